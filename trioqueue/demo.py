"""``trioqueue demo``: a few thousand sample jobs worked live, then a summary.

Some jobs fail once and succeed on retry, some always fail and end discarded, some snooze,
some are scheduled a little in the future. The demo's jobs carry a tag of their own, so
running it against a database with other jobs counts only its own.
"""

from __future__ import annotations

import random
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import trio

from .client import open_client
from .config import QueueConfig
from .errors import JobSnooze
from .events import EventKind
from .job import FINALIZED_STATES, InsertOpts, Job, JobListParams, JobState
from .workers import Workers

__all__ = ["run_demo"]


@attrs.frozen
class GreetArgs:
    kind: ClassVar[str] = "demo_greet"
    name: str


@attrs.frozen
class FlakyArgs:
    kind: ClassVar[str] = "demo_flaky"
    always_fail: bool


@attrs.frozen
class SnoozeArgs:
    kind: ClassVar[str] = "demo_snooze"
    seconds: float


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run_demo(database_url: str | None, total: int = 3000, max_workers: int = 200) -> int:
    """Insert ``total`` sample jobs, work them, print progress and a summary; return 0."""
    rng = random.Random(7)
    tag = f"demo-{int(time.time())}"
    latencies: list[float] = []
    workers = Workers()

    def started(job: Job[Any]) -> None:
        if job.attempt == 1:
            delay = (datetime.now(UTC) - job.scheduled_at).total_seconds()
            latencies.append(max(delay, 0.0))

    async def greet(job: Job[GreetArgs]) -> None:
        started(job)
        await trio.sleep(rng.uniform(0, 0.005))

    async def flaky(job: Job[FlakyArgs]) -> None:
        started(job)
        if job.args.always_fail or job.attempt == 1:
            raise RuntimeError(f"simulated failure on attempt {job.attempt}")

    async def snooze(job: Job[SnoozeArgs]) -> None:
        started(job)
        if not job.metadata.get("snoozes"):
            raise JobSnooze(job.args.seconds)

    workers.add(GreetArgs, greet)
    workers.add(FlakyArgs, flaky)
    workers.add(SnoozeArgs, snooze)

    def quick_retry(job: Job[Any]) -> float:
        return 0.2 * (len(job.errors) + 1)

    out = sys.stderr
    print("trioqueue demo: starting (a private PostgreSQL server if no URL is set)", file=out)
    async with open_client(
        database_url,
        workers=workers,
        queues={"demo": QueueConfig(max_workers=max_workers)},
        fetch_cooldown=0.005,
        fetch_poll_interval=0.2,
        scheduler_interval=0.5,
        retry_policy=quick_retry,
    ) as client:
        now = datetime.now(UTC)
        opts = InsertOpts(queue="demo", tags=(tag,))
        items: list[Any] = []
        counts = {
            "greet": 0,
            "retry then succeed": 0,
            "always fail": 0,
            "snooze": 0,
            "scheduled": 0,
        }
        for i in range(total):
            roll = rng.random()
            if roll < 0.08:
                items.append((FlakyArgs(False), opts))
                counts["retry then succeed"] += 1
            elif roll < 0.10:
                items.append(
                    (FlakyArgs(True), InsertOpts(queue="demo", tags=(tag,), max_attempts=2))
                )
                counts["always fail"] += 1
            elif roll < 0.15:
                items.append((SnoozeArgs(0.3), opts))
                counts["snooze"] += 1
            elif roll < 0.20:
                at = now + timedelta(seconds=rng.uniform(0.5, 2.0))
                items.append(
                    (
                        GreetArgs(f"later-{i}"),
                        InsertOpts(queue="demo", tags=(tag,), scheduled_at=at),
                    )
                )
                counts["scheduled"] += 1
            else:
                items.append((GreetArgs(f"job-{i}"), opts))
                counts["greet"] += 1
        async with client.subscribe(
            EventKind.JOB_COMPLETED, EventKind.JOB_FAILED, EventKind.JOB_CANCELLED, buffer=total * 3
        ) as events:
            start = trio.current_time()
            inserted = await client.insert_many_fast(items)
            print(
                f"inserted {inserted} jobs in {trio.current_time() - start:.3f} s: "
                + ", ".join(f"{v} {k}" for k, v in counts.items()),
                file=out,
            )
            finalized = 0
            last_print = 0.0
            tty = out.isatty()
            with trio.fail_after(120):
                async for event in events:
                    if event.job is not None and event.job.state in FINALIZED_STATES:
                        finalized += 1
                    now_t = trio.current_time()
                    if now_t - last_print >= (0.1 if tty else 1.0) or finalized == total:
                        last_print = now_t
                        rate = finalized / max(now_t - start, 1e-9)
                        line = f"worked {finalized}/{total} jobs  {rate:,.0f} jobs/s"
                        print(("\r" + line) if tty else line, end="" if tty else "\n", file=out)
                    if finalized >= total:
                        break
            elapsed = trio.current_time() - start
            if tty:
                print(file=out)
        states: dict[str, int] = {}
        after = None
        while True:
            page = await client.job_list(JobListParams(tags=[tag], limit=10_000, after=after))
            for job in page.jobs:
                states[job.state] = states.get(job.state, 0) + 1
            if page.last_cursor is None:
                break
            after = page.last_cursor
    print()
    print("trioqueue demo summary")
    print(f"  jobs worked      {total} in {elapsed:.2f} s = {total / elapsed:,.0f} jobs/s")
    print(
        f"  start latency    p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms "
        "(due time → first start; all jobs were queued at once, so this includes the wait)"
    )
    print("  final states     " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    ok = states.get(JobState.COMPLETED, 0) + states.get(JobState.DISCARDED, 0) == total
    return 0 if ok else 1
