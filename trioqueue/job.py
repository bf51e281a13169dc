"""Jobs and the options that shape them: the value types of the public API."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, final

import attrs

from ._validate import check_text
from .errors import ValidationError

__all__ = [
    "MAX_PRIORITY",
    "AttemptError",
    "InsertOpts",
    "Job",
    "JobInsertResult",
    "JobListParams",
    "JobListResult",
    "JobState",
    "UniqueOpts",
    "check_bigint",
    "check_tag",
    "parse_bigint",
    "validate_kind",
    "validate_queue_name",
    "validate_workflow_id",
]

T = TypeVar("T")

MAX_PRIORITY = 4
MAX_LIST_LIMIT = 10_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""The range of PostgreSQL's ``bigint``: job ids, cursors and counts must fit in it."""

# Always used with fullmatch: ``$`` also matches before a trailing newline, so ``match``
# would take "default\n" for a queue name.
_QUEUE_RE = re.compile(r"[a-z0-9]+(?:[_\-]?[a-z0-9]+)*")
_TAG_RE = re.compile(r"\w[\w\-]*\w")
_KIND_RE = re.compile(r"\w[\w\-\[\]<>/.:+]*")


@final
class JobState(enum.StrEnum):
    """Where a job is in its life. ``PENDING`` jobs are never fetched."""

    AVAILABLE = "available"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    DISCARDED = "discarded"
    PENDING = "pending"
    RETRYABLE = "retryable"
    RUNNING = "running"
    SCHEDULED = "scheduled"


FINALIZED_STATES = frozenset({JobState.CANCELLED, JobState.COMPLETED, JobState.DISCARDED})


@final
@attrs.frozen
class AttemptError:
    """One failed attempt: when, which attempt, the error's text and its traceback."""

    at: datetime
    attempt: int
    error: str
    trace: str


@final
@attrs.frozen
class Job(Generic[T]):
    """A job as stored. ``args`` is the worker's args type when the kind is registered on
    the client that read the row, else the decoded JSON object (a ``dict``)."""

    id: int
    kind: str
    args: T
    queue: str
    state: JobState
    priority: int
    attempt: int
    max_attempts: int
    attempted_at: datetime | None
    attempted_by: list[str]
    created_at: datetime
    finalized_at: datetime | None
    scheduled_at: datetime
    errors: list[AttemptError]
    metadata: dict[str, Any]
    tags: list[str]
    output: Any = None
    """What the worker returned, as JSON (attrs and dataclass instances become objects);
    None: it has not completed, or returned None."""
    workflow_id: str | None = None
    """The workflow the job is a task of (None: none)."""
    workflow_task: str | None = None
    """The job's task name in its workflow."""
    workflow_deps: tuple[int, ...] = ()
    """The ids of the jobs this workflow task waits for (its deps), in the order added."""


def validate_queue_name(field: str, name: object) -> str:
    """Return ``name`` if it is a valid queue name, else raise ValidationError for ``field``."""
    if not isinstance(name, str) or not (1 <= len(name) <= 64) or not _QUEUE_RE.fullmatch(name):
        raise ValidationError(
            field,
            f"queue name {name!r} must be 1-64 characters of a-z and 0-9, "
            "optionally separated by single '_' or '-'",
        )
    return name


MAX_WORKFLOW_ID = 255


def validate_workflow_id(field: str, workflow_id: object) -> str:
    """Return ``workflow_id`` if it can name a workflow, else raise ValidationError."""
    if not isinstance(workflow_id, str) or not 1 <= len(workflow_id) <= MAX_WORKFLOW_ID:
        raise ValidationError(field, f"must be a string of 1-{MAX_WORKFLOW_ID} characters")
    check_text(field, workflow_id)
    return workflow_id


def validate_kind(kind: object, field: str = "kind") -> str:
    """Return ``kind`` if it is a valid job kind, else raise ValidationError for ``field``."""
    if not isinstance(kind, str) or not (1 <= len(kind) <= 128) or not _KIND_RE.fullmatch(kind):
        raise ValidationError(
            field,
            f"job kind {kind!r} must be 1-128 characters: letters, digits, _ and - [ ] < > / . : +",
        )
    return kind


def check_bigint(field: str, value: object) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) that a PostgreSQL ``bigint`` can
    hold, such as a job id or a cursor; else raise ValidationError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
        raise ValidationError(field, f"must be an integer from {INT64_MIN} to {INT64_MAX}")
    return value


def parse_bigint(field: str, text: str) -> int:
    """A non-negative ``bigint`` from text of ASCII digits only (``"²"`` and ``"-1"`` are
    refused, as is a number past ``INT64_MAX``); ValidationError naming ``field`` else."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > INT64_MAX:
        raise ValidationError(field, f"{text!r} is not a whole number from 0 to {INT64_MAX}")
    return int(text)


def _check_priority(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PRIORITY:
        raise ValidationError(field, f"priority must be an integer from 1 to {MAX_PRIORITY}")


def _check_max_attempts(field: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32767:
        raise ValidationError(field, "max_attempts must be an integer from 1 to 32767")


def _check_aware(field: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValidationError(field, "must be a timezone-aware datetime")
    try:
        value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValidationError(
            field, f"{value.isoformat()} is outside the years 1-9999 once converted to UTC"
        ) from None


def check_tag(field: str, tag: object) -> str:
    """Return ``tag`` if it is a valid tag, else raise ValidationError for ``field``."""
    if not isinstance(tag, str) or len(tag) > 255 or not _TAG_RE.fullmatch(tag):
        raise ValidationError(
            field,
            f"tag {tag!r} must be 2-255 characters of letters, digits, '_' and '-', "
            "starting and ending with a letter, digit or '_'",
        )
    return tag


def _check_tags(field: str, tags: object) -> None:
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        raise ValidationError(field, "tags must be a sequence of strings")
    for tag in tags:
        check_tag(field, tag)


_REQUIRED_UNIQUE_STATES = frozenset(
    {JobState.AVAILABLE, JobState.PENDING, JobState.RUNNING, JobState.SCHEDULED}
)
DEFAULT_UNIQUE_STATES = frozenset(JobState) - {JobState.CANCELLED, JobState.DISCARDED}


def _state_set(value: Iterable[JobState | str] | None) -> frozenset[JobState] | None:
    if value is None:
        return None
    try:
        return frozenset(JobState(s) for s in value)
    except (TypeError, ValueError):
        raise ValidationError("UniqueOpts.by_state", "must be JobState values") from None


@final
@attrs.frozen
class UniqueOpts:
    """Makes an insert a no-op while a job with the same key is in one of ``by_state``.

    The key is always the kind, plus the args (``by_args``), the period the job's
    scheduled time falls in (``by_period`` seconds), and the queue (``by_queue``).
    """

    by_args: bool = False
    by_period: float | None = None
    by_queue: bool = False
    by_state: frozenset[JobState] | None = attrs.field(default=None, converter=_state_set)

    def __attrs_post_init__(self) -> None:
        if self.by_period is not None and (
            isinstance(self.by_period, bool)
            or not isinstance(self.by_period, int | float)
            or not math.isfinite(self.by_period)
            or self.by_period < 1
        ):
            raise ValidationError(
                "UniqueOpts.by_period", "must be a finite number of seconds, at least 1"
            )
        if self.by_state is not None:
            missing = _REQUIRED_UNIQUE_STATES - self.by_state
            if missing:
                names = ", ".join(sorted(missing))
                raise ValidationError(
                    "UniqueOpts.by_state",
                    f"must include available, pending, running and scheduled (missing {names})",
                )

    @property
    def states(self) -> frozenset[JobState]:
        return self.by_state if self.by_state is not None else DEFAULT_UNIQUE_STATES


def _tags_tuple(value: Sequence[str]) -> tuple[str, ...]:
    _check_tags("InsertOpts.tags", value)
    return tuple(value)


@final
@attrs.frozen
class InsertOpts:
    """Per-insert options; anything left ``None`` takes the client's default."""

    queue: str = attrs.field(default="default")
    priority: int = 1
    max_attempts: int | None = None
    scheduled_at: datetime | None = None
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tags_tuple)
    metadata: Mapping[str, Any] | None = None
    pending: bool = False
    unique: UniqueOpts | None = None

    def __attrs_post_init__(self) -> None:
        validate_queue_name("InsertOpts.queue", self.queue)
        _check_priority("InsertOpts.priority", self.priority)
        _check_max_attempts("InsertOpts.max_attempts", self.max_attempts)
        _check_aware("InsertOpts.scheduled_at", self.scheduled_at)
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise ValidationError("InsertOpts.metadata", "must be a mapping (JSON object)")
        if self.unique is not None and not isinstance(self.unique, UniqueOpts):
            raise ValidationError("InsertOpts.unique", "must be a UniqueOpts")


@final
@attrs.frozen
class JobInsertResult(Generic[T]):
    """The stored job, and whether the insert was skipped as a duplicate of it."""

    job: Job[T]
    unique_skipped_as_duplicate: bool = False


def _opt_tuple(value: Sequence[Any] | None) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        return (value,)
    return tuple(value)


@final
@attrs.frozen
class JobListParams:
    """Filters (combined with AND; ``None`` = no filter), page size and cursor.

    Pages are ordered by id (``descending``: newest first); pass the previous page's
    ``last_cursor`` as ``after``.
    """

    ids: tuple[int, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    kinds: tuple[str, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    queues: tuple[str, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    states: tuple[JobState, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    priorities: tuple[int, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    tags: tuple[str, ...] | None = attrs.field(default=None, converter=_opt_tuple)
    limit: int = 100
    after: int | None = None
    descending: bool = False
    """Newest first: ordered by id descending, and ``after`` pages on to smaller ids."""
    within_newest: int | None = None
    """Only look at the newest N job ids (ids above the highest id minus N): bounds the
    work of a filter that no index serves (kinds, queues or tags over a big table)."""
    workflow_id: str | None = None
    """Only the tasks of this workflow (`Job.workflow_id`)."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.descending, bool):
            raise ValidationError("JobListParams.descending", "must be True or False")
        if self.within_newest is not None and (
            isinstance(self.within_newest, bool)
            or not isinstance(self.within_newest, int)
            or not 1 <= self.within_newest <= INT64_MAX
        ):
            raise ValidationError(
                "JobListParams.within_newest", f"must be an integer from 1 to {INT64_MAX}"
            )
        if (
            isinstance(self.limit, bool)
            or not isinstance(self.limit, int)
            or not 1 <= self.limit <= MAX_LIST_LIMIT
        ):
            raise ValidationError("JobListParams.limit", f"must be from 1 to {MAX_LIST_LIMIT}")
        if self.after is not None:
            check_bigint("JobListParams.after", self.after)
        if self.ids is not None:
            for i in self.ids:
                check_bigint("JobListParams.ids", i)
        if self.states is not None:
            try:
                object.__setattr__(self, "states", tuple(JobState(s) for s in self.states))
            except ValueError:
                raise ValidationError(
                    "JobListParams.states", f"must be JobState values, got {self.states!r}"
                ) from None
        if self.priorities is not None:
            for p in self.priorities:
                _check_priority("JobListParams.priorities", p)
        if self.queues is not None:
            for q in self.queues:
                validate_queue_name("JobListParams.queues", q)
        if self.kinds is not None:
            for k in self.kinds:
                validate_kind(k, "JobListParams.kinds")
        if self.tags is not None:
            # Text the database can hold; not the whole tag rule, so that a filter can
            # still find a tag some other writer stored.
            for t in self.tags:
                if not isinstance(t, str):
                    raise ValidationError("JobListParams.tags", f"tag {t!r} must be a string")
                check_text("JobListParams.tags", t)
        if self.workflow_id is not None:
            validate_workflow_id("JobListParams.workflow_id", self.workflow_id)


@final
@attrs.frozen
class JobListResult:
    """One page of jobs, and the cursor for the next page (``None`` when this one is empty)."""

    jobs: list[Job[Any]]
    last_cursor: int | None
