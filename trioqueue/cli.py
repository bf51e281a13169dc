"""The ``trioqueue`` command: ``migrate`` and ``demo``.

Every command takes ``--database-url`` (else ``$TRIOQUEUE_DATABASE_URL``, else a private
PostgreSQL server). User errors print one line and exit 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from .errors import TrioqueueError

__all__ = ["main"]


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=None,
        help="PostgreSQL URL (default: $TRIOQUEUE_DATABASE_URL, else a private server)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioqueue", description="A durable PostgreSQL job queue for trio."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser("migrate", help="apply, revert or list schema migrations")
    migrate.add_argument(
        "action", nargs="?", default="up", choices=["up", "down", "list"], help="(default: up)"
    )
    migrate.add_argument(
        "--target-version",
        type=int,
        default=None,
        help="up: stop at this version; down: revert down to it (0 = everything)",
    )
    _add_url(migrate)

    demo = commands.add_parser("demo", help="insert and work a few thousand sample jobs")
    demo.add_argument("--jobs", type=int, default=3000, help="how many jobs (default 3000)")
    demo.add_argument("--workers", type=int, default=200, help="max_workers (default 200)")
    _add_url(demo)
    return parser


async def _migrate(args: argparse.Namespace) -> int:
    from .migrations import migrate, migration_list

    if args.action == "list":
        for status in await migration_list(args.database_url):
            mark = "applied" if status.applied else "pending"
            print(f"{status.version:03d} {status.name:<24} {mark}")
        return 0
    done = await migrate(
        args.database_url, direction=args.action, target_version=args.target_version
    )
    verb = "applied" if args.action == "up" else "reverted"
    if done:
        print(f"{verb} migration(s): {', '.join(f'{v:03d}' for v in done)}")
    else:
        print("nothing to do: the schema is " + ("up to date" if args.action == "up" else "empty"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trioqueue`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "migrate":
            return trio.run(_migrate, args)
        if args.command == "demo":
            from .demo import run_demo

            return trio.run(run_demo, args.database_url, args.jobs, args.workers)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TrioqueueError, RuntimeError, OSError) as exc:
        print(f"trioqueue {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
