"""Inserting a workflow's tasks on PostgreSQL (queries/workflow.sql, migration 005)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from ...errors import ValidationError
from ..protocol import JobRow, WorkflowTaskParams
from .arrays import bool_array, int8_array, text_array
from .inserts import insert_arrays
from .queries import QUERIES
from .statements import inserted_row, job_row

if TYPE_CHECKING:
    from .connection import PgConnection

__all__ = ["insert_workflow"]


def _deps_literal(ids: Sequence[int]) -> str | None:
    return "{" + ",".join(map(str, ids)) + "}" if ids else None


async def insert_workflow(
    conn: PgConnection,
    workflow_id: str,
    tasks: Sequence[WorkflowTaskParams],
    notify_queues: Sequence[str],
    now: datetime,
    *,
    prepare: bool,
) -> list[tuple[JobRow, bool]]:
    """`Driver.job_insert_workflow` on ``conn``, inside a transaction the caller holds.

    Ids are reserved first, so that one INSERT writes every task with its deps' ids.
    Unique duplicates then stand in for their tasks (a second statement, only when there
    are any), and the tasks they decide are settled (a third). On cancellation the
    caller's transaction rolls back: nothing is written."""
    # Inserts of one workflow id take turns (until their transactions end), so that the
    # check below sees a concurrent insert of the same id once it committed.
    await conn.execute(QUERIES["workflow_lock"], [workflow_id], prepare=prepare)
    if await conn.fetchval(QUERIES["workflow_exists"], [workflow_id], prepare=prepare):
        raise ValidationError("workflow", f"a workflow with id {workflow_id!r} already exists")
    reserved = [
        int(i)
        for (i,) in await conn.fetch(QUERIES["workflow_reserve_ids"], [len(tasks)], prepare=prepare)
    ]
    depended = {d for t in tasks for d in t.deps}
    args = [
        *insert_arrays([t.params for t in tasks]),
        now,
        text_array(list(notify_queues)),
        int8_array(reserved),
        workflow_id,
        text_array([t.task for t in tasks]),
        text_array([_deps_literal([reserved[d] for d in t.deps]) for t in tasks]),
        bool_array([t.ignore_failed for t in tasks]),
        bool_array([i in depended for i in range(len(tasks))]),
    ]
    rows = await conn.fetch(
        QUERIES["workflow_insert"], args, prepare=prepare, make_row=inserted_row
    )
    if len(rows) != len(tasks):
        raise RuntimeError(f"expected {len(tasks)} rows back, got {len(rows)}")
    stood_in = [
        (reserved[i], row.id) for i, (row, skipped) in enumerate(rows) if skipped and i in depended
    ]
    if not stood_in:
        return rows
    old = [r for r, _ in stood_in]
    new = [n for _, n in stood_in]
    await conn.execute(
        QUERIES["workflow_stand_in"], [int8_array(old), int8_array(new), workflow_id]
    )
    await conn.execute(QUERIES["workflow_settle"], [int8_array(new), now])
    # The tasks that waited for a stand-in may have changed: read every row again.
    fresh = {
        row.id: row
        for row in await conn.fetch(
            QUERIES["workflow_rows"], [int8_array([row.id for row, _ in rows])], make_row=job_row
        )
    }
    return [(fresh.get(row.id, row), skipped) for row, skipped in rows]
