"""Leader election and the leader-only maintenance services, against PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, cast

import attrs
import trio
from support import FAST, eventually, wait_fetches

import trioqueue as tq
from trioqueue._maintenance.cleaner import (
    Cleaner,
    CleanerConfig,
    QueueCleaner,
    QueueCleanerConfig,
)
from trioqueue._maintenance.rescuer import Rescuer, RescuerConfig
from trioqueue._maintenance.scheduler import Scheduler, SchedulerConfig
from trioqueue._outcome import default_retry_delay
from trioqueue.driver.faults import FaultyDriver
from trioqueue.driver.postgres import open_pool
from trioqueue.driver.postgres.driver import PostgresDriver
from trioqueue.driver.protocol import Driver


@attrs.frozen
class NoopArgs:
    kind: ClassVar[str] = "noop"
    n: int = 0


@attrs.frozen
class SlowArgs:
    kind: ClassVar[str] = "slow"


@attrs.frozen
class EndlessArgs:
    kind: ClassVar[str] = "endless"


def _workers() -> tq.Workers:
    workers = tq.Workers()

    async def noop(job: tq.Job[NoopArgs]) -> None:
        pass

    async def slow(job: tq.Job[SlowArgs]) -> None:
        pass

    async def endless(job: tq.Job[EndlessArgs]) -> None:
        pass

    workers.add(NoopArgs, noop)
    workers.add(SlowArgs, slow, timeout=7200.0)
    workers.add(EndlessArgs, endless, timeout=None)
    return workers


ONE_S = timedelta(seconds=1)


def _now() -> datetime:
    return datetime.now(UTC)


@asynccontextmanager
async def _driver(url: str) -> AsyncIterator[PostgresDriver]:
    async with open_pool(url, max_size=4) as pool:
        yield PostgresDriver(pool, url)


@asynccontextmanager
async def _counted(url: str) -> AsyncIterator[FaultyDriver]:
    """A driver of its own for one client, counting its calls: a FaultyDriver without
    faults (``calls["leader_attempt_elect"]``: elections tried and terms renewed)."""
    async with _driver(url) as driver:
        yield FaultyDriver(driver)


def _elections(driver: FaultyDriver) -> int:
    return driver.calls["leader_attempt_elect"]


async def _sql(client: tq.Client, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with client.transaction() as tx:
        return await tx.fetch(query, *params)


# ------------------------------------------------------------------ leader election


async def test_two_clients_elect_exactly_one_leader_and_fail_over(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with (
        _counted(database_url) as da,
        _counted(database_url) as db,
        tq.open_client(
            driver=cast(Driver, da), workers=workers, queues=queues, id="client-a", **FAST
        ) as a,
        tq.open_client(
            driver=cast(Driver, db), workers=workers, queues=queues, id="client-b", **FAST
        ) as b,
    ):
        await eventually(lambda: a.is_leader or b.is_leader)
        # Several terms pass (each client tries, or renews, four more times); never two
        # leaders at once meanwhile.
        targets = [(da, _elections(da) + 4), (db, _elections(db) + 4)]

        def terms_passed() -> bool:
            assert not (a.is_leader and b.is_leader)
            return all(_elections(d) >= n for d, n in targets)

        await eventually(terms_passed)
        leader, follower = (a, b) if a.is_leader else (b, a)
        rows = await _sql(follower, "SELECT leader_id FROM tq_leader")
        assert rows == [(leader.id,)]
        await leader.stop()
        assert not leader.is_leader
        # The resignation is announced: the follower takes over well within a term.
        await eventually(lambda: follower.is_leader, seconds=3.0)
        rows = await _sql(follower, "SELECT leader_id FROM tq_leader")
        assert rows == [(follower.id,)]


async def test_poll_only_follower_takes_over_after_the_leader_stops(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    config = {**FAST, "poll_only": True}
    async with tq.open_client(database_url, workers=workers, queues=queues, **config) as a:
        await eventually(lambda: a.is_leader)
        async with (
            _counted(database_url) as driver,
            tq.open_client(
                driver=cast(Driver, driver), workers=workers, queues=queues, **config
            ) as b,
        ):
            # b's first attempt has come back (the second one has begun): it lost.
            await eventually(lambda: _elections(driver) >= 2)
            assert not b.is_leader
            await a.stop()
            await eventually(lambda: b.is_leader, seconds=3.0)


async def test_leadership_expires_when_the_leader_vanishes(database_url: str) -> None:
    # A leader that died without resigning: its row simply expires.
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with tq.open_client(database_url) as inserter:
        await _sql(
            inserter,
            "INSERT INTO tq_leader (leader_id, elected_at, expires_at) VALUES ($1, $2, $3)",
            "ghost",
            _now(),
            _now() + timedelta(hours=1),
        )
    async with (
        _counted(database_url) as driver,
        tq.open_client(driver=cast(Driver, driver), workers=workers, queues=queues, **FAST) as c,
    ):
        # The first attempt has come back (the second one has begun): the ghost still led.
        await eventually(lambda: _elections(driver) >= 2)
        assert not c.is_leader
        # Its term runs out: moved into the past rather than waited for.
        await _sql(
            c, "UPDATE tq_leader SET expires_at = $1 WHERE leader_id = 'ghost'", _now() - ONE_S
        )
        await eventually(lambda: c.is_leader, seconds=5.0)


async def test_insert_only_client_is_never_leader(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with (
        _counted(database_url) as driver,
        tq.open_client(driver=cast(Driver, driver), **FAST) as client,
        _counted(database_url) as worker_driver,
        tq.open_client(
            driver=cast(Driver, worker_driver), workers=workers, queues=queues, **FAST
        ) as worker,
    ):
        # Elections go on here: the working client, opened after it, has been elected and
        # has renewed its term twice (two intervals), while this one never tried.
        await eventually(lambda: worker.is_leader and _elections(worker_driver) >= 3)
        assert _elections(driver) == 0
        assert not client.is_leader


async def test_leader_runs_the_scheduler(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with tq.open_client(database_url, workers=workers, queues=queues, **FAST) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
            at = _now() + timedelta(seconds=0.3)
            res = await client.insert(NoopArgs(), tq.InsertOpts(scheduled_at=at))
            assert res.job.state == tq.JobState.SCHEDULED
            with trio.fail_after(10):
                event = await events.receive()
            assert event.job is not None and event.job.id == res.job.id
            assert client.is_leader


# ------------------------------------------------------------------ scheduler


async def test_scheduler_moves_due_jobs_and_discards_unique_conflicts(database_url: str) -> None:
    unique = tq.UniqueOpts(
        by_args=True,
        by_state=[
            tq.JobState.AVAILABLE,
            tq.JobState.PENDING,
            tq.JobState.RUNNING,
            tq.JobState.SCHEDULED,
        ],
    )
    async with tq.open_client(database_url) as client, _driver(database_url) as driver:
        due = await client.insert(
            NoopArgs(1), tq.InsertOpts(scheduled_at=_now() + timedelta(hours=1))
        )
        later = await client.insert(
            NoopArgs(2), tq.InsertOpts(scheduled_at=_now() + timedelta(hours=2))
        )
        # A retryable job whose unique key is now held by a live available job.
        blocked = await client.insert(NoopArgs(3), tq.InsertOpts(unique=unique))
        await _sql(
            client,
            "UPDATE tq_job SET state = 'retryable', scheduled_at = $2 WHERE id = $1",
            blocked.job.id,
            _now() - timedelta(seconds=1),
        )
        holder = await client.insert(NoopArgs(3), tq.InsertOpts(unique=unique))
        assert not holder.unique_skipped_as_duplicate
        await _sql(
            client,
            "UPDATE tq_job SET scheduled_at = $2 WHERE id = $1",
            due.job.id,
            _now() - timedelta(seconds=1),
        )
        scheduler = Scheduler(driver, _now, SchedulerConfig(interval=1.0))
        result = await scheduler.run_once()
        assert result.made_available == {"default": 1}
        assert (await client.job_get(due.job.id)).state == tq.JobState.AVAILABLE
        assert (await client.job_get(later.job.id)).state == tq.JobState.SCHEDULED
        discarded = await client.job_get(blocked.job.id)
        assert discarded.state == tq.JobState.DISCARDED
        assert discarded.finalized_at is not None
        assert discarded.metadata["unique_key_conflict"] == "scheduler_discarded"


# ------------------------------------------------------------------ rescuer


async def _make_running(client: tq.Client, job_id: int, since: timedelta, **extra: Any) -> None:
    attempt = extra.get("attempt", 1)
    await _sql(
        client,
        "UPDATE tq_job SET state = 'running', attempt = $2, attempted_at = $3, "
        "metadata = metadata || $4::jsonb WHERE id = $1",
        job_id,
        attempt,
        _now() - since,
        extra.get("metadata", "{}"),
    )


async def test_rescuer_returns_stuck_jobs(database_url: str) -> None:
    workers = _workers()
    async with (
        tq.open_client(database_url, workers=workers) as client,
        _driver(database_url) as driver,
    ):
        stuck = (await client.insert(NoopArgs(1))).job
        spent = (await client.insert(NoopArgs(2), tq.InsertOpts(max_attempts=1))).job
        cancel = (await client.insert(NoopArgs(3))).job
        fresh = (await client.insert(NoopArgs(4))).job
        long_timeout = (await client.insert(SlowArgs())).job
        no_timeout = (await client.insert(EndlessArgs())).job
        unknown = (await client.insert(NoopArgs(5))).job
        await _make_running(client, stuck.id, timedelta(hours=2))
        await _make_running(client, spent.id, timedelta(hours=2))
        await _make_running(
            client, cancel.id, timedelta(hours=2), metadata='{"cancel_attempted_at": "x"}'
        )
        await _make_running(client, fresh.id, timedelta(minutes=5))
        await _make_running(client, long_timeout.id, timedelta(hours=1.5))
        await _make_running(client, no_timeout.id, timedelta(days=3))
        await _sql(client, "UPDATE tq_job SET kind = 'gone' WHERE id = $1", unknown.id)
        await _make_running(client, unknown.id, timedelta(hours=2))

        rescuer = Rescuer(
            driver,
            _now,
            workers,
            default_retry_delay,
            RescuerConfig(rescue_after=3600, scheduler_interval=5.0, batch_size=2),
        )
        result = await rescuer.run_once()
        assert result.rescued == {"available": 2, "discarded": 1, "cancelled": 1}
        assert result.skipped == 2  # long_timeout and no_timeout

        rescued = await client.job_get(stuck.id)
        assert rescued.state == tq.JobState.AVAILABLE  # first retry (~1 s) is due soon
        assert "rescued" in rescued.errors[-1].error
        assert rescued.errors[-1].attempt == 1
        assert rescued.metadata["rescue_count"] == 1
        assert (await client.job_get(spent.id)).state == tq.JobState.DISCARDED
        assert (await client.job_get(cancel.id)).state == tq.JobState.CANCELLED
        assert (await client.job_get(fresh.id)).state == tq.JobState.RUNNING
        assert (await client.job_get(long_timeout.id)).state == tq.JobState.RUNNING
        assert (await client.job_get(no_timeout.id)).state == tq.JobState.RUNNING
        assert (await client.job_get(unknown.id)).state == tq.JobState.AVAILABLE

        # A job past its worker's own (longer) timeout is rescued too.
        await _make_running(client, long_timeout.id, timedelta(hours=3))
        again = await rescuer.run_once()
        assert again.rescued == {"available": 1}


async def test_rescued_job_with_a_long_retry_becomes_retryable(database_url: str) -> None:
    workers = _workers()
    async with (
        tq.open_client(database_url, workers=workers) as client,
        _driver(database_url) as driver,
    ):
        job = (await client.insert(NoopArgs())).job
        await _make_running(client, job.id, timedelta(hours=2))
        rescuer = Rescuer(driver, _now, workers, lambda job: 600.0, RescuerConfig())
        await rescuer.run_once()
        rescued = await client.job_get(job.id)
        assert rescued.state == tq.JobState.RETRYABLE
        assert rescued.scheduled_at > _now() + timedelta(seconds=500)


async def test_running_client_rescues_a_dead_clients_job(database_url: str) -> None:
    workers = _workers()
    async with tq.open_client(database_url) as inserter:
        job = (await inserter.insert(NoopArgs(9))).job
        await _make_running(inserter, job.id, timedelta(seconds=5))
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with tq.open_client(
        database_url,
        workers=workers,
        queues=queues,
        rescue_stuck_jobs_after=1.0,
        rescuer_interval=0.2,
        **FAST,
    ) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
            with trio.fail_after(15):
                event = await events.receive()
        assert event.job is not None and event.job.id == job.id
        assert event.job.attempt == 2
        assert "rescued" in event.job.errors[0].error


# ------------------------------------------------------------------ cleaners


async def _finalize(client: tq.Client, job_id: int, state: str, age: timedelta) -> None:
    await _sql(
        client,
        "UPDATE tq_job SET state = $2::text::tq_job_state, finalized_at = $3 WHERE id = $1",
        job_id,
        state,
        _now() - age,
    )


async def test_cleaner_deletes_finalized_jobs_past_retention(database_url: str) -> None:
    async with tq.open_client(database_url) as client, _driver(database_url) as driver:
        ids: dict[str, int] = {}
        for name, state, age in [
            ("old_completed_1", "completed", timedelta(days=2)),
            ("old_completed_2", "completed", timedelta(days=2)),
            ("old_completed_3", "completed", timedelta(days=3)),
            ("new_completed", "completed", timedelta(hours=1)),
            ("old_cancelled", "cancelled", timedelta(days=2)),
            ("old_discarded", "discarded", timedelta(days=2)),
            ("older_discarded", "discarded", timedelta(days=8)),
        ]:
            job = (await client.insert(NoopArgs())).job
            await _finalize(client, job.id, state, age)
            ids[name] = job.id
        waiting = (await client.insert(NoopArgs())).job

        cleaner = Cleaner(
            driver,
            _now,
            CleanerConfig(cancelled_retention=None, batch_size=2),
        )
        deleted = await cleaner.run_once()
        assert deleted == {tq.JobState.COMPLETED: 3, tq.JobState.DISCARDED: 1}
        left = {j.id for j in (await client.job_list(tq.JobListParams(limit=100))).jobs}
        assert left == {
            ids["new_completed"],
            ids["old_cancelled"],
            ids["old_discarded"],
            waiting.id,
        }


async def test_queue_cleaner_keeps_fresh_and_paused_queues(database_url: str) -> None:
    async with tq.open_client(database_url) as client, _driver(database_url) as driver:
        await client.queue_pause("paused-stale")
        for name in ("stale", "paused-stale", "fresh"):
            await driver.queue_upsert(name, _now())
        await _sql(
            client,
            "UPDATE tq_queue SET updated_at = $1 WHERE name IN ('stale', 'paused-stale')",
            _now() - timedelta(days=2),
        )
        cleaner = QueueCleaner(driver, _now, QueueCleanerConfig())
        assert await cleaner.run_once() == ["stale"]
        names = {r[0] for r in await _sql(client, "SELECT name FROM tq_queue")}
        assert names == {"paused-stale", "fresh"}


# ------------------------------------------------------------------ queues across clients


async def test_pause_reaches_a_poll_only_client(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with (
        tq.open_client(
            database_url, workers=workers, queues=queues, poll_only=True, **FAST
        ) as worker,
        tq.open_client(database_url) as admin,
    ):
        async with worker.subscribe(
            tq.EventKind.QUEUE_PAUSED, tq.EventKind.QUEUE_RESUMED
        ) as events:
            await admin.queue_pause("default")
            with trio.fail_after(10):
                event = await events.receive()
            assert (event.kind, event.queue) == (tq.EventKind.QUEUE_PAUSED, "default")
            await admin.queue_resume("*")
            with trio.fail_after(10):
                event = await events.receive()
            assert (event.kind, event.queue) == (tq.EventKind.QUEUE_RESUMED, "default")


async def test_pause_event_reaches_another_listening_client(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with (
        tq.open_client(database_url, workers=workers, queues=queues, **FAST) as worker,
        tq.open_client(database_url) as admin,
    ):
        async with worker.subscribe(tq.EventKind.QUEUE_PAUSED) as events:
            await admin.queue_pause("default")
            with trio.fail_after(10):
                event = await events.receive()
            assert event.queue == "default"


async def test_pause_survives_a_restart(database_url: str) -> None:
    workers = _workers()
    queues = {"default": tq.QueueConfig(max_workers=2)}
    async with tq.open_client(database_url, workers=workers, queues=queues, **FAST) as client:
        await client.queue_pause("default")
    async with tq.open_client(database_url, workers=workers, queues=queues, **FAST) as client:
        job = (await client.insert(NoopArgs())).job
        await wait_fetches(client)  # fetches that saw the job, and left it
        assert (await client.job_get(job.id)).state == tq.JobState.AVAILABLE
        async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
            await client.queue_resume("default")
            with trio.fail_after(10):
                await events.receive()
