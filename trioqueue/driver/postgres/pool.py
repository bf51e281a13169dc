"""A bounded pool of `PgConnection` for trio."""

from __future__ import annotations

import select
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import attrs
import psycopg
import trio
from psycopg import pq
from psycopg.rows import RowMaker

from trioqueue.driver.postgres.connection import DEFAULT_CANCEL_TIMEOUT, PgConnection, QueryResult
from trioqueue.driver.postgres.transaction import rollback_shielded
from trioqueue.driver.postgres.waiting import acquire_without_yielding

__all__ = ["PgPool", "PoolStatistics", "open_pool"]

RowT = TypeVar("RowT")

_CONN_BAD: Final = pq.ConnStatus.BAD


@attrs.frozen
class PoolStatistics:
    size: int
    """Open connections (idle + in use)."""
    idle: int
    in_use: int
    waiting: int
    """Tasks waiting for a connection."""


class PgPool:
    """A bounded pool of connections, created lazily up to ``max_size``.

    Tasks beyond ``max_size`` wait in FIFO order. Each acquired connection belongs to one task
    until released, so transactions on it are safe.

    On release:

    * a broken connection is discarded (a new one is made on a later acquire);
    * a connection still in a transaction (a bug in the caller) is rolled back, shielded and
      bounded by ``cancel_timeout``, or discarded if that fails;
    * a connection that LISTENs is reset with ``UNLISTEN *``.

    On acquire, an idle connection whose socket shows it was terminated (e.g. by
    ``pg_terminate_backend`` or a server restart) is discarded and replaced.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._conninfo = conninfo
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._cancel_timeout = cancel_timeout
        self._slots = trio.Semaphore(max_size)
        self._idle: list[PgConnection] = []
        self._in_use = 0
        self._closed = False

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> PoolStatistics:
        idle = len(self._idle)
        return PoolStatistics(
            size=idle + self._in_use,
            idle=idle,
            in_use=self._in_use,
            waiting=self._slots.statistics().tasks_waiting,
        )

    def acquire(self) -> _Acquire:
        """``async with pool.acquire() as conn:`` borrows a connection for the block.

        Raises ``trio.ClosedResourceError`` once the pool is closed, and
        ``psycopg.OperationalError`` if a new connection can't be made.
        """
        return _Acquire(self)

    async def _get(self) -> PgConnection:
        if self._closed:
            raise trio.ClosedResourceError("the pool is closed")
        await acquire_without_yielding(self._slots)
        try:
            if self._closed:
                raise trio.ClosedResourceError("the pool is closed")
            idle = self._idle
            while idle:
                conn = idle.pop()
                if _check_idle(conn):
                    self._in_use += 1
                    return conn
                conn._close_now()
            conn = await PgConnection.connect(
                self._conninfo,
                connect_timeout=self._connect_timeout,
                cancel_timeout=self._cancel_timeout,
            )
            self._in_use += 1
            return conn
        except BaseException:
            self._slots.release()
            raise

    async def _put(self, conn: PgConnection) -> None:
        try:
            if not conn.broken:
                if conn.in_transaction:
                    await rollback_shielded(conn, None)
                if conn._listening and not conn.broken:
                    with trio.CancelScope(shield=True) as cs:
                        cs.deadline = trio.current_time() + self._cancel_timeout
                        try:
                            await conn.unlisten_all()
                        except Exception:
                            conn._close_now()
                    if cs.cancelled_caught:
                        conn._close_now()
            if self._closed or conn.broken:
                conn._close_now()
            else:
                self._idle.append(conn)
        finally:
            self._in_use -= 1
            self._slots.release()

    async def execute(self, query: str, params: Sequence[Any] | None = None) -> QueryResult:
        async with self.acquire() as conn:
            return await conn.execute(query, params)

    @overload
    async def fetch(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> list[tuple[Any, ...]]: ...

    @overload
    async def fetch(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        prepare: bool = False,
        make_row: RowMaker[RowT],
    ) -> list[RowT]: ...

    async def fetch(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        prepare: bool = False,
        make_row: RowMaker[Any] = tuple,
    ) -> list[Any]:
        """`PgConnection.fetch` on a connection borrowed for the statement."""
        async with self.acquire() as conn:
            return await conn.fetch(query, params, prepare=prepare, make_row=make_row)

    @overload
    async def fetchrow(
        self, query: str, params: Sequence[Any] | None = None
    ) -> tuple[Any, ...] | None: ...

    @overload
    async def fetchrow(
        self, query: str, params: Sequence[Any] | None = None, *, make_row: RowMaker[RowT]
    ) -> RowT | None: ...

    async def fetchrow(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        make_row: RowMaker[Any] = tuple,
    ) -> Any:
        """`PgConnection.fetchrow` on a connection borrowed for the statement."""
        async with self.acquire() as conn:
            return await conn.fetchrow(query, params, make_row=make_row)

    async def fetchval(self, query: str, params: Sequence[Any] | None = None) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, params)

    async def aclose(self) -> None:
        """Close idle connections; connections in use are closed when released.

        Later (and waiting) acquires raise ``trio.ClosedResourceError``. Idempotent; a
        checkpoint.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn._close_now()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> PgPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


def _check_idle(conn: PgConnection) -> bool:
    """Cheap liveness check for an idle connection: False if it is (now) broken.

    An idle session normally sends nothing; if the socket is readable, read what is there
    (a termination notice, EOF, or buffered notifications).
    """
    if conn.broken:
        return False
    poller = conn._poller
    if poller is None:
        poller = conn._poller = select.poll()
        poller.register(conn._fd, select.POLLIN)
    pgconn = conn._pgconn
    # A terminated backend sends an error message, then EOF: the first read gets the
    # message, a second one sees EOF. Bounded, in case notifications keep arriving.
    for _ in range(4):
        if not poller.poll(0):
            break
        try:
            pgconn.consume_input()
            pgconn.is_busy()  # parse what was read
        except psycopg.OperationalError:
            conn._close_now()
            return False
        if pgconn.status == _CONN_BAD:
            conn._close_now()
            return False
        conn._collect_notifies()
    return True


class _Acquire:
    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: PgPool) -> None:
        self._pool = pool
        self._conn: PgConnection | None = None

    async def __aenter__(self) -> PgConnection:
        self._conn = conn = await self._pool._get()
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool._put(conn)


@asynccontextmanager
async def open_pool(
    conninfo: str,
    *,
    max_size: int = 10,
    connect_timeout: float = 10.0,
    cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT,
) -> AsyncIterator[PgPool]:
    """``async with open_pool(url) as pool:`` — a `PgPool` closed when the block exits."""
    pool = PgPool(
        conninfo,
        max_size=max_size,
        connect_timeout=connect_timeout,
        cancel_timeout=cancel_timeout,
    )
    try:
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()
