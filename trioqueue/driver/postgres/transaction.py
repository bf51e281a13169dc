"""Transactions on a `PgConnection`: the ``async with conn.transaction():`` block (BEGIN and
COMMIT, or SAVEPOINT and RELEASE when nested; see `PgConnection.transaction`), and the
shielded, bounded rollback it (and the pool, for a connection given back mid-transaction)
falls back on."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Final

import trio
from psycopg import errors, pq

if TYPE_CHECKING:
    from .connection import PgConnection

__all__ = ["TransactionBlock", "rollback_shielded"]

_IDLE: Final = pq.TransactionStatus.IDLE
_INERROR: Final = pq.TransactionStatus.INERROR


class TransactionBlock:
    """The async context manager returned by `PgConnection.transaction`."""

    __slots__ = ("_conn", "_savepoint")

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn
        self._savepoint: bytes | None = None

    async def __aenter__(self) -> PgConnection:
        conn = self._conn
        if conn._tx_depth == 0 and not conn.in_transaction:
            self._savepoint = None
            sql = "BEGIN"
        else:
            self._savepoint = f"tq_sp_{conn._tx_depth + 1}".encode()
            sql = f"SAVEPOINT tq_sp_{conn._tx_depth + 1}"
        try:
            await conn._simple(sql)
        except BaseException:
            # A cancelled BEGIN/SAVEPOINT may still have reached the server.
            if self._savepoint is None and conn.in_transaction:
                await rollback_shielded(conn, None)
            raise
        conn._tx_depth += 1
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        conn._tx_depth = max(0, conn._tx_depth - 1)
        sp = self._savepoint
        if exc_type is None:
            if sp is None and conn._pgconn.transaction_status == _INERROR and not conn.closed:
                # COMMIT would silently roll back: make the failure visible.
                await rollback_shielded(conn, None)
                raise errors.InFailedSqlTransaction(
                    "the transaction had failed (an error was caught inside the block)"
                    " and has been rolled back"
                )
            try:
                await conn._simple("COMMIT" if sp is None else f"RELEASE SAVEPOINT {sp.decode()}")
            except BaseException:
                if sp is not None or conn.in_transaction:
                    await rollback_shielded(conn, sp)
                raise
        else:
            await rollback_shielded(conn, sp)


async def rollback_shielded(conn: PgConnection, savepoint: bytes | None) -> None:
    """Roll ``conn`` back: the transaction (``None``) or to ``savepoint``; shielded and
    bounded by the connection's ``cancel_timeout``. Closes it on any failure."""
    if conn.broken:
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + conn._cancel_timeout) as cs:
        try:
            if savepoint is None:
                if conn._pgconn.transaction_status != _IDLE:
                    await conn._simple("ROLLBACK")
                conn._tx_depth = 0
            else:
                sp = savepoint.decode()
                await conn._simple(f"ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}")
        except Exception:
            conn._close_now()
            return
    if cs.cancelled_caught:
        conn._close_now()
