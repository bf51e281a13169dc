"""The batch completer: writes finished jobs' outcomes in few statements.

Workers hand outcomes over through an `OutcomeSender`; the completer writes them in
batches (by size or after a short linger), one statement per batch, applied only to rows
still ``running``, then sends one event per written job to the dispatcher.

Its input closes the way a trio memory channel does: every sender is a handle made by
`Completer.sender` or `OutcomeSender.clone`, and once every handle made is closed (each
producer closes its own as it ends, the runtime its original as the work nursery ends),
the completer writes what is queued and returns. No flag tells it to stop: the last
sender's closing is the nesting's fact that no outcome can come any more.

A write can fail in two ways, and neither loses an outcome or stops the others:

- The database is unreachable, slow or restarting: the same batch is retried with backoff.
  Meanwhile :attr:`Completer.writable` is False, and producers fetch no new jobs until a
  write goes through again (see `Producer`).
- The database refuses the data of some outcome (``DatabaseError.rejected_data``): the
  batch is halved until the refused outcomes stand alone, every other outcome is written,
  and each refused one is written in a storable form (its error replaced by a note saying
  why); it is never retried as it was.

At most ``max_pending`` outcomes wait to be written (the runtime makes that the client's
worker slots, and at least one flush); past it ``OutcomeSender.send`` blocks, and a blocked worker
keeps its slot, so nothing new is fetched either. A crash therefore re-runs at most those
outcomes and the jobs that were running: about one batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final, cast, final

import attrs
import trio

from .._codec import dumps, row_to_job, row_to_job_with_args
from .._failure import storable_text
from .._outcome import FinishedRun
from ..driver.protocol import Driver, JobRow, WrittenRow
from ..errors import DatabaseError
from ..events import Event, EventKind
from ..job import JobListParams, JobState
from .dispatcher import Audience

PROMPT_LINGER: Final = 0.005
"""How long the completer lingers for a bigger batch when a workflow task's outcome waits
(it may promote tasks others wait to run): a few writes' worth, not 50 ms."""

__all__ = ["Completer", "CompleterStatistics", "OutcomeSender"]

log = logging.getLogger("trioqueue.completer")


class _Rejected(Exception):
    """A write failed because the database refused the data (not worth retrying as is).
    ``failed_before``: an earlier attempt at it failed in a way that may have committed."""

    def __init__(self, error: DatabaseError, failed_before: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.failed_before = failed_before


FLUSH_SIZE = 100
"""A batch is written as soon as this many outcomes wait."""

REFUSED_NOTE_LIMIT = 500
"""Characters of the database's complaint kept in a refused outcome's stand-in error."""


def storable_stand_in(finished: FinishedRun, error: DatabaseError, now: datetime) -> FinishedRun:
    """What to write for an outcome the database refused: the same state, times and
    attempt, with no metadata change, no output and its error replaced by a note of
    trioqueue's own, built from nothing the job supplied. Not a checkpoint."""
    complaint = storable_text(str(error))[:REFUSED_NOTE_LIMIT]
    note = dumps(
        {
            "at": now.isoformat(),
            "attempt": finished.attempt,
            "error": "trioqueue could not store this attempt's outcome as it was; "
            f"the database refused it: {complaint}",
            "trace": "",
        }
    )
    return finished._replace(
        outcome=finished.outcome._replace(error_json=note, metadata_json=None, output_json=None)
    )


@final
class OutcomeSender:
    """One sender's handle on the completer's input (see the module's docstring). Use it
    as a context manager, or close it: once every handle is closed, the input is.
    Sending on a closed handle raises ``trio.ClosedResourceError``."""

    __slots__ = ("_closed", "_completer")

    def __init__(self, completer: Completer) -> None:
        self._completer = completer
        self._closed = False
        completer._senders += 1

    def clone(self) -> OutcomeSender:
        """Another handle on the same input. Not a checkpoint."""
        if self._closed:
            raise trio.ClosedResourceError("this outcome sender is closed")
        return OutcomeSender(self._completer)

    def close(self) -> None:
        """Close this handle (idempotent); the last one closes the input. Not a
        checkpoint."""
        if not self._closed:
            self._closed = True
            self._completer._sender_closed()

    def __enter__(self) -> OutcomeSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_nowait(self, item: FinishedRun, *, force: bool = False) -> None:
        """Queue an outcome without waiting. Not a checkpoint.

        Raises ``trio.WouldBlock`` when the buffer is full (unless ``force``), and
        ``trio.ClosedResourceError`` once this handle is closed."""
        if self._closed:
            raise trio.ClosedResourceError("this outcome sender is closed")
        self._completer._queue(item, force)

    async def send(self, item: FinishedRun) -> None:
        """Queue an outcome, waiting while the buffer is full.

        Always a checkpoint. On cancellation: the outcome is queued anyway (past the
        limit), so it is still written before the completer exits; then Cancelled
        propagates. Raises ``trio.ClosedResourceError`` once this handle is closed."""
        if self._closed:
            raise trio.ClosedResourceError("this outcome sender is closed")
        await self._completer._queue_waiting(item)


@final
@attrs.frozen
class CompleterStatistics:
    pending: int
    """Outcomes waiting to be written."""
    written: int
    """Outcomes written since start (stand-ins of refused ones included)."""
    batches: int
    """Statements that wrote them."""
    failed_writes: int
    """Write attempts that failed and were retried."""
    waiting_for_space: int
    """Workers blocked by backpressure right now."""
    refused: int = 0
    """Outcomes the database refused as they were: each then written in a storable form,
    or, if even that was refused, dropped (see ``dropped``)."""
    dropped: int = 0
    """Refused outcomes whose stand-in was refused too: their jobs stay ``running`` for the
    rescuer."""
    writable: bool = True
    """False while writes fail (producers then fetch nothing)."""


@final
@attrs.define(eq=False)
class Completer:
    """Writes the outcomes its senders hand over; see the module's docstring."""

    driver: Driver
    now: Callable[[], datetime]
    events: trio.MemorySendChannel[list[Event]]
    """Where the events of written jobs go; the completer closes it as it returns."""
    args_type_for: Callable[[str], type[Any] | None]
    shutdown_timeout: float
    audience: Audience = attrs.field(factory=Audience.everyone)
    """Who listens for job events; while nobody does, written jobs are not read back."""
    flush_size: int = FLUSH_SIZE
    """Write as soon as this many outcomes wait."""
    linger: float = 0.05
    """Otherwise write this long after the first outcome arrived."""
    max_batch: int = 5000
    """At most this many rows per statement."""
    max_batch_bytes: int = 64 << 20
    """And at most about this many bytes of outputs, errors and metadata per statement
    (at least one outcome): PostgreSQL refuses a message over 1 GiB, and a thousand
    outputs at their 1 MiB cap would make one."""
    max_pending: int = 10_000
    """``OutcomeSender.send`` blocks while this many wait, until fewer than half remain (the runtime
    sets it from the client's worker slots)."""
    _pending: list[FinishedRun] = attrs.field(factory=list, init=False)
    _prompt: bool = attrs.field(default=False, init=False)
    """An outcome of a workflow task waits: the next write does not linger (it may
    promote tasks that others wait to run)."""
    _work: trio.Event = attrs.field(factory=trio.Event, init=False)
    _space: trio.Event = attrs.field(factory=trio.Event, init=False)
    _senders: int = attrs.field(default=0, init=False)
    """Sender handles made and not closed yet."""
    _closed: bool = attrs.field(default=False, init=False)
    """Every handle made has been closed: no outcome can come any more."""
    _written: int = attrs.field(default=0, init=False)
    _batches: int = attrs.field(default=0, init=False)
    _failed: int = attrs.field(default=0, init=False)
    _waiting: int = attrs.field(default=0, init=False)
    _refused: int = attrs.field(default=0, init=False)
    _dropped: int = attrs.field(default=0, init=False)
    _writable: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set while writes go through; cleared from a failed write to the next success."""
    _write_interrupted: bool = attrs.field(default=False, init=False)
    """A write was cancelled mid-statement: it may have committed (see ``_write``)."""
    _after_write: dict[Callable[[], None], None] = attrs.field(factory=dict, init=False)
    """Called once the next batch is written (`call_after_write`); each once."""

    def __attrs_post_init__(self) -> None:
        self._writable.set()

    def statistics(self) -> CompleterStatistics:
        return CompleterStatistics(
            len(self._pending),
            self._written,
            self._batches,
            self._failed,
            self._waiting,
            self._refused,
            self._dropped,
            self.writable,
        )

    @property
    def writable(self) -> bool:
        """False from a failed write until a write goes through again. Not a checkpoint."""
        return self._writable.is_set()

    async def wait_writable(self) -> None:
        """Return once writes go through (at once when they do). Always a checkpoint; on
        cancellation nothing changed."""
        await self._writable.wait()

    def _set_writable(self, writable: bool) -> None:
        if writable and not self._writable.is_set():
            self._writable.set()
            log.info("writing job outcomes works again")
        elif not writable and self._writable.is_set():
            self._writable = trio.Event()

    def call_after_write(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the next batch of outcomes is written (once, however
        often it was asked for), and write what waits now without lingering. For a
        producer whose jobs a limit holds back: the database counts a job as running
        until its outcome is written, so that write is what can free a slot. Not a
        checkpoint."""
        self._after_write[callback] = None
        self._work.set()

    def sender(self) -> OutcomeSender:
        """A new handle on the input (the runtime makes the original; producers get
        clones of it). Not a checkpoint."""
        if self._closed:
            raise trio.ClosedResourceError("the completer's input is closed")
        return OutcomeSender(self)

    def _sender_closed(self) -> None:
        self._senders -= 1
        if self._senders == 0:
            self._closed = True
            self._work.set()

    def _queue(self, item: FinishedRun, force: bool) -> None:
        if not force and len(self._pending) >= self.max_pending:
            raise trio.WouldBlock
        self._pending.append(item)
        if item.workflow:
            self._prompt = True  # it may promote tasks: written without lingering
            self._work.set()
        elif len(self._pending) == 1 or len(self._pending) >= self.flush_size:
            self._work.set()

    async def _queue_waiting(self, item: FinishedRun) -> None:
        queued = False
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    self._queue(item, False)
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
                self._queue(item, True)
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until every sender is closed and nothing is left; then close the
        event channel (on every path, so the dispatcher's drain always ends).

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
                wait = min(linger, PROMPT_LINGER) if self._prompt else linger
                with trio.move_on_after(wait) as lingering:
                    while (
                        len(self._pending) < self.flush_size
                        and not self._closed
                        and not self._after_write
                    ):
                        if self._prompt:  # came meanwhile: linger no longer than it allows
                            lingering.deadline = min(
                                lingering.deadline, trio.current_time() + PROMPT_LINGER
                            )
                        await self._work.wait()
                        self._work = trio.Event()
            batch = self._next_batch()
            if len(batch) == len(self._pending):
                self._prompt = False
            try:
                await self._write(batch)
            except trio.Cancelled:
                # Cancelled anywhere in the write (the statement, a backoff, the lost-reply
                # check): it may have committed, so the final flush must check.
                self._write_interrupted = True
                raise
            del self._pending[: len(batch)]
            waiting, self._after_write = self._after_write, {}
            for callback in waiting:
                callback()
            if len(self._pending) < self.max_pending // 2:
                self._space.set()
                self._space = trio.Event()

    def _next_batch(self) -> list[FinishedRun]:
        """The first pending outcomes, up to ``max_batch`` of them and ``max_batch_bytes``
        of their JSON (always at least one). Not a checkpoint."""
        size = 0
        end = 0
        for finished in self._pending[: self.max_batch]:
            o = finished.outcome
            size += len(o.output_json or "") + len(o.error_json or "") + len(o.metadata_json or "")
            if end and size > self.max_batch_bytes:
                break
            end += 1
        return self._pending[:end]

    async def _write_with_retries(
        self, batch: list[FinishedRun], want_rows: bool
    ) -> tuple[list[JobRow | WrittenRow], bool]:
        """Write the batch, retrying with backoff while the write fails for reasons other
        than its data; return the rows written (``(id,)`` only unless ``want_rows``) and
        whether any attempt failed first. Raises `_Rejected` when the database refuses the
        data (nothing was written)."""
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
                self._batches += 1
                self._set_writable(True)
                return cast("list[JobRow | WrittenRow]", rows), failed_before
            except trio.Cancelled:
                self._write_interrupted = True
                raise
            except DatabaseError as exc:
                if exc.rejected_data:
                    # The database answered: writes go through, this data does not.
                    self._set_writable(True)
                    raise _Rejected(exc, failed_before) from exc
                self._failed += 1
                failed_before = True
                self._set_writable(False)
                log.warning(
                    "writing %d job outcomes failed, retrying in %.1f s (no new jobs are "
                    "fetched meanwhile): %s",
                    len(batch),
                    delay,
                    exc,
                )
            try:
                await trio.sleep(delay)
            except trio.Cancelled:
                # Cancelled while backing off after a failed attempt, which may have
                # committed (only its reply lost): the final flush must check, as after
                # a write cancelled mid-statement.
                self._write_interrupted = True
                raise
            delay = min(delay * 2, 10.0)

    async def _write_isolating(
        self, batch: list[FinishedRun], want_rows: bool
    ) -> tuple[list[JobRow | WrittenRow], bool]:
        """`_write_with_retries`, but when the database refuses the batch's data, halve
        it until each refused outcome stands alone: every other outcome is written, and a
        refused one in its storable stand-in (`storable_stand_in`). If even the stand-in
        is refused (which no job's data can cause), the outcome is logged and dropped:
        its job stays ``running`` for the rescuer, never retried as it was."""
        try:
            return await self._write_with_retries(batch, want_rows)
        except _Rejected as rejected:
            if len(batch) > 1:
                half = len(batch) // 2
                first, failed_first = await self._write_isolating(batch[:half], want_rows)
                rest, failed_rest = await self._write_isolating(batch[half:], want_rows)
                return first + rest, rejected.failed_before or failed_first or failed_rest
            refused = batch[0]
            self._refused += 1
            log.error(
                "the database refused the outcome of job %s (%s); writing it with a "
                "stand-in error instead: %s",
                refused.outcome.id,
                refused.outcome.state.value,
                rejected.error,
            )
            try:
                rows, failed = await self._write_with_retries(
                    [storable_stand_in(refused, rejected.error, self.now())], want_rows
                )
                return rows, rejected.failed_before or failed
            except _Rejected as again:
                self._dropped += 1
                log.error(
                    "the database refused even the stand-in outcome of job %s; it stays "
                    "running until the rescuer returns it to work: %s",
                    refused.outcome.id,
                    again.error,
                )
                return [], rejected.failed_before or again.failed_before

    async def _write(self, batch: list[FinishedRun]) -> None:
        want_events = self.audience.job_subscribers > 0
        dropped = self._dropped
        rows, failed_before = await self._write_isolating(batch, want_events)
        self._written += len(batch) - (self._dropped - dropped)
        if len(rows) < len(batch):
            if want_events and failed_before:
                found = await self._written_by_lost_reply(batch, {r.id for r in rows})
                rows = [*rows, *found]
            if len(rows) < len(batch):
                log.debug(
                    "%d of %d outcomes found their job no longer running",
                    len(batch) - len(rows),
                    len(batch),
                )
        if want_events:
            # Asked for with rows=True: every row is a whole JobRow.
            self._publish(batch, rows)  # type: ignore[arg-type]

    def _publish(self, batch: list[FinishedRun], rows: list[JobRow]) -> None:
        by_id = {f.outcome.id: f for f in batch}
        events = []
        for row in rows:
            finished = by_id.get(row.id)
            if finished is None:
                continue
            if row.args is None:
                job = row_to_job_with_args(row, finished.args)
            else:
                job = row_to_job(row, self.args_type_for(row.kind))
            kind = finished.event_kind
            if job.state == "cancelled" and kind is not EventKind.JOB_CANCELLED:
                kind = EventKind.JOB_CANCELLED
            events.append(Event(kind, job=job, duration=finished.duration))
        if events:
            try:
                self.events.send_nowait(events)
            except trio.WouldBlock:
                log.warning("event dispatcher not keeping up: %d events dropped", len(events))
            except trio.BrokenResourceError:
                # Only if the dispatcher died of an error (it otherwise reads until this
                # channel closes): the outcomes are written all the same.
                log.error("event dispatcher gone: %d events dropped", len(events))

    async def _written_by_lost_reply(
        self, batch: list[FinishedRun], seen: set[int]
    ) -> list[JobRow]:
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
            finished = wanted[row.id]
            # A queued job cancelled after our write (job_cancel) is cancelled too, but not
            # by our write, and gets no event; only a cancel requested while the job ran
            # (cancel_attempted_at) turns an outcome into a cancel.
            cancelled_by_our_write = row.state == JobState.CANCELLED.value and (
                "cancel_attempted_at" in (row.metadata or {})
            )
            if row.attempted_at == finished.attempted_at and (
                row.state == finished.outcome.state.value or cancelled_by_our_write
            ):
                ours.append(row)
        return ours
