"""trioqueue behind a real PgBouncer (Debian's ``pgbouncer``), in transaction and in session
pooling mode (docs/pgbouncer.md).

A session fixture starts one pgbouncer per mode on a free port, in front of the test server
(``$TRIOQUEUE_TEST_DATABASE_URL`` or the embedded one); every database on that server is
reachable through it under its own name. The tests skip, saying why, when pgbouncer is not
installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import logging
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import psycopg
import pytest
import trio

import trioqueue as tq
from trioqueue.driver.postgres.connection import PgConnection
from trioqueue.driver.postgres.driver import PostgresDriver
from trioqueue.driver.postgres.pool import open_pool
from trioqueue.driver.postgres.pooler import check_pooler
from trioqueue.errors import PoolerError

MODES = ("transaction", "session")

POOL_MODES = {**{mode: mode for mode in MODES}, "session-noreset": "session"}
"""pgbouncers by name: their pool_mode. The last one never resets a server session
between clients (server_reset_query empty), so sessions keep other clients' state."""

SETTINGS: dict[str, dict[str, Any]] = {
    # What docs/pgbouncer.md prescribes; a short poll interval keeps the tests fast, since
    # without LISTEN both fetches and cancel requests are polled.
    "transaction": {"poll_only": True, "prepared_statements": False, "fetch_poll_interval": 0.1},
    # Session pooling works with the defaults: prepared statements, LISTEN/NOTIFY.
    "session": {},
}

FIX = "poll_only=True, prepared_statements=False"


def _pgbouncer_path() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> list[str]:
    """pgbouncer refuses to run as root: as root, ``-u`` an unprivileged user (it reads
    its configuration before switching, so the files may stay private)."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        try:
            if pwd.getpwnam(name).pw_uid != 0:
                return ["-u", name]
        except KeyError:
            continue
    pytest.skip("pgbouncer refuses to run as root, and there is no 'postgres' or 'nobody' user")


def _connstr_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@attrs.frozen
class Bouncer:
    mode: str
    port: int
    log: pathlib.Path

    @property
    def settings(self) -> dict[str, Any]:
        return SETTINGS[POOL_MODES[self.mode]]

    def url(self, database_url: str) -> str:
        """``database_url``'s database, reached through this pgbouncer (which ignores the
        user name and logs in as the server URL's user)."""
        params = psycopg.conninfo.conninfo_to_dict(database_url)
        dbname = urllib.parse.quote(str(params["dbname"]))
        user = urllib.parse.quote(str(params.get("user") or "trioqueue"))
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"


class _Bouncers:
    """pgbouncer processes, one per mode, started on first use."""

    def __init__(self, exe: str, server_url: str, workdir: pathlib.Path) -> None:
        self._exe = exe
        self._workdir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started: dict[str, Bouncer] = {}
        params = psycopg.conninfo.conninfo_to_dict(server_url)
        target = {
            "host": str(params.get("hostaddr") or params.get("host") or "/var/run/postgresql"),
            "port": str(params.get("port") or 5432),
            "user": str(params.get("user") or pwd.getpwuid(os.getuid()).pw_name),
        }
        if params.get("password"):
            target["password"] = str(params["password"])
        self._target = " ".join(f"{k}={_connstr_value(v)}" for k, v in target.items())

    def get(self, mode: str) -> Bouncer:
        """The pgbouncer named ``mode`` (a key of POOL_MODES), started if need be."""
        if mode not in self._started:
            self._started[mode] = self._start(mode)
        return self._started[mode]

    def _start(self, mode: str) -> Bouncer:
        log = self._workdir / f"{mode}.log"
        for _ in range(3):  # a free port can be taken by someone else before pgbouncer binds it
            port = _free_port()
            ini = self._workdir / f"{mode}.ini"
            ini.write_text(
                "[databases]\n"
                f"* = {self._target}\n"
                "[pgbouncer]\n"
                "listen_addr = 127.0.0.1\n"
                f"listen_port = {port}\n"
                "unix_socket_dir =\n"
                "auth_type = any\n"
                f"pool_mode = {POOL_MODES[mode]}\n"
                "max_client_conn = 500\n"
                "default_pool_size = 40\n"
                + ("server_reset_query =\n" if mode == "session-noreset" else "")
            )
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [self._exe, *_run_as(), str(ini)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self._procs.append(proc)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    time.sleep(0.02)
                    continue
                return Bouncer(mode, port, log)
            self._stop(proc)
        pytest.fail(f"pgbouncer ({mode} mode) did not start:\n{log.read_text()[-2000:]}")

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self._procs:
            self._stop(proc)


@pytest.fixture(scope="session")
def pgbouncers(pg_server_url: str) -> Iterator[_Bouncers]:
    exe = _pgbouncer_path()
    if exe is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    with tempfile.TemporaryDirectory(prefix="tq-pgbouncer-") as workdir:
        bouncers = _Bouncers(exe, pg_server_url, pathlib.Path(workdir))
        try:
            yield bouncers
        finally:
            bouncers.close()


@pytest.fixture(params=MODES)
def bouncer(request: pytest.FixtureRequest, pgbouncers: _Bouncers) -> Bouncer:
    return pgbouncers.get(request.param)


@pytest.fixture
def tx_bouncer(pgbouncers: _Bouncers) -> Bouncer:
    return pgbouncers.get("transaction")


@pytest.fixture
def session_bouncer(pgbouncers: _Bouncers) -> Bouncer:
    return pgbouncers.get("session")


# ------------------------------------------------------------------------------------------
# Jobs


@attrs.frozen
class NoteArgs:
    kind: ClassVar[str] = "pgb_note"
    n: int


@attrs.frozen
class WaitArgs:
    kind: ClassVar[str] = "pgb_wait"


def _workers(done: list[int], started: trio.Event | None = None) -> tq.Workers:
    workers = tq.Workers()

    @workers.worker(NoteArgs)
    async def note(job: tq.Job[NoteArgs]) -> None:
        done.append(job.args.n)

    @workers.worker(WaitArgs)
    async def wait(job: tq.Job[WaitArgs]) -> None:
        if started is not None:
            started.set()
        await trio.sleep_forever()  # until cancelled

    return workers


def _count_jobs(database_url: str, state: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM tq_job WHERE state = %s", [state]).fetchone()
        assert row is not None
        return int(row[0])


# ------------------------------------------------------------------------------------------
# Both modes, with the settings each needs


async def test_inserts(bouncer: Bouncer, database_url: str) -> None:
    with trio.fail_after(20):
        async with tq.open_client(bouncer.url(database_url), **bouncer.settings) as client:
            res = await client.insert(NoteArgs(1))
            assert res.job.state is tq.JobState.AVAILABLE
            assert len(await client.insert_many([NoteArgs(2), NoteArgs(3)])) == 2
            assert await client.insert_many_fast([NoteArgs(n) for n in range(4, 104)]) == 100

            async with client.transaction() as tx:
                await tx.execute("CREATE TABLE orders (id int)")
                await tx.execute("INSERT INTO orders (id) VALUES ($1)", 7)
                await client.insert_tx(tx, NoteArgs(104))
                await client.insert_many_fast_tx(tx, [NoteArgs(105), NoteArgs(106)])
            with pytest.raises(RuntimeError, match="roll back"):
                async with client.transaction() as tx:
                    await client.insert_tx(tx, NoteArgs(-1))
                    await client.insert_many_fast_tx(tx, [NoteArgs(-2)])
                    raise RuntimeError("roll back")

            page = await client.job_list(tq.JobListParams(limit=1000))
            assert sorted(job.args["n"] for job in page.jobs) == list(range(1, 107))
    assert _count_jobs(database_url, "available") == 106


async def test_work(bouncer: Bouncer, database_url: str) -> None:
    done: list[int] = []
    with trio.fail_after(20):
        async with tq.open_client(
            bouncer.url(database_url),
            workers=_workers(done),
            queues={"default": tq.QueueConfig(max_workers=5)},
            **bouncer.settings,
        ) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                await client.insert_many([NoteArgs(n) for n in range(10)])
                await client.insert_many_fast([NoteArgs(n) for n in range(10, 20)])
                seen = 0
                async for _ in events:
                    seen += 1
                    if seen == 20:
                        break
    assert sorted(done) == list(range(20))
    assert _count_jobs(database_url, "completed") == 20


async def test_cancel_a_running_job_from_another_client(
    bouncer: Bouncer, database_url: str
) -> None:
    # From another client, so that the request must travel: by NOTIFY in session mode,
    # by the worker's polling in transaction mode (poll_only).
    url = bouncer.url(database_url)
    started = trio.Event()
    with trio.fail_after(20):
        async with (
            tq.open_client(
                url,
                workers=_workers([], started),
                queues={"default": tq.QueueConfig(max_workers=2)},
                **bouncer.settings,
            ) as worker,
            tq.open_client(url, **bouncer.settings) as other,
        ):
            async with worker.subscribe(tq.EventKind.JOB_CANCELLED) as events:
                job = (await other.insert(WaitArgs())).job
                await started.wait()
                assert (await other.job_cancel(job.id)).state is tq.JobState.RUNNING
                async for event in events:
                    assert event.job is not None
                    assert event.job.id == job.id
                    break
            assert (await other.job_get(job.id)).state is tq.JobState.CANCELLED


async def test_cancelled_statement_stops_on_the_server(bouncer: Bouncer, database_url: str) -> None:
    # A hard stop cancels statements in flight: the cancel request must pass the pooler.
    with trio.fail_after(20):
        async with await PgConnection.connect(bouncer.url(database_url)) as conn:
            with trio.move_on_after(0.2):
                await conn.fetchval("SELECT pg_sleep(30)")
            assert not conn.broken
            assert await conn.fetchval("SELECT 1") == 1
    with psycopg.connect(database_url) as direct:
        running = direct.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND query = 'SELECT pg_sleep(30)' AND state = 'active'"
        ).fetchone()
        assert running == (0,)


# ------------------------------------------------------------------------------------------
# Transaction mode: the start-up check


@pytest.mark.parametrize(
    ("working", "options", "problems"),
    [
        (False, {}, ("prepared statements",)),
        (True, {}, ("prepared statements", "LISTEN/NOTIFY")),
        (True, {"prepared_statements": False}, ("LISTEN/NOTIFY",)),
        (True, {"poll_only": True}, ("prepared statements",)),
    ],
    ids=["insert-only-defaults", "worker-defaults", "worker-listening", "worker-preparing"],
)
async def test_transaction_mode_without_the_settings_fails_at_start(
    tx_bouncer: Bouncer,
    database_url: str,
    working: bool,
    options: dict[str, Any],
    problems: tuple[str, ...],
) -> None:
    kwargs: dict[str, Any] = dict(options)
    if working:
        kwargs.update(workers=_workers([]), queues={"default": tq.QueueConfig()})
    with trio.fail_after(20), pytest.raises(PoolerError) as info:
        async with tq.open_client(tx_bouncer.url(database_url), **kwargs):
            pytest.fail("the client started")
    message = str(info.value)
    assert FIX in message
    assert "docs/pgbouncer.md" in message
    assert "\n" not in message
    assert info.value.problems == problems
    assert isinstance(info.value, tq.TrioqueueError)
    # It failed before doing anything: not even its queue was registered.
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM tq_queue").fetchone() == (0,)


async def test_transaction_mode_insert_only_client_needs_no_poll_only(
    tx_bouncer: Bouncer, database_url: str
) -> None:
    # A client with no queues never LISTENs (the dashboard's client is one).
    with trio.fail_after(20):
        url = tx_bouncer.url(database_url)
        async with tq.open_client(url, prepared_statements=False) as client:
            await client.insert(NoteArgs(1))
    assert _count_jobs(database_url, "available") == 1


async def test_prepared_statement_lost_after_start_names_the_fix(
    tx_bouncer: Bouncer, database_url: str
) -> None:
    # What the start-up check is there to prevent, here without it: two client sessions
    # make their first prepared statement (tq_1) on the server session they share.
    url = tx_bouncer.url(database_url)
    with trio.fail_after(20):
        async with open_pool(url, max_size=2) as pool:
            driver = PostgresDriver(pool, url, prepare=True)
            async with pool.acquire() as a, pool.acquire() as b:
                assert await driver.job_get(1, ex=a) is None
                with pytest.raises(tq.DatabaseError) as info:
                    await driver.job_get(1, ex=b)
    message = str(info.value)
    assert message.startswith('while getting job 1: prepared statement "tq_1" already exists')
    assert FIX in message
    assert "\n" not in message
    assert isinstance(info.value.__cause__, psycopg.errors.DuplicatePreparedStatement)


async def test_check_with_a_pool_of_one(tx_bouncer: Bouncer, database_url: str) -> None:
    # The second client session the check needs is then a connection of its own.
    url = tx_bouncer.url(database_url)
    with trio.fail_after(20):
        async with open_pool(url, max_size=1) as pool:
            with pytest.raises(PoolerError):
                await check_pooler(pool, url, prepare=True, listen=False)
            assert pool.statistics().size == 1


# ------------------------------------------------------------------------------------------
# A session pooler that does not reset its server sessions


@pytest.fixture
def noreset_bouncer(pgbouncers: _Bouncers) -> Bouncer:
    return pgbouncers.get("session-noreset")


async def test_session_pooler_without_reset_fails_at_start(
    noreset_bouncer: Bouncer, database_url: str
) -> None:
    # The first client's server sessions go back to the pooler with its prepared
    # statements (tq_1, ...); the next client would make the same names on them.
    url = noreset_bouncer.url(database_url)
    with trio.fail_after(20):
        async with tq.open_client(url) as client:
            await client.insert(NoteArgs(1))
        with pytest.raises(PoolerError) as info:
            async with tq.open_client(url):
                pytest.fail("the client started")
        message = str(info.value)
        assert message.startswith('prepared statement "tq_1" already exists: ')
        assert "server_reset_query" in message
        assert FIX in message
        assert info.value.problems == ("prepared statements",)
        # Without prepared statements, nothing a session keeps is in the way.
        async with tq.open_client(url, prepared_statements=False) as client:
            await client.insert(NoteArgs(2))
    assert _count_jobs(database_url, "available") == 2


# ------------------------------------------------------------------------------------------
# What the check costs where there is nothing to find


async def test_check_behind_a_session_pooler(session_bouncer: Bouncer, database_url: str) -> None:
    url = session_bouncer.url(database_url)
    with trio.fail_after(20):
        async with open_pool(url, max_size=4) as pool:
            await check_pooler(pool, url, prepare=True, listen=True)
            assert pool.statistics().idle == 2  # both sessions it used stay in the pool


async def test_check_on_a_direct_connection_costs_one_statement(database_url: str) -> None:
    with trio.fail_after(20):
        async with open_pool(database_url, max_size=4) as pool:
            await check_pooler(pool, database_url, prepare=True, listen=True)
            assert pool.statistics().idle == 1


def test_cli_commands_work_through_a_transaction_pooler(
    tx_bouncer: Bouncer, database_url: str
) -> None:
    """``trioqueue jobs`` and ``trioqueue queues`` run one-off statements unprepared, so
    they need no flag behind a transaction pooler."""

    async def seed() -> int:
        async with tq.open_client(database_url) as client:
            return (await client.insert(NoteArgs(1))).job.id

    job_id = trio.run(seed)
    url = tx_bouncer.url(database_url)
    for args in (
        ["jobs", "list"],
        ["jobs", "get", str(job_id)],
        ["jobs", "cancel", str(job_id)],
        ["queues", "pause", "default"],
        ["queues", "list"],
        ["queues", "resume", "default"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "trioqueue", *args, "--database-url", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (args, done.stderr)
    assert _count_jobs(database_url, "cancelled") == 1


async def test_a_database_the_pooler_cannot_reach_fails_at_once(
    session_bouncer: Bouncer, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal that waiting cannot cure, reported by PgBouncer in its own words (it
    has no SQLSTATE), fails the start at once rather than after ``startup_timeout``."""
    caplog.set_level(logging.WARNING)
    parts = urllib.parse.urlsplit(session_bouncer.url(database_url))
    url = urllib.parse.urlunsplit(parts._replace(path="/tq_no_such_database"))
    with trio.fail_after(20), pytest.raises(tq.DatabaseError) as info:
        async with tq.open_client(url, startup_timeout=60.0):
            pytest.fail("the client started")
    assert not info.value.transient, info.value
    assert not [r for r in caplog.records if r.name == "trioqueue.startup"]
