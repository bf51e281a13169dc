"""The event dispatcher: fans events out to subscribers without ever blocking.

Each subscriber has its own bounded buffer. When it is full the event is dropped for that
subscriber only, counted, and logged; the completer upstream is never held up by a slow
or absent reader.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from ..errors import TrioqueueError, ValidationError
from ..events import Event, EventKind

JOB_EVENT_KINDS = frozenset(kind for kind in EventKind if kind.value.startswith("job_"))

__all__ = ["Audience", "Dispatcher", "DispatcherStatistics", "Subscription"]

log = logging.getLogger("trioqueue.dispatcher")


@final
class Audience:
    """Who listens for job events: the dispatcher keeps the count as subscriptions open
    and close, and the completer reads it, to skip reading back written jobs while no one
    would see their events (a subscription sees only what happens after it opens)."""

    __slots__ = ("job_subscribers",)

    def __init__(self, job_subscribers: int = 0) -> None:
        self.job_subscribers = job_subscribers

    @classmethod
    def everyone(cls) -> Audience:
        """An audience that always listens (a completer without a dispatcher)."""
        return cls(1)


@final
class Subscription:
    """An async iterator of events; it ends when the client stops."""

    def __init__(self, kinds: frozenset[EventKind], buffer: int) -> None:
        self.kinds = kinds
        self._send, self._receive = trio.open_memory_channel[Event](buffer)
        self.dropped = 0
        """Events dropped because this subscriber's buffer was full."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def receive(self) -> Event:
        """The next event. Raises ``trio.EndOfChannel`` once the client has stopped."""
        return await self._receive.receive()

    def _offer(self, event: Event) -> bool:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        return True

    def _end(self) -> None:
        self._send.close()

    def _close(self) -> None:
        self._send.close()
        self._receive.close()


@final
@attrs.frozen
class DispatcherStatistics:
    subscribers: int
    """Subscriptions currently open."""
    published: int
    """Events handed to the dispatcher."""
    dropped: int
    """Events dropped, summed over subscribers, because a buffer was full."""


@final
class Dispatcher:
    """Receives batches of events and offers each to every interested subscriber."""

    def __init__(self) -> None:
        self.audience = Audience()
        """Counts the open subscriptions that take job events."""
        self._subscribers: list[Subscription] = []
        self._closed = False
        self._published = 0
        self._dropped = 0
        self._last_drop_log = -math.inf

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(len(self._subscribers), self._published, self._dropped)

    def publish(self, events: Iterable[Event]) -> None:
        """Offer events to subscribers. Never blocks; not a checkpoint."""
        if self._closed:
            return
        for event in events:
            self._published += 1
            for sub in self._subscribers:
                if event.kind in sub.kinds and not sub._offer(event):
                    self._dropped += 1
                    now = trio.current_time()
                    if now - self._last_drop_log >= 1.0:
                        self._last_drop_log = now
                        log.warning(
                            "subscriber buffer full: dropped %s event for job %s "
                            "(%d dropped for this subscriber so far)",
                            event.kind,
                            event.job.id if event.job else None,
                            sub.dropped,
                        )

    @asynccontextmanager
    async def subscribe(
        self, kinds: Iterable[EventKind], buffer: int
    ) -> AsyncIterator[Subscription]:
        """Register a subscription for the duration of the block."""
        kind_set = frozenset(kinds)
        if not kind_set:
            raise ValidationError("kinds", "subscribe needs at least one EventKind")
        for kind in kind_set:
            if not isinstance(kind, EventKind):
                raise ValidationError("kinds", f"{kind!r} is not an EventKind")
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValidationError("buffer", "must be a positive integer")
        if self._closed:
            raise TrioqueueError("the client has stopped; no more events will come")
        sub = Subscription(kind_set, buffer)
        job_events = not kind_set.isdisjoint(JOB_EVENT_KINDS)
        self._subscribers.append(sub)
        self.audience.job_subscribers += job_events
        try:
            yield sub
        finally:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
                self.audience.job_subscribers -= job_events
            sub._close()
            await trio.lowlevel.checkpoint_if_cancelled()

    def close(self) -> None:
        """End every subscription's stream (after what is buffered). Idempotent."""
        self._closed = True
        for sub in self._subscribers:
            sub._end()

    async def run(
        self,
        receive: trio.MemoryReceiveChannel[list[Event]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish every batch from ``receive`` until all its senders are closed, then end
        every subscription.

        Shielded throughout, with no deadline of its own: it returns when the channel
        ends, and only then. The senders close it as the nesting unwinds (the completer as
        it returns, within its own ``shutdown_timeout`` when cancelled; the runtime once
        the completion nursery is done), so under cancellation from outside every event
        written before then still reaches subscribers, and the streams end as the client's
        work does.
        """
        task_status.started()
        try:
            with trio.CancelScope(shield=True), receive:
                async for batch in receive:
                    self.publish(batch)
        finally:
            self.close()
