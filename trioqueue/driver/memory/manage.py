"""Jobs as the application reads and manages them, one by id or many by filter: get,
list, state, cancel, retry, delete, and which running jobs are asked to cancel
(`_JobManagement`, one of the parts of `MemoryDriver`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs

from ...job import FINALIZED_STATES, JobListParams, JobState
from ..protocol import CONTROL_CHANNEL, INSERT_CHANNEL, JobRow
from .errors import MemoryDataError
from .rows import _Job
from .statement import _Stmt
from .store import _Store
from .values import _concat, _has_key, _insert_payload, _minus, _ts, _ts_json
from .workflows import CANCELLED_BY, notify_final, settle


class _JobManagement(_Store):
    """Reading and managing jobs."""

    async def job_get(self, job_id: int, *, ex: Any = None) -> JobRow | None:
        """The job's row as the caller's transaction sees it, or None."""

        def op(st: _Stmt) -> JobRow | None:
            job = st.job(job_id)
            return None if job is None else job.row()

        return await self._run(f"getting job {job_id}", ex, op)

    async def job_list(self, params: JobListParams, *, ex: Any = None) -> list[JobRow]:
        """Jobs matching every given filter (tags: the job has all of them; workflow_id:
        the tasks of that workflow), with ids above ``params.after``, ordered by id, at
        most ``params.limit``."""
        ids = None if params.ids is None else set(params.ids)
        kinds = None if params.kinds is None else set(params.kinds)
        queues = None if params.queues is None else set(params.queues)
        states = None if params.states is None else {JobState(s) for s in params.states}
        priorities = None if params.priorities is None else set(params.priorities)
        tags = None if params.tags is None else {t[:255] for t in params.tags}
        workflow_id = params.workflow_id
        after = params.after

        def match(job: _Job) -> bool:
            return (
                (ids is None or job.id in ids)
                and (kinds is None or job.kind in kinds)
                and (queues is None or job.queue in queues)
                and (states is None or job.state in states)
                and (priorities is None or job.priority in priorities)
                and (tags is None or tags.issubset(job.tags))
                and (workflow_id is None or job.workflow_id == workflow_id)
                and (after is None or (job.id < after if params.descending else job.id > after))
            )

        def op(st: _Stmt) -> list[JobRow]:
            if params.limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            visible = list(st.visible_jobs())
            floor = None
            if params.within_newest is not None and visible:
                floor = max(j.id for j in visible) - params.within_newest
            found = sorted(
                (j for j in visible if match(j) and (floor is None or j.id > floor)),
                key=lambda j: j.id,
                reverse=params.descending,
            )
            return [j.row() for j in found[: params.limit]]

        return await self._run("listing jobs", ex, op)

    async def job_cancel(self, job_id: int, now: datetime, *, ex: Any = None) -> JobRow | None:
        """Cancel a job; return its row afterwards, or None if there is no such job.

        A queued job becomes ``cancelled`` (finalized_at = now). A running job stays
        ``running`` with ``cancel_attempted_at`` in its metadata, and a ``cancel`` message
        goes to the control channel (at commit, inside a transaction). A finalized job is
        returned unchanged. A job cancelled here is announced on ``tq_final``, and its
        dependents are settled (``workflows.py``). Waits while another transaction holds
        the row.
        """
        at = _ts(now)

        def op(st: _Stmt) -> JobRow | None:
            old = st.job(job_id)
            if old is None or old.state in FINALIZED_STATES:
                return None if old is None else old.row()
            if old.state is JobState.RUNNING:
                new = attrs.evolve(
                    old,
                    finalized_at=None,
                    metadata=_concat(old.metadata, {"cancel_attempted_at": _ts_json(at)}),
                )
            else:  # a cancelled task waits no more: its progress through its deps goes
                new = attrs.evolve(
                    old, state=JobState.CANCELLED, finalized_at=at, workflow_deps_done=None
                )
            st.put_job(new, old)
            if new.state is JobState.RUNNING:
                payload = json.dumps({"action": "cancel", "job_id": job_id, "queue": new.queue})
                st.notify(CONTROL_CHANNEL, payload)
            else:
                notify_final(st, [job_id])
                settle(st, at)
            return new.row()

        return await self._run(f"cancelling job {job_id}", ex, op)

    async def job_retry(self, job_id: int, now: datetime, *, ex: Any = None) -> JobRow | None:
        """Make a job available now; return its row afterwards, or None if there is none.

        A running job is returned unchanged. Otherwise: ``available`` (a workflow task
        with deps: ``pending``, settled at once with the others waiting for its deps, as
        they allow), finalized_at cleared,
        scheduled_at = now (an available job keeps an earlier one), one more attempt when it
        has used them all, ``cancel_attempted_at`` and ``workflow_cancelled_by`` dropped;
        ``tq_insert`` is notified. A job with dependents settles them (``workflows.py``):
        the dependents its failure cancelled come back, and those that had seen it done
        wait for it again. Raises DatabaseError if another live job holds its unique key.
        """
        at = _ts(now)

        def op(st: _Stmt) -> JobRow | None:
            old = st.job(job_id)
            if old is None or old.state is JobState.RUNNING:
                return None if old is None else old.row()
            keep = old.state is JobState.AVAILABLE and old.scheduled_at < at
            waits = old.workflow_deps is not None
            new = attrs.evolve(
                old,
                state=JobState.PENDING if waits else JobState.AVAILABLE,
                finalized_at=None,
                scheduled_at=old.scheduled_at if keep else at,
                max_attempts=old.attempt + 1
                if old.attempt >= old.max_attempts
                else old.max_attempts,
                metadata=_minus(_minus(old.metadata, "cancel_attempted_at"), CANCELLED_BY),
                workflow_deps_done=None,  # a waiting task retried by hand no longer waits
            )
            st.put_job(new, old)
            st.notify(INSERT_CHANNEL, _insert_payload(new.queue))
            if old.has_dependents and job_id not in st.fired:
                st.fired.append(job_id)  # passed to the advance whatever its state was
            if old.workflow_deps is not None:
                st.fired.extend(d for d in old.workflow_deps if d not in st.fired)
            settle(st, at)
            now_row = st.job(job_id)
            return (now_row if now_row is not None else new).row()

        return await self._run(f"retrying job {job_id}", ex, op)

    async def job_delete(self, job_id: int, *, ex: Any = None) -> JobRow | None:
        """Delete a job unless it is running; return the deleted row, else None. The
        dependents of a deleted dep are settled as if it had failed (``workflows.py``)."""

        def op(st: _Stmt) -> JobRow | None:
            old = st.job(job_id)
            if old is None or old.state is JobState.RUNNING:
                return None
            st.delete_job(old)
            notify_final(st, [job_id])  # job_wait's waiters learn it is gone
            settle(st, self.clock())
            return old.row()

        return await self._run(f"deleting job {job_id}", ex, op)

    async def job_mark_waited(self, job_ids: Sequence[int]) -> list[int]:
        """Mark these jobs as waited for (outcome writes announce them on ``tq_final``
        when they end; a finished one may be retried first); return the ids marked.
        Missing ones are skipped. (PostgreSQL also skips rows another transaction holds;
        here every statement runs alone.)"""

        def op(st: _Stmt) -> list[int]:
            marked = []
            for job_id in sorted(set(job_ids)):
                old = st.job(job_id)
                if old is None:
                    continue
                if not old.waited:
                    st.put_job(attrs.evolve(old, waited=True), old)
                marked.append(job_id)
            return marked

        return await self._run("marking waited jobs", None, op)

    async def job_state(self, job_id: int, *, ex: Any = None) -> str | None:
        """The job's state as the caller's transaction sees it, or None."""

        def op(st: _Stmt) -> str | None:
            job = st.job(job_id)
            return None if job is None else job.state.value

        return await self._run(f"reading job {job_id}", ex, op)

    async def job_cancel_requested(self, job_ids: Sequence[int]) -> list[int]:
        """Which of these jobs are running with a cancellation requested (ascending)."""

        def op(st: _Stmt) -> list[int]:
            found = []
            for job_id in sorted(set(job_ids)):
                job = self._jobs.get(job_id)
                if (
                    job is not None
                    and job.state is JobState.RUNNING
                    and _has_key(job.metadata, "cancel_attempted_at")
                ):
                    found.append(job_id)
            return found

        return await self._run("checking for cancel requests", None, op)
