"""Stopping a client (docs/architecture.md, "Stopping"), against a real PostgreSQL.

Soft stop (leaving the block, ``stop()``): no more fetching, running jobs finish.
Hard stop (``stop(cancel=True)``, ``soft_stop_timeout``, cancellation from outside): running
jobs are cancelled and handed back ``available`` with their attempt given back and no error.
Whatever the stop, it returns, and no job the client fetched is left ``running``.
"""

from __future__ import annotations

import collections
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
from support import FAST, Sleep, Tracker, working

import trioqueue as tq
from trioqueue.driver.faults import Fault, FaultyDriver
from trioqueue.driver.postgres.driver import open_postgres_driver


async def all_jobs(url: str) -> list[tq.Job[Any]]:
    """Every job, read through a fresh insert-only client."""
    async with tq.open_client(url) as client:
        page = await client.job_list(tq.JobListParams(limit=10_000))
    return page.jobs


async def test_leaving_the_block_is_a_soft_stop(database_url: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        async with working(database_url, tracker.workers(), max_workers=3) as client:
            await client.insert_many([Sleep(0.5) for _ in range(5)])
            await tracker.wait_started(3)
        jobs = await all_jobs(database_url)

    assert tracker.finished == 3
    assert tracker.cancelled == 0
    states = collections.Counter(j.state for j in jobs)
    # The running jobs finished; the two never fetched were left alone.
    assert states == {tq.JobState.COMPLETED: 3, tq.JobState.AVAILABLE: 2}
    for job in jobs:
        if job.state is tq.JobState.AVAILABLE:
            assert job.attempt == 0
    assert tracker.overlaps == []


async def test_stop_is_a_soft_stop_and_the_client_can_still_insert(database_url: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        async with working(database_url, tracker.workers(), max_workers=3) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as sub:
                first = [r.job for r in await client.insert_many([Sleep(0.5)] * 3)]
                await tracker.wait_started(3)
                await client.stop()
                assert tracker.finished == 3
                events = [e async for e in sub]
            await client.stop()  # idempotent
            later = (await client.insert(Sleep())).job
            assert later.state is tq.JobState.AVAILABLE
            for job in first:
                assert (await client.job_get(job.id)).state is tq.JobState.COMPLETED
            # A stopped client fetches nothing: another client, started after it, is the
            # one that runs the job inserted after the stop.
            async with (
                working(database_url, tracker.workers(), id="after-the-stop") as other,
                other.subscribe(tq.EventKind.JOB_COMPLETED) as done,
            ):
                ran = (await done.receive()).job
            assert ran is not None and ran.id == later.id
            assert ran.attempted_by == ["after-the-stop"]

    assert sorted(e.job.id for e in events if e.job) == sorted(j.id for j in first)
    assert tracker.overlaps == []


async def test_cancelled_stop_call_still_stops(database_url: str) -> None:
    """stop() is documented to go on when the call itself is cancelled."""
    tracker = Tracker()
    with trio.fail_after(30):
        async with working(database_url, tracker.workers()) as client:
            job = (await client.insert(Sleep(0.5))).job
            await tracker.wait_started(1)
            with trio.move_on_after(0.05):
                await client.stop()
        jobs = await all_jobs(database_url)

    assert tracker.finished == 1
    assert [(j.id, j.state) for j in jobs] == [(job.id, tq.JobState.COMPLETED)]
    assert tracker.overlaps == []


async def test_hard_stop_hands_running_jobs_back(database_url: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        async with working(database_url, tracker.workers(), max_workers=3) as client:
            async with client.subscribe(*tq.EventKind) as sub:
                ids = [r.job.id for r in await client.insert_many([Sleep(60)] * 3)]
                await tracker.wait_started(3)
                await client.stop(cancel=True)
                events = [e async for e in sub]
        jobs = await all_jobs(database_url)

    assert tracker.cancelled == 3
    assert tracker.finished == 0
    assert sorted(e.job.id for e in events if e.job) == sorted(ids)
    for event in events:
        assert event.kind is tq.EventKind.JOB_INTERRUPTED
        assert event.job is not None and event.job.state is tq.JobState.AVAILABLE
    for job in jobs:
        assert job.state is tq.JobState.AVAILABLE
        assert job.attempt == 0
        assert job.errors == []
        assert job.finalized_at is None
    assert tracker.overlaps == []


@pytest.mark.parametrize("how", ["stop", "leave_block"])
async def test_soft_stop_timeout_escalates(database_url: str, how: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        async with working(database_url, tracker.workers(), soft_stop_timeout=0.3) as client:
            job = (await client.insert(Sleep(60))).job
            await tracker.wait_started(1)
            if how == "stop":
                await client.stop()
        [after] = await all_jobs(database_url)

    assert tracker.cancelled == 1
    assert after.id == job.id
    assert after.state is tq.JobState.AVAILABLE
    assert after.attempt == 0
    assert after.errors == []
    assert tracker.overlaps == []


async def test_outside_cancellation_during_soft_stop_escalates(database_url: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as cs:
                async with working(database_url, tracker.workers()) as client:
                    await client.insert(Sleep(60))
                    await tracker.wait_started(1)
                    # Leaving the block waits for the job, until the cancellation arrives
                    # (later than the block's exit: a soft stop is in progress by then).
                    nursery.start_soon(_cancel_later, cs, 0.2)
        assert cs.cancelled_caught
        [job] = await all_jobs(database_url)

    assert tracker.cancelled == 1
    assert job.state is tq.JobState.AVAILABLE
    assert job.attempt == 0
    assert tracker.overlaps == []


async def _cancel_later(scope: trio.CancelScope, seconds: float) -> None:
    await trio.sleep(seconds)
    scope.cancel()


@pytest.mark.parametrize("then", ["returns", "sleeps"])
@pytest.mark.parametrize("how", ["stop_cancel", "outside"])
async def test_worker_ignoring_cancellation_still_ends(
    database_url: str, how: str, then: str
) -> None:
    """A worker that shields itself for 0.3 s delays the hard stop but is still recorded:
    completed if it then returns, handed back if it then reaches a checkpoint."""
    tracker = Tracker()
    seconds = -1.0 if then == "returns" else 60.0
    with trio.fail_after(30):
        with trio.CancelScope() as outer:
            async with working(database_url, tracker.workers(shield=0.3)) as client:
                await client.insert(Sleep(seconds))
                await tracker.wait_started(1)
                if how == "stop_cancel":
                    await client.stop(cancel=True)
                else:
                    outer.cancel()
                    await trio.sleep_forever()
        [job] = await all_jobs(database_url)

    if then == "returns":
        assert tracker.finished == 1
        assert job.state is tq.JobState.COMPLETED
    else:
        assert tracker.cancelled == 1
        assert job.state is tq.JobState.AVAILABLE
        assert job.attempt == 0
    assert tracker.overlaps == []


async def test_cancelled_from_outside_at_random_moments(database_url: str) -> None:
    """Cancel a busy client from outside at random moments, over and over: afterwards no
    job is ``running``; each is completed, or available with its attempt given back."""
    rng = random.Random(20240611)
    tracker = Tracker()
    workers = tracker.workers()
    durations = [rng.choice([0.0, 0.01, 0.05, 0.1, 0.2, 0.5]) for _ in range(400)]

    with trio.fail_after(100):
        async with tq.open_client(database_url) as inserter:
            await inserter.insert_many([Sleep(d) for d in durations])
        for i in range(20):
            delay = rng.uniform(0, 0.3)
            with trio.fail_after(20), trio.CancelScope() as outside:
                async with working(database_url, workers, max_workers=20, id=f"iter-{i}"):
                    # A random moment of a running client's life (not of its start-up,
                    # whose length depends on the machine).
                    await trio.sleep(delay)
                    outside.cancel()
                    await trio.sleep_forever()
            assert not tracker.running
            jobs = await all_jobs(database_url)
            states = collections.Counter(j.state for j in jobs)
            assert set(states) <= {tq.JobState.AVAILABLE, tq.JobState.COMPLETED}, (i, states)
            assert sum(states.values()) == len(durations)
            for job in jobs:
                assert job.errors == [], job
                if job.state is tq.JobState.AVAILABLE:
                    assert job.attempt == 0, job
                else:
                    assert job.attempt == 1, job
            assert states[tq.JobState.COMPLETED] == tracker.finished

    # The random stops did hit running jobs, and work did get done in between.
    assert tracker.cancelled > 0
    assert tracker.finished > 0
    assert tracker.overlaps == []


@attrs.define
class _SlowRegistration:
    """A driver whose queue registrations each take ``seconds``; ``began`` is set when a
    start-up's first one begins."""

    inner: Any
    seconds: float
    began: trio.Event = attrs.field(factory=trio.Event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def queue_upsert(self, *args: Any, **kwargs: Any) -> Any:
        self.began.set()
        await trio.sleep(self.seconds)
        return await self.inner.queue_upsert(*args, **kwargs)


async def test_cancelled_from_outside_at_random_moments_of_start_up(
    database_url: str, pg_driver: Any
) -> None:
    """Cancel clients from outside at random moments of their start-up (registering three
    queues, each a slow statement, then starting the producers) and just after: each
    exits, and no job is left ``running``."""
    rng = random.Random(20261203)
    tracker = Tracker()
    queues = {name: tq.QueueConfig(max_workers=5) for name in ("a", "b", "c")}
    async with tq.open_client(database_url) as inserter:
        for name in queues:
            await inserter.insert_many([(Sleep(0.2), tq.InsertOpts(queue=name))] * 200)

    async def cancel_during_start_up(
        slow: _SlowRegistration, scope: trio.CancelScope, delay: float, after_a_job: bool
    ) -> None:
        await slow.began.wait()  # measured from the first registration: start-up is on
        if after_a_job:  # or from a job's start: the producers run
            await tracker.wait_started(tracker.started + 1)
        await trio.sleep(delay)
        scope.cancel()

    for i in range(12):
        slow = _SlowRegistration(pg_driver, 0.1)
        with trio.fail_after(20), trio.CancelScope() as outside:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    cancel_during_start_up, slow, outside, rng.uniform(0, 0.35), i % 4 == 3
                )
                async with tq.open_client(
                    driver=slow,
                    workers=tracker.workers(),
                    queues=queues,
                    id=f"start-{i}",
                    **FAST,
                ):
                    await trio.sleep_forever()
        assert outside.cancelled_caught
        assert not tracker.running
        jobs = await all_jobs(database_url)
        assert {j.state for j in jobs} <= {tq.JobState.AVAILABLE, tq.JobState.COMPLETED}
        for job in jobs:
            assert job.attempt == (1 if job.state is tq.JobState.COMPLETED else 0), job
            assert job.errors == [], job
    assert tracker.overlaps == []
    assert tracker.started > 0  # some cancels came after the producers had started


class _Stop:
    """How a stop begins, for the tests that run each one."""

    SOFT = "soft"
    HARD = "hard"
    SOFT_STOP_TIMEOUT = "soft_stop_timeout"
    OUTSIDE = "outside"


@pytest.mark.parametrize("how", [_Stop.SOFT, _Stop.HARD, _Stop.SOFT_STOP_TIMEOUT, _Stop.OUTSIDE])
async def test_never_reading_subscriber_cannot_block_shutdown(
    database_url: str, pg_driver: Any, how: str
) -> None:
    """River's completer bug class: a subscriber that never reads must not stall the
    completer, whatever the stop. Outcomes are pending when the stop begins (each write
    is slowed down, and jobs are still running); the stop returns in bounded time; every
    event published is either in the subscriber's buffer or counted as dropped, and its
    stream ends; no job is left running."""
    n = 2000
    half = trio.Event()
    finished = 0
    workers = tq.Workers()

    @workers.worker(Sleep)
    async def work(job: tq.Job[Sleep]) -> None:
        nonlocal finished
        await trio.sleep(job.args.seconds)
        finished += 1
        if finished == n // 2:
            half.set()

    # A few jobs run long (fewer than the worker slots, so the rest get done): a soft stop
    # waits for them (soft_stop_timeout then cuts them short), a hard stop interrupts them.
    jobs = [Sleep(60.0 if i % 100 == 0 else 0.0) for i in range(n)]
    slow_writes = FaultyDriver(
        pg_driver, [Fault("job_set_state_if_running_many", "delay", times=None, seconds=0.05)]
    )
    config: dict[str, Any] = {}
    if how == _Stop.SOFT:
        jobs = [Sleep(0.0)] * n  # nothing long: a soft stop waits for what runs
    if how == _Stop.SOFT_STOP_TIMEOUT:
        config["soft_stop_timeout"] = 0.2
    async with tq.open_client(database_url) as inserter:
        assert await inserter.insert_many_fast(jobs) == n
    async with contextlib.AsyncExitStack() as after_client:
        with trio.fail_after(60), trio.CancelScope() as outer:
            async with tq.open_client(
                driver=slow_writes,
                workers=workers,
                queues={"default": tq.QueueConfig(max_workers=100)},
                **{**FAST, **config},
            ) as client:
                # Entered here, left only once the client has stopped: the subscription
                # lives through the whole shutdown and is read afterwards.
                stuck = await after_client.enter_async_context(
                    client.subscribe(*tq.EventKind, buffer=10)
                )
                await half.wait()
                assert client.statistics()["completer"].pending > 0
                with trio.fail_after(30):  # the stop itself is bounded
                    if how == _Stop.OUTSIDE:
                        outer.cancel()
                        await trio.sleep_forever()
                    await client.stop(cancel=how == _Stop.HARD)
        assert outer.cancelled_caught == (how == _Stop.OUTSIDE)
        published = client.statistics()["dispatcher"].published
        with trio.fail_after(5):  # the stream ends
            received = [event async for event in stuck]
        assert len(received) <= 10
        assert stuck.dropped > 0
        assert len(received) + stuck.dropped == published
    stored = await all_jobs(database_url)
    assert len(stored) == n
    states = collections.Counter(j.state for j in stored)
    assert set(states) <= {tq.JobState.COMPLETED, tq.JobState.AVAILABLE}, states
    if how == _Stop.SOFT:
        assert states[tq.JobState.COMPLETED] == finished
    for job in stored:
        assert job.attempt == (1 if job.state is tq.JobState.COMPLETED else 0), job
        assert job.errors == [], job


@pytest.fixture
async def pg_driver(database_url: str) -> AsyncIterator[Any]:
    """A PostgreSQL driver of the test's database, for the test to wrap."""
    async with open_postgres_driver(database_url) as driver:
        yield driver


@attrs.define
class _SlowFinalWrite:
    """A driver whose outcome writes are slow. The first is slow to cancel, as a
    PostgreSQL statement is (the connection waits, shielded, for the server to stop it):
    it lands all the same, and the completer sees the cancel only afterwards. Every later
    write takes ``later`` seconds first. ``in_flight`` is set once the first has begun."""

    inner: Any
    first: float
    later: float
    in_flight: trio.Event = attrs.field(factory=trio.Event)
    writes: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def job_set_state_if_running_many(self, *args: Any, **kwargs: Any) -> Any:
        self.writes += 1
        if self.writes > 1:
            await trio.sleep(self.later)
            return await self.inner.job_set_state_if_running_many(*args, **kwargs)
        self.in_flight.set()
        with trio.CancelScope(shield=True):
            await trio.sleep(self.first)
            return await self.inner.job_set_state_if_running_many(*args, **kwargs)


async def test_a_final_write_near_shutdown_timeout_still_reaches_subscribers(
    database_url: str, pg_driver: Any
) -> None:
    """The race between completer and dispatcher under cancellation from outside: the
    completer sees the cancel late (its write in flight is slow to cancel), then its
    final write takes most of ``shutdown_timeout``. Its events arrive after
    ``shutdown_timeout`` has passed since the cancel, and must still reach a subscriber
    that lives outside the cancelled scope: the dispatcher drains until the completer is
    done, with no deadline of its own."""
    timeout = 2.0
    release = trio.Event()
    sleepers = 5
    started = 0
    all_started = trio.Event()
    workers = tq.Workers()

    @workers.worker(Sleep)
    async def work(job: tq.Job[Sleep]) -> None:
        nonlocal started
        if job.args.seconds > 0:
            started += 1
            if started == sleepers:
                all_started.set()
            await trio.sleep(job.args.seconds)
        else:
            await release.wait()

    # The final flush starts half a shutdown_timeout after the cancel, and its write takes
    # three quarters of one: its events come after shutdown_timeout has passed since the
    # cancel, and still within the completer's own deadline (a quarter of a
    # shutdown_timeout of margin either side).
    slow = _SlowFinalWrite(pg_driver, first=timeout * 0.5, later=timeout * 0.75)
    async with tq.open_client(database_url) as inserter:
        await inserter.insert_many([Sleep(0.0)] + [Sleep(600.0)] * sleepers)
    events: list[tq.Event] = []

    async def read(client: tq.Client, task_status: trio.TaskStatus[None]) -> None:
        async with client.subscribe(*tq.EventKind, buffer=100) as sub:
            task_status.started()
            async for event in sub:
                events.append(event)

    with trio.fail_after(30):
        async with trio.open_nursery() as outside:
            with trio.CancelScope() as cancelled:
                async with tq.open_client(
                    driver=slow,
                    workers=workers,
                    queues={"default": tq.QueueConfig(max_workers=10)},
                    shutdown_timeout=timeout,
                    **FAST,
                ) as client:
                    await outside.start(read, client)
                    await all_started.wait()
                    release.set()  # the quick job ends: its write is the slow one
                    await slow.in_flight.wait()
                    cancelled.cancel()
                    await trio.sleep_forever()
    # The reader's stream ended (the nursery closed) with every event of both writes.
    kinds = collections.Counter(e.kind for e in events)
    assert kinds == {tq.EventKind.JOB_COMPLETED: 1, tq.EventKind.JOB_INTERRUPTED: sleepers}
    stored = collections.Counter(j.state for j in await all_jobs(database_url))
    assert stored == {tq.JobState.COMPLETED: 1, tq.JobState.AVAILABLE: sleepers}
