"""What subscribers receive: one event per finished job, and queue pause/resume."""

from __future__ import annotations

import enum
from typing import Any, final

import attrs

from .job import Job

__all__ = ["Event", "EventKind"]


@final
class EventKind(enum.StrEnum):
    """The kinds of event a subscription can ask for."""

    JOB_COMPLETED = "job_completed"
    JOB_FAILED = "job_failed"
    JOB_CANCELLED = "job_cancelled"
    JOB_SNOOZED = "job_snoozed"
    JOB_INTERRUPTED = "job_interrupted"
    QUEUE_PAUSED = "queue_paused"
    QUEUE_RESUMED = "queue_resumed"


@final
@attrs.frozen
class Event:
    """An event. Job events carry the job as written (a failed job carries its new state:
    ``retryable``, ``available`` or ``discarded``); queue events carry the queue name."""

    kind: EventKind
    job: Job[Any] | None = None
    queue: str | None = None
    duration: float | None = None
    """Seconds the worker ran, for job events."""
