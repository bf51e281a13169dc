"""The batch completer: writes finished jobs' outcomes in few statements.

Workers hand outcomes over with :meth:`Completer.complete`; the completer writes them in
batches (by size or after a short linger), one statement per batch, applied only to rows
still ``running``, then sends one event per written job to the dispatcher. A failed write
is retried with backoff and never dropped. When too many outcomes wait, ``complete``
blocks (backpressure) instead of letting memory grow without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, final

import attrs
import trio

from .._codec import row_to_job
from ..driver.protocol import Driver, JobOutcome, Row
from ..errors import DatabaseError
from ..events import Event, EventKind
from ..job import JobListParams, JobState

__all__ = ["Completer", "CompleterStatistics", "Finished"]

log = logging.getLogger("trioqueue.completer")


class Finished(NamedTuple):
    """One finished run: the row update, the event it should produce, and how long it ran.
    A NamedTuple: one is made per job (see `JobInsertParams`)."""

    outcome: JobOutcome
    event_kind: EventKind
    duration: float
    attempted_at: datetime | None = None
    """When the run began (the row's ``attempted_at``): identifies this run of the job."""
    args: Any = None
    """The job's args as the worker saw them, for the event (the write returns none)."""


@final
@attrs.frozen
class CompleterStatistics:
    pending: int
    """Outcomes waiting to be written."""
    written: int
    """Outcomes written since start."""
    batches: int
    """Statements run to write them."""
    failed_writes: int
    """Write attempts that failed and were retried."""
    waiting_for_space: int
    """Workers blocked by backpressure right now."""


@final
@attrs.define(eq=False)
class Completer:
    driver: Driver
    now: Callable[[], datetime]
    events: trio.MemorySendChannel[list[Event]]
    args_type_for: Callable[[str], type[Any] | None]
    shutdown_timeout: float
    wants_events: Callable[[], bool] = attrs.field(default=lambda: True)
    """Whether anyone would receive job events now; if not, written jobs are not read back."""
    flush_size: int = 100
    """Write as soon as this many outcomes wait."""
    linger: float = 0.05
    """Otherwise write this long after the first outcome arrived."""
    max_batch: int = 5000
    """At most this many rows per statement."""
    max_pending: int = 10_000
    """``complete`` blocks while this many wait, until fewer than half remain."""
    _pending: list[Finished] = attrs.field(factory=list, init=False)
    _work: trio.Event = attrs.field(factory=trio.Event, init=False)
    _space: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _written: int = attrs.field(default=0, init=False)
    _batches: int = attrs.field(default=0, init=False)
    _failed: int = attrs.field(default=0, init=False)
    _waiting: int = attrs.field(default=0, init=False)
    _write_interrupted: bool = attrs.field(default=False, init=False)
    """A write was cancelled mid-statement: it may have committed (see ``_write``)."""

    def statistics(self) -> CompleterStatistics:
        return CompleterStatistics(
            len(self._pending), self._written, self._batches, self._failed, self._waiting
        )

    def complete_nowait(self, item: Finished, *, force: bool = False) -> None:
        """Queue an outcome without waiting. Not a checkpoint.

        Raises ``trio.WouldBlock`` when the buffer is full (unless ``force``), and
        ``trio.ClosedResourceError`` once the completer has been closed.
        """
        if self._closed:
            raise trio.ClosedResourceError("the completer is closed")
        if not force and len(self._pending) >= self.max_pending:
            raise trio.WouldBlock
        self._pending.append(item)
        if len(self._pending) == 1 or len(self._pending) >= self.flush_size:
            self._work.set()

    async def complete(self, item: Finished) -> None:
        """Queue an outcome, waiting while the buffer is full.

        Always a checkpoint. On cancellation: the outcome is queued anyway (past the
        limit), so it is still written before the completer exits; then Cancelled
        propagates. Raises ``trio.ClosedResourceError`` once closed.
        """
        queued = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    self.complete_nowait(item)
                    queued = True
                except trio.WouldBlock:
                    self._waiting += 1
                    try:
                        await self._space.wait()
                    finally:
                        self._waiting -= 1
                    continue
                break
            await trio.lowlevel.cancel_shielded_checkpoint()
        except trio.Cancelled:
            if not queued:
                self.complete_nowait(item, force=True)
            raise

    def close(self) -> None:
        """No more outcomes will come: write what is queued, then ``run`` returns.
        Idempotent; not a checkpoint."""
        self._closed = True
        self._work.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until closed and empty; then close the event channel.

        On cancellation (the client cancelled from outside): keeps writing, shielded, for
        up to ``shutdown_timeout`` seconds, waiting for the interrupted jobs' outcomes and
        writing each as soon as it comes (no linger: the time is short); what is still
        unwritten after that stays ``running`` in the database for the rescuer.
        """
        task_status.started()
        async with self.events:
            try:
                await self._loop(self.linger)
            except trio.Cancelled:
                with trio.move_on_after(self.shutdown_timeout) as cs:
                    cs.shield = True
                    await self._loop(0.0)
                if self._pending:
                    log.error(
                        "shutdown_timeout passed with %d outcomes unwritten (job ids %s); "
                        "the rescuer will return these jobs to work",
                        len(self._pending),
                        [f.outcome.id for f in self._pending[:20]],
                    )
                raise

    async def _loop(self, linger: float) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._work.wait()
                self._work = trio.Event()
                continue
            if linger > 0 and len(self._pending) < self.flush_size and not self._closed:
                with trio.move_on_after(linger):
                    while len(self._pending) < self.flush_size and not self._closed:
                        await self._work.wait()
                        self._work = trio.Event()
            batch = self._pending[: self.max_batch]
            await self._write(batch)
            del self._pending[: len(batch)]
            if len(self._pending) < self.max_pending // 2:
                self._space.set()
                self._space = trio.Event()

    async def _write_with_retries(
        self, batch: list[Finished], want_rows: bool
    ) -> tuple[list[Row], bool]:
        """Write the batch, retrying with backoff until it succeeds; return the rows
        written (``(id,)`` only unless ``want_rows``) and whether any attempt failed
        first."""
        delay = 0.5
        # A write cancelled mid-statement (an outside cancel, before the shielded final
        # flush) may have committed all the same: treat it like a failed attempt.
        failed_before = self._write_interrupted
        self._write_interrupted = False
        while True:
            try:
                rows = await self.driver.job_set_state_if_running_many(
                    [f.outcome for f in batch], self.now(), rows=want_rows
                )
                return rows, failed_before
            except trio.Cancelled:
                self._write_interrupted = True
                raise
            except DatabaseError as exc:
                self._failed += 1
                failed_before = True
                log.warning(
                    "writing %d job outcomes failed, retrying in %.1f s: %s",
                    len(batch),
                    delay,
                    exc,
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _write(self, batch: list[Finished]) -> None:
        want_events = self.wants_events()
        rows, failed_before = await self._write_with_retries(batch, want_events)
        self._batches += 1
        self._written += len(batch)
        if want_events and failed_before and len(rows) < len(batch):
            rows = rows + await self._written_by_lost_reply(batch, {r[0] for r in rows})
        if len(rows) < len(batch):
            log.debug(
                "%d of %d outcomes found their job no longer running",
                len(batch) - len(rows),
                len(batch),
            )
        if want_events:
            self._publish(batch, rows)

    def _publish(self, batch: list[Finished], rows: list[Row]) -> None:
        by_id = {f.outcome.id: f for f in batch}
        events = []
        for row in rows:
            finished = by_id.get(row[0])
            if finished is None:
                continue
            if row[2] is None:
                job = row_to_job((*row[:2], finished.args, *row[3:]), None)
            else:
                job = row_to_job(row, self.args_type_for(row[1]))
            kind = finished.event_kind
            if job.state == "cancelled" and kind is not EventKind.JOB_CANCELLED:
                kind = EventKind.JOB_CANCELLED
            events.append(Event(kind, job=job, duration=finished.duration))
        if events:
            try:
                self.events.send_nowait(events)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("event dispatcher not keeping up: %d events dropped", len(events))

    async def _written_by_lost_reply(self, batch: list[Finished], seen: set[int]) -> list[Row]:
        """After a write that failed, a retry finds some jobs no longer running: maybe the
        failed attempt did commit and only its reply was lost. Those rows are ours if they
        still carry the same run (``attempted_at``) and the state we wrote (or
        ``cancelled``, when a cancel requested while the job ran turned our write into
        one), so their events are not lost. Best effort: a read failure just means no
        events for them."""
        missing = [f for f in batch if f.outcome.id not in seen and f.attempted_at is not None]
        if not missing:
            return []
        try:
            rows = await self.driver.job_list(
                JobListParams(ids=[f.outcome.id for f in missing], limit=len(missing))
            )
        except DatabaseError as exc:
            log.warning("could not check %d possibly written outcomes: %s", len(missing), exc)
            return []
        wanted = {f.outcome.id: f for f in missing}
        ours = []
        for row in rows:
            finished = wanted[row[0]]
            state = row[4]
            # A queued job cancelled after our write (job_cancel) is cancelled too, but not
            # by our write, and gets no event; only a cancel requested while the job ran
            # (cancel_attempted_at) turns an outcome into a cancel.
            cancelled_by_our_write = state == JobState.CANCELLED.value and (
                "cancel_attempted_at" in (row[14] or {})
            )
            if row[8] == finished.attempted_at and (
                state == finished.outcome.state.value or cancelled_by_our_write
            ):
                ours.append(row)
        return ours
