"""Tests for the PostgreSQL connection pool (trioqueue.driver.postgres.pool)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
import trio
import trio.testing

from trioqueue.driver.postgres import PgConnection, PgPool, open_pool
from trioqueue.driver.postgres.pool import PoolStatistics

_URL: str | None = None


@pytest.fixture(autouse=True)
def _test_database(database_url: str) -> None:
    """Every test here talks to the test session's server, in a database of its own."""
    global _URL
    _URL = database_url


def _url() -> str:
    assert _URL is not None, "the _test_database fixture sets this"
    return _URL


TERMINATE_AND_WAIT = "SELECT pg_terminate_backend($1::int, 10000)"
"""Terminates a backend and waits (up to 10 s) until its process has exited."""


@pytest.fixture
async def observer() -> AsyncIterator[PgConnection]:
    c = await PgConnection.connect(_url())
    try:
        yield c
    finally:
        await c.aclose()


async def test_lazy_and_reuse() -> None:
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=3) as pool:
            assert pool.statistics() == PoolStatistics(size=0, idle=0, in_use=0, waiting=0)
            async with pool.acquire() as conn:
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                assert pool.statistics() == PoolStatistics(size=1, idle=0, in_use=1, waiting=0)
            assert pool.statistics() == PoolStatistics(size=1, idle=1, in_use=0, waiting=0)
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid


async def test_convenience_methods() -> None:
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=2) as pool:
            assert await pool.fetchval("SELECT $1::int + 1", [1]) == 2
            assert await pool.fetchrow("SELECT 1, 'a'") == (1, "a")
            assert await pool.fetch("SELECT g FROM generate_series(1, 3) g") == [(1,), (2,), (3,)]
            res = await pool.execute("SELECT 1")
            assert (res.rowcount, res.status) == (1, "SELECT 1")
            assert pool.statistics().in_use == 0


async def test_bounded_and_fifo() -> None:
    holding = 0
    max_holding = 0
    order: list[int] = []
    waiting_seen = 0
    release = [trio.Event() for _ in range(6)]
    got_send, got = trio.open_memory_channel[int](6)

    async with open_pool(_url(), max_size=2) as pool:
        # Both connections made up front: taking an idle one needs no I/O, so the order of
        # getting a connection is the order of getting a slot.
        async with pool.acquire(), pool.acquire():
            pass

        async def worker(i: int) -> None:
            nonlocal holding, max_holding, waiting_seen
            async with pool.acquire() as conn:
                order.append(i)
                got_send.send_nowait(i)
                holding += 1
                max_holding = max(max_holding, holding)
                waiting_seen = max(waiting_seen, pool.statistics().waiting)
                await conn.execute("SELECT 1")
                await release[i].wait()
                holding -= 1

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(worker, i)
                    # Worker i holds a slot or waits for one: its place in line is fixed.
                    await trio.testing.wait_all_tasks_blocked()
                assert [got.receive_nowait() for _ in range(2)] == [0, 1]
                assert pool.statistics().waiting == 4
                # One slot given back at a time (the next only once a waiter has taken
                # it): each goes to the longest waiter.
                for i, event in enumerate(release):
                    event.set()
                    if i + 2 < len(release):
                        await got.receive()
        stats = pool.statistics()

    assert max_holding == 2
    assert waiting_seen >= 1
    assert order == list(range(6))
    assert stats == PoolStatistics(size=2, idle=2, in_use=0, waiting=0)


async def test_cancel_while_waiting_does_not_leak_a_slot() -> None:
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=1) as pool:
            async with pool.acquire():
                with trio.move_on_after(0.1) as cs:
                    async with pool.acquire():
                        pytest.fail("acquired beyond max_size")
                assert cs.cancelled_caught
            assert pool.statistics() == PoolStatistics(size=1, idle=1, in_use=0, waiting=0)
            assert await pool.fetchval("SELECT 1") == 1


async def test_idle_connection_killed_is_replaced(observer: PgConnection) -> None:
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=1) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            # With a timeout, pg_terminate_backend returns once the backend has exited:
            # its socket is closed, so the idle connection can tell it was terminated.
            assert await observer.fetchval(TERMINATE_AND_WAIT, [pid]) is True
            new_pid = await pool.fetchval("SELECT pg_backend_pid()")
            assert new_pid != pid
            assert pool.statistics().size == 1


async def test_connection_broken_in_use_is_discarded(observer: PgConnection) -> None:
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=1) as pool:
            with pytest.raises(psycopg.OperationalError):
                async with pool.acquire() as conn:
                    pid = conn.backend_pid
                    await observer.execute("SELECT pg_terminate_backend($1::int)", [pid])
                    await conn.execute("SELECT 1")
                    await conn.execute("SELECT 1")
            assert conn.broken
            assert pool.statistics() == PoolStatistics(size=0, idle=0, in_use=0, waiting=0)
            async with pool.acquire() as conn2:
                assert conn2 is not conn
                assert await conn2.fetchval("SELECT pg_backend_pid()") != pid


async def test_released_in_transaction_is_rolled_back(observer: PgConnection) -> None:
    table = f"tq_test_pool_{uuid.uuid4().hex[:8]}"
    await observer.execute(f"CREATE TABLE {table} (x int)")
    try:
        with trio.fail_after(10):
            async with open_pool(_url(), max_size=1) as pool:
                async with pool.acquire() as conn:
                    await conn.execute("BEGIN")
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    assert conn.in_transaction
                async with pool.acquire() as conn2:
                    assert conn2 is conn
                    assert not conn2.in_transaction
                    assert await conn2.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        await observer.execute(f"DROP TABLE {table}")


async def test_release_resets_listen(observer: PgConnection) -> None:
    channel = f"public.tq_pool.{uuid.uuid4().hex[:8]}"
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=1) as pool:
            async with pool.acquire() as conn:
                await conn.listen(channel)
            async with pool.acquire() as conn2:
                assert conn2 is conn
                assert conn2.listening == frozenset()
                # The observer listens too: once its own notification reaches it, one
                # sent to conn2's session would have been sent as well, at the latest
                # before its next query's reply.
                await observer.listen(channel)
                await observer.notify(channel, "x")
                assert [n.payload for n in await observer.wait_notifies()] == ["x"]
                await conn2.fetchval("SELECT 1")
                assert conn2.pending_notifies() == []


async def test_aclose() -> None:
    with trio.fail_after(10):
        pool = PgPool(_url(), max_size=2)
        async with pool.acquire() as busy:
            async with pool.acquire() as idle_conn:
                pass
            assert pool.statistics() == PoolStatistics(size=2, idle=1, in_use=1, waiting=0)
            await pool.aclose()
            assert pool.closed
            assert idle_conn.closed
            assert await busy.fetchval("SELECT 1") == 1  # still usable until released
        assert busy.closed
        assert pool.statistics() == PoolStatistics(size=0, idle=0, in_use=0, waiting=0)
        with pytest.raises(trio.ClosedResourceError):
            async with pool.acquire():
                pass
        with pytest.raises(trio.ClosedResourceError):
            await pool.fetchval("SELECT 1")
        await pool.aclose()  # idempotent


async def test_open_pool_closes_on_exit() -> None:
    with trio.fail_after(10):
        async with open_pool(_url()) as pool:
            await pool.fetchval("SELECT 1")
        assert pool.closed
        with pytest.raises(trio.ClosedResourceError):
            await pool.fetchval("SELECT 1")


async def test_connect_failure_releases_slot() -> None:
    with trio.fail_after(10):
        async with open_pool("postgresql://root@127.0.0.1:1/test", max_size=1) as pool:
            for _ in range(3):
                with pytest.raises(psycopg.OperationalError):
                    await pool.fetchval("SELECT 1")
            assert pool.statistics() == PoolStatistics(size=0, idle=0, in_use=0, waiting=0)


async def test_cancel_in_pool_query_keeps_connection(observer: PgConnection) -> None:
    with trio.fail_after(10):
        async with open_pool(_url(), max_size=1) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            with trio.move_on_after(0.2):
                await pool.execute("SELECT pg_sleep(10)")
            state = await observer.fetchval(
                "SELECT state FROM pg_stat_activity WHERE pid = $1::int", [pid]
            )
            assert state == "idle"
            assert await pool.fetchval("SELECT pg_backend_pid()") == pid
