"""What a failed attempt records, whatever the job raised (docs/failure-modes.md).

A job may raise anything: an exception whose ``str()`` raises, text PostgreSQL cannot
store (NUL, lone surrogates), a message of megabytes, a ``BaseException``, an exception
group holding any of these. This module turns each into an error entry that can always be
stored, and tells the executor which of them it must treat specially:

- a *genuine* cancellation (a ``trio.Cancelled`` while the task's scope really is
  cancelled) is the runtime's own doing: the job is interrupted, not failed;
- ``KeyboardInterrupt`` and ``SystemExit`` (alone or inside a group) are recorded like any
  error and then stop the client (docs/failure-modes.md);
- everything else, a hand-made ``trio.Cancelled`` included, is an ordinary failure.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Final

import trio

from ._codec import dumps

__all__ = [
    "MAX_ERROR_MESSAGE",
    "MAX_ERROR_TRACE",
    "cancelled_for_real",
    "describe",
    "error_entry",
    "fatal_in",
    "fatal_unwrapped",
    "leaves",
    "storable_text",
]

MAX_ERROR_MESSAGE: Final = 4_000
"""Characters of an error's message kept in the job's ``errors`` (then a marker)."""
MAX_ERROR_TRACE: Final = 16_000
"""Characters of an error's traceback kept: its start and its end, with a marker between."""

_FATAL: Final = (KeyboardInterrupt, SystemExit)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions ``exc`` consists of, exception groups flattened (in order)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def _holds(
    exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    """Whether ``exc`` is one of ``types`` or an exception group holding one, at any depth."""
    if isinstance(exc, types):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(types) is not None


def fatal_in(exc: BaseException) -> BaseException | None:
    """The first ``KeyboardInterrupt`` or ``SystemExit`` in ``exc`` (itself, or a leaf of
    its group), as one safe to raise through trio, or None: the client stops after
    recording it. Not a checkpoint."""
    if isinstance(exc, _FATAL):
        return _raisable(exc)
    if isinstance(exc, BaseExceptionGroup):
        found = next((leaf for leaf in leaves(exc) if isinstance(leaf, _FATAL)), None)
        return None if found is None else _raisable(found)
    return None


def _raisable(fatal: BaseException) -> BaseException:
    """``fatal``, unless its ``repr()`` raises (``sys.exit(obj)`` with such an ``obj``, or a
    subclass's own ``__repr__``): trio calls it as the exception leaves a task, and would
    crash. Then a plain ``SystemExit`` with the same ``code`` (the interpreter exits by
    ``code``), or a plain ``KeyboardInterrupt``, stands in for it."""
    try:
        repr(fatal)
    except BaseException:
        pass
    else:
        return fatal
    stand_in: BaseException
    if isinstance(fatal, SystemExit):
        stand_in = SystemExit()
        stand_in.code = fatal.code
    else:
        stand_in = KeyboardInterrupt()
    return stand_in.with_traceback(fatal.__traceback__)


@contextmanager
def fatal_unwrapped() -> Iterator[None]:
    """Around a nursery: when what comes out of it is only ``KeyboardInterrupt`` and
    ``SystemExit`` (jobs', once their outcomes were written), and ``Cancelled``, the first
    of them is re-raised as itself, not nested in exception groups, so the process stops
    as it would without trioqueue (a ``sys.exit(3)`` exits with 3). Any other group
    passes."""
    try:
        yield
    except BaseExceptionGroup as group:
        found = leaves(group)
        fatal = [leaf for leaf in found if isinstance(leaf, _FATAL)]
        if not fatal or not all(isinstance(leaf, (*_FATAL, trio.Cancelled)) for leaf in found):
            raise
        raise fatal[0] from None


def cancelled_for_real(exc: BaseException) -> bool:
    """Whether ``exc`` holds a ``trio.Cancelled`` *and* the calling task sits in a
    cancelled scope, so trio delivered it. A job can hand-make a ``Cancelled``
    (``trio.Cancelled._create()``) and raise it with nothing cancelled: that is an error of
    the job's, not a stop. Not a checkpoint."""
    return _holds(exc, trio.Cancelled) and trio.current_effective_deadline() == -math.inf


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it in text and jsonb: NUL becomes the four
    characters ``\\x00`` and a lone surrogate its ``\\udc80`` escape; the rest is kept."""
    if text.isascii():
        return text.replace("\x00", "\\x00") if "\x00" in text else text
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _capped(text: str, limit: int, *, keep_end: bool) -> str:
    """``text`` storable and at most ``limit`` characters plus a marker saying how long it
    was: its start (and, with ``keep_end``, its end). Escaping NUL and lone surrogates can
    make text up to six times longer, so the cap applies after it; only the part kept is
    escaped, so a text of megabytes costs no more than one at the cap."""
    if len(text) <= limit:
        safe = storable_text(text)
        if len(safe) <= limit:
            return safe
    marker = f"[cut: {len(text)} characters in all]"
    if not keep_end:
        return f"{storable_text(text[:limit])[:limit]} … {marker}"
    half = limit // 2
    head = storable_text(text[:half])[:half]
    tail = storable_text(text[-half:])[-half:]
    return f"{head}\n… {marker} …\n{tail}"


def _class_name(exc: BaseException) -> str:
    return storable_text(type(exc).__name__)


def describe(exc: BaseException) -> str:
    """``"ValueError: message"`` (just the class name when the message is empty), storable
    and capped at `MAX_ERROR_MESSAGE`. Never raises: an exception whose ``str()`` raises
    is described by its ``repr()``, and one whose ``repr()`` raises too by its class name."""
    name = _class_name(exc)
    try:
        text = str(exc)
    except BaseException:
        try:
            text = repr(exc)
        except BaseException:
            text = ""
    if not isinstance(text, str):  # a str subclass whose methods misbehave is still a str
        text = ""
    return _capped(f"{name}: {text}" if text else name, MAX_ERROR_MESSAGE, keep_end=False)


def _trace(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(exc))
    except BaseException as failure:  # a broken __cause__ chain, an exotic group...
        text = f"(the traceback could not be formatted: {_class_name(failure)})"
    return _capped(text, MAX_ERROR_TRACE, keep_end=True)


def error_entry(now: datetime, attempt: int, exc: BaseException, note: str | None = None) -> str:
    """The JSON of one ``errors`` entry for ``exc``: when, which attempt, its description
    and traceback, every text storable and capped. ``note`` (trioqueue's own words, such as
    why a retry policy's answer was ignored) is added to the description."""
    message = describe(exc)
    if note:
        message = f"{message} [{storable_text(note)}]"
    return dumps(
        {"at": now.isoformat(), "attempt": attempt, "error": message, "trace": _trace(exc)}
    )
