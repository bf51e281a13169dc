"""Middleware and hooks: code of the application's that runs around inserts and job runs.

**Insert middleware** is an object with an ``insert_many(params, call_next)`` method; it
sees every job of one insert call (``insert``, ``insert_tx``, ``insert_many(_tx)``,
``insert_many_fast(_tx)``) as a list of :class:`InsertParams`, may pass changed ones on,
and returns what ``call_next`` returned. **Worker middleware** is an object with a
``work(job, call_next)`` method (or, per kind, a plain async function of the same two
arguments); it wraps one run of one job, inside the job's timeout, and what it returns is
what the run returned: the outermost middleware's return value is recorded as the job's
output (so middleware passes on ``await call_next(job)``'s value, or returns one of its
own; returning None records no output). One object may be both, as
``trioqueue.otel.OpenTelemetryMiddleware`` is.

**Hooks** are objects with any of ``insert_begin(params)``, ``work_begin(job)`` and
``work_end(job, error)``, each a function or an async function.

Order: list order, the first entry outermost; client middleware (``open_client(...,
middleware=[...])``) runs outside a kind's own (``workers.add(..., middleware=[...])``).
``insert_begin`` hooks run after every insert middleware, just before the jobs are
validated and written; ``work_begin`` hooks run before every worker middleware, inside the
job's timeout; ``work_end`` hooks run after the run, outside the timeout, and see the
outcome as it will be recorded. See docs/middleware.md.

Nothing here costs a job run anything when no middleware or hooks are configured: the
chain of each kind is built once, and without middleware it is the worker function itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar, final, runtime_checkable

import attrs

from ._failure import cancelled_for_real
from .errors import ValidationError
from .job import InsertOpts, Job, UniqueOpts

__all__ = [
    "InsertMiddleware",
    "InsertParams",
    "WorkerMiddleware",
    "build_work_chain",
    "check_hooks",
    "check_middleware",
    "insert_layers",
    "run_insert_begin",
    "run_insert_chain",
    "run_work_end",
    "work_end_hooks",
]

R = TypeVar("R")

WorkNext = Callable[[Job[Any]], Awaitable[object]]
"""The rest of the chain of a job run: ``await call_next(job)`` returns what the worker (or
the middleware inside) returned."""


@final
@attrs.frozen(kw_only=True)
class InsertParams:
    """One job of an insert call, as insert middleware sees it: the args and every
    ``InsertOpts`` field, with the client's defaults applied.

    Change one with ``attrs.evolve(params, priority=3)``. What middleware passes on is
    validated like ``InsertOpts`` (a bad value raises ``ValidationError`` and nothing is
    written); the kind always follows the args' type.
    """

    args: Any
    queue: str
    priority: int
    max_attempts: int
    scheduled_at: datetime
    """When the job may run; the insert's "now" unless ``InsertOpts.scheduled_at`` was set."""
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    pending: bool = False
    unique: UniqueOpts | None = None

    @property
    def kind(self) -> str:
        """The job's kind: the ``kind`` class attribute of its args."""
        return str(getattr(type(self.args), "kind", ""))

    def opts(self) -> InsertOpts:
        """These fields as a (validated) ``InsertOpts``."""
        return InsertOpts(
            queue=self.queue,
            priority=self.priority,
            max_attempts=self.max_attempts,
            scheduled_at=self.scheduled_at,
            tags=self.tags,
            metadata=self.metadata,
            pending=self.pending,
            unique=self.unique,
        )


@runtime_checkable
class InsertMiddleware(Protocol):
    """Runs around every insert call of a client."""

    async def insert_many(
        self,
        params: list[InsertParams],
        call_next: Callable[[list[InsertParams]], Awaitable[R]],
    ) -> R:
        """Return ``await call_next(params)`` (with ``params`` changed or not). The result
        is a list of ``JobInsertResult`` (or, for ``insert_many_fast``, the count)."""
        ...


@runtime_checkable
class WorkerMiddleware(Protocol):
    """Runs around every run of a job; exceptions pass through it to the executor, and
    what it returns is what the run returned."""

    async def work(self, job: Job[Any], call_next: WorkNext) -> object:
        """``return await call_next(job)``; let its exceptions propagate (or raise your
        own). The value returned is recorded as the job's output (by the outermost
        middleware; None: no output), so pass ``call_next``'s value on, or return
        another."""
        ...


_HOOK_NAMES = ("insert_begin", "work_begin", "work_end")


def check_middleware(field: str, value: object, *, kind_level: bool = False) -> tuple[Any, ...]:
    """``value`` as a tuple of middleware, or ValidationError naming ``field``.

    Client level: each entry has ``insert_many`` and/or ``work``. Kind level: each entry
    has ``work`` or is itself an async function ``(job, call_next)``.
    """
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError(field, "must be a list of middleware objects")
    result = tuple(value)
    for i, mw in enumerate(result):
        has_work = callable(getattr(mw, "work", None))
        if kind_level:
            if not has_work and not callable(mw):
                raise ValidationError(
                    f"{field}[{i}]",
                    "must have a work(job, call_next) method or be an async function",
                )
        elif not has_work and not callable(getattr(mw, "insert_many", None)):
            raise ValidationError(
                f"{field}[{i}]",
                "must have an insert_many(params, call_next) and/or work(job, call_next) method",
            )
    return result


def check_hooks(value: object, *, kind_level: bool = False) -> tuple[Any, ...]:
    """``value`` as a tuple of hooks, or ValidationError.

    A kind's own hooks (``workers.add(..., hooks=...)``) see that kind's runs only, so
    they take ``work_begin`` and ``work_end``, not ``insert_begin``."""
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError("hooks", "must be a list of hook objects")
    result = tuple(value)
    for i, hook in enumerate(result):
        if kind_level:
            if callable(getattr(hook, "insert_begin", None)):
                raise ValidationError(
                    f"hooks[{i}]",
                    "a kind's hooks see its runs only: insert_begin belongs in "
                    "open_client(hooks=...)",
                )
            if not any(callable(getattr(hook, n, None)) for n in ("work_begin", "work_end")):
                raise ValidationError(f"hooks[{i}]", "must have a work_begin or work_end method")
        elif not any(callable(getattr(hook, name, None)) for name in _HOOK_NAMES):
            raise ValidationError(
                f"hooks[{i}]", "must have an insert_begin, work_begin or work_end method"
            )
    return result


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _work_layer(mw: Any, inner: WorkNext) -> WorkNext:
    work = getattr(mw, "work", None)
    fn = work if callable(work) else mw

    async def layer(job: Job[Any]) -> object:
        return await fn(job, inner)

    return layer


def _begin_layer(begins: Sequence[Callable[[Job[Any]], Any]], inner: WorkNext) -> WorkNext:
    async def layer(job: Job[Any]) -> object:
        for begin in begins:
            await _maybe_await(begin(job))
        return await inner(job)

    return layer


def build_work_chain(
    fn: WorkNext,
    client_middleware: Sequence[Any],
    kind_middleware: Sequence[Any],
    hooks: Sequence[Any],
) -> WorkNext:
    """The function the executor awaits for a job of one kind: ``fn`` itself when there is
    no worker middleware and no ``work_begin`` hook, else ``fn`` wrapped (first entry
    outermost, client middleware outside kind middleware, ``work_begin`` hooks outside
    both). It returns what the outermost middleware returns (``fn``'s value when there is
    none). Built once per kind, not per job."""
    chain = fn
    for mw in reversed(kind_middleware):
        chain = _work_layer(mw, chain)
    for mw in reversed(client_middleware):
        if callable(getattr(mw, "work", None)):
            chain = _work_layer(mw, chain)
    begins = [h.work_begin for h in hooks if callable(getattr(h, "work_begin", None))]
    if begins:
        chain = _begin_layer(begins, chain)
    return chain


def work_end_hooks(hooks: Sequence[Any]) -> tuple[Callable[..., Any], ...]:
    return tuple(h.work_end for h in hooks if callable(getattr(h, "work_end", None)))


async def run_work_end(
    ends: Sequence[Callable[..., Any]], job: Job[Any], error: BaseException | None
) -> BaseException | None:
    """Call each ``work_end(job, error)`` in order. One that returns an exception (or
    raises one, whatever it is) replaces the outcome for the hooks after it and for the
    record; one that returns None leaves it as it is. Only a genuine cancellation (a
    stop) propagates."""
    for end in ends:
        try:
            replaced = await _maybe_await(end(job, error))
        except BaseException as exc:
            if cancelled_for_real(exc):
                raise
            replaced = exc
        if isinstance(replaced, BaseException):
            error = replaced
    return error


def insert_layers(
    middleware: Sequence[Any], hooks: Sequence[Any]
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The client's insert middleware and its hooks with ``insert_begin``. When both are
    empty the client skips building InsertParams altogether."""
    layers = tuple(mw for mw in middleware if callable(getattr(mw, "insert_many", None)))
    begins = tuple(h for h in hooks if callable(getattr(h, "insert_begin", None)))
    return layers, begins


async def run_insert_begin(begins: Sequence[Any], params: list[InsertParams]) -> None:
    """Call each hook's ``insert_begin(params)``; one that raises stops the insert."""
    for hook in begins:
        await _maybe_await(hook.insert_begin(params))


async def run_insert_chain(
    layers: Sequence[Any],
    params: list[InsertParams],
    write: Callable[[list[InsertParams]], Awaitable[R]],
) -> R:
    """Run ``params`` through the insert middleware (first entry outermost) to ``write``."""
    chain = write
    for mw in reversed(layers):
        chain = _insert_layer(mw, chain)
    return await chain(params)


def _insert_layer(
    mw: Any, inner: Callable[[list[InsertParams]], Awaitable[R]]
) -> Callable[[list[InsertParams]], Awaitable[R]]:
    async def layer(ps: list[InsertParams]) -> R:
        result: R = await mw.insert_many(ps, inner)
        return result

    return layer
