"""How the driver reports a failure: as a ``DatabaseError`` naming what it was doing, and
saying whether the values sent were at fault and whether a later try may succeed."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from ...errors import DatabaseError
from .pooler import pooler_error
from .transient import is_transient

__all__ = ["FAILURES", "database_error", "wrapped"]

_ENCODING_ERRORS = (UnicodeEncodeError, OverflowError, struct.error)
"""What encoding a value for the server raises when the value cannot be sent at all (a lone
surrogate in text, a number too big for its column's type)."""
FAILURES = (psycopg.Error, *_ENCODING_ERRORS)


def database_error(doing: str, exc: BaseException) -> DatabaseError:
    """``exc`` (one of `FAILURES`) as a DatabaseError. It is ``rejected_data`` when the
    values sent were at fault — a data exception or constraint (SQLSTATE classes 22 and
    23; psycopg raises DataError for a NUL in text before sending), a program limit
    (class 54: too big), or a value that could not be encoded — so that the caller does
    not send them again as they are. It is ``transient`` when a later try may get past
    it (`is_transient`: a lost or refused connection, a server restarting, ...). One of our
    prepared statements lost to a pooler says so, and what to do (`pooler_error`)."""
    if isinstance(exc, psycopg.Error):
        pooler = pooler_error(exc)
        if pooler is not None:
            return DatabaseError(doing, pooler)
        rejected = isinstance(exc, psycopg.DataError | psycopg.IntegrityError) or (
            exc.sqlstate or ""
        ).startswith("54")
    else:
        rejected = True
    return DatabaseError(doing, exc, rejected_data=rejected, transient=is_transient(exc))


@contextmanager
def wrapped(doing: str) -> Iterator[None]:
    """Raise the `FAILURES` of the block as `database_error` says (``doing``: what failed)."""
    try:
        yield
    except FAILURES as exc:
        raise database_error(doing, exc) from exc
