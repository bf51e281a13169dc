"""Runs jobs in cancel scopes shared by the jobs run back to back (lanes) and decides what
each outcome does to the row."""

from __future__ import annotations

import logging
import math
import random
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, final

import attrs
import trio

from .._codec import decode_args, dumps, with_args
from ..config import ClientConfig, RetryPolicy, call_error_handler
from ..driver.protocol import JobOutcome
from ..errors import JobCancel, JobSnooze
from ..events import EventKind
from ..job import Job, JobState
from ..middleware import WorkNext, build_work_chain, run_work_end, work_end_hooks
from ..workers import DEFAULT_TIMEOUT, WorkerEntry, Workers
from .completer import Completer, Finished

__all__ = ["Executor", "JobHandle", "default_retry_delay", "next_retry_delay"]

log = logging.getLogger("trioqueue.executor")


def default_retry_delay(job: Job[Any]) -> float:
    """``(errors + 1) ** 4`` seconds, ±10% jitter; ``job.errors`` holds earlier errors."""
    base = float((len(job.errors) + 1) ** 4)
    return base * random.uniform(0.9, 1.1)


MAX_RETRY_DELAY = 10 * 365 * 86400.0


def next_retry_delay(
    job: Job[Any], entry: WorkerEntry[Any] | None, retry_policy: RetryPolicy | None
) -> float:
    """Seconds until ``job``'s retry: the worker's ``next_retry``, else the client's
    ``retry_policy``, else the default. A policy that raises or returns a negative or
    non-finite number is logged and the default used instead."""
    policy = (entry.next_retry if entry is not None else None) or retry_policy
    if policy is not None:
        try:
            delay = float(policy(job))
            if math.isfinite(delay) and delay >= 0:
                return min(delay, MAX_RETRY_DELAY)
            log.warning("retry policy gave %r for job %s; using the default", delay, job.id)
        except Exception:
            log.exception("retry policy raised for job %s; using the default", job.id)
    return min(default_retry_delay(job), MAX_RETRY_DELAY)


DEADLINE_SLACK = 0.001
"""A job's timeout may pass up to this fraction of itself late (60 ms of 60 s), so that
jobs run back to back can share their cancel scope's deadline (see `Executor.run`)."""


class JobTimeoutError(Exception):
    """Recorded when a job runs past its timeout."""


class JobCancelledRemotelyError(Exception):
    """Recorded when a running job is cancelled through ``job_cancel``."""


class UnknownKindError(Exception):
    """Recorded when a fetched job's kind has no worker on this client."""


@final
class JobHandle:
    """A claimed job's link to the cancel scope it runs in, so ``job_cancel`` can reach it.

    While the job's own code runs, ``lane`` is the scope (see `Executor.run`); a cancel
    that comes before that is remembered and applied when the job starts."""

    __slots__ = ("cancel_requested", "lane")

    def __init__(self) -> None:
        self.lane: trio.CancelScope | None = None
        self.cancel_requested = False

    def cancel_remotely(self) -> None:
        self.cancel_requested = True
        if self.lane is not None:
            self.lane.cancel()


Take = Callable[[], "tuple[Job[Any], JobHandle] | None"]
"""Hands out the next claimed job to run, or None when there is none."""

Ended = Callable[["Job[Any]", "Finished"], None]
"""Called once per job taken, right after its outcome was handed to the completer."""


def _error_entry(now: datetime, attempt: int, exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    trace = "".join(traceback.format_exception(exc))
    return dumps({"at": now.isoformat(), "attempt": attempt, "error": message, "trace": trace})


def _log_end(job: Job[Any], finished: Finished, failure: BaseException | None) -> None:
    """One line per finished run, with structured fields (docs/observability.md): DEBUG,
    except WARNING for a failed attempt that will be retried and ERROR for a discard."""
    state = finished.outcome.state
    if finished.event_kind is EventKind.JOB_FAILED:
        level = logging.ERROR if state is JobState.DISCARDED else logging.WARNING
    else:
        level = logging.DEBUG
    if not log.isEnabledFor(level):
        return
    outcome = finished.event_kind.value.removeprefix("job_")
    extra = {
        "job_id": job.id,
        "kind": job.kind,
        "queue": job.queue,
        "attempt": job.attempt,
        "duration": finished.duration,
        "outcome": outcome,
        "state": state.value,
    }
    if failure is not None and level > logging.DEBUG:
        log.log(
            level,
            "job %s (%s) %s on attempt %s/%s, now %s: %s",
            job.id,
            job.kind,
            outcome,
            job.attempt,
            job.max_attempts,
            state.value,
            f"{type(failure).__name__}: {failure}",
            extra=extra,
        )
    else:
        log.log(
            level,
            "job %s (%s) %s in %.6f s",
            job.id,
            job.kind,
            outcome,
            finished.duration,
            extra=extra,
        )


@final
@attrs.define(eq=False)
class Executor:
    """Turns a fetched job into exactly one outcome for the completer."""

    workers: Workers
    config: ClientConfig
    completer: Completer
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

    async def execute(self, job: Job[Any], handle: JobHandle) -> Finished:
        """Run one job (see `run`): its outcome is queued with the completer, and also
        returned."""
        items = [(job, handle)]
        outcome: list[Finished] = []
        await self.run(lambda: items.pop() if items else None, lambda _, f: outcome.append(f))
        return outcome[0]

    async def run(self, take: Take, ended: Ended) -> None:
        """Run jobs one after another as ``take()`` hands them out, until it returns None.
        Each outcome is handed to the completer (waiting while its buffer is full), then
        ``ended(job, finished)`` is called.

        A job runs inside a cancel scope with its deadline, which ``job_cancel`` and the
        timeout cancel. Making a trio cancel scope costs more than a no-op job, so the jobs
        run here share one (a "lane"); its deadline follows each job's as it starts (at
        most `DEADLINE_SLACK` of the timeout late). A cancel uses the lane up: the job it
        was meant for gets its outcome outside the lane, and the next job a new lane.
        Between jobs nothing can cancel the lane: no job's handle points at it, and its
        deadline is lifted before anything after a job's own code may wait (hooks, the
        error handler, a full completer buffer).

        On cancellation from outside (hard stop): the job in hand gets its "interrupted"
        outcome (back to ``available``, attempt given back, no error) queued before
        Cancelled propagates, so the job never stays ``running``.
        """
        item = take()
        while item is not None:
            item = await self._lane(item, take, ended)

    async def _lane(
        self, item: tuple[Job[Any], JobHandle], take: Take, ended: Ended
    ) -> tuple[Job[Any], JobHandle] | None:
        """Run jobs in one lane until ``take()`` runs dry (then None) or a cancel uses the
        lane up (then the next item to run, from ``take()``)."""
        job, handle = item
        start = trio.current_time()
        in_hand = True  # the job's outcome is not queued yet
        entry: WorkerEntry[Any] | None = None
        done = False
        ran = False
        failure: BaseException | None = None
        timeout: float | None = None
        try:
            with trio.CancelScope() as lane:
                while True:
                    entry = self.workers.get(job.kind)
                    done = False
                    failure = None
                    if entry is None:
                        failure = UnknownKindError(
                            f"no worker is registered for job kind {job.kind!r} on this client"
                        )
                    elif type(job.args) is not entry.args_type:
                        # The producer decodes args as it builds the job; here only when
                        # that failed (so this raises and is recorded) or the job came
                        # from elsewhere.
                        try:
                            job = with_args(job, decode_args(entry.args_type, job.args))
                        except Exception as exc:
                            failure = exc
                    if entry is not None and failure is None:
                        timeout = self._timeout(entry)
                        if timeout is None:
                            if lane.deadline != math.inf:
                                lane.deadline = math.inf
                        else:
                            # Moving a scope's deadline costs trio about as much as a
                            # no-op job: keep the lane's while it is within the slack.
                            due = start + timeout
                            if not due <= lane.deadline <= due + timeout * DEADLINE_SLACK:
                                lane.deadline = due + timeout * DEADLINE_SLACK
                        handle.lane = lane
                        if handle.cancel_requested:
                            lane.cancel()
                        try:
                            await (self._chains.get(job.kind) or self._chain(entry))(job)
                            done = True
                        except Exception as exc:
                            failure = exc
                        finally:
                            handle.lane = None
                        if lane.cancel_called:
                            # Cancelled, but the job caught it or never reached a
                            # checkpoint: it ends outside this lane, like a cancelled one.
                            break
                        ran = True
                    else:
                        ran = False
                    if lane.deadline != math.inf and (
                        failure is not None or (ran and self._ends.get(job.kind, self._work_ends))
                    ):
                        lane.deadline = math.inf
                    finished = await self._end(job, entry, ran, done, failure, start, handle)
                    in_hand = False
                    await self._hand_over(job, finished, ended, lane)
                    following = take()
                    if following is None:
                        return None
                    job, handle = following
                    start = trio.current_time()
                    in_hand = True
            if in_hand:
                # The lane was cancelled for this job: by job_cancel or its timeout.
                if not done and failure is None:
                    if handle.cancel_requested:
                        failure = JobCancelledRemotelyError("job cancelled through job_cancel")
                    else:
                        failure = JobTimeoutError(f"job timed out after {timeout} s")
                finished = await self._end(job, entry, True, done, failure, start, handle)
                in_hand = False
                await self._hand_over(job, finished, ended, None)
        except BaseException:
            if in_hand:
                interrupted = self.interrupted(job, start)
                self.completer.complete_nowait(interrupted, force=True)
                if log.isEnabledFor(logging.DEBUG):
                    _log_end(job, interrupted, None)
                ended(job, interrupted)
            raise
        return take()

    async def _hand_over(
        self, job: Job[Any], finished: Finished, ended: Ended, lane: trio.CancelScope | None
    ) -> None:
        """Queue the outcome, waiting while the completer's buffer is full; then
        ``ended``. On cancellation the outcome is queued all the same."""
        try:
            try:
                self.completer.complete_nowait(finished)
            except trio.WouldBlock:
                if lane is not None and lane.deadline != math.inf:
                    lane.deadline = math.inf
                await self.completer.complete(finished)
        finally:
            ended(job, finished)

    async def _end(
        self,
        job: Job[Any],
        entry: WorkerEntry[Any] | None,
        ran: bool,
        done: bool,
        failure: BaseException | None,
        start: float,
        handle: JobHandle,
    ) -> Finished:
        """The outcome of a run: the work_end hooks (if the job's code ran), then
        `_decide`, then the log line."""
        if ran:
            ends = self._ends.get(job.kind, self._work_ends)
            if ends:
                failure = await run_work_end(ends, job, failure)
                done = failure is None
        finished = await self._decide(
            job, entry, done, failure, trio.current_time() - start, handle
        )
        if failure is not None or log.isEnabledFor(logging.DEBUG):
            _log_end(job, finished, failure)
        return finished

    def _timeout(self, entry: WorkerEntry[Any]) -> float | None:
        if entry.timeout is DEFAULT_TIMEOUT:
            return self.config.job_timeout
        assert not isinstance(entry.timeout, type(DEFAULT_TIMEOUT))
        return entry.timeout

    def interrupted(self, job: Job[Any], start: float) -> Finished:
        return Finished(
            JobOutcome(
                id=job.id,
                state=JobState.AVAILABLE,
                finalized_at=None,
                scheduled_at=None,
                give_back_attempt=True,
                error_json=None,
                metadata_json=None,
                attempted_at=job.attempted_at,
            ),
            EventKind.JOB_INTERRUPTED,
            trio.current_time() - start,
            job.attempted_at,
            job.args,
        )

    async def _decide(
        self,
        job: Job[Any],
        entry: WorkerEntry[Any] | None,
        done: bool,
        failure: BaseException | None,
        duration: float,
        handle: JobHandle,
    ) -> Finished:
        now = self.now()
        if done:
            return Finished(
                JobOutcome(
                    job.id, JobState.COMPLETED, now, None, False, None, None, job.attempted_at
                ),
                EventKind.JOB_COMPLETED,
                duration,
                job.attempted_at,
                job.args,
            )
        assert failure is not None
        if isinstance(failure, JobSnooze):
            at = now + timedelta(seconds=failure.seconds)
            soon = failure.seconds <= self.config.scheduler_interval
            snoozes = int(job.metadata.get("snoozes", 0)) + 1
            return Finished(
                JobOutcome(
                    job.id,
                    JobState.AVAILABLE if soon else JobState.SCHEDULED,
                    None,
                    at,
                    True,
                    None,
                    dumps({"snoozes": snoozes}),
                    job.attempted_at,
                ),
                EventKind.JOB_SNOOZED,
                duration,
                job.attempted_at,
                job.args,
            )
        error_json = _error_entry(now, job.attempt, failure)
        cancel = isinstance(failure, JobCancel | JobCancelledRemotelyError) or (
            handle.cancel_requested
        )
        if not cancel and self.config.error_handler is not None:
            try:
                verdict = await call_error_handler(self.config.error_handler, job, failure)
            except Exception:
                log.exception("error_handler raised for job %s; ignoring it", job.id)
                verdict = None
            cancel = bool(verdict and verdict.set_cancelled)
        if cancel:
            return Finished(
                JobOutcome(
                    job.id, JobState.CANCELLED, now, None, False, error_json, None, job.attempted_at
                ),
                EventKind.JOB_CANCELLED,
                duration,
                job.attempted_at,
                job.args,
            )
        if job.attempt >= job.max_attempts:
            return Finished(
                JobOutcome(
                    job.id, JobState.DISCARDED, now, None, False, error_json, None, job.attempted_at
                ),
                EventKind.JOB_FAILED,
                duration,
                job.attempted_at,
                job.args,
            )
        delay = next_retry_delay(job, entry, self.config.retry_policy)
        soon = delay <= self.config.scheduler_interval
        return Finished(
            JobOutcome(
                job.id,
                JobState.AVAILABLE if soon else JobState.RETRYABLE,
                None,
                now + timedelta(seconds=delay),
                False,
                error_json,
                None,
                job.attempted_at,
            ),
            EventKind.JOB_FAILED,
            duration,
            job.attempted_at,
            job.args,
        )
