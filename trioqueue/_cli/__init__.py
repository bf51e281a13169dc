"""The ``trioqueue`` command, on click: one module per command group.

Import this package only when click is installed; ``trioqueue/cli.py`` checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from .. import __version__
from .dashboard import dashboard
from .jobs import jobs
from .migrate import migrate
from .queues import queues
from .tools import bench, demo
from .worker import worker

__all__ = ["cli", "run"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trioqueue")
def cli() -> None:
    """trioqueue: a durable PostgreSQL job queue for trio.

    Every command takes --database-url (default: $TRIOQUEUE_DATABASE_URL). Without either,
    migrate, demo and bench start a private PostgreSQL server; worker, jobs, queues and
    dashboard need a database.

    Exit codes: 0 success, 1 runtime error (database, schema, job not found, ...),
    2 usage error, 130 interrupted.
    """


for _command in (migrate, worker, jobs, queues, dashboard, demo, bench):
    cli.add_command(_command)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="trioqueue",
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 1
    return result if isinstance(result, int) else 0
