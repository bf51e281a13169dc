"""The ``trioqueue`` command: ``migrate``, ``demo`` and ``bench``.

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

    bench = commands.add_parser(
        "bench", help="measure trioqueue's throughput and latency (no-op jobs)"
    )
    bench.add_argument("--jobs", type=_positive_int, default=20_000, help="(default 20000)")
    bench.add_argument(
        "--workers", type=_positive_int, default=1000, help="max_workers (default 1000)"
    )
    bench.add_argument("--latency-samples", type=_positive_int, default=200, help="(default 200)")
    _add_url(bench)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


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
        if args.command == "bench":
            from .bench import run_bench

            return trio.run(
                run_bench, args.database_url, args.jobs, args.workers, args.latency_samples
            )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (TrioqueueError, RuntimeError, OSError) as exc:
        print(f"trioqueue {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
