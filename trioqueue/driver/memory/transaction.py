"""The executor of an open transaction (`MemoryTransaction`) and what it holds.

A transaction keeps its own versions of the rows it wrote, the unique keys they hold, the
notifications it will send and the row locks it has taken, until the store commits or
discards them (``_Store.transaction`` in ``store.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, final

import trio

from ...errors import TrioqueueError
from ..protocol import Notification
from .errors import MemoryStoreError
from .rows import _Job, _LockKey, _Periodic, _Queue

if TYPE_CHECKING:
    from .store import _Store

__all__ = ["MemoryTransaction"]


@final
class MemoryTransaction:
    """An open transaction of a :class:`MemoryDriver`: pass it as ``ex=``.

    Made by :meth:`MemoryDriver.transaction`, never directly. Do not share it between tasks.
    It runs no SQL: :meth:`execute`, :meth:`fetch`, :meth:`fetchrow` and :meth:`fetchval`
    (what ``trioqueue.Transaction`` calls for the application's own statements) raise
    ``TrioqueueError`` and leave the transaction usable.
    """

    def __init__(self, driver: _Store) -> None:
        self._driver = driver
        self._owner = trio.lowlevel.current_task()
        self._done = trio.Event()
        self._open = True
        self._failed: MemoryStoreError | None = None
        self._waiting_for: MemoryTransaction | None = None
        # The transaction's own versions; None marks a deleted row.
        self._jobs: dict[int, _Job | None] = {}
        self._holders: dict[bytes, int | None] = {}
        self._queues: dict[str, _Queue | None] = {}
        self._periodic: dict[str, _Periodic] = {}
        self._notes: list[Notification] = []
        self._locks: set[_LockKey] = set()
        # The rows it inserted with workflow deps (the store indexes them at commit).
        self._inserted_waiting: list[int] = []

    def __repr__(self) -> str:
        state = "failed" if self._failed else "open" if self._open else "closed"
        return f"<MemoryTransaction {state} writes={len(self._jobs)}>"

    async def _no_sql(self, query: str) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise TrioqueueError(
            "the memory driver runs no SQL; this transaction only carries trioqueue "
            f"operations (ex=tx / client.*_tx): refused {query[:60]!r}"
        )

    async def execute(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)

    async def fetch(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)

    async def fetchrow(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)

    async def fetchval(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)
