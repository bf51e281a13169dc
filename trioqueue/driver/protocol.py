"""The seam between the runtime and storage: named operations, no SQL.

Runtime code and the client call only these methods. A driver raises
``trioqueue.DatabaseError`` (naming the operation) for storage failures. This protocol is
internal and may change between releases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import attrs

from ..job import JobListParams, JobState
from ..limits import LimitedFetch, PartitionInfo, QueueLimits

__all__ = [
    "Driver",
    "JobInsertParams",
    "JobOutcome",
    "JobRescue",
    "Listener",
    "Notification",
    "PeriodicJobState",
    "JobRow",
    "LeaderRow",
    "PARTITIONS_SHOWN",
    "QueueRow",
    "WorkflowTaskParams",
    "WrittenRow",
]


class JobRow(NamedTuple):
    """One job as storage returns it. A NamedTuple: as cheap to make as a tuple, and read
    by name. ``args``, ``errors`` and ``metadata`` are decoded JSON; ``errors`` and
    ``metadata`` may be None where empty (`row_to_job` reads both)."""

    id: int
    kind: str
    args: Any
    queue: str
    state: str
    priority: int
    attempt: int
    max_attempts: int
    attempted_at: datetime | None
    attempted_by: list[str] | None
    created_at: datetime
    finalized_at: datetime | None
    scheduled_at: datetime
    errors: list[Any] | None
    metadata: dict[str, Any] | None
    tags: list[str] | None
    output: Any = None
    """The worker's recorded return value (decoded JSON); None: none."""
    workflow_id: str | None = None
    workflow_task: str | None = None
    workflow_deps: list[int] | None = None
    """The ids of the jobs a workflow task waits for, in the order added."""


class WrittenRow(NamedTuple):
    """A job an outcome was written to, when nobody wants the whole row back."""

    id: int


class QueueRow(NamedTuple):
    """One queue: its ``tq_queue`` row and how many of its jobs are available and running."""

    name: str
    paused_at: datetime | None
    created_at: datetime
    updated_at: datetime
    available: int
    running: int
    limits: QueueLimits | None = None
    """The limits the clients working the queue store (None: no limits)."""
    held_back: int = 0
    """Due jobs the limits hold back now."""
    partitions: tuple[PartitionInfo, ...] = ()
    """The busiest partitions of a limited queue (at most `PARTITIONS_SHOWN`)."""


PARTITIONS_SHOWN = 10
"""How many partitions of a limited queue `Driver.queue_list` reports."""


class LeaderRow(NamedTuple):
    """The elected leader: who, since when, and until when (unless it renews)."""

    leader_id: str
    elected_at: datetime
    expires_at: datetime


INSERT_CHANNEL = "tq_insert"
CONTROL_CHANNEL = "tq_control"
LEADERSHIP_CHANNEL = "tq_leadership"
FINAL_CHANNEL = "tq_final"
"""Jobs that reached a final state (completed, cancelled, discarded), or were deleted by
``job_delete``: each payload is ``{"ids": [...]}`` (at most 400 ids). Sent by every write
that finalizes jobs (outcomes, for the jobs marked by ``job_mark_waited`` only; cancels,
rescues, the scheduler's discards, a workflow's cancelled dependents) and by
``job_delete``, at most a few per write, never one per job; `Client.job_wait` listens."""


class JobInsertParams(NamedTuple):
    """One job to insert, with every default already applied and JSON already encoded.

    A NamedTuple rather than an attrs class, like `JobOutcome`: one is made per job on
    the insert path, and a frozen attrs instance costs four times as much to make."""

    args_json: str
    kind: str
    max_attempts: int
    metadata_json: str
    priority: int
    queue: str
    scheduled_at: datetime
    state: JobState
    tags: tuple[str, ...]
    unique_key: bytes | None
    unique_states: str | None


class JobOutcome(NamedTuple):
    """What a finished run does to its job row (applied only while the row is running
    that same run). A NamedTuple: one is made per finished job (see `JobInsertParams`)."""

    id: int
    state: JobState
    finalized_at: datetime | None
    scheduled_at: datetime | None
    give_back_attempt: bool
    error_json: str | None
    metadata_json: str | None
    attempted_at: datetime | None = None
    """The run this outcome belongs to (the row's ``attempted_at`` when it was fetched):
    the outcome is applied only while the row still runs that run, so a write retried
    after its reply was lost cannot land on a later run of the job. None: any run."""
    output_json: str | None = None
    """A completed run's return value as JSON (None: no output; the stored output is
    cleared)."""


class WorkflowTaskParams(NamedTuple):
    """One task of a workflow to insert (`Driver.job_insert_workflow`)."""

    params: JobInsertParams
    """The job; its state is ``pending`` when it has deps."""
    task: str
    """Its name in the workflow."""
    deps: tuple[int, ...]
    """The positions (in the same list) of the tasks it waits for: always earlier ones."""
    ignore_failed: bool
    """Run once every dep is final, whatever its outcome (else: only once all completed)."""


@attrs.frozen
class JobRescue:
    """The rescuer's decision for one stuck job (applied only if it still runs the same
    attempt, identified by ``attempted_at``)."""

    id: int
    state: JobState
    finalized_at: datetime | None
    scheduled_at: datetime | None
    error_json: str
    attempted_at: datetime


@attrs.frozen
class PeriodicJobState:
    """The durable schedule state of one periodic job (a ``tq_periodic_job`` row)."""

    id: str
    schedule: str | None
    """The schedule this state was computed for (``every=60``, ``cron=...``); None: unknown."""
    next_run_at: datetime
    last_run_at: datetime | None


@attrs.frozen
class Notification:
    channel: str
    payload: str


class Listener(Protocol):
    async def wait(self) -> list[Notification]:
        """Wait for at least one notification; return all that are pending."""
        ...


class Driver(Protocol):
    """Storage operations. ``ex`` is an executor from :meth:`transaction` (the operation
    then runs inside that transaction), or ``None`` to run on its own."""

    def clock(self) -> datetime:
        """The time every statement is given as ``now`` (timezone-aware UTC)."""
        ...

    async def schema_version(self) -> int:
        """The newest migration the storage has applied (0: none)."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """A transaction for the block; the executor it yields goes in ``ex=``. It must
        offer ``execute/fetch/fetchrow/fetchval(query, params)`` for the application's
        own statements (a driver without SQL raises ``TrioqueueError`` from them)."""
        ...

    async def job_insert_many(
        self,
        params: Sequence[JobInsertParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[JobRow, bool]]: ...

    async def job_insert_fast(
        self,
        params: Iterable[JobInsertParams],
        notify_queues: Sequence[str] | Callable[[], Sequence[str]],
        now: datetime,
        *,
        ex: Any = None,
    ) -> int:
        """Insert a batch the fastest way (COPY); return how many were inserted.

        ``params`` may be a one-shot iterator: it is read once, in order, and may be read
        while earlier jobs are already on their way to the server. An exception raised
        while reading it aborts the insert (nothing is written; inside ``ex`` the
        transaction is aborted) and propagates. ``notify_queues`` (or what it returns,
        called once after every job was read) names the queues to notify.
        """
        ...

    async def job_insert_workflow(
        self,
        workflow_id: str,
        tasks: Sequence[WorkflowTaskParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[JobRow, bool]]:
        """Insert a workflow's tasks, all or nothing (inside ``ex`` when given), and return
        their rows in input order, each with whether it was skipped as a unique duplicate.

        Each row gets ``workflow_id``, its task name, the job ids of its deps (in order),
        ``ignore_failed``, and a job some task depends on is marked as having dependents.
        A task whose unique key collides with a live job comes back as that job (skipped),
        and the tasks that depend on it wait for that job instead. Tasks whose deps are
        already final are settled at once (promoted or cancelled).

        Raises ValidationError (field ``workflow``) when jobs of ``workflow_id`` exist;
        nothing is written."""
        ...

    async def job_get_available(
        self, queue: str, now: datetime, limit: int, client_id: str
    ) -> list[JobRow]:
        """Claim up to ``limit`` due ``available`` jobs of ``queue`` (none while it is
        paused) for ``client_id``: each becomes ``running``, its attempt counted. The rows
        come in the order to run them: by priority, then ``scheduled_at``, then id. Their
        errors and metadata may be None where empty (`row_to_job` reads both)."""
        ...

    async def job_get_available_limited(
        self, queue: str, now: datetime, limit: int, client_id: str, limits: QueueLimits
    ) -> LimitedFetch:
        """`job_get_available` for a queue with limits, shared by every client: no more
        than ``limits.global_limit`` jobs of a partition are running once it returns, and
        no more than ``limits.rate_limit`` started in any window. A full partition holds
        back its own jobs only; within a priority, jobs are taken round robin across
        partitions. Says whether due jobs were held back, and when a rate window next
        opens for them.

        On cancellation: nothing was claimed."""
        ...

    async def job_claim(self, job_id: int, now: datetime, client_id: str) -> JobRow | None:
        """Claim one job by id for a run outside any producer (``trioqueue.testing``): if
        it is available, pending, retryable or scheduled, whatever its queue, schedule or
        pause, it becomes ``running`` as ``job_get_available`` makes it; else None."""
        ...

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        """Apply outcomes to jobs still running; return the rows written. Their ``args``
        may be None (the caller ran the job, so it has them). With ``rows=False`` each
        written job comes back as a one-column row ``(id,)``: enough to count, and far
        cheaper when nobody will look at the jobs (a `WrittenRow`)."""
        ...

    async def job_get(self, job_id: int, *, ex: Any = None) -> JobRow | None: ...

    async def job_list(self, params: JobListParams, *, ex: Any = None) -> list[JobRow]: ...

    async def job_count_live(self) -> list[tuple[str, str, int]]:
        """Exact ``(queue, state, count)`` of every queue and state that is not finalized
        (states without jobs are left out)."""
        ...

    async def job_count_finalized(
        self, exact_up_to: int
    ) -> list[tuple[str, int | None, int | None]]:
        """``(state, count, estimate)`` for each finalized state, ordered by state.
        ``estimate``: the storage's estimate of the state's rows (None: it has none; a
        driver that counts cheaply gives the exact count). ``count``: exact when below
        ``exact_up_to``, else it stops there; None when the estimate is at least twice
        ``exact_up_to`` and the driver skipped counting."""
        ...

    async def job_count_finalized_since(self, since: datetime, limit: int) -> dict[str, int]:
        """Per finalized state, the jobs finalized at or after ``since``, counting at most
        ``limit`` of them."""
        ...

    async def job_cancel(self, job_id: int, now: datetime, *, ex: Any = None) -> JobRow | None: ...

    async def job_retry(self, job_id: int, now: datetime, *, ex: Any = None) -> JobRow | None: ...

    async def job_delete(self, job_id: int, *, ex: Any = None) -> JobRow | None: ...

    async def job_state(self, job_id: int, *, ex: Any = None) -> str | None: ...

    async def job_mark_waited(self, job_ids: Sequence[int]) -> list[int]:
        """Some client waits for these jobs (`Client.job_wait`): outcome writes announce
        them on `FINAL_CHANNEL` when they end (they announce no other job). Finished jobs
        are marked too (one may be retried before its waiter reads it). Returns the ids
        marked (in any order); missing ones are not, nor ones another transaction holds
        (skipped, not waited for: mark them again later)."""
        ...

    async def job_cancel_requested(self, job_ids: Sequence[int]) -> list[int]: ...

    async def job_schedule(
        self, horizon: datetime, now: datetime, limit: int
    ) -> dict[str, int]: ...

    async def queue_upsert(
        self, name: str, now: datetime, limits: QueueLimits | None = None, *, rekey: bool = False
    ) -> bool:
        """Create the queue's row or touch its updated_at, storing the ``limits`` this
        client works it with; return whether it is paused. When the limits change, or
        with ``rekey``, the queue's live jobs get the partition keys of these limits."""
        ...

    async def queue_pause(self, name: str, now: datetime, *, ex: Any = None) -> list[str]: ...

    async def queue_resume(self, name: str, now: datetime, *, ex: Any = None) -> list[str]: ...

    async def queue_paused(self, names: Sequence[str]) -> set[str]: ...

    async def queue_list(self) -> list[QueueRow]:
        """Every queue row, ordered by name, as ``(name, paused_at, created_at, updated_at,
        available, running, limits, held_back, partitions)``: available and running count
        the queue's jobs in those states; a limited queue also has the due jobs its limits
        hold back and its busiest partitions (`PARTITIONS_SHOWN`), by running jobs, then
        held-back ones."""
        ...

    async def notify_many(self, channel: str, payloads: Sequence[str]) -> None: ...

    async def leader_attempt_elect(
        self, leader_id: str, now: datetime, expires_at: datetime
    ) -> bool: ...

    async def leader_resign(self, leader_id: str) -> bool: ...

    async def leader_get(self) -> LeaderRow | None: ...

    async def job_get_stuck(
        self, attempted_before: datetime, limit: int, after_id: int
    ) -> list[JobRow]: ...

    async def job_rescue_many(self, rescues: Sequence[JobRescue]) -> list[tuple[int, str, str]]: ...

    async def job_delete_finalized(
        self, state: JobState, finalized_before: datetime, limit: int
    ) -> int: ...

    async def queue_delete_stale(self, updated_before: datetime) -> list[str]: ...

    async def periodic_job_get_many(
        self, ids: Sequence[str], *, ex: Any = None
    ) -> dict[str, PeriodicJobState]: ...

    async def periodic_job_save(
        self,
        state: PeriodicJobState,
        expected: PeriodicJobState | None,
        now: datetime,
        *,
        ex: Any = None,
    ) -> bool:
        """Write ``state`` only if the stored row still equals ``expected`` (None: no row);
        False when it did not (another client moved it). Inside ``ex`` the row stays
        locked until the transaction ends; a claimant that waits for such a lock longer
        than a bound (2 s on PostgreSQL) gets False too."""
        ...

    def open_listener(self, channels: Sequence[str]) -> AbstractAsyncContextManager[Listener]: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
