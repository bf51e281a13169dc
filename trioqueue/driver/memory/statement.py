"""One statement (`_Stmt`): what it sees, the row locks it takes, the writes it stages.

A statement reads committed rows overlaid with its transaction's versions and then its
own; it enforces the CHECK constraints and the unique index as each row is written; and
it raises ``_Blocked`` when a row it needs is locked by another open transaction. The
store applies its staged writes only if it finishes (``_Store._run`` in ``store.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ...job import FINALIZED_STATES
from ..protocol import Notification
from .errors import MemoryDataError, _Blocked
from .rows import _Job, _Leader, _LockKey, _Periodic, _Queue

if TYPE_CHECKING:
    from .store import _Store
    from .transaction import MemoryTransaction


class _Stmt:
    """One statement's view (committed rows, then its transaction's, then its own staged
    versions) and its staged writes, applied together by ``MemoryDriver._apply`` only if
    the statement finishes. Raising ``_Blocked`` or ``MemoryStoreError`` discards it."""

    def __init__(self, driver: _Store, tx: MemoryTransaction | None) -> None:
        self.d = driver
        self.tx = tx
        self.jobs: dict[int, _Job | None] = {}
        self.holders: dict[bytes, int | None] = {}
        self.queues: dict[str, _Queue | None] = {}
        self.periodic: dict[str, _Periodic] = {}
        self.leader: tuple[_Leader | None] | None = None
        self.notes: list[Notification] = []
        self.locks: set[_LockKey] = set()
        self.fired: list[int] = []
        """Jobs with dependents this statement moved into or out of a final state, or
        deleted, in the order written: the ids the statement passes to the workflow
        advance (``workflows.settle``, with the ``now`` of the statement)."""
        self.settling = False
        """While the workflow advance writes: its own writes are not recorded in `fired`
        (it follows its cascade itself)."""
        self.inserted_waiting: list[int] = []
        """Rows this statement inserted with ``workflow_deps`` (not in the store's index)."""

    # ---- reading

    def job(self, job_id: int) -> _Job | None:
        if job_id in self.jobs:
            return self.jobs[job_id]
        if self.tx is not None and job_id in self.tx._jobs:
            return self.tx._jobs[job_id]
        return self.d._jobs.get(job_id)

    def visible_jobs(self) -> Iterator[_Job]:
        """Every row this statement's transaction sees (not its own staged versions)."""
        own = self.tx._jobs if self.tx is not None else {}
        for job_id, job in self.d._jobs.items():
            if job_id not in own:
                yield job
        for maybe in own.values():
            if maybe is not None:
                yield maybe

    def dependents(self, dep_ids: Iterable[int]) -> set[int]:
        """The ids of the rows that may wait for one of ``dep_ids`` (``workflow_deps``
        overlaps them), as an index lookup: committed rows through the store's index, and
        the rows the transaction and this statement inserted with deps. Read each through
        `job`: some may be gone from this view, or be in any state."""
        wanted = set(dep_ids)
        found: set[int] = set()
        index = self.d._dependents
        for dep in wanted:
            found |= index.get(dep, set())
        inserted = self.inserted_waiting
        if self.tx is not None and self.tx._inserted_waiting:
            inserted = [*self.tx._inserted_waiting, *inserted]
        for job_id in inserted:
            job = self.job(job_id)
            if job is not None and job.workflow_deps is not None:
                if not wanted.isdisjoint(job.workflow_deps):
                    found.add(job_id)
        return found

    def queue(self, name: str) -> _Queue | None:
        if name in self.queues:
            return self.queues[name]
        if self.tx is not None and name in self.tx._queues:
            return self.tx._queues[name]
        return self.d._queues.get(name)

    def visible_queues(self) -> list[_Queue]:
        own = self.tx._queues if self.tx is not None else {}
        found = [q for n, q in self.d._queues.items() if n not in own]
        return found + [q for q in own.values() if q is not None]

    def periodic_row(self, pid: str) -> _Periodic | None:
        if pid in self.periodic:
            return self.periodic[pid]
        if self.tx is not None and pid in self.tx._periodic:
            return self.tx._periodic[pid]
        return self.d._periodic.get(pid)

    def holder(self, key: bytes) -> int | None:
        """The id of the row that holds ``key`` in tq_job_unique_idx, as an index insertion
        sees it: raises _Blocked when the entry belongs to another open transaction (its
        uncommitted row, or a committed row it is changing)."""
        for layer in (self.holders, self.tx._holders if self.tx is not None else None):
            if layer is not None and key in layer:
                found = layer[key]
                if found is not None:
                    return found
                break
        else:
            committed = self.d._holders.get(key)
            if committed is not None:
                owner = self.d._locks.get(("job", committed))
                if owner is not None and owner is not self.tx:
                    raise _Blocked(owner)
                return committed
        for other in self.d._open_txs:
            if other is not self.tx and other._holders.get(key) is not None:
                raise _Blocked(other)
        return None

    # ---- locking and writing

    def lock(self, key: _LockKey) -> None:
        """Take the row lock ``key`` (kept until the transaction ends; released at once
        outside one). Raises _Blocked while another transaction holds it."""
        owner = self.d._locks.get(key)
        if owner is not None and owner is not self.tx:
            raise _Blocked(owner)
        self.locks.add(key)

    def skip_locked(self, key: _LockKey) -> bool:
        owner = self.d._locks.get(key)
        return owner is not None and owner is not self.tx

    def put_job(self, new: _Job, old: _Job | None) -> None:
        """Stage ``new`` (replacing ``old``, the visible version, if any), enforcing the CHECK
        constraints and the unique index the way each row's write does."""
        new.check()
        self.lock(("job", new.id))
        if new.holds_key:
            assert new.unique_key is not None
            found = self.holder(new.unique_key)
            if found is not None and found != new.id:
                raise MemoryDataError(
                    'duplicate key value violates unique constraint "tq_job_unique_idx"'
                )
        if old is not None and old.holds_key and not new.holds_key:
            assert old.unique_key is not None
            self.holders[old.unique_key] = None
        if new.holds_key:
            assert new.unique_key is not None
            self.holders[new.unique_key] = new.id
        self.jobs[new.id] = new
        if old is None and new.workflow_deps is not None:
            self.inserted_waiting.append(new.id)
        if (
            old is not None
            and old.has_dependents
            and not self.settling
            and old.state is not new.state
            and (old.state in FINALIZED_STATES or new.state in FINALIZED_STATES)
        ):
            self.fired.append(new.id)

    def delete_job(self, old: _Job) -> None:
        self.lock(("job", old.id))
        if old.holds_key:
            assert old.unique_key is not None
            self.holders[old.unique_key] = None
        self.jobs[old.id] = None
        if old.has_dependents and not self.settling:
            self.fired.append(old.id)

    def notify(self, channel: str, payload: str) -> None:
        self.notes.append(Notification(channel, payload))
