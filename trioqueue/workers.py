"""The worker registry: which async function works which args type."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Generic, TypeVar, final

import attrs

from .errors import ValidationError
from .job import Job, validate_kind
from .middleware import check_hooks, check_middleware

__all__ = ["DEFAULT_TIMEOUT", "WorkerEntry", "Workers", "args_kind"]

A = TypeVar("A")

WorkFn = Callable[[Job[A]], Awaitable[object]]
"""A worker: an async function of the job. What it returns is recorded as the job's output
(see `Workers.add`)."""
NextRetryFn = Callable[[Job[Any]], float]


@final
class _DefaultTimeout:
    def __repr__(self) -> str:
        return "DEFAULT_TIMEOUT"


DEFAULT_TIMEOUT: Final = _DefaultTimeout()
"""A worker's timeout when none is given: the client's ``job_timeout``."""


def args_kind(args_type: type[Any]) -> str:
    """The ``kind`` class attribute of an args type, validated."""
    kind = getattr(args_type, "kind", None)
    if kind is None:
        raise ValidationError(
            "kind", f"{args_type!r} has no `kind` class attribute (kind: ClassVar[str] = ...)"
        )
    return validate_kind(kind)


@final
@attrs.frozen
class WorkerEntry(Generic[A]):
    """A registered worker: its args type, function and per-worker settings."""

    args_type: type[A]
    fn: WorkFn[A]
    timeout: float | _DefaultTimeout | None = DEFAULT_TIMEOUT
    next_retry: NextRetryFn | None = None
    middleware: tuple[Any, ...] = ()
    """This kind's worker middleware, run inside the client's (first entry outermost)."""
    hooks: tuple[Any, ...] = ()
    """This kind's work_begin / work_end hooks, run after the client's."""

    @property
    def kind(self) -> str:
        return args_kind(self.args_type)


def _check_timeout(timeout: object) -> None:
    if timeout is DEFAULT_TIMEOUT or timeout is None:
        return
    # ``not timeout > 0`` also refuses NaN, which trio would refuse as a deadline later.
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValidationError("timeout", "must be a positive number of seconds or None")


@final
class Workers:
    """Maps job kinds to workers. Register with :meth:`add` or the :meth:`worker` decorator."""

    def __init__(self) -> None:
        self._by_kind: dict[str, WorkerEntry[Any]] = {}

    def __repr__(self) -> str:
        return f"Workers({sorted(self._by_kind)!r})"

    def add(
        self,
        args_type: type[A],
        fn: WorkFn[A],
        *,
        timeout: float | _DefaultTimeout | None = DEFAULT_TIMEOUT,
        next_retry: NextRetryFn | None = None,
        middleware: Sequence[Any] = (),
        hooks: Sequence[Any] = (),
    ) -> None:
        """Register ``fn`` to work jobs of ``args_type``. What ``fn`` returns is recorded
        as the job's output (``job.output``) when the run completes: JSON, with attrs and
        dataclass instances as objects; None records no output. A value that cannot be
        stored as JSON, or is over 1 MiB as JSON, fails the attempt with that error
        recorded (retried or discarded like any error).

        ``timeout`` overrides the client's ``job_timeout`` (``None``: no timeout);
        ``next_retry(job)`` returns seconds until the retry, overriding the client's policy;
        ``middleware`` wraps each run of this kind, inside the client's middleware: objects
        with ``work(job, call_next)`` or async functions ``(job, call_next)``; ``hooks``
        are this kind's ``work_begin`` / ``work_end`` hooks, called after the client's.
        Raises ValidationError for a bad kind, timeout, middleware or hook, or a kind
        registered twice.
        """
        kind = args_kind(args_type)
        _check_timeout(timeout)
        layers = check_middleware("middleware", middleware, kind_level=True)
        kind_hooks = check_hooks(hooks, kind_level=True)
        if not callable(fn):
            raise ValidationError("fn", "the worker must be an async function")
        if kind in self._by_kind:
            raise ValidationError("kind", f"a worker for kind {kind!r} is already registered")
        self._by_kind[kind] = WorkerEntry(args_type, fn, timeout, next_retry, layers, kind_hooks)

    def worker(
        self,
        args_type: type[A],
        *,
        timeout: float | _DefaultTimeout | None = DEFAULT_TIMEOUT,
        next_retry: NextRetryFn | None = None,
        middleware: Sequence[Any] = (),
        hooks: Sequence[Any] = (),
    ) -> Callable[[WorkFn[A]], WorkFn[A]]:
        """Decorator form of :meth:`add`; returns the function unchanged."""

        def register(fn: WorkFn[A]) -> WorkFn[A]:
            self.add(
                args_type,
                fn,
                timeout=timeout,
                next_retry=next_retry,
                middleware=middleware,
                hooks=hooks,
            )
            return fn

        return register

    def get(self, kind: str) -> WorkerEntry[Any] | None:
        return self._by_kind.get(kind)

    def args_type(self, kind: str) -> type[Any] | None:
        """The args type registered for ``kind``, or None (to decode a stored job's args)."""
        entry = self._by_kind.get(kind)
        return entry.args_type if entry is not None else None

    def kinds(self) -> frozenset[str]:
        return frozenset(self._by_kind)

    def __len__(self) -> int:
        return len(self._by_kind)
