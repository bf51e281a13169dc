"""Runs one job in its own cancel scope and decides what its outcome does to the row."""

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


class JobTimeoutError(Exception):
    """Recorded when a job runs past its timeout."""


class JobCancelledRemotelyError(Exception):
    """Recorded when a running job is cancelled through ``job_cancel``."""


class UnknownKindError(Exception):
    """Recorded when a fetched job's kind has no worker on this client."""


@final
class JobHandle:
    """A running job's cancel scope, so ``job_cancel`` can reach it.

    The scope is made when the job starts, with its deadline (setting a deadline on a
    scope afterwards costs trio a second round of deadline bookkeeping); a cancel that
    comes before that is remembered and applied then."""

    __slots__ = ("cancel_requested", "scope")

    def __init__(self) -> None:
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False

    def open_scope(self, deadline: float) -> trio.CancelScope:
        scope = self.scope = trio.CancelScope(deadline=deadline)
        if self.cancel_requested:
            scope.cancel()
        return scope

    def cancel_remotely(self) -> None:
        self.cancel_requested = True
        if self.scope is not None:
            self.scope.cancel()


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
        """Run ``job``'s worker and return its outcome (not yet queued for writing).

        On cancellation from outside (hard stop): the job's "interrupted" outcome (back to
        ``available``, attempt given back, no error) is queued with the completer before
        Cancelled propagates, so the job never stays ``running``.
        """
        start = trio.current_time()
        entry = self.workers.get(job.kind)
        failure: BaseException | None = None
        result: BaseException | None = None
        done = False
        try:
            if entry is None:
                failure = UnknownKindError(
                    f"no worker is registered for job kind {job.kind!r} on this client"
                )
            elif type(job.args) is not entry.args_type:
                # The producer decodes args as it builds the job; here only when that
                # failed (so this raises and is recorded) or the job came from elsewhere.
                try:
                    job = with_args(job, decode_args(entry.args_type, job.args))
                except Exception as exc:
                    failure = exc
            if entry is not None and failure is None:
                timeout = self._timeout(entry)
                with handle.open_scope(math.inf if timeout is None else start + timeout):
                    try:
                        await (self._chains.get(job.kind) or self._chain(entry))(job)
                        done = True
                    except Exception as exc:
                        result = exc
                if not done and result is None:
                    if handle.cancel_requested:
                        result = JobCancelledRemotelyError("job cancelled through job_cancel")
                    else:
                        result = JobTimeoutError(f"job timed out after {timeout} s")
                failure = result
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
        except BaseException:
            interrupted = self.interrupted(job, start)
            self.completer.complete_nowait(interrupted, force=True)
            if log.isEnabledFor(logging.DEBUG):
                _log_end(job, interrupted, None)
            raise

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
