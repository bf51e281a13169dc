"""What the memory store reports where PostgreSQL would report an error.

None of these leaves the driver on its own: each becomes the ``__cause__`` of the
``DatabaseError`` the failed operation raises, as a psycopg error does on PostgreSQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import TrioqueueError

if TYPE_CHECKING:
    from .transaction import MemoryTransaction

__all__ = ["MemoryDataError", "MemoryStoreError"]


class MemoryStoreError(TrioqueueError):
    """What PostgreSQL would have reported (a constraint violation, bad input, a
    deadlock); the memory driver raises it as the cause of a ``DatabaseError``."""


class MemoryDataError(MemoryStoreError):
    """What PostgreSQL (or psycopg, before sending) would have refused because of the
    values themselves: the ``DatabaseError`` it causes is ``rejected_data``."""


class _Blocked(Exception):
    """Raised inside a statement that must wait for ``tx`` to end; nothing was changed.

    Not an error of the store: the driver's ``_run`` catches it, waits, and runs the
    statement again."""

    def __init__(self, tx: MemoryTransaction) -> None:
        super().__init__()
        self.tx = tx
