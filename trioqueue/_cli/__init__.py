"""The ``trioqueue`` command, on click: one module per command group.

Import this package only when click is installed; ``trioqueue/cli.py`` checks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from .. import __version__
from .common import INTERRUPTED, OutputClosed, output_closed, silence_stdout
from .dashboard import dashboard
from .jobs import jobs
from .migrate import migrate
from .queues import queues
from .tools import bench, demo
from .worker import worker
from .workflows import workflows

__all__ = ["cli", "run"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trioqueue")
def cli() -> None:
    """trioqueue: a durable PostgreSQL job queue for trio.

    Every command takes --database-url (default: $TRIOQUEUE_DATABASE_URL). Without either,
    migrate, demo and bench start a private PostgreSQL server; worker, jobs, queues,
    workflows and dashboard need a database.

    Exit codes: 0 success (also when the reader of the output goes away, as with
    `| head`), 1 runtime error (database, schema, job not found, ...), 2 usage error,
    130 interrupted.
    """


for _command in (migrate, worker, jobs, queues, workflows, dashboard, demo, bench):
    cli.add_command(_command)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    A closed output pipe (``trioqueue jobs list | head -1``) ends the command quietly with
    0: the reader has what it wanted. stdout then points at the null device, so that the
    interpreter's last flush cannot fail again.
    """
    try:
        try:
            code = _run(argv)
            sys.stdout.flush()  # a closed pipe shows here, not in the exit-time flush
        except BrokenPipeError:
            if not output_closed():
                raise
            raise OutputClosed from None
        except SystemExit:
            # click's own output (--help, --version) on a closed pipe: click exits 1.
            if not output_closed():
                raise
            raise OutputClosed from None
    except OutputClosed:
        silence_stdout()
        return 0
    return code


def _run(argv: Sequence[str] | None) -> int:
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
        # Ctrl-C outside trio (while a worker module is imported, say).
        click.echo("interrupted", err=True)
        return INTERRUPTED
    return result if isinstance(result, int) else 0
