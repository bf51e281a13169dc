"""How a connection waits, in trio: for its socket, and for its turn.

psycopg's generators (``psycopg.generators``) yield "wait until readable/writable"
requests instead of doing I/O; the functions here answer them with
``trio.lowlevel.wait_readable``/``wait_writable``, so every step runs in the trio task
that awaits it. The locks here let a statement take a free pool slot or connection
without a trip through the scheduler.
"""

from __future__ import annotations

from typing import Final, TypeVar

import trio
from psycopg import capabilities, generators
from psycopg.abc import PQGen, PQGenConn
from psycopg.pq.abc import PGconn
from psycopg.waiting import Ready, Wait

__all__ = ["StatementLock", "acquire_without_yielding", "send_cancel", "wait_conn", "wait_gen"]

RV = TypeVar("RV")

_WAIT_R: Final = Wait.R
_WAIT_W: Final = Wait.W
_READY_R: Final = Ready.R
_READY_W: Final = Ready.W
_READY_RW: Final = Ready.RW

# Non-blocking cancel (PQcancelStart/PQcancelPoll) needs libpq >= 17; the binary wheel has 18.
_HAS_CANCEL_CONN: Final = capabilities.has_cancel_safe()


async def _wait_rw(fd: int) -> Ready:
    # Only needed while a large send can't be flushed at once. Waiting for writability alone
    # could deadlock if the server is blocked writing to us, so wake up now and then and let
    # the generator consume input (harmless when there is none) before trying again.
    with trio.move_on_after(0.05):
        await trio.lowlevel.wait_writable(fd)
        return _READY_RW
    return _READY_R


async def wait_gen(gen: PQGen[RV], fd: int) -> RV:
    """Drive a psycopg generator to completion on socket ``fd`` (no error handling)."""
    try:
        s = next(gen)
        while True:
            if s == _WAIT_R:
                await trio.lowlevel.wait_readable(fd)
                s = gen.send(_READY_R)
            elif s == _WAIT_W:
                await trio.lowlevel.wait_writable(fd)
                s = gen.send(_READY_W)
            else:
                s = gen.send(await _wait_rw(fd))
    except StopIteration as ex:
        rv: RV = ex.value
        return rv


async def wait_conn(gen: PQGenConn[RV]) -> RV:
    """Drive a generator that yields ``(fd, Wait)`` pairs (connect, cancel)."""
    try:
        fd, s = next(gen)
        while True:
            if s == _WAIT_R:
                await trio.lowlevel.wait_readable(fd)
                ready = _READY_R
            elif s == _WAIT_W:
                await trio.lowlevel.wait_writable(fd)
                ready = _READY_W
            else:
                ready = await _wait_rw(fd)
            fd, s = gen.send(ready)
    except StopIteration as ex:
        rv: RV = ex.value
        return rv


async def send_cancel(pgconn: PGconn) -> None:
    """Ask the server to cancel the statement running on ``pgconn``'s session (over a
    connection of its own), without blocking trio."""
    if _HAS_CANCEL_CONN:
        cancel_conn = pgconn.cancel_conn()
        cancel_conn.start()
        try:
            await wait_conn(generators.cancel(cancel_conn))
        finally:
            cancel_conn.finish()
    else:  # pragma: no cover - libpq < 17 only
        cancel = pgconn.get_cancel()
        await trio.to_thread.run_sync(cancel.cancel, abandon_on_cancel=True)


async def acquire_without_yielding(primitive: trio.Lock | trio.Semaphore) -> None:
    """Acquire ``primitive``, taking it at once if it is free, without a trip through the
    scheduler; when it is not, wait for it as ``acquire`` does (fairly: trio hands it to
    the longest waiter). A cancellation point either way.

    For what every statement passes through (a pool slot, the connection lock): the
    statement's own I/O wait is a scheduling point anyway, and each extra yield cost a
    single insert another pass through trio's run loop."""
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        primitive.acquire_nowait()
    except trio.WouldBlock:
        await primitive.acquire()


class StatementLock:
    """A ``trio.Lock`` whose ``async with`` uses `acquire_without_yielding`."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        await acquire_without_yielding(self._lock)

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    def statistics(self) -> trio.LockStatistics:
        return self._lock.statistics()
