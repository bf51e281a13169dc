"""Stopping a client (DESIGN.md §1, "Stopping"), against a real PostgreSQL.

Soft stop (leaving the block, ``stop()``): no more fetching, running jobs finish.
Hard stop (``stop(cancel=True)``, ``soft_stop_timeout``, cancellation from outside): running
jobs are cancelled and handed back ``available`` with their attempt given back and no error.
Whatever the stop, it returns, and no job the client fetched is left ``running``.
"""

from __future__ import annotations

import collections
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import attrs
import pytest
import trio

import trioqueue as tq

FAST: dict[str, Any] = {
    "fetch_poll_interval": 0.1,
    "fetch_cooldown": 0.01,
    "scheduler_interval": 0.2,
}


@attrs.frozen
class Sleep:
    kind: ClassVar[str] = "sleep"
    seconds: float = 0.0


@asynccontextmanager
async def working(
    url: str, workers: tq.Workers, *, max_workers: int = 10, **config: Any
) -> AsyncIterator[tq.Client]:
    async with tq.open_client(
        url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=max_workers)},
        **{**FAST, **config},
    ) as client:
        yield client


async def all_jobs(url: str) -> list[tq.Job[Any]]:
    """Every job, read through a fresh insert-only client."""
    async with tq.open_client(url) as client:
        page = await client.job_list(tq.JobListParams(limit=10_000))
    return page.jobs


class Tracker:
    """Counts worker starts, finishes and cancellations; ``wait_started(n)`` blocks until
    n jobs have started."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.running: set[int] = set()
        self._changed = trio.Event()

    async def wait_started(self, n: int) -> None:
        while self.started < n:
            await self._changed.wait()

    def workers(self, *, shield: float = 0.0) -> tq.Workers:
        workers = tq.Workers()

        @workers.worker(Sleep)
        async def work(job: tq.Job[Sleep]) -> None:
            assert job.id not in self.running, f"job {job.id} runs twice at once"
            self.running.add(job.id)
            self.started += 1
            self._changed.set()
            self._changed = trio.Event()
            try:
                if shield:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(shield)
                if job.args.seconds >= 0:  # negative: return without a checkpoint
                    await trio.sleep(job.args.seconds)
                self.finished += 1
            except trio.Cancelled:
                self.cancelled += 1
                raise
            finally:
                self.running.discard(job.id)

        return workers


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
            await trio.sleep(0.3)  # several poll intervals: a stopped client fetches nothing
            assert (await client.job_get(later.id)).state is tq.JobState.AVAILABLE

    assert sorted(e.job.id for e in events if e.job) == sorted(j.id for j in first)


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


async def test_outside_cancellation_during_soft_stop_escalates(database_url: str) -> None:
    tracker = Tracker()
    with trio.fail_after(30):
        with trio.move_on_after(0.5) as cs:
            async with working(database_url, tracker.workers()) as client:
                await client.insert(Sleep(60))
                await tracker.wait_started(1)
            # Leaving the block waits for the job, until the cancellation arrives.
        assert cs.cancelled_caught
        [job] = await all_jobs(database_url)

    assert tracker.cancelled == 1
    assert job.state is tq.JobState.AVAILABLE
    assert job.attempt == 0


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
            with trio.fail_after(20):
                with trio.move_on_after(delay):
                    async with working(database_url, workers, max_workers=20, id=f"iter-{i}"):
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


async def test_never_reading_subscriber_cannot_block_shutdown(database_url: str) -> None:
    """River's completer bug class: a subscriber that never reads must not stall the
    completer, so stop() returns and every outcome is written."""
    n = 5000
    done = trio.Event()
    count = 0
    workers = tq.Workers()

    @workers.worker(Sleep)
    async def work(job: tq.Job[Sleep]) -> None:
        nonlocal count
        await trio.lowlevel.checkpoint()
        count += 1
        if count == n:
            done.set()

    with trio.fail_after(60):
        async with tq.open_client(database_url) as inserter:
            assert await inserter.insert_many_fast([Sleep()] * n) == n
        async with (
            working(database_url, workers, max_workers=100) as client,
            client.subscribe(*tq.EventKind, buffer=10) as stuck,
        ):
            await done.wait()
            await client.stop()
            assert stuck.dropped > 0
        jobs = await all_jobs(database_url)

    assert len(jobs) == n
    assert collections.Counter(j.state for j in jobs) == {tq.JobState.COMPLETED: n}
