"""Workflows in memory: what migration 005 (``migrations/005_composition.up.sql``) does on
PostgreSQL, statement for statement.

- `advance` is ``tq_workflow_advance``: it settles the dependents of jobs that reached a
  final state, left one, were deleted or were just inserted; promoting, cancelling and
  reviving them, the cascade in a loop.
- `settle` is how each statement calls it: `_Stmt.put_job` and `_Stmt.delete_job`
  record each job with dependents whose state enters or leaves
  ``cancelled``/``completed``/``discarded``, or that is deleted; the operation then passes
  them all to one advance with its ``now``, as the SQL statement that wrote them passes
  the ids it changed to ``tq_workflow_advance``. (``_Store._run`` settles, at the clock's
  ``now``, whatever an operation left recorded.)
- `notify_final` is ``tq_notify_final``: ``tq_final`` notifications of final jobs.

Everything here runs inside one statement (a `_Stmt`): its writes are staged with the
statement's and kept only if the whole statement finishes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import attrs

from ...job import JobState
from ..protocol import FINAL_CHANNEL, INSERT_CHANNEL
from .values import _concat, _insert_payload, _minus

if TYPE_CHECKING:
    from .rows import _Job
    from .statement import _Stmt

__all__ = ["FINAL_IDS_PER_PAYLOAD", "advance", "notify_final", "settle"]

FINAL_IDS_PER_PAYLOAD: Final = 400
"""At most this many ids in one ``tq_final`` payload (under NOTIFY's 8000-byte bound)."""

CANCELLED_BY: Final = "workflow_cancelled_by"
"""The metadata key naming the dep whose failure cancelled a task."""

_FAILED: Final = frozenset({JobState.CANCELLED, JobState.DISCARDED})
_FINAL: Final = frozenset({JobState.CANCELLED, JobState.COMPLETED, JobState.DISCARDED})


def notify_final(st: _Stmt, ids: Sequence[int]) -> None:
    """Send ``{"ids": [...]}`` on ``tq_final`` for ``ids`` (in that order), at most
    `FINAL_IDS_PER_PAYLOAD` a payload; nothing when there are none. Formatted as
    ``json_build_object('ids', ids)::text`` writes it."""
    for start in range(0, len(ids), FINAL_IDS_PER_PAYLOAD):
        chunk = ids[start : start + FINAL_IDS_PER_PAYLOAD]
        st.notify(FINAL_CHANNEL, '{"ids" : ' + json.dumps(list(chunk), separators=(",", ":")) + "}")


def _cancelled_by(metadata: Any) -> str | None:
    """``metadata ->> 'workflow_cancelled_by'``: the value as text, None where the key is
    absent (or JSON null, or metadata is no object). Compared as text with the dep ids,
    so that a value someone else stored there (not a number) never fails a statement."""
    if not isinstance(metadata, dict):
        return None
    value = metadata.get(CANCELLED_BY)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def advance(st: _Stmt, ids: Sequence[int], now: datetime) -> int:
    """``tq_workflow_advance(ids, now)``: settle the dependents of the jobs ``ids``;
    return how many dependents changed state.

    Round after round, until nothing changed: a changed job that is missing, cancelled or
    discarded has failed; one that is not final is live again. A live-again job brings
    back (``pending``, ``workflow_cancelled_by`` dropped) the dependents its failure
    cancelled. Then each pending dependent, by id, is locked and judged against the rows
    as they are at that point: with a failed dep it is to be cancelled (unless it ignores
    failed deps); else its deps are walked from the first not yet seen done (from the
    start when one of them is live again): it is to be promoted once every dep is
    completed (or, ignoring failed deps, final or missing), cancelled at a failed dep, and
    else waits, remembering how far it got. Then the round's promotions (``scheduled`` if
    ``scheduled_at`` is after ``now``, else ``available``) and cancels (finalized_at =
    ``now``, metadata ``workflow_cancelled_by`` = the dep) are written. Revived and
    cancelled dependents with dependents of their own are the next round's changed jobs.

    Sends ``tq_insert`` once per queue of a task promoted to ``available``, and
    ``tq_final`` for the cancelled ones. Its own writes are not passed to it again.

    Raises _Blocked (the statement waits and runs again) when another transaction holds a
    dependent, and MemoryStoreError when a write breaks a constraint (a revived or
    promoted task's unique key is taken), failing the statement.
    """
    was_settling = st.settling
    st.settling = True
    try:
        return _advance(st, ids, now)
    finally:
        st.settling = was_settling


def _advance(st: _Stmt, ids: Sequence[int], now: datetime) -> int:
    changed = list(ids)
    cancelled: list[int] = []
    queues: list[str] = []
    count = 0
    while changed:
        following: list[int] = []
        failed: list[int] = []
        live: set[int] = set()
        for job_id in changed:
            job = st.job(job_id)
            if job is None or job.state in _FAILED:
                failed.append(job_id)
            elif job.state not in _FINAL:
                live.add(job_id)
        failed_set = set(failed)
        waiting = sorted(st.dependents(changed))

        # A live-again dep brings back the dependents its failure cancelled; they are live
        # again too, so their own dep-cancelled dependents come back on the next round.
        if live:
            for job_id in waiting:
                job = st.job(job_id)
                if (
                    job is None
                    or job.workflow_deps is None
                    or job.state is not JobState.CANCELLED
                    or live.isdisjoint(job.workflow_deps)
                    or _cancelled_by(job.metadata) not in {str(i) for i in live}
                ):
                    continue
                revived = attrs.evolve(
                    job,
                    state=JobState.PENDING,
                    finalized_at=None,
                    metadata=_minus(job.metadata, CANCELLED_BY),
                )
                st.put_job(revived, job)
                count += 1
                if job.has_dependents:
                    following.append(job_id)

        promote: list[int] = []
        cancel: list[tuple[int, int]] = []
        moved: list[tuple[int, int]] = []
        for job_id in waiting:
            d = st.job(job_id)
            if d is None or d.workflow_deps is None or d.state is not JobState.PENDING:
                continue
            st.lock(("job", job_id))  # FOR UPDATE
            verdict, at_dep = _judge(st, d.workflow_deps, d, live, failed, failed_set)
            if verdict == "promote":
                promote.append(job_id)
            elif verdict == "cancel":
                cancel.append((job_id, at_dep))
                if d.has_dependents:
                    following.append(job_id)
            elif at_dep != (d.workflow_deps_done or 0):
                moved.append((job_id, at_dep))

        for job_id in promote:
            d = _visible(st, job_id)
            due = d.scheduled_at <= now
            state = JobState.AVAILABLE if due else JobState.SCHEDULED
            st.put_job(attrs.evolve(d, state=state, workflow_deps_done=None), d)
            if due and d.queue not in queues:
                queues.append(d.queue)
        count += len(promote)
        for job_id, cause in cancel:
            d = _visible(st, job_id)
            new = attrs.evolve(
                d,
                state=JobState.CANCELLED,
                finalized_at=now,
                metadata=_concat(d.metadata, {CANCELLED_BY: cause}),
                workflow_deps_done=None,
            )
            st.put_job(new, d)
            cancelled.append(job_id)
        count += len(cancel)
        for job_id, done in moved:
            d = _visible(st, job_id)
            st.put_job(attrs.evolve(d, workflow_deps_done=done), d)
        changed = following

    for queue in queues:
        st.notify(INSERT_CHANNEL, _insert_payload(queue))
    notify_final(st, cancelled)
    return count


def _visible(st: _Stmt, job_id: int) -> _Job:
    job = st.job(job_id)
    assert job is not None
    return job


def _judge(
    st: _Stmt,
    deps: tuple[int, ...],
    d: _Job,
    live: set[int],
    failed: list[int],
    failed_set: set[int],
) -> tuple[str, int]:
    """The verdict on the pending task ``d`` this round: ``("promote", deps seen done)``,
    ``("cancel", the failed dep)`` or ``("wait", deps seen done)``."""
    ignore = bool(d.workflow_ignore_failed)
    i = d.workflow_deps_done or 0
    if live and not live.isdisjoint(deps):
        i = 0  # a dep it had seen done is live again: look from the start
        if not ignore:
            # Brought back (or set back) behind another dep that failed: cancelled again at
            # once, by the first failed dep in order, not once the walk reaches it.
            for dep_id in deps:
                dep = st.job(dep_id)
                if dep is None or dep.state in _FAILED:
                    return "cancel", dep_id
    if not ignore and failed_set and not failed_set.isdisjoint(deps):
        return "cancel", next(f for f in failed if f in deps)
    while i < len(deps):
        dep = st.job(deps[i])
        if dep is None or dep.state in _FAILED:
            if not ignore:
                return "cancel", deps[i]
        elif dep.state is not JobState.COMPLETED:
            return "wait", i  # still waiting for this one
        i += 1
    return "promote", i


def settle(st: _Stmt, now: datetime) -> None:
    """Pass the jobs the statement recorded (``st.fired``: jobs with dependents moved into
    or out of a final state, or deleted) to one `advance` with ``now``, as each statement
    of the PostgreSQL driver calls ``tq_workflow_advance`` with the ids it changed."""
    fired, st.fired = st.fired, []
    if fired:
        advance(st, fired, now)
