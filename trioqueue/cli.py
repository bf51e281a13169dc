"""The ``trioqueue`` console script: ``migrate``, ``worker``, ``jobs``, ``queues``,
``workflows``, ``dashboard``, ``demo`` and ``bench`` (see docs/cli.md).

The commands are built on click, from the ``cli`` extra; they live in ``trioqueue/_cli/``.
Without click the command prints how to install it and exits 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trioqueue`` console script; returns the exit code."""
    try:
        import click  # noqa: F401
    except ImportError:
        print(
            "trioqueue: the command line needs click: pip install 'trioqueue[cli]'",
            file=sys.stderr,
        )
        return 1
    from ._cli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
