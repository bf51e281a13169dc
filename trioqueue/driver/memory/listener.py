"""Notifications: `MemoryListener`, which receives them, and what it raises when it
falls behind. The store delivers what commits to every open listener (``_Store._deliver``
in ``store.py``); ``open_listener`` and ``notify_many`` are in ``admin.py``."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final, final

import trio

from ...errors import DatabaseError
from ..protocol import Notification
from .errors import MemoryStoreError

__all__ = ["DEFAULT_LISTENER_BUFFER", "ListenerOverflowError", "MemoryListener"]

DEFAULT_LISTENER_BUFFER: Final = 10_000
"""Notifications a listener holds before it overflows (see :class:`MemoryListener`)."""


@final
class ListenerOverflowError(MemoryStoreError):
    """A listener's buffer filled up, so notifications were lost."""


@final
class MemoryListener:
    """Receives the notifications of its channels sent after it was opened.

    It buffers up to ``capacity`` notifications. If more arrive before :meth:`wait` takes
    them, it drops what it holds and the next :meth:`wait` raises ``DatabaseError`` (caused
    by ``ListenerOverflowError``) — what a lost LISTEN connection looks like — so the
    runtime's notifier reconnects and re-checks the database instead of missing work
    silently. After that it works normally again.
    """

    def __init__(self, channels: Iterable[str], capacity: int) -> None:
        self._channels = frozenset(channels)
        self._capacity = capacity
        self._pending: deque[Notification] = deque()
        self._overflowed = False
        self._lot = trio.lowlevel.ParkingLot()

    def _offer(self, note: Notification) -> None:
        if note.channel not in self._channels or self._overflowed:
            return
        if len(self._pending) >= self._capacity:
            self._overflowed = True
            self._pending.clear()
        else:
            self._pending.append(note)
        self._lot.unpark_all()

    async def wait(self) -> list[Notification]:
        """Wait for at least one notification; return all that are pending, oldest first.

        Always a checkpoint. On cancellation: nothing was taken.

        Raises:
          DatabaseError: notifications were lost because the buffer overflowed.
        """
        await trio.lowlevel.checkpoint()
        while not self._pending and not self._overflowed:
            await self._lot.park()
        if self._overflowed:
            self._overflowed = False
            raise DatabaseError(
                "waiting for notifications",
                ListenerOverflowError(
                    f"more than {self._capacity} notifications were pending; some were lost"
                ),
            )
        notes = list(self._pending)
        self._pending.clear()
        return notes
