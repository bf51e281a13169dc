"""The stored records: one class per table row (``tq_job``, ``tq_queue``,
``tq_periodic_job``, ``tq_leader``), and the row-lock key.

Records are frozen: a change makes a new version, so a transaction's versions and the
committed ones never share mutable state. `_Job.row` turns a job into the `JobRow` the
protocol returns; `_Job.check` holds the table's CHECK constraints.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, final

import attrs

from ...job import FINALIZED_STATES, JobState
from ...limits import QueueLimits
from ..protocol import JobRow, PeriodicJobState
from .errors import MemoryDataError
from .values import _check_length, _copy, _smallint, _violation

_LockKey = tuple[str, Any]
"""A row lock: the table (``"job"``, ``"queue"``, ``"periodic"``) and the row's key."""


@final
@attrs.frozen(slots=True)
class _Job:
    """One tq_job row. Never mutated: a change makes a new version. JSON values inside
    are never mutated either, so versions share them."""

    id: int
    kind: str
    args: Any
    queue: str
    state: JobState
    priority: int
    attempt: int
    max_attempts: int
    attempted_at: datetime | None
    attempted_by: tuple[str, ...]
    created_at: datetime
    finalized_at: datetime | None
    scheduled_at: datetime
    errors: tuple[Any, ...]
    metadata: Any
    tags: tuple[str, ...]
    unique_key: bytes | None
    unique_states: frozenset[JobState] | None
    output: Any = None
    """The recorded return value of the job's completed run (decoded JSON); None: none."""
    workflow_id: str | None = None
    workflow_task: str | None = None
    workflow_deps: tuple[int, ...] | None = None
    """The ids of the jobs this workflow task waits for, in order (None: no deps). Never
    changes once inserted (the stand-in of a unique duplicate is resolved before)."""
    workflow_ignore_failed: bool | None = None
    workflow_deps_done: int | None = None
    """How many of ``workflow_deps`` (from the first) the workflow advance saw done."""
    has_dependents: bool | None = None
    """Whether some workflow task depends on this job (its state changes settle them)."""
    waited: bool | None = None
    """Whether some client waits for the job (``job_mark_waited``): outcome writes announce
    it on ``tq_final`` when it ends."""

    @property
    def holds_key(self) -> bool:
        """Whether the row is in tq_job_unique_idx (its state is in its own bitmask)."""
        return (
            self.unique_key is not None
            and self.unique_states is not None
            and self.state in self.unique_states
        )

    def row(self, *, args: bool = True) -> JobRow:
        """The row as the protocol returns it, its JSON values copied. ``args=False``:
        with ``args`` None, as the outcome statement returns it."""
        return JobRow(
            self.id,
            self.kind,
            _copy(self.args) if args else None,
            self.queue,
            self.state.value,
            self.priority,
            self.attempt,
            self.max_attempts,
            self.attempted_at,
            list(self.attempted_by),
            self.created_at,
            self.finalized_at,
            self.scheduled_at,
            [_copy(e) for e in self.errors],
            _copy(self.metadata),
            list(self.tags),
            _copy(self.output),
            self.workflow_id,
            self.workflow_task,
            None if self.workflow_deps is None else list(self.workflow_deps),
        )

    def check(self) -> None:
        """The table's CHECK constraints (and column types) of this version."""
        _smallint(self.priority)
        _smallint(self.max_attempts)
        _smallint(self.attempt)
        if self.max_attempts <= 0:
            _violation("tq_job", "tq_job_max_attempts_positive")
        if not 1 <= self.priority <= 4:
            _violation("tq_job", "tq_job_priority_in_range")
        _check_length("tq_job", "tq_job_kind_length", self.kind)
        _check_length("tq_job", "tq_job_queue_length", self.queue)
        if (self.finalized_at is None) == (self.state in FINALIZED_STATES):
            _violation("tq_job", "tq_job_finalized_or_finalized_at_null")
        for tag in self.tags:
            if len(tag) > 255:
                raise MemoryDataError("value too long for type character varying(255)")


@final
@attrs.frozen(slots=True)
class _Queue:
    name: str
    created_at: datetime
    paused_at: datetime | None
    updated_at: datetime
    limits: QueueLimits | None = None


@final
@attrs.frozen(slots=True)
class _Periodic:
    id: str
    schedule: str | None
    next_run_at: datetime
    last_run_at: datetime | None
    updated_at: datetime

    def state(self) -> PeriodicJobState:
        return PeriodicJobState(self.id, self.schedule, self.next_run_at, self.last_run_at)


@final
@attrs.frozen(slots=True)
class _Leader:
    leader_id: str
    elected_at: datetime
    expires_at: datetime
