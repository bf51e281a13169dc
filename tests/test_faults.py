"""Fault tolerance against a real PostgreSQL (docs/failure-modes.md).

- several worker OS processes on one database: every job runs exactly once, never on two
  processes at once, and the work is shared;
- the client's backends killed (``pg_terminate_backend``) three times mid-run: the pool
  replaces them, the notifier LISTENs again, the completer retries its writes, and nothing
  is lost or run twice at once;
- the server restarted mid-run (only on the session's own embedded server);
- a worker process SIGKILLed mid-job: its job stays ``running``, and the rescuer of another
  client returns it to work.

Worker processes run ``tests/worker_process.py``. Every test is bounded by ``fail_after``
and kills the processes it started, whatever happens; none asserts anything about speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar

import attrs
import psycopg
import pytest
import trio
from support import FAST, Sleep, Tracker

import trioqueue as tq
from trioqueue.driver.postgres import PgConnection
from trioqueue.embedded import EmbeddedServer

WORKER_SCRIPT = Path(__file__).with_name("worker_process.py")

KILL_BACKENDS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@attrs.frozen
class Record:
    """Worked by ``worker_process.py``: sleeps, then writes a row into ``runs``."""

    kind: ClassVar[str] = "record"
    seconds: float = 0.0


# ------------------------------------------------------------------------------- helpers


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[PgConnection]:
    """A connection of the test's own, outside any client's pool."""
    conn = await PgConnection.connect(url)
    async with conn:
        yield conn


async def state_counts(db: PgConnection) -> dict[str, int]:
    rows = await db.fetch("SELECT state::text, count(*) FROM tq_job GROUP BY 1")
    return {str(state): int(n) for state, n in rows}


async def wait_for_states(db: PgConnection, expected: dict[str, int], within: float) -> None:
    """Poll until the jobs' states are exactly ``expected``; fail after ``within`` seconds,
    naming the states seen last."""
    counts: dict[str, int] = {}
    with trio.move_on_after(within):
        while True:
            counts = await state_counts(db)
            if counts == expected:
                return
            await trio.sleep(0.1)
    running = await db.fetch(
        "SELECT id, attempt, attempted_at FROM tq_job WHERE state = 'running' ORDER BY id LIMIT 10"
    )
    raise AssertionError(
        f"after {within} s the jobs are {counts}, not {expected}; running: {running}"
    )


async def kill_backends(db: PgConnection) -> int:
    """Terminate every other session on ``db``'s database (never another database's)."""
    rows = await db.fetch(KILL_BACKENDS)
    return sum(1 for (ok,) in rows if ok)


class WorkerProcess:
    """A running ``worker_process.py``; reads the lines it prints."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buffer = bytearray()

    async def line(self) -> str:
        assert self.proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.proc.stdout.receive_some()
            if not chunk:
                code = await self.proc.wait()
                raise AssertionError(f"worker process {self.proc.pid} exited with {code}")
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()

    async def expect(self, word: str) -> str:
        """Skip lines until one starts with ``word``; return the rest of it."""
        while True:
            first, _, rest = (await self.line()).partition(" ")
            if first == word:
                return rest


@asynccontextmanager
async def worker_processes(url: str, count: int, *args: str) -> AsyncIterator[list[WorkerProcess]]:
    """Start ``count`` worker processes and wait until each one works; SIGKILL whichever is
    still alive when the block ends, whatever happened."""
    procs: list[WorkerProcess] = []
    try:
        for _ in range(count):
            proc = await trio.lowlevel.open_process(
                [sys.executable, str(WORKER_SCRIPT), url, *args],
                stdout=subprocess.PIPE,
            )
            procs.append(WorkerProcess(proc))
        for p in procs:
            await p.expect("ready")
        yield procs
    finally:
        with trio.CancelScope(shield=True):
            for p in procs:
                if p.proc.returncode is None:
                    p.proc.kill()
            for p in procs:
                with trio.move_on_after(10):
                    await p.proc.wait()
                assert p.proc.stdout is not None
                await p.proc.stdout.aclose()


def assert_each_ran_once(tracker: Tracker, ids: list[int]) -> None:
    assert tracker.overlaps == [], f"jobs ran twice at once: {tracker.overlaps[:20]}"
    assert set(tracker.runs) == set(ids), "a job never ran (or an unknown job ran)"
    twice = {i: n for i, n in tracker.runs.items() if n != 1}
    assert twice == {}, f"jobs ran more than once: {dict(list(twice.items())[:20])}"


# ------------------------------------------------------------------------------- tests


async def test_several_worker_processes_share_one_database(database_url: str) -> None:
    jobs = 3000
    with trio.fail_after(60):
        async with connect(database_url) as db:
            await db.execute(
                "CREATE TABLE runs (job_id bigint NOT NULL, pid integer NOT NULL, "
                "started_at timestamptz NOT NULL, finished_at timestamptz NOT NULL)"
            )
            async with worker_processes(database_url, 3, "--max-workers", "20") as procs:
                async with tq.open_client(database_url) as client:
                    assert await client.insert_many_fast([Record(0.002)] * jobs) == jobs
                await wait_for_states(db, {"completed": jobs}, 30)
                for p in procs:
                    p.proc.send_signal(signal.SIGTERM)
                for p in procs:
                    await p.expect("stopped")
                    assert await p.proc.wait() == 0

            ids = [r[0] for r in await db.fetch("SELECT id FROM tq_job")]
            per_job = await db.fetch("SELECT job_id, count(*) FROM runs GROUP BY job_id")
            overlapping = await db.fetch(
                "SELECT a.job_id, a.pid, b.pid FROM runs a JOIN runs b "
                "ON a.job_id = b.job_id AND a.ctid < b.ctid "
                "AND a.started_at < b.finished_at AND b.started_at < a.finished_at"
            )
            per_process = await db.fetch("SELECT pid, count(*) FROM runs GROUP BY pid")
            not_first_attempt = await db.fetchval("SELECT count(*) FROM tq_job WHERE attempt <> 1")

    assert len(ids) == jobs
    runs = {job_id: n for job_id, n in per_job}
    assert set(runs) == set(ids), "some jobs have no recorded run"
    assert {i: n for i, n in runs.items() if n != 1} == {}, "some jobs ran more than once"
    assert overlapping == [], "a job ran on two processes at once"
    assert not_first_attempt == 0
    worked = {pid: n for pid, n in per_process}
    assert set(worked) <= {p.proc.pid for p in procs}
    assert len(worked) > 1, f"only one process did any work: {worked}"


async def test_a_statement_whose_commit_is_killed_raises(database_url: str) -> None:
    # Regression: the driver handed back the rows of a statement whose commit failed
    # (results [TUPLES_OK, FATAL_ERROR]), so fetched jobs ran twice and written outcomes
    # were silently rolled back.
    # A deferred trigger sleeps at commit time, so the backend can be terminated after the
    # INSERT sent its row back but before the transaction committed.
    with trio.fail_after(20):
        async with connect(database_url) as admin, connect(database_url) as victim:
            await admin.execute_script(
                "CREATE TABLE t (x int);"
                "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(10); RETURN NULL; END $$;"
                "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED "
                "FOR EACH ROW EXECUTE FUNCTION slow_commit();"
            )
            pid = victim.backend_pid

            async def kill_while_committing() -> None:
                query = "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = $1"
                while True:
                    if await admin.fetchval(query, [pid]):
                        break
                    await trio.sleep(0.01)
                await admin.execute("SELECT pg_terminate_backend($1)", [pid])

            outcome: list[tuple[int, ...]] | BaseException
            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_while_committing)
                try:
                    outcome = await victim.fetch("INSERT INTO t VALUES (1) RETURNING x")
                except psycopg.Error as exc:
                    outcome = exc
            assert await admin.fetchval("SELECT count(*) FROM t") == 0
    # Nothing was committed, so the caller must not be told the statement succeeded.
    assert isinstance(outcome, psycopg.OperationalError), f"returned {outcome!r}, no error"


async def test_client_survives_killed_connections(database_url: str) -> None:
    # A 5 s poll: after the kills, only a re-established LISTEN (or a full fetch) wakes
    # the producer quickly, which the final check relies on.
    jobs = 2000
    tracker = Tracker()
    with trio.fail_after(60):
        async with (
            connect(database_url) as db,
            tq.open_client(
                database_url,
                workers=tracker.workers(),
                queues={"default": tq.QueueConfig(max_workers=20)},
                **{**FAST, "fetch_poll_interval": 5.0},
            ) as client,
        ):
            ids = [r.job.id for r in await client.insert_many([Sleep(0.005)] * jobs)]
            for threshold in (300, 800, 1300):
                await tracker.wait_finished(threshold)
                assert await kill_backends(db) > 0
            await wait_for_states(db, {"completed": jobs}, 30)
            assert_each_ran_once(tracker, ids)

            # LISTEN is back: an insert wakes the producer long before its 5 s poll.
            done = tracker.finished
            with trio.fail_after(3):
                probe = await client.insert(Sleep(0.0))
                await tracker.wait_finished(done + 1)
            assert tracker.runs[probe.job.id] == 1


@pytest.fixture
def own_server(pg_server: EmbeddedServer | None) -> EmbeddedServer:
    """The session's embedded server, which a test may restart. A sync fixture skips with
    its reason shown: a ``pytest.skip`` inside an async test loses it (pytest-trio)."""
    if pg_server is None:
        pytest.skip(
            "restarts the session's embedded server; with $TRIOQUEUE_TEST_DATABASE_URL set "
            "the server is shared and not ours to restart"
        )
    return pg_server


async def test_client_survives_a_server_restart(
    database_url: str, own_server: EmbeddedServer
) -> None:
    pg_server = own_server
    jobs = 2000
    tracker = Tracker()
    try:
        with trio.fail_after(60):
            async with tq.open_client(
                database_url,
                workers=tracker.workers(),
                queues={"default": tq.QueueConfig(max_workers=20)},
                **FAST,
            ) as client:
                ids = [r.job.id for r in await client.insert_many([Sleep(0.005)] * jobs)]
                await tracker.wait_finished(500)
                await trio.to_thread.run_sync(pg_server.restart)
                assert tracker.finished < jobs, "the run ended before the restart"
                async with connect(database_url) as db:
                    await wait_for_states(db, {"completed": jobs}, 30)
            assert_each_ran_once(tracker, ids)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_ensure_up, pg_server)


def _ensure_up(server: EmbeddedServer) -> None:
    """Leave the session's server accepting connections, for the tests that follow."""
    try:
        psycopg.connect(server.url, connect_timeout=5).close()
    except psycopg.OperationalError:
        server.restart()


async def _kill_a_worker_mid_job(url: str, client_id: str) -> int:
    """Start a worker process, give it a long job, SIGKILL it while it runs the job;
    return the job's id."""
    async with worker_processes(url, 1, "--max-workers", "1", "--id", client_id) as (proc,):
        async with tq.open_client(url) as client:
            job_id = (await client.insert(Sleep(30.0))).job.id
        assert int(await proc.expect("started")) == job_id
        proc.proc.send_signal(signal.SIGKILL)
        assert await proc.proc.wait() == -signal.SIGKILL
    return job_id


async def test_a_sigkilled_worker_leaves_its_job_running(database_url: str) -> None:
    client_id = f"doomed_{os.getpid()}"
    with trio.fail_after(30):
        job_id = await _kill_a_worker_mid_job(database_url, client_id)
        async with tq.open_client(database_url) as client:
            job = await client.job_get(job_id)
    # Nobody can hand it back: the job waits, running, for the rescuer.
    assert job.state is tq.JobState.RUNNING
    assert job.attempt == 1
    assert job.attempted_by == [client_id]
    assert job.errors == []


async def test_the_rescuer_returns_a_killed_workers_job_to_work(database_url: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        job_id = await _kill_a_worker_mid_job(database_url, f"doomed_{os.getpid()}")
        async with tq.open_client(
            database_url,
            workers=tracker.workers(longest=0.0),
            queues={"default": tq.QueueConfig(max_workers=5)},
            **{**FAST, "leader_interval": 0.5},
            rescue_stuck_jobs_after=0.5,
            rescuer_interval=0.2,
            retry_policy=lambda job: 0.0,
        ) as client:
            await tracker.wait_finished(1)
            # The rescued job finished here; let the completer write it.
            async with connect(database_url) as db:
                await wait_for_states(db, {"completed": 1}, 20)
            job = await client.job_get(job_id)

    assert tracker.runs == {job_id: 1}
    assert job.state is tq.JobState.COMPLETED
    assert job.attempt == 2
    assert len(job.errors) == 1
    assert job.errors[0].attempt == 1
    assert "rescued" in job.errors[0].error
