"""Exceptions raised by trioqueue, and the two that workers raise to steer their job."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard, final

import attrs

__all__ = [
    "DatabaseError",
    "ErrorHandlerResult",
    "JobCancel",
    "JobNotFoundError",
    "JobRunningError",
    "JobSnooze",
    "PoolerError",
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
    """No worker is registered for a job's kind: raised when inserting such a job on a
    client that has workers, and recorded on a fetched job whose kind has no worker on
    the client that fetched it (``where`` then says so)."""

    def __init__(self, kind: str, where: str = "") -> None:
        super().__init__("kind", f"no worker is registered for job kind {kind!r}{where}")
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

    The original driver exception is chained as ``__cause__``. ``rejected_data`` is True
    when the database refused the values it was sent, or they could not be encoded for it
    (bad text or JSON, a number or date out of range, a constraint): sending the same
    values again fails the same way. False for every other failure (a lost connection, a
    timeout, a deadlock), which a retry may get past.

    ``transient`` is True when the failure was in reaching the database rather than in
    what was asked of it, so that the same request may well succeed a little later: the
    connection was refused, lost, reset or timed out, the server is starting, shutting
    down or ended the session (SQLSTATE class 08, 57P01-57P03, 57P05), it has too many
    connections (53300), or the transaction lost a serialization conflict or deadlock
    (40001, 40P01). False for everything else: a failed login, a missing database or
    role, rejected data, a bad statement. Whether sending a request again is *safe* is
    another matter (a lost reply may hide a commit); ``open_client``'s start-up retries
    its own idempotent steps on transient errors.
    """

    def __init__(
        self,
        doing: str,
        cause: BaseException,
        *,
        rejected_data: bool = False,
        transient: bool = False,
    ) -> None:
        super().__init__(f"while {doing}: {cause}")
        self.doing = doing
        self.rejected_data = rejected_data
        self.transient = transient


POOLER_SETTINGS = "poll_only=True, prepared_statements=False"
"""The settings that work through a transaction pooler, as the error messages name them."""
POOLER_DOCS = "docs/pgbouncer.md"
"""Where the settings for connection poolers are explained."""


@final
class PoolerError(TrioqueueError):
    """A connection pooler between the client and PostgreSQL cannot serve what the client
    is set up to use: prepared statements, or LISTEN/NOTIFY. That is the case with a
    transaction pooler (PgBouncer with ``pool_mode = transaction``, and the like), and
    for prepared statements also with a session pooler that hands a client a server
    session still holding another client's (PgBouncer with an empty
    ``server_reset_query``). ``open_client`` raises it at start-up, before anything is
    written; no retry helps, a change of settings does (docs/pgbouncer.md).

    ``problems`` names what cannot work (``"prepared statements"``, ``"LISTEN/NOTIFY"``).
    ``seen`` is the server's error, when a prepared statement ran into the pooler; after
    start-up this error is the cause of a DatabaseError saying what the client was doing.
    """

    def __init__(self, problems: Sequence[str], *, seen: str | None = None) -> None:
        if seen is None:
            found = (
                "the client is connected to PostgreSQL through a transaction pooler (such as"
                f" PgBouncer with pool_mode = transaction), through which {' and '.join(problems)}"
                " cannot work"
            )
        else:
            found = (
                f"{seen}: the client's server session is not its own, as happens through a"
                " transaction pooler (such as PgBouncer with pool_mode = transaction) or a"
                " session pooler that does not reset sessions (PgBouncer's server_reset_query)"
            )
        super().__init__(f"{found}: open the client with {POOLER_SETTINGS} (see {POOLER_DOCS})")
        self.problems = tuple(problems)
        self.seen = seen


@final
class JobCancel(Exception):
    """Raise from a worker to cancel its job for good, whatever attempts remain."""


MAX_SNOOZE = 10 * 365 * 86400.0
"""The longest a job may snooze: ten years (the retry delay is capped at the same)."""


def snooze_seconds_ok(seconds: object) -> TypeGuard[float]:
    """Whether ``seconds`` can be a snooze: a number (not a bool) from 0 to `MAX_SNOOZE`;
    NaN and infinities are not."""
    return (
        not isinstance(seconds, bool)
        and isinstance(seconds, int | float)
        and 0 <= seconds <= MAX_SNOOZE  # also refuses NaN
    )


@final
class JobSnooze(Exception):
    """Raise from a worker to run the job again after ``seconds``, without using an attempt.

    ``seconds`` must be a finite number from 0 to `MAX_SNOOZE` (ten years), else
    ValidationError. A value changed after construction to one out of that range makes
    the attempt fail, with the reason recorded as its error."""

    def __init__(self, seconds: float) -> None:
        if not snooze_seconds_ok(seconds):
            raise ValidationError(
                "JobSnooze.seconds", f"must be a number of seconds from 0 to {MAX_SNOOZE:g}"
            )
        super().__init__(f"snoozed for {seconds} s")
        self.seconds = float(seconds)


@final
@attrs.frozen
class ErrorHandlerResult:
    """What an ``error_handler`` may ask for: ``set_cancelled=True`` cancels the job."""

    set_cancelled: bool = False
