"""The runtime against injected driver faults (FaultyDriver over PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, cast

import attrs
import pytest
import trio
from support import FAST, eventually

import trioqueue as tq
from trioqueue.driver.faults import Fault, FaultyDriver
from trioqueue.driver.postgres.driver import open_postgres_driver
from trioqueue.driver.protocol import Driver


@attrs.frozen
class CountArgs:
    kind: ClassVar[str] = "count"
    n: int


@asynccontextmanager
async def _faulty(url: str, *faults: Fault) -> AsyncIterator[FaultyDriver]:
    async with open_postgres_driver(url) as driver:
        yield FaultyDriver(driver, faults)


def _workers(runs: dict[int, int]) -> tq.Workers:
    workers = tq.Workers()

    async def count(job: tq.Job[CountArgs]) -> None:
        runs[job.id] = runs.get(job.id, 0) + 1

    workers.add(CountArgs, count)
    return workers


async def _work(driver: FaultyDriver, jobs: int, **config: Any) -> dict[int, int]:
    runs: dict[int, int] = {}
    settings = {**FAST, **config}
    async with tq.open_client(
        driver=cast(Driver, driver),
        workers=_workers(runs),
        queues={"default": tq.QueueConfig(max_workers=10)},
        **settings,
    ) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED, buffer=jobs * 2) as events:
            await client.insert_many([CountArgs(i) for i in range(jobs)])
            with trio.fail_after(30):
                seen = 0
                async for _ in events:
                    seen += 1
                    if seen == jobs:
                        break
        page = await client.job_list(tq.JobListParams(limit=1000))
        assert {j.state for j in page.jobs} == {tq.JobState.COMPLETED}
    return runs


@pytest.mark.parametrize("kind", ["error", "delay"])
async def test_failed_outcome_writes_are_retried(database_url: str, kind: str) -> None:
    fault = Fault("job_set_state_if_running_many", kind, times=3, seconds=0.2)  # type: ignore[arg-type]
    async with _faulty(database_url, fault) as driver:
        runs = await _work(driver, 30)
    # Every failed write was retried (a delayed one simply waited); each job ran once.
    expected = 3 if kind == "error" else 1
    assert driver.injected["job_set_state_if_running_many"] >= expected
    assert set(runs.values()) == {1}


async def test_failed_fetches_are_retried(database_url: str) -> None:
    async with _faulty(database_url, Fault("job_get_available", times=5)) as driver:
        runs = await _work(driver, 20)
    assert driver.injected["job_get_available"] == 5
    assert len(runs) == 20 and set(runs.values()) == {1}


async def test_a_fetch_whose_reply_is_lost_is_rescued(database_url: str) -> None:
    # The claim committed, but the client was told it failed: those jobs sit `running`
    # with no task until the rescuer returns them to work.
    async with tq.open_client(database_url) as inserter:
        job = (await inserter.insert(CountArgs(1))).job
    fault = Fault("job_get_available", "error_after", call=1)
    async with _faulty(database_url, fault) as driver:
        runs: dict[int, int] = {}
        async with tq.open_client(
            driver=cast(Driver, driver),
            workers=_workers(runs),
            queues={"default": tq.QueueConfig(max_workers=10)},
            rescue_stuck_jobs_after=0.5,
            rescuer_interval=0.2,
            **FAST,
        ) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                with trio.fail_after(20):
                    event = await events.receive()
        assert event.job is not None and event.job.id == job.id
        assert event.job.attempt == 2
        assert "rescued" in event.job.errors[0].error
        assert runs == {job.id: 1}


async def test_a_dropped_listener_reconnects(database_url: str) -> None:
    async with _faulty(database_url, Fault("listener_wait", "drop", call=1)) as driver:
        runs: dict[int, int] = {}
        async with tq.open_client(
            driver=cast(Driver, driver),
            workers=_workers(runs),
            queues={"default": tq.QueueConfig(max_workers=10)},
            fetch_poll_interval=30.0,
            fetch_cooldown=0.01,
        ) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                # The first notification breaks the listener; after reconnecting, the
                # notifier wakes every producer, so the job still runs long before the poll.
                await client.insert(CountArgs(1))
                with trio.fail_after(10):
                    await events.receive()
                assert driver.injected["listener_wait"] == 1
                assert driver.calls["open_listener"] >= 2
                # And the new listener delivers notifications again.
                await client.insert(CountArgs(2))
                with trio.fail_after(10):
                    await events.receive()
    assert sorted(runs.values()) == [1, 1]


async def test_elector_gives_up_leadership_when_renewal_fails(database_url: str) -> None:
    async with _faulty(database_url) as driver:
        runs: dict[int, int] = {}
        async with tq.open_client(
            driver=cast(Driver, driver),
            workers=_workers(runs),
            queues={"default": tq.QueueConfig(max_workers=2)},
            **FAST,
        ) as client:
            await eventually(lambda: client.is_leader)
            driver.add(Fault("leader_attempt_elect", times=None))
            await eventually(lambda: not client.is_leader)
            driver.faults.clear()
            await eventually(lambda: client.is_leader)


async def test_an_outcome_write_whose_reply_is_lost_still_reports_each_job_once(
    database_url: str,
) -> None:
    # The batch committed but the client was told it failed: the retry finds the jobs no
    # longer running, recognises its own run by attempted_at, and still emits the events.
    fault = Fault("job_set_state_if_running_many", "error_after", call=1)
    async with _faulty(database_url, fault) as driver:
        runs = await _work(driver, 25)
    assert driver.injected["job_set_state_if_running_many"] == 1
    assert len(runs) == 25 and set(runs.values()) == {1}
