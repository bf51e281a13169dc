"""Client and queue configuration, validated when built (River's defaults)."""

from __future__ import annotations

import inspect
import math
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, final

import attrs

from ._validate import check_text
from .errors import ErrorHandlerResult, ValidationError
from .job import Job, validate_queue_name
from .limits import GlobalLimit, QueueLimits, RateLimit
from .middleware import check_hooks, check_middleware
from .periodic import PeriodicJob, check_periodic_jobs
from .workers import args_kind

__all__ = [
    "ClientConfig",
    "ErrorHandler",
    "QueueConfig",
    "RetryPolicy",
    "args_types_by_kind",
    "default_client_id",
]

RetryPolicy = Callable[[Job[Any]], float]
ErrorHandler = Callable[
    [Job[Any], BaseException],
    "ErrorHandlerResult | Awaitable[ErrorHandlerResult | None] | None",
]

MAX_WORKERS_LIMIT = 10_000


def _positive(field: str, value: object, *, allow_none: bool = False, minimum: float = 0) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= minimum
    ):
        rule = f"must be a number greater than {minimum:g}"
        raise ValidationError(field, rule + (" or None" if allow_none else ""))


@final
@attrs.frozen
class QueueConfig:
    """How one queue is worked by this client: at most ``max_workers`` jobs at once.

    ``global_limit`` and ``rate_limit`` hold across every client working the queue
    (docs/flow-control.md); configure those clients alike.
    """

    max_workers: int = 100
    global_limit: GlobalLimit | None = None
    rate_limit: RateLimit | None = None

    @property
    def limits(self) -> QueueLimits | None:
        """Both limits together, or None when the queue has neither."""
        if self.global_limit is None and self.rate_limit is None:
            return None
        return QueueLimits(self.global_limit, self.rate_limit)

    def __attrs_post_init__(self) -> None:
        if self.global_limit is not None and not isinstance(self.global_limit, GlobalLimit):
            raise ValidationError(
                "QueueConfig.global_limit", "must be a trioqueue.GlobalLimit or None"
            )
        if self.rate_limit is not None and not isinstance(self.rate_limit, RateLimit):
            raise ValidationError("QueueConfig.rate_limit", "must be a trioqueue.RateLimit or None")
        if (
            isinstance(self.max_workers, bool)
            or not isinstance(self.max_workers, int)
            or not 1 <= self.max_workers <= MAX_WORKERS_LIMIT
        ):
            raise ValidationError(
                "QueueConfig.max_workers", f"must be an integer from 1 to {MAX_WORKERS_LIMIT}"
            )


def _periodic_tuple(value: object) -> tuple[Any, ...]:
    if isinstance(value, str | bytes | PeriodicJob) or not isinstance(value, Iterable):
        raise ValidationError("periodic_jobs", "must be a list of trioqueue.PeriodicJob")
    return tuple(value)


def _args_types_tuple(value: object) -> tuple[Any, ...]:
    if isinstance(value, str | bytes | type) or not isinstance(value, Iterable):
        raise ValidationError("args_types", "must be a list of args classes")
    return tuple(value)


def args_types_by_kind(types: Iterable[type[Any]]) -> dict[str, type[Any]]:
    """``{kind: args type}``; ValidationError for a type without a valid ``kind`` or two
    types of one kind."""
    found: dict[str, type[Any]] = {}
    for i, args_type in enumerate(types):
        if not isinstance(args_type, type):
            raise ValidationError(f"args_types[{i}]", f"{args_type!r} is not a class")
        try:
            kind = args_kind(args_type)
        except ValidationError as exc:
            raise ValidationError(f"args_types[{i}]", exc.rule) from None
        if found.get(kind, args_type) is not args_type:
            raise ValidationError(f"args_types[{i}]", f"two args types have the kind {kind!r}")
        found[kind] = args_type
    return found


def _middleware_tuple(value: object) -> tuple[Any, ...]:
    return check_middleware("middleware", value)


def default_client_id() -> str:
    """``<hostname>_<UTC start time>``, like River's."""
    host = socket.gethostname().replace(".", "_")[:60]
    return f"{host}_{datetime.now(UTC).strftime('%Y_%m_%dT%H_%M_%S_%f')}"


@final
@attrs.frozen(kw_only=True)
class ClientConfig:
    """Every keyword option of ``open_client`` other than workers and queues.

    Times are seconds. See the README's configuration table for what each one does.
    """

    id: str = attrs.field(factory=default_client_id)
    job_timeout: float | None = 60.0
    max_attempts: int = 25
    retry_policy: RetryPolicy | None = None
    fetch_cooldown: float = 0.1
    fetch_poll_interval: float = 1.0
    poll_only: bool = False
    prepared_statements: bool = True
    """Run the hot queries as prepared statements; False behind a transaction-pooling
    proxy (such as PgBouncer before 1.21), which cannot keep them."""
    scheduler_interval: float = 5.0
    rescuer_interval: float = 30.0
    rescue_stuck_jobs_after: float = 3600.0
    cleaner_interval: float = 30.0
    completed_job_retention: float | None = 86400.0
    cancelled_job_retention: float | None = 86400.0
    discarded_job_retention: float | None = 604800.0
    leader_interval: float = 5.0
    periodic_jobs: tuple[PeriodicJob, ...] = attrs.field(default=(), converter=_periodic_tuple)
    error_handler: ErrorHandler | None = None
    soft_stop_timeout: float | None = None
    shutdown_timeout: float = 10.0
    startup_timeout: float | None = 30.0
    """How long ``open_client``'s start-up retries transient database errors (a lost or
    refused connection, a server restarting) before it raises; None: for ever."""
    middleware: tuple[Any, ...] = attrs.field(default=(), converter=_middleware_tuple)
    """Insert and worker middleware for every insert and every job; the first entry is
    outermost, and all of them run outside a kind's own middleware (docs/middleware.md)."""
    hooks: tuple[Any, ...] = attrs.field(default=(), converter=check_hooks)
    """Objects with ``insert_begin``, ``work_begin`` and/or ``work_end`` (docs/middleware.md)."""
    args_types: tuple[type[Any], ...] = attrs.field(default=(), converter=_args_types_tuple)
    """Args types to decode on read (``job_get``, ``job_list``, events), beside the kinds of
    the client's ``workers``: an insert-only client's way to get typed args back. Jobs of
    any other kind come back with their args as the stored JSON object (a ``dict``)."""

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.id, str) or not 1 <= len(self.id) <= 100:
            raise ValidationError("id", "must be a string of 1-100 characters")
        check_text("id", self.id)  # stored in attempted_by and the leader row
        _positive("job_timeout", self.job_timeout, allow_none=True)
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or not 1 <= self.max_attempts <= 32767
        ):
            raise ValidationError("max_attempts", "must be an integer from 1 to 32767")
        if self.retry_policy is not None and not callable(self.retry_policy):
            raise ValidationError("retry_policy", "must be a function (job) -> seconds")
        _positive("fetch_cooldown", self.fetch_cooldown, minimum=0.0009)
        _positive("fetch_poll_interval", self.fetch_poll_interval, minimum=0.0099)
        if self.fetch_poll_interval < self.fetch_cooldown:
            raise ValidationError("fetch_poll_interval", "must be at least fetch_cooldown")
        for name in (
            "scheduler_interval",
            "rescuer_interval",
            "rescue_stuck_jobs_after",
            "cleaner_interval",
            "leader_interval",
            "shutdown_timeout",
        ):
            _positive(name, getattr(self, name))
        for name in (
            "completed_job_retention",
            "cancelled_job_retention",
            "discarded_job_retention",
            "soft_stop_timeout",
            "startup_timeout",
        ):
            _positive(name, getattr(self, name), allow_none=True)
        if self.error_handler is not None and not callable(self.error_handler):
            raise ValidationError("error_handler", "must be a function (job, exception)")
        check_periodic_jobs(self.periodic_jobs)
        args_types_by_kind(self.args_types)


def validate_queues(queues: Mapping[str, QueueConfig] | None) -> dict[str, QueueConfig]:
    """Check the ``queues`` argument of ``open_client``."""
    if queues is None:
        return {}
    if not isinstance(queues, Mapping):
        raise ValidationError("queues", "must be a mapping of queue name to QueueConfig")
    result: dict[str, QueueConfig] = {}
    for name, cfg in queues.items():
        validate_queue_name("queues", name)
        if not isinstance(cfg, QueueConfig):
            raise ValidationError(f"queues[{name!r}]", "must be a QueueConfig")
        result[name] = cfg
    return result


async def call_error_handler(
    handler: ErrorHandler, job: Job[Any], exc: BaseException
) -> ErrorHandlerResult | None:
    """Call a sync or async error handler; its own failures are the caller's to log."""
    result = handler(job, exc)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, ErrorHandlerResult):
        return None
    return result
