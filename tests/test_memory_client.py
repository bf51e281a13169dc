"""A whole client on the memory driver, on trio's real clock and on a MockClock, and what
is particular to the memory driver (its clock, its URLs, listener overflow, no SQL)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing
from support import FAST

import trioqueue as tq
from trioqueue.driver.memory import MemoryDriver, memory_driver_for_url
from trioqueue.driver.protocol import JobInsertParams
from trioqueue.migrations import latest_version, migrations

FINAL = (tq.JobState.COMPLETED, tq.JobState.CANCELLED, tq.JobState.DISCARDED)


@attrs.frozen
class Task:
    kind: ClassVar[str] = "task"
    mode: str
    n: int = 0


def _workers(runs: dict[int, int], started: dict[int, trio.Event]) -> tq.Workers:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        runs[job.id] = runs.get(job.id, 0) + 1
        mode = job.args.mode
        if mode == "fail-once" and runs[job.id] == 1:
            raise RuntimeError("first attempt fails")
        if mode == "fail-4" and runs[job.id] <= 4:
            raise RuntimeError(f"attempt {runs[job.id]} fails")
        if mode == "snooze-once" and runs[job.id] == 1:
            raise tq.JobSnooze(0.3)
        if mode == "cancel":
            raise tq.JobCancel("not wanted")
        if mode == "wait":
            started.setdefault(job.id, trio.Event()).set()
            await trio.sleep_forever()

    return workers


async def _until_final(client: tq.Client, job_ids: list[int]) -> dict[int, tq.Job[Any]]:
    """Poll until every job is finalized; return them."""
    while True:
        jobs = {i: await client.job_get(i) for i in job_ids}
        if all(j.state in FINAL for j in jobs.values()):
            return jobs
        await trio.sleep(0.05)


@pytest.fixture(params=["real-clock", "mock-clock"])
def clock(request: pytest.FixtureRequest) -> object:
    """Run the test on trio's real clock or on an autojumping MockClock (pytest-trio uses
    a ``trio.abc.Clock`` fixture value as the run's clock)."""
    if request.param == "mock-clock":
        return trio.testing.MockClock(autojump_threshold=0)
    return request.param


async def test_client_works_jobs_end_to_end(clock: object) -> None:
    runs: dict[int, int] = {}
    started: dict[int, trio.Event] = {}
    driver = MemoryDriver()
    with trio.fail_after(30):
        async with tq.open_client(
            driver=driver,
            workers=_workers(runs, started),
            queues={"default": tq.QueueConfig(max_workers=10)},
            retry_policy=lambda job: 0.1,
            id="mem-client",
            **FAST,
        ) as client:
            results = await client.insert_many(
                [Task(mode) for mode in ("ok", "fail-once", "snooze-once", "cancel", "wait")]
            )
            ok, retried, snoozed, cancelled, waiting = (r.job.id for r in results)
            await started.setdefault(waiting, trio.Event()).wait()
            running = await client.job_cancel(waiting)
            assert running.state is tq.JobState.RUNNING
            jobs = await _until_final(client, [ok, retried, snoozed, cancelled, waiting])
            await client.stop()
    assert jobs[ok].state is tq.JobState.COMPLETED
    assert jobs[ok].attempted_by == ["mem-client"]
    assert (jobs[retried].state, jobs[retried].attempt) == (tq.JobState.COMPLETED, 2)
    [error] = jobs[retried].errors
    assert (error.attempt, "first attempt fails" in error.error) == (1, True)
    assert (jobs[snoozed].state, jobs[snoozed].attempt) == (tq.JobState.COMPLETED, 1)
    assert jobs[snoozed].metadata.get("snoozes") == 1
    assert jobs[snoozed].errors == []
    assert jobs[cancelled].state is tq.JobState.CANCELLED
    assert jobs[waiting].state is tq.JobState.CANCELLED
    assert "cancel_attempted_at" in jobs[waiting].metadata
    assert runs == {ok: 1, retried: 2, snoozed: 2, cancelled: 1, waiting: 1}
    # Nothing was left running and the leader resigned on the way out.
    assert await driver.job_list(tq.JobListParams(states=[tq.JobState.RUNNING])) == []
    assert await driver.leader_get() is None


async def test_default_backoff_passes_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Four failures with the default backoff (1 + 16 + 81 + 256 s, ±10 %) cost minutes of
    virtual time and well under a second of real time."""
    runs: dict[int, int] = {}
    driver = MemoryDriver()
    real_start = time.monotonic()
    virtual_start = trio.current_time()
    with trio.fail_after(3600):
        async with tq.open_client(
            driver=driver,
            workers=_workers(runs, {}),
            queues={"default": tq.QueueConfig(max_workers=5)},
            scheduler_interval=5.0,
        ) as client:
            created = driver.clock()
            job_id = (await client.insert(Task("fail-4"))).job.id
            [job] = (await _until_final(client, [job_id])).values()
    virtual = trio.current_time() - virtual_start
    assert (job.state, job.attempt, len(job.errors)) == (tq.JobState.COMPLETED, 5, 4)
    assert runs == {job_id: 5}
    assert 0.9 * 354 <= virtual <= 1.1 * 354 + 60
    assert time.monotonic() - real_start < 10
    # The driver's clock followed trio's.
    assert job.finalized_at is not None
    assert job.finalized_at - created >= timedelta(seconds=0.9 * 354)


async def test_memory_url_names_a_shared_store() -> None:
    url = f"memory://shared-{id(object())}"
    runs: dict[int, int] = {}
    async with tq.open_client(url) as inserter:
        job_id = (await inserter.insert(Task("ok"))).job.id
    assert memory_driver_for_url(url) is memory_driver_for_url(url)
    with trio.fail_after(30):
        async with tq.open_client(
            url,
            workers=_workers(runs, {}),
            queues={"default": tq.QueueConfig(max_workers=2)},
            **FAST,
        ) as worker:
            [job] = (await _until_final(worker, [job_id])).values()
    assert job.state is tq.JobState.COMPLETED
    # A bare memory:// is a fresh store every time.
    async with tq.open_client("memory://") as private:
        with pytest.raises(tq.JobNotFoundError):
            await private.job_get(job_id)
    assert memory_driver_for_url("memory://") is not memory_driver_for_url("memory://")


async def test_migrate_is_a_no_op_for_memory_urls() -> None:
    assert await tq.migrate("memory://anything") == []
    statuses = await tq.migration_list("memory://anything")
    assert [s.version for s in statuses] == [m.version for m in migrations()]
    assert all(s.applied for s in statuses)
    assert await MemoryDriver().schema_version() == latest_version()


async def test_transactions_run_no_sql() -> None:
    async with tq.open_client(driver=MemoryDriver()) as client:
        async with client.transaction() as tx:
            with pytest.raises(tq.TrioqueueError, match="runs no SQL"):
                await tx.execute("SELECT 1")
            with pytest.raises(tq.TrioqueueError, match="runs no SQL"):
                await tx.fetchval("SELECT 1")
            # The transaction is still usable for trioqueue's own operations.
            res = await client.insert_tx(tx, Task("ok"))
            assert (await client.job_get_tx(tx, res.job.id)).id == res.job.id
        assert (await client.job_get(res.job.id)).state is tq.JobState.AVAILABLE


async def test_waiting_for_ones_own_transaction_raises_instead_of_hanging() -> None:
    driver = MemoryDriver()
    now = driver.clock()
    params = JobInsertParams(
        args_json="{}",
        kind="k",
        max_attempts=1,
        metadata_json="{}",
        priority=1,
        queue="default",
        scheduled_at=now,
        state=tq.JobState.AVAILABLE,
        tags=(),
        unique_key=b"key",
        unique_states="11111111",
    )
    async with driver.transaction() as tx:
        await driver.job_insert_many([params], [], now, ex=tx)
        with pytest.raises(tq.DatabaseError, match="wait forever"):
            await driver.job_insert_many([params], [], now)


async def test_clock_follows_trio_and_stays_monotonic_across_runs() -> None:
    driver = MemoryDriver()
    wall = datetime.now(UTC)
    start = driver.clock()
    assert abs((start - wall).total_seconds()) < 5
    await trio.sleep(0.01)
    assert driver.clock() > start

    async def later(seconds: float) -> datetime:
        before = driver.clock()
        await trio.sleep(seconds)
        after = driver.clock()
        assert after - before >= timedelta(seconds=seconds)
        return after

    # Another run, on a mock clock that starts at 0 and jumps an hour: time goes on.
    def run_mocked() -> datetime:
        clock = trio.testing.MockClock(autojump_threshold=0)
        return trio.run(later, 3600.0, clock=clock)

    jumped = await trio.to_thread.run_sync(lambda: run_mocked())
    assert jumped - start >= timedelta(hours=1)
    # Back in this run: never behind what was already handed out.
    assert driver.clock() >= jumped


def test_clock_outside_trio_is_the_wall_clock() -> None:
    driver = MemoryDriver()
    first = driver.clock()
    assert abs((first - datetime.now(UTC)).total_seconds()) < 5
    assert driver.clock() >= first


async def test_listener_overflow_is_reported_not_silent() -> None:
    driver = MemoryDriver(listener_buffer=3)
    async with driver.open_listener(["c"]) as listener:
        await driver.notify_many("c", ["1", "2"])
        assert [n.payload for n in await listener.wait()] == ["1", "2"]
        await driver.notify_many("c", ["a", "b", "c", "d"])
        with pytest.raises(tq.DatabaseError, match="lost"):
            await listener.wait()
        await driver.notify_many("c", ["after"])
        assert [n.payload for n in await listener.wait()] == ["after"]


@asynccontextmanager
async def _two_clients(driver: MemoryDriver) -> AsyncIterator[tuple[tq.Client, tq.Client]]:
    async with (
        tq.open_client(driver=driver) as a,
        tq.open_client(driver=driver) as b,
    ):
        yield a, b


async def test_clients_sharing_a_driver_share_the_store() -> None:
    driver = MemoryDriver()
    async with _two_clients(driver) as (a, b):
        job = (await a.insert(Task("ok"), tq.InsertOpts(unique=tq.UniqueOpts()))).job
        dup = await b.insert(Task("ok"), tq.InsertOpts(unique=tq.UniqueOpts()))
        assert dup.unique_skipped_as_duplicate and dup.job.id == job.id
        await b.queue_pause("default")
        assert await driver.queue_paused(["default"]) == {"default"}
