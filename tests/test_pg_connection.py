"""Tests for the trio-native PostgreSQL connection (trioqueue.driver.postgres.connection)."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from trioqueue.driver.postgres import Notify, PgConnection, QueryResult
from trioqueue.embedded import EmbeddedServer

UTC = dt.UTC
SOCKET_DIR = "/var/run/postgresql"


_URL: str | None = None


@pytest.fixture(autouse=True)
def _test_database(database_url: str) -> None:
    """Every test here talks to the test session's server, in a database of its own."""
    global _URL
    _URL = database_url


def _url() -> str:
    assert _URL is not None, "the _test_database fixture sets this"
    return _URL


@pytest.fixture
async def conn() -> AsyncIterator[PgConnection]:
    c = await PgConnection.connect(_url())
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def observer() -> AsyncIterator[PgConnection]:
    c = await PgConnection.connect(_url())
    try:
        yield c
    finally:
        await c.aclose()


async def _activity(observer: PgConnection, pid: int) -> tuple[str, str] | None:
    row = await observer.fetchrow(
        "SELECT state, query FROM pg_stat_activity WHERE pid = $1::int", [pid]
    )
    return None if row is None else (row[0], row[1])


def _channel(prefix: str = "public.tq_test") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


# ---- connecting ---------------------------------------------------------------------------


async def test_connect_url() -> None:
    with trio.fail_after(10):
        c = await PgConnection.connect(_url())
        try:
            assert await c.fetchval("SELECT 1") == 1
            assert not c.broken
            assert not c.in_transaction
        finally:
            await c.aclose()


async def test_connect_keyword_string() -> None:
    params = conninfo_to_dict(_url())
    kw = make_conninfo("", **params)
    assert "://" not in kw
    with trio.fail_after(10):
        c = await PgConnection.connect(kw)
        try:
            assert await c.fetchval("SELECT current_database()") == params.get("dbname")
        finally:
            await c.aclose()


@pytest.fixture
def socket_dir(pg_server: EmbeddedServer | None) -> str:
    """The test server's unix socket folder. A sync fixture skips with its reason shown: a
    ``pytest.skip`` inside an async test loses it (pytest-trio)."""
    if pg_server is not None and pg_server.socket_dir is not None:
        return str(pg_server.socket_dir)
    if os.path.exists(os.path.join(SOCKET_DIR, ".s.PGSQL.5432")):
        return SOCKET_DIR
    pytest.skip(f"the test server has no unix socket we know of (tried {SOCKET_DIR})")


async def test_connect_unix_socket(socket_dir: str) -> None:
    params = conninfo_to_dict(_url())
    params["host"] = socket_dir
    params.pop("hostaddr", None)
    with trio.fail_after(10):
        c = await PgConnection.connect(make_conninfo("", **params))
        try:
            # inet_server_addr() is NULL over a unix socket
            assert await c.fetchval("SELECT inet_server_addr()") is None
            assert await c.fetchval("SELECT 1") == 1
        finally:
            await c.aclose()


async def test_connect_refused_raises_operational_error() -> None:
    with trio.fail_after(10), pytest.raises(psycopg.OperationalError):
        await PgConnection.connect("postgresql://root@127.0.0.1:1/test")


async def test_connect_timeout() -> None:
    # A listening socket that never answers the startup packet.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        with trio.fail_after(5), pytest.raises(psycopg.OperationalError, match="timeout"):
            await PgConnection.connect(
                f"postgresql://root@127.0.0.1:{port}/test", connect_timeout=0.3
            )
    finally:
        listener.close()


async def test_aclose_idempotent(conn: PgConnection) -> None:
    await conn.aclose()
    await conn.aclose()
    assert conn.broken
    assert conn.closed
    with pytest.raises(psycopg.OperationalError):
        await conn.execute("SELECT 1")


# ---- parameters and results ---------------------------------------------------------------

NOW = dt.datetime(2026, 11, 27, 12, 30, 45, 123456, tzinfo=UTC)
PARIS = dt.timezone(dt.timedelta(hours=1))


@pytest.mark.parametrize(
    ("value", "sqltype", "expected"),
    [
        (1, "bigint", 1),
        (-(2**40), "bigint", -(2**40)),
        (7, "smallint", 7),
        ("héllo\t\n'\"\\", "text", "héllo\t\n'\"\\"),
        (True, "boolean", True),
        (False, "boolean", False),
        (1.25, "double precision", 1.25),
        (None, "text", None),
        (None, "bigint", None),
        (NOW, "timestamptz", NOW),
        (NOW.astimezone(PARIS), "timestamptz", NOW),
        (b"\x00\x01\xff", "bytea", b"\x00\x01\xff"),
        (b"'\\\"", "bytea", b"'\\\""),
        ([1, 2, 3], "bigint[]", [1, 2, 3]),
        ([], "bigint[]", []),
        (["a", "b c", 'q"uote'], "text[]", ["a", "b c", 'q"uote']),
        ([NOW, NOW + dt.timedelta(days=1)], "timestamptz[]", [NOW, NOW + dt.timedelta(days=1)]),
        (Jsonb({"a": [1, 2], "b": None}), "jsonb", {"a": [1, 2], "b": None}),
        (Jsonb([1, "x"]), "jsonb", [1, "x"]),
    ],
)
async def test_param_roundtrip(conn: PgConnection, value: Any, sqltype: str, expected: Any) -> None:
    with trio.fail_after(10):
        # through a typed column, as real queries do...
        await conn.execute(f"CREATE TEMP TABLE t (v {sqltype})")
        res = await conn.execute("INSERT INTO t (v) VALUES ($1)", [value])
        assert (res.rowcount, res.status) == (1, "INSERT 0 1")
        got = await conn.fetchval("SELECT v FROM t")
        assert got == expected
        assert type(got) is type(expected)
        # ...and as a bare expression with a cast
        assert await conn.fetchval(f"SELECT $1::{sqltype}", [value]) == expected


async def test_params_several_and_where(conn: PgConnection) -> None:
    row = await conn.fetchrow(
        "SELECT $1::bigint + 1, $2::text || '!', $3::bool, $4::float8 * 2, $5::text IS NULL",
        [41, "hi", True, 1.5, None],
    )
    assert row == (42, "hi!", True, 3.0, True)
    rows = await conn.fetch(
        "SELECT x FROM generate_series(1, 10) x WHERE x = ANY($1) ORDER BY x", [[2, 5, 99]]
    )
    assert rows == [(2,), (5,)]


async def test_result_types(conn: PgConnection) -> None:
    row = await conn.fetchrow(
        """
        SELECT '{"k": [1, "two", null]}'::jsonb,
               ARRAY['{"a": 1}'::jsonb, '[2]'::jsonb],
               ARRAY['x', NULL, 'y z']::text[],
               '2026-11-27 12:30:45.123456+00'::timestamptz,
               B'10101010'::bit(8),
               B'101'::varbit,
               1::int2, 2::int4, 3::int8, 2.5::float8, 'ab'::bytea, NULL::int, true
        """
    )
    assert row == (
        {"k": [1, "two", None]},
        [{"a": 1}, [2]],
        ["x", None, "y z"],
        NOW,
        "10101010",
        "101",
        1,
        2,
        3,
        2.5,
        b"ab",
        None,
        True,
    )
    ts = row[3]
    assert isinstance(ts, dt.datetime) and ts.tzinfo is not None


async def test_execute_result(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (id int PRIMARY KEY, v text)")
    res = await conn.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 5) g")
    assert res == QueryResult(rows=[], rowcount=5, status="INSERT 0 5")
    res = await conn.execute("UPDATE t SET v = 'y' WHERE id > $1 RETURNING id", [2])
    assert res.status == "UPDATE 3"
    assert res.rowcount == 3
    assert sorted(res.rows) == [(3,), (4,), (5,)]
    res = await conn.execute("SELECT id FROM t WHERE id < 3 ORDER BY id")
    assert (res.rows, res.rowcount, res.status) == ([(1,), (2,)], 2, "SELECT 2")
    assert await conn.fetchrow("SELECT id FROM t WHERE id = 42") is None
    assert await conn.fetchval("SELECT id FROM t WHERE id = 42") is None
    assert await conn.fetch("SELECT id FROM t WHERE id = 42") == []
    res = await conn.execute("CREATE TEMP TABLE u (x int)")
    assert (res.rows, res.rowcount, res.status) == ([], 0, "CREATE TABLE")


async def test_execute_script(conn: PgConnection) -> None:
    await conn.execute_script(
        """
        CREATE TEMP TABLE s (x int);
        INSERT INTO s VALUES (1), (2);
        -- a comment; with a semicolon
        INSERT INTO s VALUES (3);
        """
    )
    assert await conn.fetchval("SELECT sum(x) FROM s") == 6
    with pytest.raises(errors.DivisionByZero):
        await conn.execute_script("INSERT INTO s VALUES (4); SELECT 1/0; INSERT INTO s VALUES (5)")
    # the implicit transaction of the script rolled back the first insert
    assert await conn.fetchval("SELECT sum(x) FROM s") == 6


# ---- errors -------------------------------------------------------------------------------


async def test_unique_violation(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (id int PRIMARY KEY)")
    await conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(errors.UniqueViolation) as info:
        await conn.execute("INSERT INTO t VALUES ($1)", [1])
    assert info.value.sqlstate == "23505"
    assert "duplicate key" in str(info.value)
    assert not conn.broken
    assert await conn.fetchval("SELECT count(*) FROM t") == 1


async def test_syntax_error(conn: PgConnection) -> None:
    with pytest.raises(errors.SyntaxError) as info:
        await conn.execute("SELEC 1")
    assert info.value.sqlstate == "42601"
    assert not conn.broken
    assert await conn.fetchval("SELECT 1") == 1


async def test_bad_param_type_leaves_connection_usable(conn: PgConnection) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        await conn.execute("SELECT $1", [object()])
    assert await conn.fetchval("SELECT $1::int", [5]) == 5


async def test_terminated_backend_marks_broken(conn: PgConnection, observer: PgConnection) -> None:
    pid = conn.backend_pid
    assert await observer.fetchval("SELECT pg_terminate_backend($1::int)", [pid]) is True
    with trio.fail_after(10):
        with pytest.raises(psycopg.OperationalError):
            # the first query may still be sent into the dying socket; the error surfaces
            # at the latest on the second one
            await conn.execute("SELECT 1")
            await conn.execute("SELECT 1")
    assert conn.broken
    with pytest.raises(psycopg.OperationalError):
        await conn.execute("SELECT 1")


async def test_aclose_from_other_task_fails_query(
    conn: PgConnection, observer: PgConnection
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await _until_sleeping(observer, conn.backend_pid)
                await conn.aclose()

            nursery.start_soon(close_soon)
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT pg_sleep(5)")
    assert conn.broken


async def _until_sleeping(observer: PgConnection, pid: int) -> None:
    """Wait until backend ``pid`` is inside ``pg_sleep``: its query is running."""
    query = "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = $1::int"
    while True:
        if await observer.fetchval(query, [pid]):
            return
        await trio.sleep(0.01)


# ---- concurrency ----------------------------------------------------------------------------


async def test_tasks_sharing_a_connection_serialize(conn: PgConnection) -> None:
    results: dict[int, Any] = {}

    async def worker(i: int) -> None:
        results[i] = await conn.fetchval("SELECT $1::int * 10 FROM pg_sleep(0.01)", [i])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(worker, i)
    assert results == {i: i * 10 for i in range(20)}


# ---- transactions -------------------------------------------------------------------------


async def test_transaction_commit(conn: PgConnection, observer: PgConnection) -> None:
    table = f"tq_test_tx_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE TABLE {table} (x int)")
    try:
        async with conn.transaction() as c:
            assert c is conn
            assert conn.in_transaction
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            assert await observer.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert not conn.in_transaction
        assert await observer.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await conn.execute(f"DROP TABLE {table}")


async def test_transaction_rollback_on_exception(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int)")
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
    assert not conn.in_transaction
    assert await conn.fetchval("SELECT count(*) FROM t") == 0


async def test_transaction_rollback_on_server_error(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int PRIMARY KEY)")
    with pytest.raises(errors.UniqueViolation):
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            await conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction
    assert await conn.fetchval("SELECT count(*) FROM t") == 0


async def test_transaction_caught_error_does_not_commit_silently(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int PRIMARY KEY)")
    with pytest.raises(errors.InFailedSqlTransaction):
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            with pytest.raises(errors.UniqueViolation):
                await conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction
    assert await conn.fetchval("SELECT count(*) FROM t") == 0


async def test_nested_transaction_savepoint(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int PRIMARY KEY)")
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(errors.UniqueViolation):
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (2)")
                await conn.execute("INSERT INTO t VALUES (1)")  # fails: rolls back to savepoint
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (3)")
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (4)")
        assert conn.in_transaction
    assert not conn.in_transaction
    assert await conn.fetch("SELECT x FROM t ORDER BY x") == [(1,), (3,), (4,)]


# ---- cancellation -------------------------------------------------------------------------


async def test_cancel_mid_query(conn: PgConnection, observer: PgConnection) -> None:
    pid = conn.backend_pid
    start = trio.current_time()
    with trio.fail_after(10):
        with trio.move_on_after(0.3) as cs:
            await conn.execute("SELECT pg_sleep(10)")
        assert cs.cancelled_caught
        elapsed = trio.current_time() - start
        assert elapsed < 2.0, elapsed
        assert not conn.broken
        activity = await _activity(observer, pid)
        assert activity is not None
        state, _query = activity
        assert state == "idle", activity  # not "active": the server query is gone
        active = await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE pid = $1::int AND state = 'active' AND query LIKE '%pg_sleep%'",
            [pid],
        )
        assert active == 0
        assert await conn.fetchval("SELECT 1") == 1
        assert not conn.in_transaction


async def test_statement_in_a_cancelled_scope_sends_nothing(conn: PgConnection) -> None:
    # Taking the free statement lock skips the scheduler, but entering is still a
    # cancellation point: nothing reaches the server.
    with trio.CancelScope() as cs:
        cs.cancel()
        await conn.execute("CREATE TEMP TABLE never_made (x int)")
    assert cs.cancelled_caught
    assert not conn.broken
    assert await conn.fetchval("SELECT to_regclass('never_made') IS NULL") is True


async def test_statements_from_many_tasks_take_turns(conn: PgConnection) -> None:
    # The statement lock stays fair: every task gets its turn, in order of arrival.
    order: list[int] = []

    async def one(i: int) -> None:
        order.append(await conn.fetchval("SELECT $1::int", [i]))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
                await trio.testing.wait_all_tasks_blocked()
    assert order == list(range(20))


async def test_cancel_mid_query_many_times(conn: PgConnection) -> None:
    with trio.fail_after(20):
        for i in range(10):
            with trio.move_on_after(0.01 * (i % 4)):
                await conn.execute("SELECT pg_sleep(1)")
            assert not conn.broken
            assert await conn.fetchval("SELECT $1::int", [i]) == i


async def test_cancel_that_cannot_complete_closes_connection() -> None:
    # cancel_timeout=0: no time to cancel and drain, so the connection must be given up.
    c = await PgConnection.connect(_url(), cancel_timeout=0)
    try:
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as cs:
                await c.execute("SELECT pg_sleep(1)")
        assert cs.cancelled_caught
        assert c.broken
        with pytest.raises(psycopg.OperationalError):
            await c.execute("SELECT 1")
    finally:
        await c.aclose()


async def test_cancel_mid_transaction(conn: PgConnection, observer: PgConnection) -> None:
    table = f"tq_test_cancel_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE TABLE {table} (x int)")
    try:
        pid = conn.backend_pid
        with trio.fail_after(10):
            with trio.move_on_after(0.3) as cs:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    await conn.execute("SELECT pg_sleep(10)")
            assert cs.cancelled_caught
            assert not conn.broken
            assert not conn.in_transaction
            activity = await _activity(observer, pid)
            assert activity is not None and activity[0] == "idle", activity
            assert await observer.fetchval(f"SELECT count(*) FROM {table}") == 0
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
            # reusable, including for a new transaction
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
            assert await observer.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await conn.execute(f"DROP TABLE {table}")


async def test_cancel_in_transaction_body_outside_query(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int)")
    with trio.fail_after(10):
        with trio.move_on_after(0.1):
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                await trio.sleep(10)
        assert not conn.in_transaction
        assert await conn.fetchval("SELECT count(*) FROM t") == 0


async def test_cancel_nested_transaction(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE t (x int)")
    with trio.fail_after(10):
        with trio.move_on_after(0.3):
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (2)")
                    await conn.execute("SELECT pg_sleep(10)")
        assert not conn.in_transaction
        assert await conn.fetchval("SELECT count(*) FROM t") == 0


# ---- LISTEN / NOTIFY ----------------------------------------------------------------------


async def test_listen_notify(conn: PgConnection, observer: PgConnection) -> None:
    channel = _channel()
    assert "." in channel
    await conn.listen(channel)
    assert channel in conn.listening
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await trio.testing.wait_all_tasks_blocked()  # conn waits for notifications
                await observer.notify(channel, "hello")

            nursery.start_soon(send)
            got = await conn.wait_notifies()
    assert got == [Notify(channel=channel, payload="hello", pid=observer.backend_pid)]


async def test_notification_during_other_query_is_buffered(
    conn: PgConnection, observer: PgConnection
) -> None:
    channel = _channel()
    await conn.listen(channel)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await _until_sleeping(observer, conn.backend_pid)
                await observer.notify(channel, "during")

            nursery.start_soon(send)
            # the notification arrives while this query runs
            await conn.execute("SELECT pg_sleep(0.5)")
        await observer.notify(channel, "after")
        got = await conn.wait_notifies()
        if len(got) == 1:
            got += await conn.wait_notifies()
    assert [n.payload for n in got] == ["during", "after"]


async def test_query_interrupts_wait_notifies(conn: PgConnection, observer: PgConnection) -> None:
    channel = _channel()
    await conn.listen(channel)
    got: list[Notify] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def waiter() -> None:
                got.extend(await conn.wait_notifies())

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # the waiter blocks on the socket
            # another task uses the connection while the waiter blocks on the socket
            with trio.fail_after(2):
                assert await conn.fetchval("SELECT 42") == 42
                await conn.notify(channel, "self")  # delivered to ourselves
            await observer.notify(channel, "other")
        if len(got) < 2:
            got.extend(await conn.wait_notifies())
    assert [n.payload for n in got] == ["self", "other"]
    assert got[0].pid == conn.backend_pid


async def test_wait_notifies_cancellable(conn: PgConnection) -> None:
    await conn.listen(_channel())
    with trio.fail_after(5):
        with trio.move_on_after(0.1) as cs:
            await conn.wait_notifies()
    assert cs.cancelled_caught
    assert await conn.fetchval("SELECT 1") == 1


async def test_unlisten(conn: PgConnection, observer: PgConnection) -> None:
    channel = _channel('odd "quoted" name')
    await conn.listen(channel)
    await observer.notify(channel, "one")
    with trio.fail_after(5):
        assert [n.payload for n in await conn.wait_notifies()] == ["one"]
    await conn.unlisten(channel)
    assert channel not in conn.listening
    # The observer listens too: once its own notification reaches it, one sent to conn's
    # session would have been sent as well, at the latest before its next query's reply.
    await observer.listen(channel)
    await observer.notify(channel, "two")
    with trio.fail_after(5):
        assert [n.payload for n in await observer.wait_notifies()] == ["two"]
    await conn.fetchval("SELECT 1")
    assert conn.pending_notifies() == []


# ---- COPY ---------------------------------------------------------------------------------

COPY_TABLE = """
CREATE TEMP TABLE c (
    id bigint, args jsonb, tags text[], at timestamptz, prio smallint, blob bytea, note text
)
"""
COPY_COLS = "(id, args, tags, at, prio, blob, note)"


def _copy_rows(n: int) -> list[tuple[Any, ...]]:
    return [
        (
            i,
            Jsonb({"i": i, "s": "tab\there\nnewline \\ backslash"}),
            [f"t{i}", "x y", 'q"'],
            NOW + dt.timedelta(seconds=i),
            i % 5,
            bytes([i % 256, 0, 255]),
            None if i % 2 else f"note {i}",
        )
        for i in range(n)
    ]


def _expected(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(r[0], None if r[1] is None else r[1].obj, *r[2:]) for r in rows]


async def test_copy_in_text(conn: PgConnection) -> None:
    await conn.execute(COPY_TABLE)
    rows = _copy_rows(50)
    rows.append((None, None, None, None, None, None, None))
    with trio.fail_after(10):
        n = await conn.copy_in(f"COPY c {COPY_COLS} FROM STDIN", rows)
    assert n == 51
    got = await conn.fetch(f"SELECT {COPY_COLS[1:-1]} FROM c ORDER BY id NULLS LAST")
    assert got == _expected(rows)


async def test_copy_in_binary(conn: PgConnection) -> None:
    await conn.execute(COPY_TABLE)
    rows = _copy_rows(50)
    types = ["bigint", "jsonb", "text[]", "timestamptz", "smallint", "bytea", "text"]
    with trio.fail_after(10):
        n = await conn.copy_in(f"COPY c {COPY_COLS} FROM STDIN (FORMAT binary)", rows, types=types)
    assert n == 50
    got = await conn.fetch(f"SELECT {COPY_COLS[1:-1]} FROM c ORDER BY id")
    assert got == _expected(rows)


async def test_copy_in_binary_needs_types(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE c (x int)")
    with pytest.raises(psycopg.ProgrammingError, match="types"):
        await conn.copy_in("COPY c (x) FROM STDIN (FORMAT binary)", [(1,)])
    assert await conn.fetchval("SELECT count(*) FROM c") == 0


async def test_copy_in_large(conn: PgConnection) -> None:
    await conn.execute(COPY_TABLE)
    with trio.fail_after(30):
        n = await conn.copy_in(f"COPY c {COPY_COLS} FROM STDIN", _copy_rows(20_000))
    assert n == 20_000
    assert await conn.fetchval("SELECT count(*) FROM c") == 20_000


async def test_copy_in_empty(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE c (x int)")
    assert await conn.copy_in("COPY c (x) FROM STDIN", []) == 0


async def test_copy_in_server_error(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE c (x smallint)")
    with pytest.raises(errors.InvalidTextRepresentation):
        await conn.copy_in("COPY c (x) FROM STDIN", [(1,), ("nope",)])
    assert not conn.broken
    assert await conn.fetchval("SELECT count(*) FROM c") == 0


async def test_copy_in_bad_statement(conn: PgConnection) -> None:
    with pytest.raises(errors.UndefinedTable):
        await conn.copy_in("COPY no_such_table_xyz (x) FROM STDIN", [(1,)])
    with pytest.raises(psycopg.ProgrammingError):
        await conn.copy_in("SELECT 1", [(1,)])
    assert await conn.fetchval("SELECT 1") == 1


async def test_copy_in_error_in_rows_aborts(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE c (x int)")

    def rows() -> Iterator[tuple[int]]:
        for i in range(20_000):
            if i == 15_000:
                raise ValueError("producer failed")
            yield (i,)

    with pytest.raises(ValueError, match="producer failed"):
        await conn.copy_in("COPY c (x) FROM STDIN", rows())
    assert not conn.broken
    assert await conn.fetchval("SELECT count(*) FROM c") == 0


async def test_copy_in_cancelled(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE c (x int, pad text)")
    pad = "p" * 100

    with trio.fail_after(10):
        with trio.CancelScope() as cs:

            def rows() -> Iterator[tuple[int, str]]:
                for i in range(20_000):
                    if i == 5_000:
                        cs.cancel()
                    yield (i, pad)

            await conn.copy_in("COPY c (x, pad) FROM STDIN", rows())
        assert cs.cancelled_caught
        assert not conn.broken
        assert await conn.fetchval("SELECT count(*) FROM c") == 0


async def test_copy_via_execute_is_refused(conn: PgConnection) -> None:
    await conn.execute("CREATE TEMP TABLE c (x int)")
    with pytest.raises(psycopg.NotSupportedError):
        await conn.execute("COPY c (x) FROM STDIN")
    assert await conn.fetchval("SELECT 1") == 1


# ---- prepared statements --------------------------------------------------------------------


async def test_prepared_statements_match_unprepared(conn: PgConnection) -> None:
    with trio.fail_after(10):
        query = "SELECT $1::bigint + 1, $2::text"
        for value in (1, 40_000, 2**40, -5):
            expected = await conn.fetchrow(query, [value, "x"])
            assert await conn.fetchrow(query, [value, "x"], prepare=True) == expected
            assert await conn.fetchrow(query, [value, "x"], prepare=True) == expected
        # One prepared statement per combination of parameter types (int2/int4/int8 here).
        assert 1 <= len(conn._prepared) <= 4


async def test_prepared_statement_error_is_raised_and_not_cached(conn: PgConnection) -> None:
    with trio.fail_after(10):
        with pytest.raises(errors.SyntaxError):
            await conn.fetch("SELEC $1::int", [1], prepare=True)
        assert not conn._prepared
        assert await conn.fetchval("SELECT $1::int", [3], prepare=True) == 3


async def test_prepared_statement_cancelled_mid_run_keeps_the_connection(
    conn: PgConnection,
) -> None:
    with trio.fail_after(15):
        with trio.move_on_after(0.2):
            await conn.fetch("SELECT pg_sleep($1::float8)", [10.0], prepare=True)
        assert not conn.broken
        assert await conn.fetchval("SELECT pg_sleep($1::float8)::text", [0.0], prepare=True) == ""
