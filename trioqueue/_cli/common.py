"""What every command shares: the database option, running trio, errors and output.

Errors: a usage error (bad option, missing argument, no database URL where one is required)
is click's :class:`click.UsageError`, exit code 2. A runtime error (database unreachable,
schema not migrated, job not found, ...) is :class:`CliError`, shown as one line
``trioqueue COMMAND: error: MESSAGE`` on stderr, exit code 1. No tracebacks for either.

Output: when the reader of stdout (or stderr) goes away, as ``trioqueue jobs list | head -1``
does, the command ends quietly with exit code 0 (:class:`OutputClosed`, see ``run``).
"""

from __future__ import annotations

import json
import os
import select
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import IO, Any, TypeVarTuple, Unpack

import attrs
import click
import trio

from .._failure import leaves
from .._urls import DATABASE_URL_ENV, resolve_database_url
from ..embedded import EmbeddedServerError
from ..errors import TrioqueueError, ValidationError
from ..job import INT64_MAX, parse_bigint

__all__ = [
    "INTERRUPTED",
    "CliError",
    "OutputClosed",
    "JobIdType",
    "database_url_option",
    "dump_json",
    "format_time",
    "print_table",
    "require_database_url",
    "run_trio",
    "to_json",
]

Ts = TypeVarTuple("Ts")

INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


class CliError(click.ClickException):
    """A runtime error: one line on stderr naming the command, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ctx = click.get_current_context(silent=True)
        self.command_path = ctx.command_path if ctx is not None else "trioqueue"

    def format_message(self) -> str:
        """The message on one line (database errors can span several)."""
        return " ".join(part.strip() for part in self.message.splitlines() if part.strip())

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(
            f"{self.command_path}: error: {self.format_message()}", err=file is None, file=file
        )


class OutputClosed(Exception):
    """Writing stdout or stderr failed because the pipe's reader has gone: not an error of
    the command, which ends quietly (see ``trioqueue._cli.run``)."""


class JobIdType(click.ParamType[int]):
    """A job id or cursor on the command line: ASCII digits from ``minimum`` to the largest
    bigint (no sign, no ``²`` or fullwidth digits, no ``1_000``); else a usage error, exit 2."""

    name = "integer"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value)  # click passes defaults through here too, as ints
        try:
            number = parse_bigint("id", text)
        except ValidationError:
            number = None
        if number is None or number < self.minimum:
            self.fail(
                f"{text!r} is not a whole number from {self.minimum} to {INT64_MAX}", param, ctx
            )
        return number


def output_closed() -> bool:
    """Whether stdout or stderr is a pipe (or socket) whose reader has gone.

    A write there fails with BrokenPipeError; this tells that failure apart from a broken
    pipe anywhere else (which stays an error). Where ``poll`` is missing (Windows), it
    cannot tell, and says no: the broken pipe is then reported as an error.
    """
    if not hasattr(select, "poll"):
        return False
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            fd = stream.fileno() if stream is not None else -1
        except (OSError, ValueError):
            continue
        if fd < 0:
            continue
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            return True
    return False


def silence_stdout() -> None:
    """Point stdout's file descriptor at the null device, so that the interpreter's final
    flush of whatever is still buffered does not fail again (Python's docs, "Note on
    SIGPIPE")."""
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else -1
    except (OSError, ValueError):
        return
    if fd >= 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


_USER_ERRORS = (CliError, TrioqueueError, OSError, EmbeddedServerError)
"""Failures a user can fix (the database, the schema, the input): shown without a traceback."""


def database_url_option(*, embedded: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--database-url`` option. ``embedded``: without a URL the command starts a
    private PostgreSQL server; otherwise a URL is required (see require_database_url)."""
    fallback = (
        "else a private PostgreSQL server started for this command"
        if embedded
        else "one of the two is required"
    )
    return click.option(
        "--database-url",
        metavar="URL",
        default=None,
        help=f"PostgreSQL URL (default: ${DATABASE_URL_ENV}; {fallback}).",
    )


def require_database_url(url: str | None) -> str:
    """``url``, else ``$TRIOQUEUE_DATABASE_URL``; a usage error when neither is set."""
    resolved = resolve_database_url(url)
    if resolved is None:
        raise click.UsageError(
            f"no database: pass --database-url URL or set ${DATABASE_URL_ENV} "
            "(this command works on an existing database and never starts a private server)"
        )
    return resolved


def _user_errors(exc: BaseException) -> list[BaseException] | None:
    """The user errors ``exc`` consists of (it may be an exception group from a nursery),
    or None if any part of it is something else: a bug, which keeps its traceback."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for inner in exc.exceptions:
            errors = _user_errors(inner)
            if errors is None:
                return None
            found.extend(errors)
        return found
    return [exc] if isinstance(exc, _USER_ERRORS) else None


def _say_interrupted() -> None:
    click.echo("interrupted", err=True)


def run_trio(
    fn: Callable[[Unpack[Ts]], Awaitable[int | None]],
    *args: *Ts,
    interrupted: Callable[[], None] = _say_interrupted,
) -> int:
    """``trio.run(fn, *args)``; returns its exit code (None counts as 0), 130 after Ctrl-C
    (a KeyboardInterrupt alone or anywhere in an exception group, as a nursery leaves it),
    once ``interrupted()`` has said so (by default the line ``interrupted`` on stderr).

    Raises OutputClosed when a BrokenPipeError came from stdout or stderr losing its
    reader; CliError for user errors (see ``_USER_ERRORS``), with one line per distinct
    message.
    """
    try:
        result = trio.run(fn, *args)
    except BaseException as exc:
        found = leaves(exc)
        if any(isinstance(e, KeyboardInterrupt) for e in found):
            interrupted()
            return INTERRUPTED
        if any(isinstance(e, BrokenPipeError) for e in found) and output_closed():
            raise OutputClosed from None
        errors = _user_errors(exc)
        if errors is None:
            raise
        messages = dict.fromkeys(str(e) or type(e).__name__ for e in errors)
        raise CliError("; ".join(messages)) from None
    return result or 0


def format_time(value: datetime | None) -> str:
    """ISO 8601 to the second, or ``-`` for no time."""
    return "-" if value is None else value.isoformat(timespec="seconds")


def _json_value(_inst: Any, _field: Any, value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def to_json(value: Any) -> Any:
    """An attrs instance as JSON-ready data: datetimes as ISO 8601 strings."""
    return attrs.asdict(value, value_serializer=_json_value)


def dump_json(document: Any) -> None:
    """Print one JSON document on stdout."""

    def fallback(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if attrs.has(type(value)):
            return to_json(value)
        return repr(value)

    click.echo(json.dumps(document, indent=2, default=fallback))


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = ()
) -> None:
    """Print aligned columns on stdout: a header line, then one line per row. Columns
    whose index is in ``right`` (numbers) are right-aligned."""
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    right = set(right)
    for line in cells:
        parts = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        click.echo("  ".join(parts).rstrip())
