"""Exceptions raised by trioqueue, and the two that workers raise to steer their job."""

from __future__ import annotations

from typing import final

import attrs

__all__ = [
    "DatabaseError",
    "ErrorHandlerResult",
    "JobCancel",
    "JobNotFoundError",
    "JobRunningError",
    "JobSnooze",
    "TrioqueueError",
    "UnknownJobKindError",
    "ValidationError",
]


class TrioqueueError(Exception):
    """Base class of every error trioqueue raises on its own account."""


class ValidationError(TrioqueueError, ValueError):
    """Bad input. The message names the field and the rule; nothing was written."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


@final
class UnknownJobKindError(ValidationError):
    """Inserting a kind that no worker is registered for, on a client that has workers."""

    def __init__(self, kind: str) -> None:
        super().__init__("kind", f"no worker is registered for job kind {kind!r}")
        self.kind = kind


@final
class JobNotFoundError(TrioqueueError, LookupError):
    """No job has the given id."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


@final
class JobRunningError(TrioqueueError):
    """The operation is refused because the job is running."""

    def __init__(self, job_id: int, action: str) -> None:
        super().__init__(f"cannot {action} job {job_id}: it is running")
        self.job_id = job_id


@final
class DatabaseError(TrioqueueError):
    """A database operation failed; the message says what the client was doing.

    The original driver exception is chained as ``__cause__``.
    """

    def __init__(self, doing: str, cause: BaseException) -> None:
        super().__init__(f"while {doing}: {cause}")
        self.doing = doing


@final
class JobCancel(Exception):
    """Raise from a worker to cancel its job for good, whatever attempts remain."""


@final
class JobSnooze(Exception):
    """Raise from a worker to run the job again after ``seconds``, without using an attempt."""

    def __init__(self, seconds: float) -> None:
        if not isinstance(seconds, int | float) or seconds < 0:
            raise ValidationError("JobSnooze.seconds", "must be a number >= 0")
        super().__init__(f"snoozed for {seconds} s")
        self.seconds = float(seconds)


@final
@attrs.frozen
class ErrorHandlerResult:
    """What an ``error_handler`` may ask for: ``set_cancelled=True`` cancels the job."""

    set_cancelled: bool = False
