"""What a finished run does to its job row: the `FinishedRun` records the executor hands
to the completer, one builder per kind of ending, the retry delay (which the rescuer
uses too), and the recorded output of a job that returned (`recorded_output`).

Pure: nothing here awaits, touches storage or keeps state. Nothing here raises on values
that came from user code either: a retry policy's odd answer falls back to the default
delay, an impossible snooze becomes an error of the attempt, an odd ``snoozes`` count in
the metadata counts as none.
"""

from __future__ import annotations

import logging
import math
import random
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from ._codec import dumps, encode_output
from ._failure import describe, error_entry
from .config import RetryPolicy
from .driver.protocol import JobOutcome
from .errors import MAX_SNOOZE, ValidationError, snooze_seconds_ok
from .events import EventKind
from .job import Job, JobState
from .workers import WorkerEntry, Workers

__all__ = [
    "MAX_RETRY_DELAY",
    "FinishedRun",
    "InvalidSnoozeError",
    "OutputError",
    "completed",
    "default_retry_delay",
    "failed",
    "interrupted",
    "next_retry_delay",
    "recorded_output",
    "retry_delay",
    "snoozed",
]

log = logging.getLogger("trioqueue.executor")

MAX_RETRY_DELAY = MAX_SNOOZE
"""The longest a retry waits, whatever a policy answers: ten years."""


class FinishedRun(NamedTuple):
    """One finished run of a job, as the executor hands it to the completer: the row
    update, the event it should produce, and how long it ran. A NamedTuple: one is made
    per job, and it costs what a tuple costs."""

    outcome: JobOutcome
    event_kind: EventKind
    duration: float
    attempted_at: datetime | None = None
    """When the run began (the row's ``attempted_at``): identifies this run of the job."""
    args: Any = None
    """The job's args as the worker saw them, for the event (the write returns none)."""
    attempt: int = 0
    """The attempt that ran (for an error entry the completer must write in its place)."""
    workflow: bool = False
    """The job is a workflow task: its outcome may promote or cancel others, so the
    completer writes it without lingering for a bigger batch."""


class InvalidSnoozeError(Exception):
    """Recorded when a job snoozes for a time that cannot be scheduled."""


class OutputError(Exception):
    """Recorded when a job's return value cannot be stored as its output: it is not JSON
    that PostgreSQL's ``jsonb`` stores as it is, it is over ``_codec.MAX_OUTPUT_BYTES`` as JSON,
    or reading it raised."""


def recorded_output(result: object) -> tuple[str | None, BaseException | None]:
    """What a run that returned ``result`` records: ``(output JSON text, None)`` — the
    text None when ``result`` is None — or ``(None, the error)`` that fails the attempt
    instead, as if the job had raised it.

    The error is an `OutputError` naming the place in the value and the rule (see
    `encode_output`), or, when the value's own code raised an ``Exception`` as it was
    read, an `OutputError` saying so, with that exception as its ``__cause__`` (its
    traceback is recorded). Anything else the value's code raised (a ``BaseException``
    such as ``KeyboardInterrupt``) is returned as it is: the attempt records it and the
    executor treats it as if the job had raised it. Never raises; not a checkpoint."""
    if result is None:
        return None, None
    try:
        return encode_output(result), None
    except ValidationError as exc:
        return None, OutputError(f"the return value cannot be stored as output: {exc.rule}")
    except Exception as exc:
        error = OutputError(
            "the return value cannot be stored as output: reading it raised " + describe(exc)
        )
        error.__cause__ = exc
        return None, error
    except BaseException as exc:
        return None, exc


def default_retry_delay(job: Job[Any]) -> float:
    """``(errors + 1) ** 4`` seconds, ±10% jitter; ``job.errors`` holds earlier errors."""
    base = float((len(job.errors) + 1) ** 4)
    return base * random.uniform(0.9, 1.1)


def next_retry_delay(
    job: Job[Any], entry: WorkerEntry[Any] | None, retry_policy: RetryPolicy | None
) -> tuple[float, str | None]:
    """Seconds until ``job``'s retry — the worker's ``next_retry``, else the client's
    ``retry_policy``, else the default — and, when a policy's answer was not used, why.

    A policy that raises, or answers anything but a number from 0 up (NaN, infinity, a
    negative number, a bool, a string, None), is logged and the default used instead; an
    answer past `MAX_RETRY_DELAY` (an int too big for a float included) is cut to it.
    Never raises an ``Exception``."""
    policy = (entry.next_retry if entry is not None else None) or retry_policy
    note = None
    if policy is not None:
        try:
            answer = policy(job)
        except Exception as exc:
            log.exception("retry policy raised for job %s; using the default", job.id)
            note = f"the retry policy raised {type(exc).__name__}; the default delay was used"
        else:
            delay = _seconds(answer)
            if delay is not None:
                return delay, None
            log.warning(
                "retry policy gave %s for job %s; using the default", _short_repr(answer), job.id
            )
            note = f"the retry policy answered {_short_repr(answer)}; the default delay was used"
    return min(default_retry_delay(job), MAX_RETRY_DELAY), note


def retry_delay(job: Job[Any], workers: Workers, retry_policy: RetryPolicy | None) -> float:
    """Seconds until ``job``'s retry, for a job whose run ended elsewhere (the rescuer's
    stuck jobs): `next_retry_delay` with the job's worker, if this client has one."""
    return next_retry_delay(job, workers.get(job.kind), retry_policy)[0]


def _seconds(answer: object) -> float | None:
    """A retry policy's answer as seconds up to `MAX_RETRY_DELAY`; None when it is no
    number from 0 up. Anything ``float()`` takes counts (a ``Decimal``, a numpy float),
    but not a bool or a string."""
    if isinstance(answer, bool | str | bytes) or answer is None:
        return None
    try:
        if isinstance(answer, int) and answer > MAX_RETRY_DELAY:
            return MAX_RETRY_DELAY  # may be past what a float holds
        delay = float(answer)  # type: ignore[arg-type]
    except Exception:
        return None
    if not (math.isfinite(delay) and delay >= 0):
        return None
    return min(delay, MAX_RETRY_DELAY)


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _snoozes(metadata: dict[str, Any]) -> int:
    """How often the job snoozed before, as stored; anything but a sane count is 0."""
    value = metadata.get("snoozes", 0)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 - 1:
        return value
    return 0


def _finished(
    job: Job[Any],
    state: JobState,
    kind: EventKind,
    duration: float,
    *,
    finalized_at: datetime | None = None,
    scheduled_at: datetime | None = None,
    give_back_attempt: bool = False,
    error_json: str | None = None,
    metadata_json: str | None = None,
) -> FinishedRun:
    return FinishedRun(
        outcome=JobOutcome(
            id=job.id,
            state=state,
            finalized_at=finalized_at,
            scheduled_at=scheduled_at,
            give_back_attempt=give_back_attempt,
            error_json=error_json,
            metadata_json=metadata_json,
            attempted_at=job.attempted_at,
        ),
        event_kind=kind,
        duration=duration,
        attempted_at=job.attempted_at,
        args=job.args,
        attempt=job.attempt,
        workflow=job.workflow_id is not None,
    )


def completed(
    job: Job[Any], now: datetime, duration: float, output_json: str | None = None
) -> FinishedRun:
    """The job returned: ``completed``, with ``output_json`` (see `recorded_output`;
    None: no output, which clears one a previous run recorded).

    The one builder that goes by position: every job that succeeds makes one, and
    keyword arguments to a NamedTuple cost about 1-2 µs more per job here (a few percent
    of a no-op job's whole cost). A test holds it equal to the keyword-built record."""
    attempted_at = job.attempted_at
    return FinishedRun(
        JobOutcome(
            job.id, JobState.COMPLETED, now, None, False, None, None, attempted_at, output_json
        ),
        EventKind.JOB_COMPLETED,
        duration,
        attempted_at,
        job.args,
        job.attempt,
        job.workflow_id is not None,
    )


def interrupted(job: Job[Any], duration: float) -> FinishedRun:
    """The run was cut short by a stop: back to ``available``, its attempt given back and
    no error recorded."""
    return _finished(
        job, JobState.AVAILABLE, EventKind.JOB_INTERRUPTED, duration, give_back_attempt=True
    )


def snoozed(
    job: Job[Any], now: datetime, seconds: object, scheduler_interval: float, duration: float
) -> FinishedRun | InvalidSnoozeError:
    """The job raised ``JobSnooze(seconds)``: ``scheduled`` that much later (``available``
    when due within ``scheduler_interval``), its attempt given back, no error. A time that
    cannot be scheduled (``seconds`` changed after the JobSnooze was made) comes back as
    the error to record instead."""
    if not snooze_seconds_ok(seconds):
        return InvalidSnoozeError(
            f"JobSnooze.seconds is {_short_repr(seconds)}: must be a number of seconds "
            f"from 0 to {MAX_SNOOZE:g}"
        )
    try:
        at = now + timedelta(seconds=seconds)
    except OverflowError:
        return InvalidSnoozeError(f"JobSnooze.seconds is {seconds!r}: past the last date")
    return _finished(
        job,
        JobState.AVAILABLE if seconds <= scheduler_interval else JobState.SCHEDULED,
        EventKind.JOB_SNOOZED,
        duration,
        scheduled_at=at,
        give_back_attempt=True,
        metadata_json=dumps({"snoozes": _snoozes(job.metadata) + 1}),
    )


def failed(
    job: Job[Any],
    entry: WorkerEntry[Any] | None,
    error: BaseException,
    now: datetime,
    duration: float,
    *,
    cancel: bool,
    retry_policy: RetryPolicy | None,
    scheduler_interval: float,
) -> FinishedRun:
    """The attempt failed with ``error`` (recorded on the job, storable whatever it is):
    ``cancelled`` when ``cancel``; ``discarded`` once the attempts are used up; else
    retried after the retry delay (``available`` when that is within
    ``scheduler_interval``, else ``retryable``)."""
    if cancel:
        return _finished(
            job,
            JobState.CANCELLED,
            EventKind.JOB_CANCELLED,
            duration,
            finalized_at=now,
            error_json=error_entry(now, job.attempt, error),
        )
    if job.attempt >= job.max_attempts:
        return _finished(
            job,
            JobState.DISCARDED,
            EventKind.JOB_FAILED,
            duration,
            finalized_at=now,
            error_json=error_entry(now, job.attempt, error),
        )
    delay, note = next_retry_delay(job, entry, retry_policy)
    return _finished(
        job,
        JobState.AVAILABLE if delay <= scheduler_interval else JobState.RETRYABLE,
        EventKind.JOB_FAILED,
        duration,
        scheduled_at=now + timedelta(seconds=delay),
        error_json=error_entry(now, job.attempt, error, note),
    )
