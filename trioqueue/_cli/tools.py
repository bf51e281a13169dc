"""``trioqueue demo`` and ``trioqueue bench``: see trioqueue/demo.py and trioqueue/bench.py."""

from __future__ import annotations

from functools import partial

import click

from .common import database_url_option, run_trio

__all__ = ["bench", "demo"]

_POSITIVE = click.IntRange(min=1)


@click.command()
@click.option("--jobs", type=_POSITIVE, default=3000, show_default=True, help="How many jobs.")
@click.option(
    "--workers", type=_POSITIVE, default=200, show_default=True, help="max_workers of the queue."
)
@database_url_option(embedded=True)
def demo(jobs: int, workers: int, database_url: str | None) -> int:
    """Insert and work sample jobs live, then print a summary.

    A few thousand jobs by default.
    Some jobs fail and retry, some snooze, some are scheduled. The demo's jobs carry a tag
    of their own, so other jobs in the database are left out of its counts. The log lines
    of the failures it makes on purpose are counted in the summary, not printed.
    """
    from ..demo import run_demo

    return run_trio(partial(run_demo, manage_logging=True), database_url, jobs, workers)


@click.command()
@click.option("--jobs", type=_POSITIVE, default=20_000, show_default=True, help="How many jobs.")
@click.option(
    "--workers", type=_POSITIVE, default=1000, show_default=True, help="max_workers of the queue."
)
@click.option(
    "--latency-samples",
    type=_POSITIVE,
    default=200,
    show_default=True,
    help="Idle latency samples: jobs inserted one at a time into an idle queue.",
)
@database_url_option(embedded=True)
def bench(jobs: int, workers: int, latency_samples: int, database_url: str | None) -> int:
    """Measure trioqueue's throughput and latency with no-op jobs.

    Progress goes to stderr, the summary table to stdout.
    """
    from ..bench import run_bench

    return run_trio(run_bench, database_url, jobs, workers, latency_samples)
