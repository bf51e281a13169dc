"""Runs claimed jobs in lanes (cancel scopes shared by the jobs run back to back, see
`lane`), and turns whatever each run did into exactly one outcome for the completer —
whatever the job raised or returned (see `trioqueue._failure` for hostile errors,
`trioqueue._outcome` for the row changes).

What the job's code returns (the worker's return value, or whatever its worker middleware
returns in its place) is recorded as the job's output: encoded as it returns, before the
``work_end`` hooks, so that a value that cannot be stored is the attempt's error, which the
hooks see and which is retried or discarded like any other (`_outcome.recorded_output`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, final

import attrs
import trio

from .. import _outcome as outcome
from .._codec import decode_args, with_args
from .._failure import cancelled_for_real, describe, fatal_in
from .._outcome import FinishedRun
from ..config import ClientConfig, call_error_handler
from ..errors import JobCancel, JobSnooze, UnknownJobKindError
from ..events import EventKind
from ..job import Job, JobState
from ..middleware import WorkNext, build_work_chain, run_work_end, work_end_hooks
from ..workers import DEFAULT_TIMEOUT, WorkerEntry, Workers
from .claimed import ClaimedJobs, Wakeup
from .lane import JobHandle, Lane

if TYPE_CHECKING:
    from .completer import OutcomeSender

__all__ = ["Executor"]

log = logging.getLogger("trioqueue.executor")


class JobTimeoutError(Exception):
    """Recorded when a job runs past its timeout."""


class JobCancelledRemotelyError(Exception):
    """Recorded when a running job is cancelled through ``job_cancel``."""


class ArgsDecodeError(Exception):
    """Recorded when a job's stored args cannot be made into its worker's args type."""


class _Run(NamedTuple):
    """What one run of a job's code came to, before hooks and the decision."""

    job: Job[Any]
    """The job, with its args decoded for the worker when they could be."""
    entry: WorkerEntry[Any] | None
    ran: bool
    """The job's code was called (so its work_end hooks are owed)."""
    error: BaseException | None
    """What it raised, whatever that was (None: it returned); or why its return value
    cannot be recorded."""
    timeout: float | None
    output_json: str | None = None
    """What it returned, as the JSON text to record (None: nothing, or it did not return)."""


def _unknown(job: Job[Any]) -> UnknownJobKindError:
    """What a run of a job whose kind has no worker on this client records (the error
    inserting such a job raises, on a client that has workers)."""
    return UnknownJobKindError(job.kind, " on this client")


def _decoded(job: Job[Any], entry: WorkerEntry[Any]) -> Job[Any]:
    """``job`` with its args as ``entry``'s args type. The producer decodes them as it
    builds the job; here only when that failed, or the job came from elsewhere. Raises
    ArgsDecodeError when the stored args are not a JSON object, and whatever the type
    raises when it refuses them."""
    args = job.args
    if not isinstance(args, dict):
        raise ArgsDecodeError(
            f"the stored args are a JSON {type(args).__name__}, not an object: "
            f"cannot make a {entry.args_type.__name__} of them"
        )
    return with_args(job, decode_args(entry.args_type, args))


def _log_end(job: Job[Any], finished: FinishedRun, failure: BaseException | None) -> None:
    """One line per finished run, with structured fields (docs/observability.md): DEBUG,
    except WARNING for a failed attempt that will be retried and ERROR for a discard."""
    state = finished.outcome.state
    if finished.event_kind is EventKind.JOB_FAILED:
        level = logging.ERROR if state is JobState.DISCARDED else logging.WARNING
    else:
        level = logging.DEBUG
    if not log.isEnabledFor(level):
        return
    outcome_name = finished.event_kind.value.removeprefix("job_")
    extra = {
        "job_id": job.id,
        "kind": job.kind,
        "queue": job.queue,
        "attempt": job.attempt,
        "duration": finished.duration,
        "outcome": outcome_name,
        "state": state.value,
    }
    if failure is not None and level > logging.DEBUG:
        log.log(
            level,
            "job %s (%s) %s on attempt %s/%s, now %s: %s",
            job.id,
            job.kind,
            outcome_name,
            job.attempt,
            job.max_attempts,
            state.value,
            describe(failure),
            extra=extra,
        )
    else:
        log.log(
            level,
            "job %s (%s) %s in %.6f s",
            job.id,
            job.kind,
            outcome_name,
            finished.duration,
            extra=extra,
        )


@final
@attrs.define(eq=False)
class Executor:
    """Turns a fetched job into exactly one outcome for the completer."""

    workers: Workers
    config: ClientConfig
    now: Callable[[], datetime]
    _chains: dict[str, WorkNext] = attrs.field(factory=dict, init=False)
    """Per kind, what a run awaits: the worker function, or it wrapped in middleware."""
    _work_ends: tuple[Callable[..., Any], ...] = attrs.field(default=(), init=False)
    """The client's work_end hooks."""
    _ends: dict[str, tuple[Callable[..., Any], ...]] = attrs.field(factory=dict, init=False)
    """Per kind, the work_end hooks of a run: the kind's own, then the client's."""

    def __attrs_post_init__(self) -> None:
        self._work_ends = work_end_hooks(self.config.hooks)

    def _chain(self, entry: WorkerEntry[Any]) -> WorkNext:
        chain = build_work_chain(
            entry.fn, self.config.middleware, entry.middleware, (*self.config.hooks, *entry.hooks)
        )
        self._chains[entry.kind] = chain
        self._ends[entry.kind] = (*work_end_hooks(entry.hooks), *self._work_ends)
        return chain

    async def execute(
        self, job: Job[Any], handle: JobHandle, outcomes: OutcomeSender
    ) -> FinishedRun:
        """Run one job (see `run`): its outcome is sent to ``outcomes``, and also
        returned."""
        claimed = ClaimedJobs(job.queue, Wakeup())
        claimed.add(job, handle)
        await self.run(claimed, outcomes)
        finished = claimed.last_ended
        if finished is None:  # run() hands every job it takes over, or raises
            raise RuntimeError(f"job {job.id} ended without an outcome")
        return finished

    async def run(self, claimed: ClaimedJobs, outcomes: OutcomeSender) -> None:
        """Run claimed jobs one after another as ``claimed.take()`` hands them out, until
        none is queued. Each outcome is sent to ``outcomes`` (waiting while the
        completer's buffer is full), then ``claimed.ended`` frees the job's slot.

        Jobs run in a `Lane`: its deadline follows each job's as it starts (at most
        `DEADLINE_SLACK` of the timeout late). A cancel uses the lane up: the job it was
        meant for gets its outcome outside the lane, and the next job a new lane. Between
        jobs nothing can cancel the lane: no job's handle points at it, and its deadline
        is lifted before anything after a job's own code may wait (hooks, the error
        handler, a full completer buffer).

        Whatever a job raises is its outcome (docs/failure-modes.md): an error recorded
        and the attempt counted, even for a ``BaseException`` or a hand-made
        ``trio.Cancelled``. ``KeyboardInterrupt`` and ``SystemExit`` (alone or in a group)
        are recorded the same way, and then propagate once the outcome is sent.

        On cancellation from outside (hard stop): the job in hand gets its "interrupted"
        outcome (back to ``available``, attempt given back, no error) sent before
        Cancelled propagates, so the job never stays ``running``. Should anything else
        escape while a job is in hand (a hook or error handler raising a
        ``BaseException``), that job's outcome records it as a failed attempt first.
        """
        item = claimed.take()
        while item is not None:
            item = await self._lane(item, claimed, outcomes)

    async def _lane(
        self, item: tuple[Job[Any], JobHandle], claimed: ClaimedJobs, outcomes: OutcomeSender
    ) -> tuple[Job[Any], JobHandle] | None:
        """Run jobs in one lane until ``claimed`` runs dry (then None) or a cancel uses
        the lane up (then the next item to run)."""
        job, handle = item
        start = trio.current_time()
        in_hand = True  # the job's outcome is not sent yet
        lane = Lane()
        try:
            with lane.scope:
                while True:
                    run = await self._run_job(job, handle, lane)
                    job = run.job
                    if run.ran and lane.used_up:
                        # Cancelled (by job_cancel or the timeout), whether the job caught
                        # it or never reached a checkpoint: it ends outside this lane. (A
                        # job that did not run has no deadline of its own in the lane, and
                        # reading cancel_called past the last job's would cancel the lane.)
                        break
                    ends = run.ran and self._ends.get(job.kind, self._work_ends)
                    if run.error is None and not ends:
                        # The usual run, kept short: it returned, and no hook follows.
                        fatal = None
                        finished = outcome.completed(
                            job, self.now(), trio.current_time() - start, run.output_json
                        )
                        if log.isEnabledFor(logging.DEBUG):
                            _log_end(job, finished, None)
                    else:
                        lane.lift()
                        finished, fatal = await self._end(run, start, handle)
                    in_hand = False
                    await self._hand_over(job, finished, claimed, outcomes, lane)
                    if fatal is not None:
                        raise fatal
                    following = claimed.take()
                    if following is None:
                        return None
                    job, handle = following
                    start = trio.current_time()
                    in_hand = True
            # The lane was cancelled for this job: by job_cancel or its timeout. A stop
            # from outside that came as well wins (out here, only outer scopes count): the
            # job is interrupted, as a job that outlived its timeout in a shielded cleanup
            # during a hard stop must be.
            if run.error is not None and cancelled_for_real(run.error):
                await trio.lowlevel.checkpoint()
            # Otherwise that cancel is no error of the job's; anything else it raised is.
            error = run.error
            if isinstance(error, BaseExceptionGroup):
                error = error.split(trio.Cancelled)[1]
                cancelled = error is None
            else:
                cancelled = isinstance(error, trio.Cancelled)
            if cancelled:
                if handle.cancel_requested:
                    error = JobCancelledRemotelyError("job cancelled through job_cancel")
                else:
                    error = JobTimeoutError(f"job timed out after {run.timeout} s")
            finished, fatal = await self._end(run._replace(error=error), start, handle)
            in_hand = False
            await self._hand_over(job, finished, claimed, outcomes, None)
            if fatal is not None:
                raise fatal
        except BaseException as exc:
            if in_hand:
                self._hand_back(job, exc, start, claimed, outcomes)
            raise
        return claimed.take()

    async def _run_job(self, job: Job[Any], handle: JobHandle, lane: Lane) -> _Run:
        """Run the job's code in ``lane`` (with its deadline), catching whatever it raises;
        when it returns, its return value is encoded as the output to record, and a value
        that cannot be is the run's error (`_outcome.recorded_output`).

        Cancelled from outside while the job runs (its error holds a ``Cancelled`` and the
        lane itself was not cancelled): raises trio's Cancelled, never the job's own
        exception, which might be a group also holding errors that must not escape."""
        entry = self.workers.get(job.kind)
        if entry is None:
            return _Run(job=job, entry=None, ran=False, error=_unknown(job), timeout=None)
        if type(job.args) is not entry.args_type:
            try:
                job = _decoded(job, entry)
            except BaseException as exc:  # the args type's code: whatever it raises
                return _Run(job=job, entry=entry, ran=False, error=exc, timeout=None)
        timeout = self._timeout(entry)
        lane.follow(timeout)
        scope = lane.scope
        handle.lane = scope
        if handle.cancel_requested:
            scope.cancel()
        error: BaseException | None = None
        result: object = None
        try:
            result = await (self._chains.get(job.kind) or self._chain(entry))(job)
        except BaseException as exc:
            error = exc
        finally:
            handle.lane = None
        output_json = None
        if result is not None:
            output_json, error = outcome.recorded_output(result)
            result = None  # the job's value is not kept past its encoding
        if error is not None and not scope.cancel_called and cancelled_for_real(error):
            await trio.lowlevel.checkpoint()  # raises Cancelled: the task's scope is cancelled
        return _Run(job, entry, True, error, timeout, output_json)

    def _hand_back(
        self,
        job: Job[Any],
        exc: BaseException,
        start: float,
        claimed: ClaimedJobs,
        outcomes: OutcomeSender,
    ) -> None:
        """``exc`` escaped while ``job`` was in hand: send its outcome before it
        propagates. A cancellation interrupts the job (back to ``available``, attempt
        given back); anything else is a failed attempt with ``exc`` recorded, retried on
        the default delay (no user code runs here). Not a checkpoint."""
        duration = trio.current_time() - start
        if cancelled_for_real(exc):
            finished = outcome.interrupted(job, duration)
            failure = None
        else:
            finished = outcome.failed(
                job,
                None,
                exc,
                self.now(),
                duration,
                cancel=False,
                retry_policy=None,
                scheduler_interval=self.config.scheduler_interval,
            )
            failure = exc
        outcomes.send_nowait(finished, force=True)
        claimed.ended(job.id, finished)
        if failure is not None or log.isEnabledFor(logging.DEBUG):
            _log_end(job, finished, failure)

    async def _hand_over(
        self,
        job: Job[Any],
        finished: FinishedRun,
        claimed: ClaimedJobs,
        outcomes: OutcomeSender,
        lane: Lane | None,
    ) -> None:
        """Send the outcome, waiting while the completer's buffer is full; then free the
        job's slot. On cancellation the outcome is sent all the same."""
        try:
            try:
                outcomes.send_nowait(finished)
            except trio.WouldBlock:
                if lane is not None:
                    lane.lift()
                await outcomes.send(finished)
        finally:
            claimed.ended(job.id, finished)

    async def _end(
        self, run: _Run, start: float, handle: JobHandle
    ) -> tuple[FinishedRun, BaseException | None]:
        """The outcome of a run — the work_end hooks (if the job's code ran), then
        `_decide`, then the log line — and the KeyboardInterrupt or SystemExit to raise
        once it is queued, if the job raised one."""
        job, error = run.job, run.error
        fatal = None if error is None else fatal_in(error)
        if run.ran:
            ends = self._ends.get(job.kind, self._work_ends)
            if ends:
                error = await run_work_end(ends, job, error)
                if fatal is None and error is not None:
                    fatal = fatal_in(error)
        finished = await self._decide(
            job, run.entry, error, run.output_json, trio.current_time() - start, handle
        )
        if error is not None or log.isEnabledFor(logging.DEBUG):
            _log_end(job, finished, error)
        return finished, fatal

    def _timeout(self, entry: WorkerEntry[Any]) -> float | None:
        if entry.timeout is DEFAULT_TIMEOUT:
            return self.config.job_timeout
        assert not isinstance(entry.timeout, type(DEFAULT_TIMEOUT))
        return entry.timeout

    async def _decide(
        self,
        job: Job[Any],
        entry: WorkerEntry[Any] | None,
        error: BaseException | None,
        output_json: str | None,
        duration: float,
        handle: JobHandle,
    ) -> FinishedRun:
        now = self.now()
        if error is None:
            return outcome.completed(job, now, duration, output_json)
        if isinstance(error, JobSnooze):
            snooze = outcome.snoozed(
                job, now, error.seconds, self.config.scheduler_interval, duration
            )
            if isinstance(snooze, FinishedRun):
                return snooze
            error = snooze
        cancel = handle.cancel_requested or isinstance(error, JobCancel | JobCancelledRemotelyError)
        if not cancel and self.config.error_handler is not None:
            try:
                verdict = await call_error_handler(self.config.error_handler, job, error)
            except Exception:
                log.exception("error_handler raised for job %s; ignoring it", job.id)
                verdict = None
            cancel = bool(verdict and verdict.set_cancelled)
        return outcome.failed(
            job,
            entry,
            error,
            now,
            duration,
            cancel=cancel,
            retry_policy=self.config.retry_policy,
            scheduler_interval=self.config.scheduler_interval,
        )
