"""The completer against outcomes the database refuses, and against writes that fail
(issue 13): one refused outcome never holds back its batch, nor is it retried as it was;
while writes fail, no new jobs are fetched, so finished runs cannot pile up unwritten.

Each test runs on the memory driver (under a MockClock where time passes) and on
PostgreSQL, which is what really refuses a ``\\u0000`` in jsonb.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, ClassVar, cast

import attrs
import pytest
import trio
import trio.testing

import trioqueue as tq
from trioqueue._outcome import FinishedRun
from trioqueue._runtime.completer import Completer
from trioqueue.driver.faults import Fault, FaultyDriver
from trioqueue.driver.postgres.driver import open_postgres_driver
from trioqueue.driver.protocol import Driver, JobOutcome, JobRow, WrittenRow
from trioqueue.events import Event, EventKind


@attrs.frozen
class Noop:
    kind: ClassVar[str] = "noop"
    n: int = 0


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> str | None:
    """None for a MemoryDriver, else a fresh PostgreSQL database's URL."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("database_url")
        return url
    return None


@asynccontextmanager
async def _driver(url: str | None) -> AsyncIterator[Driver]:
    if url is None:
        yield tq.MemoryDriver()
        return
    async with open_postgres_driver(url) as driver:
        yield driver


async def _running(driver: Driver, n: int) -> list[JobRow]:
    async with tq.open_client(driver=driver) as client:
        await client.insert_many([Noop(i) for i in range(n)])
    return await driver.job_get_available("default", driver.clock(), n, "worker")


def _finished(row: JobRow, state: tq.JobState, **outcome: Any) -> FinishedRun:
    values: dict[str, Any] = {
        "id": row.id,
        "state": state,
        "finalized_at": None,
        "scheduled_at": None,
        "give_back_attempt": False,
        "error_json": None,
        "metadata_json": None,
        "attempted_at": row.attempted_at,
        **outcome,
    }
    kind = EventKind.JOB_COMPLETED if state is tq.JobState.COMPLETED else EventKind.JOB_FAILED
    return FinishedRun(
        outcome=JobOutcome(**values),
        event_kind=kind,
        duration=0.0,
        attempted_at=row.attempted_at,
        args={},
        attempt=row.attempt,
    )


async def _complete_all(driver: Any, items: list[FinishedRun]) -> tuple[Completer, list[Event]]:
    """Hand ``items`` to a completer of its own, let it write them, and return it with the
    events it sent."""
    send, receive = trio.open_memory_channel[list[Event]](100)
    completer = Completer(driver, driver.clock, send, lambda kind: None, 5.0, linger=0.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(completer.run)
            with completer.sender() as outcomes:
                for item in items:
                    outcomes.send_nowait(item)
    return completer, [event for batch in [b async for b in receive] for event in batch]


async def test_refused_outcomes_are_isolated_and_written_in_a_storable_form(
    store: str | None,
) -> None:
    async with _driver(store) as driver:
        rows = await _running(driver, 8)
        now = driver.clock()
        refused = {
            rows[2][0]: '{"at": "x", "attempt": 1, "error": "nul \\u0000"}',
            rows[5][0]: '{"at": "x", "attempt": 1, "error": "lone \udc80"}',
        }
        items = [
            _finished(row, tq.JobState.RETRYABLE, scheduled_at=now, error_json=refused[row.id])
            if row.id in refused
            else _finished(row, tq.JobState.COMPLETED, finalized_at=now)
            for row in rows
        ]
        completer, events = await _complete_all(driver, items)
        stats = completer.statistics()
        assert (stats.written, stats.refused, stats.failed_writes) == (8, 2, 0)
        # Every job got its outcome and its event; none stays running.
        assert sorted(e.job.id for e in events if e.job) == sorted(r[0] for r in rows)
        for row in rows:
            stored = await driver.job_get(row.id)
            assert stored is not None
            if row.id not in refused:
                assert stored[4] == "completed"
                continue
            assert stored[4] == "retryable"
            [error] = stored[13]
            assert error["attempt"] == row.attempt
            assert error["error"].startswith(
                "trioqueue could not store this attempt's outcome as it was"
            )


@attrs.define
class RefuseJob:
    """Refuses, as rejected data, every write that holds job ``job_id``'s outcome — even
    the completer's stand-in, which no real database would refuse."""

    inner: Driver
    job_id: int
    writes: list[list[int]] = attrs.Factory(list)
    transient: int = 1
    """The first writes holding the job fail this many times as if the database were
    away, before it refuses them."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        self.writes.append([o.id for o in outcomes])
        if any(o.id == self.job_id for o in outcomes):
            await trio.lowlevel.checkpoint()
            if self.transient:
                self.transient -= 1
                raise tq.DatabaseError("writing job outcomes", ConnectionError("gone"))
            raise tq.DatabaseError("writing job outcomes", ValueError("no"), rejected_data=True)
        return await self.inner.job_set_state_if_running_many(outcomes, now, rows=rows)


async def test_an_outcome_refused_even_as_a_stand_in_is_given_up_not_retried(
    store: str | None,
) -> None:
    async with _driver(store) as driver:
        rows = await _running(driver, 5)
        now = driver.clock()
        refusing = RefuseJob(driver, rows[3][0])
        items = [_finished(row, tq.JobState.COMPLETED, finalized_at=now) for row in rows]
        completer, _ = await _complete_all(refusing, items)
        # Halving found the one outcome; it was tried once more as a stand-in, and that
        # was all: the completer ended instead of retrying it forever.
        alone = [w for w in refusing.writes if w == [rows[3][0]]]
        assert len(alone) == 2
        assert len(refusing.writes) <= 2 * len(rows) + 1
        stats = completer.statistics()
        assert (stats.written, stats.refused, stats.dropped, stats.failed_writes) == (4, 1, 1, 1)
        # The database answered after the failed write: writes are possible again, so
        # producers may fetch (they would otherwise wait for good).
        assert stats.writable
        states = {row.id: await driver.job_state(row.id) for row in rows}
        assert states.pop(rows[3][0]) == "running"  # left for the rescuer
        assert set(states.values()) == {"completed"}


# ------------------------------------------------------------------ backpressure


@attrs.define
class Watch:
    """Records, at each fetch, whether outcomes could be written then, and the size of
    every outcome write."""

    inner: Driver
    completer: Completer | None = None
    fetched_while_unwritable: int = 0
    fetches_after_recovery: int = 0
    writes: list[int] = attrs.Factory(list)
    waiting: list[int] = attrs.Factory(list)
    """At each write: the outcomes waiting besides the ones being written."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def clock(self) -> datetime:
        return self.inner.clock()

    def transaction(self) -> Any:
        return self.inner.transaction()

    def open_listener(self, channels: Sequence[str]) -> Any:
        return self.inner.open_listener(channels)

    async def job_get_available(self, *args: Any, **kwargs: Any) -> list[JobRow]:
        if self.completer is not None:
            if not self.completer.writable:
                self.fetched_while_unwritable += 1
            elif self.completer.statistics().failed_writes:
                self.fetches_after_recovery += 1
        rows: list[JobRow] = await self.inner.job_get_available(*args, **kwargs)
        return rows

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        self.writes.append(len(outcomes))
        assert self.completer is not None
        self.waiting.append(self.completer.statistics().pending - len(outcomes))
        result: list[JobRow] | list[WrittenRow] = await self.inner.job_set_state_if_running_many(
            outcomes, now, rows=rows
        )
        return result


SLOTS = 4


async def _work_through_failing_writes(driver: Driver, jobs: int) -> tuple[Watch, FaultyDriver]:
    # Writes 2 and 3 fail (the completer backs off 0.5 s, then 1 s): meanwhile the jobs
    # already running finish, and nothing new may be fetched.
    faulty = FaultyDriver(
        driver,
        [Fault("job_set_state_if_running_many", "error", call=n) for n in (2, 3)],
    )
    watch = Watch(cast(Driver, faulty))

    async def work(job: tq.Job[Noop]) -> None:
        await trio.sleep(0.01)

    workers = tq.Workers()
    workers.add(Noop, work)
    async with tq.open_client(
        driver=cast(Driver, watch),
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=SLOTS)},
        fetch_cooldown=0.01,
        fetch_poll_interval=0.05,
    ) as client:
        assert client._runtime is not None and client._runtime.completer is not None
        watch.completer = client._runtime.completer
        await client.insert_many([Noop(i) for i in range(jobs)])
        with trio.fail_after(60):
            while True:
                counts = await client.job_counts()
                if counts.states[tq.JobState.COMPLETED] == jobs:
                    break
                await trio.sleep(0.05)
    return watch, faulty


def _check_backpressure(watch: Watch, faulty: FaultyDriver) -> None:
    assert faulty.injected["job_set_state_if_running_many"] == 2
    # No fetch while writes failed, and fetching resumed once they went through.
    assert watch.fetched_while_unwritable == 0
    assert watch.fetches_after_recovery > 0
    # The batch was retried (calls 2-4 carry the same outcomes); by the write that went
    # through, only the jobs running when writes began to fail had finished meanwhile (the
    # old code kept fetching, and job after job finished unwritten).
    assert watch.writes[1] == watch.writes[2] == watch.writes[3], watch.writes
    assert watch.waiting[3] <= 2 * SLOTS, watch.waiting


async def test_fetching_pauses_while_outcome_writes_fail_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch, faulty = await _work_through_failing_writes(tq.MemoryDriver(), 200)
    _check_backpressure(watch, faulty)


async def test_fetching_pauses_while_outcome_writes_fail_postgres(database_url: str) -> None:
    async with open_postgres_driver(database_url) as driver:
        watch, faulty = await _work_through_failing_writes(driver, 200)
    _check_backpressure(watch, faulty)


def test_unwritten_outcomes_are_bounded_by_the_worker_slots() -> None:
    from trioqueue._runtime.tree import Runtime
    from trioqueue.config import ClientConfig

    for slots, bound in ((4, 100), (1000, 1000)):
        runtime = Runtime(
            tq.MemoryDriver(),
            ClientConfig(),
            tq.Workers(),
            {
                "a": tq.QueueConfig(max_workers=slots // 2),
                "b": tq.QueueConfig(max_workers=slots // 2),
            },
            lambda: datetime.now(),
        )
        assert runtime.max_pending() == bound
