"""The store (`_Store`): the committed rows and their indexes, the row locks held by open
transactions, and the machinery every operation runs through.

``_run`` runs one statement (a `_Stmt`, ``statement.py``): a checkpoint, then the whole
statement at once; a statement blocked by another transaction's lock waits for it to end
and runs again, and one that fails becomes a ``DatabaseError``. ``transaction`` opens a
`MemoryTransaction` and commits or discards it. The operations of the protocol are in the
subclasses that `MemoryDriver` combines (``jobs.py``, ``manage.py``, ``maintenance.py``,
``admin.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import trio

from ...errors import DatabaseError, TrioqueueError
from ...job import JobState
from ..protocol import Notification
from .errors import MemoryDataError, MemoryStoreError, _Blocked
from .listener import DEFAULT_LISTENER_BUFFER, MemoryListener
from .rows import _Job, _Leader, _LockKey, _Periodic, _Queue
from .statement import _Stmt
from .transaction import MemoryTransaction
from .workflows import settle

T = TypeVar("T")


class _Store:
    """The state of one memory store and how statements and transactions run on it.

    Not used on its own: `MemoryDriver` is this plus the operations."""

    def __init__(self, *, listener_buffer: int = DEFAULT_LISTENER_BUFFER) -> None:
        if listener_buffer < 1:
            raise ValueError("listener_buffer must be at least 1")
        self._listener_buffer = listener_buffer
        self._ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._by_state: dict[JobState, set[int]] = {state: set() for state in JobState}
        self._available: dict[str, set[int]] = {}
        self._holders: dict[bytes, int] = {}
        self._dependents: dict[int, set[int]] = {}
        """Committed rows by the ids in their ``workflow_deps`` (tq_job_workflow_deps_idx)."""
        self._workflows: dict[str, set[int]] = {}
        """Committed rows by ``workflow_id`` (tq_job_workflow_idx)."""
        self._queues: dict[str, _Queue] = {}
        self._periodic: dict[str, _Periodic] = {}
        self._rate_starts: dict[str, list[tuple[str, datetime]]] = {}
        """Recent starts of rate-limited queues (tq_rate_start): (partition, time)."""
        self._leader: _Leader | None = None
        self._locks: dict[_LockKey, MemoryTransaction] = {}
        self._open_txs: dict[MemoryTransaction, None] = {}
        self._listeners: dict[MemoryListener, None] = {}
        # The clock: wall time at creation, advanced by trio's clock within each run.
        self._last = datetime.now(UTC)
        self._anchor: trio.lowlevel.RunVar[tuple[datetime, float]] = trio.lowlevel.RunVar(
            f"trioqueue.MemoryDriver.anchor.{id(self):x}"
        )
        try:
            self._anchor.set((self._last, trio.current_time()))
        except RuntimeError:
            pass  # not in a trio run: the first run anchors itself

    # ---- time

    def clock(self) -> datetime:
        """Now, in UTC: the wall time when the driver was created, advanced by
        ``trio.current_time()``, so a ``MockClock`` moves it. In a later trio run (whose
        clock starts afresh) time goes on from the later of the last value returned and the
        wall clock; outside any run it is the wall clock. Never goes backwards."""
        try:
            current = trio.current_time()
        except RuntimeError:
            value = datetime.now(UTC)
        else:
            try:
                base, anchor = self._anchor.get()
            except LookupError:
                base, anchor = max(self._last, datetime.now(UTC)), current
                self._anchor.set((base, anchor))
            value = base + timedelta(seconds=current - anchor)
        if value < self._last:
            value = self._last
        self._last = value
        return value

    # ---- running statements

    def _tx(self, ex: Any) -> MemoryTransaction | None:
        if ex is None:
            return None
        if not isinstance(ex, MemoryTransaction) or ex._driver is not self:
            raise TrioqueueError(
                f"ex must be a transaction of this MemoryDriver, got {type(ex).__name__}"
            )
        return ex

    async def _run(self, doing: str, ex: Any, op: Callable[[_Stmt], T]) -> T:
        """Run ``op`` as one statement: checkpoint, then evaluate and apply atomically. A
        statement blocked by another transaction's lock waits for it to end and runs again.
        """
        tx = self._tx(ex)
        await trio.lowlevel.checkpoint()
        while True:
            stmt = _Stmt(self, tx)
            try:
                if tx is not None:
                    if not tx._open:
                        raise MemoryStoreError("the transaction is no longer open")
                    if tx._failed is not None:
                        raise MemoryStoreError(
                            "current transaction is aborted, commands ignored until end of "
                            f"transaction block (after: {tx._failed})"
                        )
                result = op(stmt)
                if stmt.fired:
                    settle(stmt, self.clock())
            except _Blocked as blocked:
                try:
                    await self._wait(blocked.tx, tx)
                except MemoryStoreError as exc:
                    raise self._failure(doing, tx, exc) from exc
                continue
            except MemoryStoreError as exc:
                raise self._failure(doing, tx, exc) from exc
            self._apply(stmt)
            return result

    @staticmethod
    def _failure(doing: str, tx: MemoryTransaction | None, exc: MemoryStoreError) -> DatabaseError:
        if tx is not None and tx._open and tx._failed is None:
            tx._failed = exc
        return DatabaseError(doing, exc, rejected_data=isinstance(exc, MemoryDataError))

    async def _wait(self, blocker: MemoryTransaction, tx: MemoryTransaction | None) -> None:
        if blocker._owner is trio.lowlevel.current_task():
            raise MemoryStoreError(
                "this statement waits for a row of a transaction that the same task holds "
                "open, so it would wait forever (run it inside that transaction: ex=tx)"
            )
        if tx is None:
            await blocker._done.wait()
            return
        step: MemoryTransaction | None = blocker
        while step is not None:
            if step is tx:
                raise MemoryStoreError(
                    "deadlock detected: two transactions wait for each other's rows"
                )
            step = step._waiting_for
        tx._waiting_for = blocker
        try:
            await blocker._done.wait()
        except trio.Cancelled:
            # As in PostgreSQL, a statement cancelled inside a transaction aborts it.
            if tx._failed is None:
                tx._failed = MemoryStoreError("canceling statement due to user request")
            raise
        finally:
            tx._waiting_for = None

    def _apply(self, stmt: _Stmt) -> None:
        tx = stmt.tx
        if tx is not None:
            for key in stmt.locks:
                self._locks[key] = tx
            tx._locks |= stmt.locks
            tx._jobs.update(stmt.jobs)
            tx._holders.update(stmt.holders)
            tx._queues.update(stmt.queues)
            tx._periodic.update(stmt.periodic)
            tx._notes.extend(stmt.notes)
            tx._inserted_waiting.extend(stmt.inserted_waiting)
            assert stmt.leader is None
            return
        for job_id, job in stmt.jobs.items():
            self._store_job(job_id, job)
        for name, queue in stmt.queues.items():
            if queue is None:
                self._queues.pop(name, None)
            else:
                self._queues[name] = queue
        self._periodic.update(stmt.periodic)
        if stmt.leader is not None:
            self._leader = stmt.leader[0]
        self._deliver(stmt.notes)

    def _store_job(self, job_id: int, job: _Job | None) -> None:
        """Write one committed row, keeping the indexes right."""
        old = self._jobs.get(job_id)
        if old is not None:
            self._by_state[old.state].discard(job_id)
            if old.state is JobState.AVAILABLE:
                self._available[old.queue].discard(job_id)
            if old.holds_key and self._holders.get(old.unique_key) == job_id:  # type: ignore[arg-type]
                del self._holders[old.unique_key]  # type: ignore[arg-type]
        if job is None:
            self._jobs.pop(job_id, None)
        else:
            self._jobs[job_id] = job
            self._by_state[job.state].add(job_id)
            if job.state is JobState.AVAILABLE:
                self._available.setdefault(job.queue, set()).add(job_id)
            if job.holds_key:
                assert job.unique_key is not None
                self._holders[job.unique_key] = job_id
        self._index_workflow(job_id, old, job)

    def _index_workflow(self, job_id: int, old: _Job | None, new: _Job | None) -> None:
        """Keep ``_dependents`` and ``_workflows`` right for one committed row's change.
        Versions of a row share these values (``attrs.evolve``), so most changes skip."""
        old_deps = None if old is None else old.workflow_deps
        new_deps = None if new is None else new.workflow_deps
        if old_deps is not new_deps:
            for dep in old_deps or ():
                waiting = self._dependents.get(dep)
                if waiting is not None:
                    waiting.discard(job_id)
                    if not waiting:
                        del self._dependents[dep]
            for dep in new_deps or ():
                self._dependents.setdefault(dep, set()).add(job_id)
        old_wf = None if old is None else old.workflow_id
        new_wf = None if new is None else new.workflow_id
        if old_wf is not new_wf:
            if old_wf is not None:
                members = self._workflows.get(old_wf)
                if members is not None:
                    members.discard(job_id)
                    if not members:
                        del self._workflows[old_wf]
            if new_wf is not None:
                self._workflows.setdefault(new_wf, set()).add(job_id)

    def _deliver(self, notes: Sequence[Notification]) -> None:
        # PostgreSQL sends identical notifications of one transaction once.
        for note in dict.fromkeys(notes):
            for listener in self._listeners:
                listener._offer(note)

    def _jobs_in(self, state: JobState) -> list[_Job]:
        return [self._jobs[i] for i in self._by_state[state]]

    # ---- transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTransaction]:
        """A transaction for the block; pass the yielded executor as ``ex=``.

        Commits when the block exits normally: every write becomes visible at once and the
        notifications sent inside it are delivered. Rolls back when the block raises or is
        cancelled (also when cancelled just before the commit): nothing it wrote is kept
        and nothing it notified is sent. Ids it took are not reused.

        Raises:
          DatabaseError: a statement inside the block failed and the block went on (the
            transaction was aborted and has been rolled back), or the commit found a row
            that breaks the unique index (nothing was applied).
        """
        await trio.lowlevel.checkpoint()
        tx = MemoryTransaction(self)
        self._open_txs[tx] = None
        try:
            yield tx
        except BaseException:
            self._end(tx)
            raise
        if tx._failed is not None:
            self._end(tx)
            raise DatabaseError(
                "running a transaction",
                MemoryStoreError(
                    "the transaction had failed (an error was caught inside the block)"
                    f" and has been rolled back: {tx._failed}"
                ),
            )
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._end(tx)
            raise
        try:
            self._commit(tx)
        except MemoryStoreError as exc:
            raise DatabaseError("running a transaction", exc) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _commit(self, tx: MemoryTransaction) -> None:
        try:
            for job in tx._jobs.values():
                if job is not None and job.holds_key:
                    assert job.unique_key is not None
                    other = self._holders.get(job.unique_key)
                    if other is not None and other != job.id and other not in tx._jobs:
                        raise MemoryDataError(
                            'duplicate key value violates unique constraint "tq_job_unique_idx"'
                        )
            for job_id, maybe in tx._jobs.items():
                self._store_job(job_id, maybe)
            for name, queue in tx._queues.items():
                if queue is None:
                    self._queues.pop(name, None)
                else:
                    self._queues[name] = queue
            self._periodic.update(tx._periodic)
            notes = list(tx._notes)
        finally:
            self._end(tx)
        self._deliver(notes)

    def _end(self, tx: MemoryTransaction) -> None:
        """Close ``tx``: drop what it did not commit, release its locks, wake its waiters."""
        if not tx._open:
            return
        tx._open = False
        for key in tx._locks:
            if self._locks.get(key) is tx:
                del self._locks[key]
        tx._locks.clear()
        tx._jobs.clear()
        tx._holders.clear()
        tx._queues.clear()
        tx._periodic.clear()
        tx._notes.clear()
        tx._inserted_waiting.clear()
        self._open_txs.pop(tx, None)
        tx._done.set()
