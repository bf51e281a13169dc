"""A job's life as the runtime drives it: inserting jobs, claiming them to run, and
writing the outcome of each run (`_JobFlow`, one of the parts of `MemoryDriver`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import attrs

from ...errors import ValidationError
from ...job import FINALIZED_STATES, JobState
from ..protocol import (
    INSERT_CHANNEL,
    JobInsertParams,
    JobOutcome,
    JobRow,
    WorkflowTaskParams,
    WrittenRow,
)
from .errors import MemoryDataError, MemoryStoreError, _Blocked
from .rows import _Job
from .statement import _Stmt
from .store import _Store
from .values import (
    _concat,
    _has_key,
    _insert_payload,
    _jsonb,
    _opt_ts,
    _text,
    _ts,
    _unique_states,
)
from .workflows import advance, notify_final, settle

_MAX_ATTEMPTED_BY: Final = 100
_CANCEL_OVERRIDES: Final = frozenset({JobState.RETRYABLE, JobState.SCHEDULED, JobState.AVAILABLE})


def _claimed(job: _Job, at: datetime, client_id: str) -> _Job:
    """``job`` as a claim leaves it: running, one more attempt, ``client_id`` appended to
    the last ``_MAX_ATTEMPTED_BY`` attempts' clients."""
    keep = job.attempted_by[max(len(job.attempted_by) - (_MAX_ATTEMPTED_BY - 1), 0) :]
    return attrs.evolve(
        job,
        state=JobState.RUNNING,
        attempt=job.attempt + 1,
        attempted_at=at,
        attempted_by=(*keep, client_id),
    )


class _JobFlow(_Store):
    """Inserting, claiming and finishing jobs."""

    # ---- inserting

    def _new_job(
        self, p: JobInsertParams, tags: tuple[str, ...], now: datetime, **workflow: Any
    ) -> _Job:
        """A new row of ``p`` (its next id taken), checked; ``workflow``: the values of
        the workflow columns (``workflow_id``, ``workflow_deps``, ...)."""
        job = _Job(
            id=next(self._ids),
            kind=_text(p.kind),
            args=_jsonb(p.args_json),
            queue=_text(p.queue),
            state=JobState(p.state),
            priority=p.priority,
            attempt=0,
            max_attempts=p.max_attempts,
            attempted_at=None,
            attempted_by=(),
            created_at=now,
            finalized_at=None,
            scheduled_at=_ts(p.scheduled_at),
            errors=(),
            metadata=_jsonb(p.metadata_json),
            tags=tuple(_text(tag) for tag in tags),
            unique_key=p.unique_key,
            unique_states=_unique_states(p.unique_states),
            **workflow,
        )
        job.check()
        return job

    async def job_insert_many(
        self,
        params: Sequence[JobInsertParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[JobRow, bool]]:
        """Insert a batch in one statement; return ``(row, skipped)`` in input order.

        A job whose unique key a live job holds is not inserted: that job comes back with
        ``skipped=True`` (and is locked until ``ex`` ends, as ``ON CONFLICT DO UPDATE`` does).
        Two jobs of the batch with one key fail the statement, as in PostgreSQL ("cannot
        affect row a second time"). Notifies ``tq_insert`` for ``notify_queues`` (at
        commit, inside a transaction) unless the batch is empty.

        Raises DatabaseError for a CHECK violation or bad JSON; nothing is inserted.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[tuple[JobRow, bool]]:
            out: list[tuple[JobRow, bool]] = []
            touched: set[int] = set()
            for p in params:
                joined = ",".join(p.tags)
                job = self._new_job(p, tuple(joined.split(",")) if joined else (), at)
                existing = _conflicting(st, job, touched)
                if existing is not None:
                    updated = attrs.evolve(existing, kind=job.kind)
                    st.put_job(updated, existing)
                    touched.add(existing.id)
                    out.append((updated.row(), True))
                    continue
                st.put_job(job, None)
                touched.add(job.id)
                out.append((job.row(), False))
            if params:
                for queue in notify_queues:
                    st.notify(INSERT_CHANNEL, _insert_payload(queue))
            return out

        return await self._run("inserting jobs", ex, op)

    async def job_insert_fast(
        self,
        params: Iterable[JobInsertParams],
        notify_queues: Sequence[str] | Callable[[], Sequence[str]],
        now: datetime,
        *,
        ex: Any = None,
    ) -> int:
        """Insert a batch as COPY does; return how many were inserted.

        ``params`` is read once, before anything is written: an exception while reading
        it propagates and nothing is inserted (inside ``ex`` the transaction is aborted, as
        an aborted COPY leaves it on PostgreSQL). A unique key already held (by a live job
        or an earlier job of the batch) fails the whole batch with DatabaseError, the same
        way. Notifies ``tq_insert`` for ``notify_queues`` (called after reading ``params``,
        if it is a function).
        """
        at = _ts(now)
        tx = self._tx(ex)
        try:
            batch = list(params)
        except BaseException as exc:
            if tx is not None and tx._open and tx._failed is None:
                tx._failed = MemoryStoreError(f"COPY aborted: {type(exc).__name__}")
            raise
        queues = notify_queues() if callable(notify_queues) else notify_queues

        def op(st: _Stmt) -> int:
            for p in batch:
                st.put_job(self._new_job(p, tuple(p.tags), at), None)
            for queue in queues:
                st.notify(INSERT_CHANNEL, _insert_payload(queue))
            return len(batch)

        return await self._run("inserting jobs with COPY", ex, op)

    async def job_insert_workflow(
        self,
        workflow_id: str,
        tasks: Sequence[WorkflowTaskParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[JobRow, bool]]:
        """Insert a workflow's tasks in one statement, all or nothing; return ``(row,
        skipped)`` in input order, the rows as the statement leaves them.

        Each new row gets ``workflow_id``, its task name, its deps' job ids in order (None
        when it has none), ``ignore_failed`` and, when some task depends on it,
        ``has_dependents``. A task whose unique key a live job holds is not inserted: that
        job stands in for it (``skipped=True``, locked until ``ex`` ends, its dependents'
        ``workflow_deps`` name it, and it is marked as having dependents). Then the
        dependents of the stand-ins are settled (``workflows.advance`` with ``now``): those
        of a stand-in already final are promoted or cancelled at once. Notifies
        ``tq_insert`` for ``notify_queues`` unless ``tasks`` is empty. Waits while another
        open transaction holds jobs of ``workflow_id`` (then finds them, if it committed).

        Raises ValidationError (field ``workflow``) when jobs of ``workflow_id`` exist, or a
        task's deps are not earlier tasks; DatabaseError for a CHECK violation, bad JSON, two
        tasks of one name, or two tasks with one unique key. Nothing is written.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[tuple[JobRow, bool]]:
            _text(workflow_id)
            if self._workflow_taken(st, workflow_id):
                raise ValidationError(
                    "workflow", f"a workflow with id {workflow_id!r} already exists"
                )
            depended = {dep for t in tasks for dep in t.deps}
            placed: list[tuple[int, bool]] = []  # per task: its job id, and skipped
            touched: set[int] = set()
            names: set[str] = set()
            stand_ins: list[int] = []
            for pos, t in enumerate(tasks):
                if any(not 0 <= dep < pos for dep in t.deps):
                    raise ValidationError(
                        "workflow", f"task {t.task!r} may depend on earlier tasks only"
                    )
                if _text(t.task) in names:
                    raise MemoryDataError(
                        'duplicate key value violates unique constraint "tq_job_workflow_idx"'
                    )
                names.add(t.task)
                p = t.params
                joined = ",".join(p.tags)
                job = self._new_job(
                    p,
                    tuple(joined.split(",")) if joined else (),
                    at,
                    workflow_id=workflow_id,
                    workflow_task=t.task,
                    workflow_deps=tuple(placed[dep][0] for dep in t.deps) or None,
                    workflow_ignore_failed=t.ignore_failed or None,
                    has_dependents=(pos in depended) or None,
                )
                existing = _conflicting(st, job, touched)
                if existing is not None:
                    marked = pos in depended or existing.has_dependents
                    updated = attrs.evolve(existing, kind=job.kind, has_dependents=marked)
                    st.put_job(updated, existing)
                    touched.add(existing.id)
                    placed.append((existing.id, True))
                    if pos in depended:
                        stand_ins.append(existing.id)
                    continue
                st.put_job(job, None)
                touched.add(job.id)
                placed.append((job.id, False))
            if tasks:
                for queue in notify_queues:
                    st.notify(INSERT_CHANNEL, _insert_payload(queue))
            if stand_ins:
                # Settled as on PostgreSQL: every stand-in with dependents (a live one
                # leaves them waiting; a final one promotes or cancels them).
                advance(st, stand_ins, at)
            out = []
            for job_id, skipped in placed:
                now_row = st.job(job_id)
                assert now_row is not None
                out.append((now_row.row(), skipped))
            return out

        return await self._run(f"inserting workflow {workflow_id!r}", ex, op)

    def _workflow_taken(self, st: _Stmt, workflow_id: str) -> bool:
        """Whether jobs of ``workflow_id`` are visible to ``st``. Raises _Blocked while
        another open transaction has uncommitted ones (so the insert waits for it)."""
        for job_id in self._workflows.get(workflow_id, ()):
            job = st.job(job_id)
            if job is not None and job.workflow_id == workflow_id:
                return True
        if st.tx is not None:
            for maybe in st.tx._jobs.values():
                if maybe is not None and maybe.workflow_id == workflow_id:
                    return True
        for other in self._open_txs:
            if other is not st.tx:
                for maybe in other._jobs.values():
                    if maybe is not None and maybe.workflow_id == workflow_id:
                        raise _Blocked(other)
        return False

    # ---- working jobs

    async def job_get_available(
        self, queue: str, now: datetime, limit: int, client_id: str
    ) -> list[JobRow]:
        """Claim up to ``limit`` available jobs of ``queue`` due at ``now``, in (priority,
        scheduled_at, id) order, unless the queue is paused: each becomes ``running`` with
        attempt + 1, attempted_at = now and ``client_id`` appended to attempted_by (the last
        100 kept). Rows an open transaction holds are skipped. Returned in claim order.

        On cancellation: nothing was claimed.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[JobRow]:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            paused = self._queues.get(queue)
            if paused is not None and paused.paused_at is not None:
                return []
            due = [
                self._jobs[i]
                for i in self._available.get(queue, ())
                if self._jobs[i].scheduled_at <= at and not st.skip_locked(("job", i))
            ]
            due.sort(key=lambda j: (j.priority, j.scheduled_at, j.id))
            out = []
            for job in due[:limit]:
                running = _claimed(job, at, client_id)
                st.put_job(running, job)
                out.append(running.row())
            return out

        return await self._run(f"fetching jobs of queue {queue!r}", None, op)

    async def job_claim(self, job_id: int, now: datetime, client_id: str) -> JobRow | None:
        """Claim one job by id (for ``trioqueue.testing``): an available, pending,
        retryable or scheduled job becomes ``running`` as ``job_get_available`` makes it,
        whatever its queue, schedule or pause; returns its row, else None. Waits while
        another transaction holds the row.

        On cancellation: nothing was claimed.
        """
        at = _ts(now)

        def op(st: _Stmt) -> JobRow | None:
            job = st.job(job_id)
            if job is None or job.state is JobState.RUNNING or job.state in FINALIZED_STATES:
                return None
            running = _claimed(job, at, client_id)
            st.put_job(running, job)
            return running.row()

        return await self._run(f"claiming job {job_id}", None, op)

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        """Write a batch of outcomes, each only if its job is still ``running`` the run the
        outcome came from (its ``attempted_at``, when given); return the rows written (in
        input order; an id given twice is written once, from its first outcome). A job
        whose cancellation was requested (``cancel_attempted_at``) and whose outcome is
        retryable, scheduled or available ends ``cancelled`` with finalized_at = now. An
        error is appended to ``errors``; metadata is merged in; a ``completed`` outcome
        replaces ``output`` with its ``output_json`` (None clears it), other outcomes leave
        it. The jobs that end final are announced on ``tq_final``, and the dependents of
        those with dependents are settled (``workflows.py``). The rows come back with
        ``args`` None, as from PostgreSQL (the caller has them); with ``rows=False``, as
        `WrittenRow` (the id only). Waits while an open transaction holds one of the rows.

        Raises DatabaseError (nothing written) when an outcome breaks a constraint, such as
        a finalized state without finalized_at. On cancellation: nothing was written.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[JobRow] | list[WrittenRow]:
            written: list[_Job] = []
            seen: set[int] = set()
            for o in outcomes:
                if o.id in seen:
                    continue
                seen.add(o.id)
                old = st.job(o.id)
                if old is None or old.state is not JobState.RUNNING:
                    continue
                if o.attempted_at is not None and old.attempted_at != _ts(o.attempted_at):
                    continue  # a later run of the job: this outcome is stale
                cancel = _has_key(old.metadata, "cancel_attempted_at") and (
                    o.state in _CANCEL_OVERRIDES
                )
                new = attrs.evolve(
                    old,
                    state=JobState.CANCELLED if cancel else JobState(o.state),
                    finalized_at=at if cancel else _opt_ts(o.finalized_at),
                    scheduled_at=_ts(o.scheduled_at) if o.scheduled_at else old.scheduled_at,
                    attempt=max(old.attempt - 1, 0) if o.give_back_attempt else old.attempt,
                    errors=old.errors
                    if o.error_json is None
                    else (*old.errors, _jsonb(o.error_json)),
                    metadata=old.metadata
                    if o.metadata_json is None
                    else _concat(old.metadata, _jsonb(o.metadata_json)),
                    output=(None if o.output_json is None else _jsonb(o.output_json))
                    if o.state == JobState.COMPLETED
                    else old.output,
                )
                st.put_job(new, old)
                written.append(new)
            notify_final(
                st, [job.id for job in written if job.waited and job.state in FINALIZED_STATES]
            )
            settle(st, at)
            if rows:
                return [job.row(args=False) for job in written]  # args left out, as the SQL does
            return [WrittenRow(job.id) for job in written]

        return await self._run("writing job outcomes", None, op)


def _conflicting(st: _Stmt, job: _Job, touched: set[int]) -> _Job | None:
    """The live job holding ``job``'s unique key, as ``ON CONFLICT (unique_key)`` finds
    it (None: no conflict); MemoryStoreError when this statement already wrote that job,
    as PostgreSQL refuses to update a row twice in one statement."""
    if not job.holds_key:
        return None
    assert job.unique_key is not None
    found = st.holder(job.unique_key)
    if found is None:
        return None
    if found in touched:
        raise MemoryStoreError("ON CONFLICT DO UPDATE command cannot affect row a second time")
    existing = st.job(found)
    assert existing is not None
    return existing
