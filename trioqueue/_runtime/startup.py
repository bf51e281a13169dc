"""Start-up retries: ``open_client``'s first steps ride out transient database faults.

A client that starts while its database restarts, fails over, is full, or has its
sessions terminated would otherwise die on the first lost connection, although the same
faults are survived once it runs. So each start-up step that talks to the database — the
driver's first connections, the schema check, registering the queues — goes through one
`Startup`: a step that fails with a transient ``DatabaseError`` (``exc.transient``; see
``trioqueue/driver/postgres/transient.py``) is tried again after a backoff with jitter,
with a WARNING log line per retry, until it succeeds or the client's ``startup_timeout``
(counted from when ``open_client`` starts connecting, shared by every step) has passed;
then ``open_client`` raises a DatabaseError that names the step, the attempts and the
time tried, with the last error. Any other error — a failed login, a missing database, a
schema that needs ``trioqueue migrate``, bad input — is raised at once, untried.

Every step retried here is safe to repeat: it reads, or writes idempotently (a queue
upsert).
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from typing import TypeVar, final

import trio

from .._failure import leaves
from ..errors import DatabaseError

__all__ = ["Startup", "backoff"]

log = logging.getLogger("trioqueue.startup")

T = TypeVar("T")

FIRST_DELAY = 0.1
"""Seconds before the first retry (before jitter)."""
MAX_DELAY = 5.0
"""The longest wait between two tries (before jitter)."""


def backoff(attempt: int, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> float:
    """Seconds to wait after failed try number ``attempt`` (1-based): ``first`` doubling
    with each try up to ``cap``, then scaled by a random factor from 0.5 to 1, so that
    clients failing together (a server restart) do not all come back at the same
    instant."""
    base = min(first * 2.0 ** min(attempt - 1, 32), cap)
    return base * random.uniform(0.5, 1.0)


def _reason(exc: DatabaseError) -> BaseException:
    """What went wrong, without the DatabaseError's own "while ...": its cause."""
    return exc.__cause__ if exc.__cause__ is not None else exc


@final
class Startup:
    """The retry budget of one client's start-up: every step run through `retry` shares
    one deadline, ``timeout`` seconds after this object was made (None: no deadline,
    transient errors are retried for ever)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.began = trio.current_time()
        self.retries = 0
        """Retries so far, over every step."""
        self.failure: DatabaseError | None = None
        """The error a step failed the start-up with, once one has."""

    async def retry(self, doing: str, step: Callable[[], Awaitable[T]]) -> T:
        """``await step()``, tried again while it fails with a transient DatabaseError and
        time is left; returns what it returns. ``doing`` names the step ("registering
        queue 'default'") for the log lines and the final error.

        Raises the first error that is not a transient DatabaseError at once, unchanged.
        Once the deadline has passed, raises a DatabaseError (still ``transient``) whose
        message says what was being done, after how many tries and how long into start-up,
        and the last error, which is chained. Each retry is logged at WARNING with the try
        number and the delay. A try that is under way is never cut short by the deadline
        (its own time limits bound it, such as the 10 s connect timeout); the deadline
        only decides whether another try starts, and the last wait is shortened to end on
        it.

        Cancellation: during the wait between tries, it just cancels (nothing is held);
        during a try, as that step's own cancellation says.
        """
        tries = 0
        while True:
            tries += 1
            try:
                return await step()
            except DatabaseError as exc:
                if not exc.transient:
                    self.failure = exc
                    raise
                error = exc
            delay = backoff(tries)
            if self.timeout is not None:
                left = self.began + self.timeout - trio.current_time()
                if left <= 0:
                    self.failure = self._gave_up(doing, tries, error)
                    raise self.failure from error
                delay = min(delay, left)
            self.retries += 1
            log.warning(
                "start-up: %s failed (attempt %d), retrying in %.2f s: %s",
                doing,
                tries,
                delay,
                _reason(error),
            )
            await trio.sleep(delay)

    @asynccontextmanager
    async def entered(
        self, doing: str, open_cm: Callable[[], AbstractAsyncContextManager[T]]
    ) -> AsyncIterator[T]:
        """Enter the context manager ``open_cm()`` makes, as `retry` runs a step: a
        transient DatabaseError while entering it (which leaves nothing open) makes a fresh
        one to enter again. Yields what it yields, and exits it when the block ends; errors
        of the block are never retried."""
        async with AsyncExitStack() as stack:
            yield await self.retry(doing, lambda: stack.enter_async_context(open_cm()))

    @contextmanager
    def failure_unwrapped(self) -> Iterator[None]:
        """Around nurseries that start-up steps run in: when what comes out of them is
        the DatabaseError a step failed the start-up with (and the cancellations of its
        sibling tasks), it is re-raised as itself, not nested in exception groups, so that
        ``open_client`` raises it as it raises a failed schema check. Any other group
        passes unchanged."""
        try:
            yield
        except BaseExceptionGroup as group:
            failure = self.failure
            found = leaves(group)
            if (
                failure is None
                or not any(leaf is failure for leaf in found)
                or not all(leaf is failure or isinstance(leaf, trio.Cancelled) for leaf in found)
            ):
                raise
            raise failure from failure.__cause__

    def _gave_up(self, doing: str, tries: int, error: DatabaseError) -> DatabaseError:
        took = trio.current_time() - self.began
        return DatabaseError(
            f"{doing} (gave up after {tries} attempts, {took:.1f} s into start-up; "
            f"startup_timeout is {self.timeout:g} s)",
            _reason(error),
            transient=True,
        )
