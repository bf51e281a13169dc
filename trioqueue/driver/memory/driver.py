"""`MemoryDriver`: the store (``store.py``) with every operation of the protocol, put
together from the parts that hold them (``jobs.py``, ``manage.py``, ``maintenance.py``,
``admin.py``, ``limits.py``)."""

from __future__ import annotations

from typing import final

import trio

from ..._schema import SCHEMA_VERSION
from .admin import _Admin
from .jobs import _JobFlow
from .limits import _Limits
from .maintenance import _Maintenance
from .manage import _JobManagement

__all__ = ["MemoryDriver"]


@final
class MemoryDriver(_JobFlow, _Limits, _JobManagement, _Maintenance, _Admin):
    """The Driver protocol in memory, with the PostgreSQL driver's semantics.

    Several clients may share one instance, as a fleet shares a database: notifications
    reach every open listener of the instance. ``memory://NAME`` URLs name process-wide
    instances (see :func:`memory_driver_for_url`). Use it from one thread (any number of
    trio runs, one after another).

    Differences from PostgreSQL, on purpose:

    - Rows that PostgreSQL returns in no particular order (outcome and rescue batches,
      ``queue_pause("*")``) come back in a fixed order: input order, queue creation order.
      (``job_get_available`` returns claim order on both.)
    - A task that would wait for a row lock held by a transaction that the same task has
      open (a hang in PostgreSQL) gets ``DatabaseError`` instead.
    - ``job_schedule`` waits for another transaction's uncommitted unique key and then
      discards the conflicting job, where PostgreSQL's statement fails with a unique
      violation (and the next run discards it).
    - Timestamps in ``metadata`` (``cancel_attempted_at``) are written with a ``+00:00``
      offset, as PostgreSQL does in a UTC session.
    - ``job_insert_workflow`` waits while another open transaction has uncommitted jobs of
      the same workflow id, and then refuses the id if that one committed.
    - A workflow's dependents settled by a deleted dep (``job_delete``, the cleaner) or a
      rescue that finalized nothing get the driver's clock as ``now`` where PostgreSQL
      uses the transaction's ``now()``.
    """

    def __repr__(self) -> str:
        return (
            f"<trioqueue.MemoryDriver jobs={len(self._jobs)} queues={len(self._queues)} "
            f"transactions={len(self._open_txs)} listeners={len(self._listeners)}>"
        )

    async def schema_version(self) -> int:
        """Always the newest migration: the store is made with the current schema."""
        await trio.lowlevel.checkpoint()
        return SCHEMA_VERSION

    async def ping(self) -> None:
        """Always fine (a checkpoint)."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Nothing to close: the store lives as long as the driver (a named store as long
        as the process), so clients may come and go."""
        await trio.lowlevel.checkpoint()
