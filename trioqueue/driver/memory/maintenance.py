"""What the maintenance services ask of the store: moving due jobs to ``available``,
finding and rescuing stuck jobs, deleting old finalized jobs and stale queue rows
(`_Maintenance`, one of the parts of `MemoryDriver`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

import attrs

from ...job import FINALIZED_STATES, JobState
from ..protocol import JobRescue, JobRow
from .errors import MemoryDataError
from .statement import _Stmt
from .store import _Store
from .values import _concat, _has_key, _jsonb, _opt_ts, _rescue_count, _ts
from .workflows import CANCELLED_BY, notify_final, settle

_SCHEDULABLE: Final = (JobState.RETRYABLE, JobState.SCHEDULED)


class _Maintenance(_Store):
    """The scheduler's, rescuer's and cleaner's statements."""

    async def job_schedule(self, horizon: datetime, now: datetime, limit: int) -> dict[str, int]:
        """Move up to ``limit`` scheduled/retryable jobs due by ``horizon`` to ``available``,
        in (priority, scheduled_at, id) order, skipping rows an open transaction holds;
        return how many became available per queue.

        A job whose unique key another live job holds, or an earlier job of the same
        batch takes, is ``discarded`` instead (finalized_at = now, metadata
        ``unique_key_conflict: scheduler_discarded``), announced on ``tq_final``, its
        dependents settled (``workflows.py``). Sends no ``tq_insert`` (the scheduler does).
        """
        until, at = _ts(horizon), _ts(now)

        def op(st: _Stmt) -> dict[str, int]:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            candidates = [
                job
                for state in _SCHEDULABLE
                for job in self._jobs_in(state)
                if job.scheduled_at <= until and not st.skip_locked(("job", job.id))
            ]
            candidates.sort(key=lambda j: (j.priority, j.scheduled_at, j.id))
            due = candidates[:limit]
            ranked = [
                job
                for job in due
                if job.unique_key is not None
                and job.unique_states is not None
                and JobState.AVAILABLE in job.unique_states
            ]
            # Per key, the job holding it now ranks first, then (priority, scheduled_at, id).
            ranked.sort(key=lambda j: not j.holds_key)
            first: set[bytes] = set()
            conflicting: set[int] = set()
            for job in ranked:
                assert job.unique_key is not None
                if job.unique_key in first:
                    conflicting.add(job.id)
                    continue
                first.add(job.unique_key)
                # The statement's snapshot: committed rows, including other due rows.
                other = self._holders.get(job.unique_key)
                if other is not None and other != job.id:
                    conflicting.add(job.id)
            moved: dict[str, int] = {}
            discarded: list[int] = []
            for job in due:
                if job.id in conflicting:
                    assert job.unique_states is not None
                    new = attrs.evolve(
                        job,
                        state=JobState.DISCARDED,
                        finalized_at=at,
                        metadata=_concat(
                            job.metadata, {"unique_key_conflict": "scheduler_discarded"}
                        ),
                        # Discarded but still holding the key is what the index refuses.
                        unique_states=None
                        if JobState.DISCARDED in job.unique_states
                        else job.unique_states,
                    )
                    discarded.append(job.id)
                else:
                    new = attrs.evolve(job, state=JobState.AVAILABLE, finalized_at=None)
                    moved[job.queue] = moved.get(job.queue, 0) + 1
                st.put_job(new, job)
            notify_final(st, discarded)
            settle(st, at)
            return moved

        return await self._run("scheduling due jobs", None, op)

    async def job_get_stuck(
        self, attempted_before: datetime, limit: int, after_id: int
    ) -> list[JobRow]:
        """Running jobs attempted before ``attempted_before`` with ids above ``after_id``,
        by id, at most ``limit``."""
        before = _ts(attempted_before)

        def op(st: _Stmt) -> list[JobRow]:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            found = sorted(
                (
                    j
                    for j in self._jobs_in(JobState.RUNNING)
                    if j.attempted_at is not None and j.attempted_at < before and j.id > after_id
                ),
                key=lambda j: j.id,
            )
            return [j.row() for j in found[:limit]]

        return await self._run("looking for stuck jobs", None, op)

    async def job_rescue_many(self, rescues: Sequence[JobRescue]) -> list[tuple[int, str, str]]:
        """Apply the rescuer's decisions to jobs still running the same attempt (same
        attempted_at): new state, finalized_at, scheduled_at (if given), the error appended,
        ``rescue_count`` + 1. Returns ``(id, queue, state)`` of each row written. Those
        that end final are announced on ``tq_final``, and their dependents settled (at
        the latest finalized_at written, else the clock)."""

        def op(st: _Stmt) -> list[tuple[int, str, str]]:
            out = []
            ends: list[datetime | None] = []
            seen: set[int] = set()
            for r in rescues:
                if r.id in seen:
                    continue
                seen.add(r.id)
                old = st.job(r.id)
                if (
                    old is None
                    or old.state is not JobState.RUNNING
                    or old.attempted_at != _ts(r.attempted_at)
                ):
                    continue
                new = attrs.evolve(
                    old,
                    state=JobState(r.state),
                    finalized_at=_opt_ts(r.finalized_at),
                    scheduled_at=_ts(r.scheduled_at) if r.scheduled_at else old.scheduled_at,
                    errors=(*old.errors, _jsonb(r.error_json)),
                    metadata=_concat(
                        old.metadata, {"rescue_count": _rescue_count(old.metadata) + 1}
                    ),
                )
                st.put_job(new, old)
                out.append((new.id, new.queue, new.state.value))
                ends.append(new.finalized_at)
            notify_final(st, [i for i, _, state in out if JobState(state) in FINALIZED_STATES])
            finalized = [t for t in ends if t is not None]
            settle(st, max(finalized) if finalized else self.clock())
            return out

        return await self._run("rescuing stuck jobs", None, op)

    async def job_delete_finalized(
        self, state: JobState, finalized_before: datetime, limit: int
    ) -> int:
        """Delete up to ``limit`` jobs in ``state`` finalized before ``finalized_before``,
        oldest first, skipping rows an open transaction holds and workflow deps that a
        pending task still waits for; return how many."""
        before = _ts(finalized_before)

        def op(st: _Stmt) -> int:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            doomed = sorted(
                (
                    j
                    for j in self._jobs_in(JobState(state))
                    if j.finalized_at is not None
                    and j.finalized_at < before
                    and not st.skip_locked(("job", j.id))
                    and not (j.has_dependents and self._awaited(st, j.id))
                ),
                key=lambda j: (j.finalized_at, j.id),
            )[:limit]
            for job in doomed:
                st.delete_job(job)
            settle(st, self.clock())
            return len(doomed)

        return await self._run(f"deleting old {JobState(state).value} jobs", None, op)

    @staticmethod
    def _awaited(st: _Stmt, job_id: int) -> bool:
        """Whether a workflow task waits for ``job_id`` (has it in its deps), or may wait
        again: one cancelled by a failed dep comes back when that dep is retried."""
        for waiting_id in st.dependents([job_id]):
            job = st.job(waiting_id)
            if job is not None and (
                job.state is JobState.PENDING
                or (job.state is JobState.CANCELLED and _has_key(job.metadata, CANCELLED_BY))
            ):
                assert job.workflow_deps is not None
                if job_id in job.workflow_deps:
                    return True
        return False

    async def queue_delete_stale(self, updated_before: datetime) -> list[str]:
        """Delete the queue rows not updated since ``updated_before``, unless paused;
        return their names."""
        before = _ts(updated_before)

        def op(st: _Stmt) -> list[str]:
            names = []
            for queue in list(self._queues.values()):
                if queue.updated_at < before and queue.paused_at is None:
                    st.lock(("queue", queue.name))
                    st.queues[queue.name] = None
                    names.append(queue.name)
            return names

        return await self._run("deleting stale queues", None, op)
