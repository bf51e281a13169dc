"""`client.job_wait` (issue 17, docs/output-and-waiting.md): waiting for a job to end, seen
from any client (insert-only ones included), from another OS process, under cancellation,
in poll_only mode and while the waiting client stops.

Where a test needs the wake-up to come from the completion notification (not from the
re-check every ``fetch_poll_interval``), the waiting client polls only once a minute, and
the test is bounded well below that: it checks which path woke the waiter, not how fast.
Every test is bounded by ``trio.fail_after``; none asserts anything about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import attrs
import pytest
import trio
from support import FAST, eventually, working

import trioqueue as tq
from trioqueue.driver.postgres import PgConnection

SLOW_POLL: dict[str, Any] = {**FAST, "fetch_poll_interval": 60.0}
"""A waiting client whose re-check never comes within a test: only notifications wake it."""


@attrs.frozen
class Work:
    """``ok``: returns ``{"n": n}``; ``fail``: raises; ``block``: runs until cancelled."""

    kind: ClassVar[str] = "work"
    mode: str = "ok"
    n: int = 0


class Worked:
    """A ``work`` worker that tells the test when a ``block`` job is running."""

    def __init__(self) -> None:
        self.blocking = trio.Event()
        self.workers = tq.Workers()

        @self.workers.worker(Work)
        async def work(job: tq.Job[Work]) -> dict[str, int]:
            if job.args.mode == "fail":
                raise RuntimeError("this job fails")
            if job.args.mode == "block":
                self.blocking.set()
                await trio.sleep_forever()
            return {"n": job.args.n}


class Waited:
    """What the waits of a test returned; ``all_in`` is set once ``want`` returned."""

    def __init__(self, client: tq.Client, want: int = 1) -> None:
        self.client = client
        self.want = want
        self.jobs: list[tq.Job[Any]] = []
        self.all_in = trio.Event()

    async def wait(self, job_id: int) -> None:
        self.jobs.append(await self.client.job_wait(job_id))
        if len(self.jobs) >= self.want:
            self.all_in.set()


def waits(client: tq.Client) -> dict[str, Any]:
    """The waiting service's counters (`JobWaits.statistics`)."""
    assert client._waits is not None
    return client._waits.statistics()


async def registered(client: tq.Client, waiters: int, *, listening: bool = True) -> None:
    """Return once ``client`` has ``waiters`` waiters, none of whose first read is still to
    come, and (``listening``) its listener LISTENs."""
    assert client._waits is not None
    service = client._waits

    def ready() -> bool:
        stats = service.statistics()
        return (
            stats["waiters"] == waiters
            and not stats["reading"]
            and not service._due
            and (stats["listening"] or not listening)
        )

    await eventually(ready)


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[PgConnection]:
    conn = await PgConnection.connect(url)
    async with conn:
        yield conn


async def listen_connections(url: str) -> int:
    """Sessions of this test's database whose last statement was a LISTEN."""
    async with connect(url) as db:
        count = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
        )
    return int(count)


# ------------------------------------------------------------------ contract basics


async def test_a_final_job_returns_at_once(store_url: str) -> None:
    worked = Worked()
    with trio.fail_after(30):
        async with tq.open_client(store_url, **SLOW_POLL) as waiter:
            job_id = (await waiter.insert(Work(n=7))).job.id
            async with working(store_url, worked.workers):
                first = await waiter.job_wait(job_id)
            again = await waiter.job_wait(job_id)
    assert first.state is tq.JobState.COMPLETED
    assert again.state is tq.JobState.COMPLETED
    assert again.id == job_id


async def test_a_missing_job_raises_job_not_found(store_url: str) -> None:
    with trio.fail_after(30):
        async with tq.open_client(store_url, **FAST) as client:
            with pytest.raises(tq.JobNotFoundError):
                await client.job_wait(123_456_789)
            assert waits(client)["waited_jobs"] == 0


@pytest.mark.parametrize("bad", ["1", 1.0, True, None, 2**63, -(2**63) - 1])
async def test_a_bad_id_raises_validation_error_naming_job_id(store_url: str, bad: Any) -> None:
    async with tq.open_client(store_url, **FAST) as client:
        with pytest.raises(tq.ValidationError, match="job_id"):
            await client.job_wait(bad)
        assert waits(client)["waited_jobs"] == 0
        assert waits(client)["listeners_opened"] == 0


async def test_a_deleted_job_raises_job_not_found(store_url: str) -> None:
    """A delete sends no notification: the re-check (every fetch_poll_interval) sees it."""
    with trio.fail_after(30):
        async with tq.open_client(store_url, **FAST) as client:
            job_id = (await client.insert(Work())).job.id
            async with trio.open_nursery() as nursery:
                failures: list[BaseException] = []

                async def wait() -> None:
                    try:
                        await client.job_wait(job_id)
                    except tq.JobNotFoundError as exc:
                        failures.append(exc)

                nursery.start_soon(wait)
                await registered(client, 1)
                await client.job_delete(job_id)
            assert len(failures) == 1
            assert waits(client)["waited_jobs"] == 0


# ------------------------------------------------------------------ across clients


@pytest.mark.parametrize("end", ["completed", "discarded", "cancelled running", "cancelled queued"])
async def test_an_insert_only_client_sees_the_end_another_client_writes(
    store_url: str, end: str
) -> None:
    """The waiter (insert-only) registers before anything happens to the job; a working
    client then runs it (or a third client cancels it). Only a notification can wake the
    waiter within the test (it re-checks once a minute)."""
    worked = Worked()
    mode = {"completed": "ok", "discarded": "fail"}.get(end, "block")
    with trio.fail_after(30):
        async with (
            tq.open_client(store_url, args_types=[Work], **SLOW_POLL) as waiter,
            tq.open_client(store_url, **FAST) as third,
        ):
            opts = tq.InsertOpts(max_attempts=1)
            job_id = (await waiter.insert(Work(mode, n=3), opts)).job.id
            assert waits(waiter)["listeners_opened"] == 0  # none before the first wait
            waited = Waited(waiter)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waited.wait, job_id)
                await registered(waiter, 1)
                if end == "cancelled queued":
                    await third.job_cancel(job_id)
                else:
                    async with working(store_url, worked.workers):
                        if end == "cancelled running":
                            await worked.blocking.wait()
                            await third.job_cancel(job_id)
                        await waited.all_in.wait()
    [job] = waited.jobs
    assert job.id == job_id
    expected = {
        "completed": tq.JobState.COMPLETED,
        "discarded": tq.JobState.DISCARDED,
    }.get(end, tq.JobState.CANCELLED)
    assert job.state is expected
    assert isinstance(job.args, Work)
    if end == "discarded":
        assert job.errors and "this job fails" in job.errors[-1].error


async def test_a_working_client_waits_on_its_runtime_notifier(store_url: str) -> None:
    """A client with queues LISTENs once, on its runtime's notifier, for its own waits too;
    it waits for a job that it runs itself."""
    worked = Worked()
    with trio.fail_after(30):
        async with working(store_url, worked.workers, **SLOW_POLL) as client:
            job = await client.job_wait((await client.insert(Work(n=5))).job.id)
            assert job.state is tq.JobState.COMPLETED
            stats = waits(client)
            assert stats["source"] == "runtime notifier"
            assert stats["listeners_opened"] == 0
            if not store_url.startswith("memory://"):
                assert await listen_connections(store_url) == 1


async def test_waits_on_one_client_share_one_listener_and_one_registry(store_url: str) -> None:
    """200 waiters on 200 jobs: one registry entry per job, one LISTEN connection for all
    of them; the jobs are worked by a poll_only client, which LISTENs to nothing."""
    worked = Worked()
    count = 200
    with trio.fail_after(60):
        async with tq.open_client(store_url, **SLOW_POLL) as waiter:
            results = await waiter.insert_many([Work(n=i) for i in range(count)])
            ids = [r.job.id for r in results]
            waited = Waited(waiter, count)
            done = waited.jobs
            async with trio.open_nursery() as nursery:
                for job_id in ids:
                    nursery.start_soon(waited.wait, job_id)
                await registered(waiter, count)
                stats = waits(waiter)
                assert stats["waited_jobs"] == count
                assert stats["listeners_opened"] == 1
                if not store_url.startswith("memory://"):
                    assert await listen_connections(store_url) == 1
                async with working(store_url, worked.workers, max_workers=50, poll_only=True):
                    await waited.all_in.wait()
            assert sorted(j.id for j in done) == sorted(ids)
            assert {j.state for j in done} == {tq.JobState.COMPLETED}
            assert waits(waiter)["waited_jobs"] == 0
            assert waits(waiter)["listeners_opened"] == 1


async def test_many_waiters_woken_by_one_notification_cost_one_read(database_url: str) -> None:
    """200 jobs end in one write that sends one notification (as the completer's batch
    does): their 200 waiters are woken by one read, and 50 more waiters on one of the jobs
    share its registry entry."""
    count = 200
    done: list[tq.Job[Any]] = []
    with trio.fail_after(60):
        async with tq.open_client(database_url, **SLOW_POLL) as waiter:
            ids = [r.job.id for r in await waiter.insert_many([Work()] * count)]
            async with trio.open_nursery() as nursery:

                async def wait(job_id: int) -> None:
                    done.append(await waiter.job_wait(job_id))

                for job_id in ids:
                    nursery.start_soon(wait, job_id)
                for _ in range(50):
                    nursery.start_soon(wait, ids[0])
                await registered(waiter, count + 50)
                assert waits(waiter)["waited_jobs"] == count
                before = waits(waiter)["reads"]
                async with connect(database_url) as db, db.transaction():
                    await db.execute(
                        "UPDATE tq_job SET state = 'completed', finalized_at = now()"
                        " WHERE id = ANY($1::bigint[])",
                        [ids],
                    )
                    await db.execute("SELECT tq_notify_final($1::bigint[])", [ids])
        assert len(done) == count + 50
        assert waits(waiter)["reads"] == before + 1


# ------------------------------------------------------------------ listener, polling


async def test_after_the_listener_reconnects_every_waiter_checks_again(database_url: str) -> None:
    """A job ends while the LISTEN connection is down (here: with no notification at
    all); once the listener is back, its waiter reads the job again and returns."""
    got: list[tq.Job[Any]] = []
    with trio.fail_after(30):
        async with tq.open_client(database_url, **SLOW_POLL) as waiter:
            job_id = (await waiter.insert(Work())).job.id
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    got.append(await waiter.job_wait(job_id))

                nursery.start_soon(wait)
                await registered(waiter, 1)
                async with connect(database_url) as db:
                    await db.execute(
                        "UPDATE tq_job SET state = 'cancelled', finalized_at = now() WHERE id = $1",
                        [job_id],
                    )
                    await db.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
                    )
    [job] = got
    assert job.state is tq.JobState.CANCELLED
    assert waits(waiter)["reads"] >= 2


async def test_poll_only_clients_wait_by_polling(store_url: str) -> None:
    worked = Worked()
    with trio.fail_after(30):
        async with tq.open_client(store_url, poll_only=True, **FAST) as waiter:
            job_id = (await waiter.insert(Work(n=1))).job.id
            waited = Waited(waiter)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waited.wait, job_id)
                await registered(waiter, 1, listening=False)
                async with working(store_url, worked.workers, poll_only=True):
                    if not store_url.startswith("memory://"):
                        assert await listen_connections(store_url) == 0
                    await waited.all_in.wait()
            assert waited.jobs[0].state is tq.JobState.COMPLETED
            stats = waits(waiter)
            assert stats["source"] == "polling"
            assert stats["listeners_opened"] == 0


# ------------------------------------------------------------------ cancellation, stopping


async def test_a_cancelled_waiter_returns_and_leaves_no_registration(store_url: str) -> None:
    with trio.fail_after(30):
        async with tq.open_client(store_url, **SLOW_POLL) as client:
            job_id = (await client.insert(Work())).job.id
            with trio.move_on_after(0.2) as scope:
                await client.job_wait(job_id)
            assert scope.cancelled_caught
            assert waits(client)["waited_jobs"] == 0
            assert waits(client)["waiters"] == 0
            # Another waiter on the same job: cancelling one leaves the other waiting.
            async with trio.open_nursery() as nursery:
                got: list[tq.Job[Any]] = []

                async def wait() -> None:
                    got.append(await client.job_wait(job_id))

                nursery.start_soon(wait)
                with trio.move_on_after(0.2) as scope:
                    await client.job_wait(job_id)
                assert scope.cancelled_caught
                await registered(client, 1)
                assert waits(client)["waited_jobs"] == 1
                await client.job_cancel(job_id)
            assert got[0].state is tq.JobState.CANCELLED
            assert waits(client)["waited_jobs"] == 0


@pytest.mark.parametrize("queues", [False, True], ids=["insert-only", "working"])
async def test_waits_still_pending_when_the_client_closes_raise(
    store_url: str, queues: bool
) -> None:
    """Waiters in tasks outside the client's block raise TrioqueueError once the block
    ends (for a working client: once its runtime has stopped), instead of hanging; a wait
    after that raises at once."""
    errors: list[BaseException] = []
    opened = (
        working(store_url, Worked().workers, **SLOW_POLL)
        if queues
        else tq.open_client(store_url, **SLOW_POLL)
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as outside:
            async with opened as client:
                # Not worked even by the working client: it runs only the default queue.
                job_id = (await client.insert(Work(), tq.InsertOpts(queue="elsewhere"))).job.id

                async def wait() -> None:
                    try:
                        await client.job_wait(job_id)
                    except tq.TrioqueueError as exc:
                        errors.append(exc)

                for _ in range(3):
                    outside.start_soon(wait)
                await registered(client, 3)
        assert len(errors) == 3
        assert all("client closed" in str(e) for e in errors)
        assert not isinstance(errors[0], tq.JobNotFoundError)
        with pytest.raises(tq.TrioqueueError, match="client closed"):
            await client.job_wait(job_id)


async def test_waits_go_on_after_client_stop_until_the_block_ends(store_url: str) -> None:
    """``client.stop()`` stops the runtime and its notifier; the client's waits carry on,
    on a listener of their own, and see a job another client completes afterwards."""
    worked = Worked()
    with trio.fail_after(30):
        async with working(store_url, worked.workers, **SLOW_POLL) as client:
            await client.stop()
            job_id = (await client.insert(Work(n=2))).job.id
            waited = Waited(client)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waited.wait, job_id)
                await registered(client, 1)
                assert waits(client)["source"] == "own listener"
                async with working(store_url, Worked().workers):
                    await waited.all_in.wait()
            assert waited.jobs[0].state is tq.JobState.COMPLETED


# ------------------------------------------------------------------ another OS process

WAITER_SCRIPT = """
import json, sys
import trio
import trioqueue as tq

async def main(url: str, job_id: int) -> None:
    async with tq.open_client(url, fetch_poll_interval=60.0) as client:
        async with trio.open_nursery() as nursery:
            async def report() -> None:
                while True:
                    stats = client._waits.statistics()
                    if stats["waiters"] == 1 and stats["listening"] and not stats["reading"]:
                        print("waiting", flush=True)
                        return
                    await trio.sleep(0.01)
            nursery.start_soon(report)
            job = await client.job_wait(job_id)
        print("done", job.state.value, json.dumps(job.output), flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_a_waiter_in_another_process_sees_a_job_completed_here(database_url: str) -> None:
    worked = Worked()
    with trio.fail_after(60):
        async with tq.open_client(database_url, **FAST) as inserter:
            job_id = (await inserter.insert(Work(n=42))).job.id
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", WAITER_SCRIPT, database_url, str(job_id)],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            lines = Lines(proc.stdout)
            assert await lines.next() == "waiting"
            async with working(database_url, worked.workers):
                with trio.fail_after(20):  # the waiter re-checks only once a minute
                    line = await lines.next()
            word, state, output = line.split(" ", 2)
            assert (word, state) == ("done", "completed")
            assert json.loads(output) == {"n": 42}
            assert await proc.wait() == 0
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()


class Lines:
    """The lines a process prints."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise AssertionError(f"the process ended; it printed {bytes(self._buffer)!r}")
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode()
