"""COPY FROM STDIN on a `PgConnection`: `PgConnection.copy_in` and ``copy_in_data`` run
`copy_from_stdin`, and a statement that unexpectedly starts a COPY is ended with
`abort_copy_in`.

These functions drive the connection's own session, as its methods would: they take its
statement lock, wait on its socket and, on failure, close it the way it closes itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import psycopg
import trio
from psycopg import errors, generators, pq
from psycopg._copy_base import BinaryFormatter, Formatter, TextFormatter
from psycopg.abc import Buffer, PQGen
from psycopg.adapt import Transformer
from psycopg.pq.abc import PGconn, PGresult
from psycopg.waiting import Wait

from .adapters import ADAPTERS
from .waiting import wait_gen

if TYPE_CHECKING:
    from .connection import PgConnection

__all__ = ["abort_copy_in", "copy_from_stdin"]

_ENCODING: Final = "utf-8"
_BINARY: Final = pq.Format.BINARY
_TEXT: Final = pq.Format.TEXT
_WAIT_W: Final = Wait.W

_FATAL_ERROR: Final = pq.ExecStatus.FATAL_ERROR
_COPY_IN: Final = pq.ExecStatus.COPY_IN
_COPY_OUT: Final = pq.ExecStatus.COPY_OUT
_COPY_BOTH: Final = pq.ExecStatus.COPY_BOTH

# libpq can loop forever on a single huge put_copy_data (psycopg #255): feed it in chunks.
_COPY_CHUNK: Final = 128 * 1024


async def copy_from_stdin(
    conn: PgConnection,
    query: str,
    rows: Iterable[Any],
    *,
    types: Sequence[int | str] | None = None,
    raw: bool = False,
) -> int:
    """`PgConnection.copy_in` (``raw``: `PgConnection.copy_in_data`, ``rows`` being the
    chunks of data to send as they are)."""
    conn._wake_notify_waiter()
    async with conn._lock:
        pgconn = conn._usable()
        try:
            pgconn.send_query(query.encode(_ENCODING))
        except psycopg.OperationalError:
            raise conn._broke("sending the query failed") from None
        results: list[PGresult] = await conn._run(generators.execute(pgconn))
        res = results[0]
        if res.status == _FATAL_ERROR:
            raise errors.error_from_result(res, encoding=_ENCODING)
        if res.status != _COPY_IN:
            if res.status == _COPY_OUT or res.status == _COPY_BOTH:
                conn._close_now()
            raise psycopg.ProgrammingError(
                "copy_in() needs a COPY ... FROM STDIN statement,"
                f" got {pq.ExecStatus(res.status).name}"
            )

        try:
            if raw:
                for buf in rows:
                    await _send(conn, buf)
            else:
                formatter = _formatter(res.binary_tuples == 1, types)
                for row in rows:
                    buf = formatter.write_row(row)
                    if buf:
                        await _send(conn, buf)
                buf = formatter.end()
                if buf:
                    await _send(conn, buf)
        except BaseException as ex:
            if isinstance(ex, trio.ClosedResourceError):
                raise conn._broke("the connection was closed") from ex
            await abort_copy_in(conn, f"copy_in() aborted: {type(ex).__name__}".encode())
            raise

        results = await conn._run(_copy_end_gen(pgconn, None))
        for res in results:
            if res.status == _FATAL_ERROR:
                raise errors.error_from_result(res, encoding=_ENCODING)
        return results[0].command_tuples or 0


async def abort_copy_in(conn: PgConnection, message: bytes) -> None:
    """Abort a COPY FROM STDIN in progress (shielded, bounded by the connection's
    ``cancel_timeout``); close the connection on failure."""
    if conn.broken:
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + conn._cancel_timeout) as cs:
        try:
            await wait_gen(_copy_end_gen(conn._pgconn, message), conn._fd)
        except Exception:
            conn._close_now()
            return
    if cs.cancelled_caught:
        conn._close_now()


def _formatter(binary: bool, types: Sequence[int | str] | None) -> Formatter:
    # A fresh Transformer: set_dumper_types() pins dumpers that must not leak into the
    # connection's shared one.
    tx = Transformer(ADAPTERS)
    if types is not None:
        registry = ADAPTERS.types
        oids = [t if isinstance(t, int) else registry.get_oid(t) for t in types]
        tx.set_dumper_types(oids, _BINARY if binary else _TEXT)
    elif binary:
        raise psycopg.ProgrammingError("binary COPY needs types=[...] (the column types)")
    return BinaryFormatter(tx) if binary else TextFormatter(tx)


async def _send(conn: PgConnection, buf: Buffer) -> None:
    pgconn, fd = conn._pgconn, conn._fd
    if len(buf) <= _COPY_CHUNK:
        await wait_gen(generators.copy_to(pgconn, buf), fd)
        return
    view = memoryview(buf)
    for i in range(0, len(view), _COPY_CHUNK):
        await wait_gen(generators.copy_to(pgconn, view[i : i + _COPY_CHUNK]), fd)


def _copy_end_gen(pgconn: PGconn, error: bytes | None) -> PQGen[list[PGresult]]:
    """End (or abort, with ``error``) a COPY FROM STDIN and return the final results.

    Unlike ``psycopg.generators.copy_end`` it returns error results instead of raising, so the
    caller can tell a server error (connection fine) from an I/O error (connection broken).
    """
    while pgconn.put_copy_end(error) == 0:
        while not (yield _WAIT_W):
            pass
    while pgconn.flush() != 0:
        while not (yield _WAIT_W):
            pass
    results: list[PGresult] = yield from generators.fetch_many(pgconn)
    return results
