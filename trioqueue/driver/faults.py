"""A driver wrapper that injects faults, for testing how the runtime copes.

Wrap any driver (PostgreSQL or memory) and add :class:`Fault` rules::

    faulty = FaultyDriver(MemoryDriver(), [Fault("job_set_state_if_running_many", call=2)])
    async with trioqueue.open_client(driver=faulty, ...) as client: ...

Each rule matches an operation (a Driver method name, or ``"*"`` for all) and, optionally,
only its Nth call; it then applies ``times`` times (``None``: every match). Kinds:

- ``"error"``: raise ``DatabaseError`` before the operation runs (nothing happens);
- ``"error_after"``: run the operation, then raise ``DatabaseError`` (it happened, but the
  caller is told it failed — a reply lost after the commit);
- ``"delay"``: sleep ``seconds`` first (a slow database);
- ``"drop"``: for ``open_listener`` only — the listener's Nth ``wait`` raises, as when the
  LISTEN connection breaks.

An injected ``DatabaseError`` is ``transient`` (as a lost connection is) unless the rule
says ``transient=False`` (as a failed login is): start-up retries only the former.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, final

import attrs
import trio

from ..errors import DatabaseError, ValidationError
from .protocol import Driver, Listener, Notification

__all__ = ["Fault", "FaultyDriver", "InjectedFault"]

FaultKind = Literal["error", "error_after", "delay", "drop"]


class InjectedFault(Exception):
    """The cause chained to a DatabaseError that a Fault raised."""


@final
@attrs.define
class Fault:
    """One fault rule; see the module docstring."""

    op: str
    kind: FaultKind = "error"
    call: int | None = None
    """Only the Nth call (1-based) of ``op`` matches; None: every call."""
    times: int | None = 1
    """How many times the rule applies; None: forever."""
    seconds: float = 0.0
    """For ``delay``."""
    transient: bool = True
    """Whether the DatabaseError raised is ``transient``."""
    applied: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("error", "error_after", "delay", "drop"):
            raise ValidationError("Fault.kind", "must be error, error_after, delay or drop")
        if self.call is not None and self.call < 1:
            raise ValidationError("Fault.call", "must be 1 or more")
        if self.times is not None and self.times < 1:
            raise ValidationError("Fault.times", "must be 1 or more, or None")
        if self.seconds < 0:
            raise ValidationError("Fault.seconds", "must be 0 or more")

    def matches(self, op: str, call: int) -> bool:
        if self.op not in ("*", op):
            return False
        if self.call is not None and self.call != call:
            return False
        return self.times is None or self.applied < self.times


def _fail(op: str, rule: Fault) -> DatabaseError:
    cause = InjectedFault(f"injected {rule.kind} fault in {op}")
    error = DatabaseError(f"running {op}", cause, transient=rule.transient)
    error.__cause__ = cause
    return error


@final
class _FaultyListener:
    def __init__(self, inner: Listener, owner: FaultyDriver) -> None:
        self._inner = inner
        self._owner = owner

    async def wait(self) -> list[Notification]:
        rule = self._owner._take("listener_wait", {"drop"})
        if rule is not None:
            await trio.lowlevel.checkpoint()
            raise _fail("listener_wait", rule)
        return await self._inner.wait()


@final
class FaultyDriver:
    """Delegates every Driver operation to ``inner``, applying the fault rules first."""

    def __init__(self, inner: Driver, faults: Iterable[Fault] = ()) -> None:
        self.inner = inner
        self.faults: list[Fault] = list(faults)
        self.calls: Counter[str] = Counter()
        """How many times each operation was called."""
        self.injected: Counter[str] = Counter()
        """How many faults were injected, per operation."""

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def _take(self, op: str, kinds: set[str]) -> Fault | None:
        self.calls[op] += 1
        for rule in self.faults:
            if rule.kind in kinds and rule.matches(op, self.calls[op]):
                rule.applied += 1
                self.injected[op] += 1
                return rule
        return None

    def clock(self) -> Any:
        return self.inner.clock()

    def transaction(self) -> Any:
        return self.inner.transaction()

    @asynccontextmanager
    async def open_listener(self, channels: Sequence[str]) -> AsyncIterator[_FaultyListener]:
        rule = self._take("open_listener", {"error", "delay"})
        if rule is not None:
            if rule.kind == "delay":
                await trio.sleep(rule.seconds)
            else:
                raise _fail("open_listener", rule)
        async with self.inner.open_listener(channels) as listener:
            yield _FaultyListener(listener, self)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if not callable(target) or name.startswith("_"):
            return target
        return functools.partial(self._call, name, target)

    async def _call(
        self, op: str, target: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        rule = self._take(op, {"error", "error_after", "delay"})
        if rule is None:
            return await target(*args, **kwargs)
        if rule.kind == "delay":
            await trio.sleep(rule.seconds)
            return await target(*args, **kwargs)
        if rule.kind == "error":
            await trio.lowlevel.checkpoint()
            raise _fail(op, rule)
        await target(*args, **kwargs)
        raise _fail(op, rule)
