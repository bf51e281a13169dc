"""The batch completer on its own, on the memory driver under a MockClock: what it does
when the client is cancelled from outside, and when nobody subscribes to events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs
import trio
import trio.lowlevel
import trio.testing

import trioqueue as tq
from trioqueue._outcome import FinishedRun
from trioqueue._runtime.completer import Completer
from trioqueue._runtime.dispatcher import Audience
from trioqueue.driver.protocol import JobOutcome, JobRow, WrittenRow
from trioqueue.events import Event, EventKind


@attrs.frozen
class Noop:
    kind = "noop"


async def _running_job(driver: tq.MemoryDriver) -> JobRow:
    async with tq.open_client(driver=driver) as client:
        await client.insert(Noop())
    [row] = await driver.job_get_available("default", driver.clock(), 1, "worker")
    return row


def _completed(driver: tq.MemoryDriver, row: JobRow) -> FinishedRun:
    outcome = JobOutcome(
        id=row.id,
        state=tq.JobState.COMPLETED,
        finalized_at=driver.clock(),
        scheduled_at=None,
        give_back_attempt=False,
        error_json=None,
        metadata_json=None,
        attempted_at=row.attempted_at,
    )
    return FinishedRun(
        outcome=outcome,
        event_kind=EventKind.JOB_COMPLETED,
        duration=0.0,
        attempted_at=row.attempted_at,
        args={},
    )


def _completer(
    driver: Any, events: trio.MemorySendChannel[list[Event]], **options: Any
) -> Completer:
    return Completer(driver, driver.clock, events, lambda kind: None, **options)


def _cancellable(completer: Completer) -> tuple[trio.CancelScope, Any]:
    """A scope to cancel the completer from outside, and the task function running it."""
    cancel = trio.CancelScope()

    async def run() -> None:
        with cancel:
            await completer.run()

    return cancel, run


async def test_final_flush_writes_at_once_instead_of_lingering(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # An outcome that arrives after an outside cancel must not wait out the linger: the
    # final flush has only shutdown_timeout (here shorter than the linger) to write it.
    driver = tq.MemoryDriver()
    row = await _running_job(driver)
    send, receive = trio.open_memory_channel[list[Event]](10)
    completer = _completer(driver, send, shutdown_timeout=0.02, linger=0.05)
    cancel, run = _cancellable(completer)
    outcomes = completer.sender()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(0.1)
        cancel.cancel()
        await trio.lowlevel.checkpoint()
        outcomes.send_nowait(_completed(driver, row), force=True)
        await trio.sleep(1.0)
        outcomes.close()
    assert await driver.job_state(row.id) == "completed"
    [events] = [batch async for batch in receive]
    assert [e.kind for e in events] == [EventKind.JOB_COMPLETED]


@attrs.define
class CommitThenHang:
    """Writes outcomes, then hangs before replying the first time: a cancel that lands
    there interrupts a write that has committed (as on PostgreSQL, mid-reply)."""

    inner: tq.MemoryDriver
    hung: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        written: list[JobRow] | list[WrittenRow] = await self.inner.job_set_state_if_running_many(
            outcomes, now, rows=rows
        )
        if not self.hung:
            self.hung += 1
            await trio.sleep_forever()
        return written


async def test_a_write_cancelled_after_committing_still_gets_its_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = tq.MemoryDriver()
    row = await _running_job(driver)
    send, receive = trio.open_memory_channel[list[Event]](10)
    completer = _completer(CommitThenHang(driver), send, shutdown_timeout=5.0)
    cancel, run = _cancellable(completer)
    outcomes = completer.sender()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        outcomes.send_nowait(_completed(driver, row))
        await trio.sleep(1.0)  # past the linger: the write has committed and hangs
        assert await driver.job_state(row.id) == "completed"
        cancel.cancel()
        await trio.sleep(0.1)
        outcomes.close()
    # The final flush found the job no longer running; it checked whether the interrupted
    # write was ours and still sent the event.
    [events] = [batch async for batch in receive]
    assert [(e.kind, e.job and e.job.id) for e in events] == [(EventKind.JOB_COMPLETED, row.id)]


async def test_without_subscribers_written_jobs_are_not_read_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    driver = tq.MemoryDriver()
    row = await _running_job(driver)
    send, receive = trio.open_memory_channel[list[Event]](10)
    completer = _completer(driver, send, shutdown_timeout=1.0, audience=Audience(0))
    outcomes = completer.sender()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(completer.run)
        outcomes.send_nowait(_completed(driver, row))
        await trio.sleep(1.0)
        outcomes.close()
    assert await driver.job_state(row.id) == "completed"
    assert completer.statistics().written == 1
    assert [batch async for batch in receive] == []


@attrs.define
class CountingWrites:
    """Records the size of each outcome write."""

    inner: tq.MemoryDriver
    sizes: list[int] = attrs.field(factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        self.sizes.append(len(outcomes))
        written: list[JobRow] | list[WrittenRow] = await self.inner.job_set_state_if_running_many(
            outcomes, now, rows=rows
        )
        return written


async def test_big_outputs_are_written_in_batches_bounded_by_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # PostgreSQL refuses a message over 1 GiB: a thousand outputs at their cap would make
    # one, and the same batch would fail for ever. Batches stop at max_batch_bytes.
    driver = tq.MemoryDriver()
    rows = [await _running_job(driver) for _ in range(5)]
    counting = CountingWrites(driver)
    send, receive = trio.open_memory_channel[list[Event]](10)
    completer = _completer(counting, send, shutdown_timeout=1.0, max_batch_bytes=2500)
    outcomes = completer.sender()
    big = '"' + "x" * 998 + '"'  # 1,000 bytes of JSON
    async with trio.open_nursery() as nursery:
        nursery.start_soon(completer.run)
        for row in rows:
            finished = _completed(driver, row)
            finished = finished._replace(outcome=finished.outcome._replace(output_json=big))
            outcomes.send_nowait(finished, force=True)
        outcomes.close()
    assert counting.sizes == [2, 2, 1]
    for row in rows:
        assert (await driver.job_get(row.id)).output == "x" * 998  # type: ignore[union-attr]
    assert sum(len(batch) for batch in [b async for b in receive]) == 5
