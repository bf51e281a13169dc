"""`Client`: what an application does with its queue once `open_client` made one.

Inserting (each method hands its items to the client's `InsertPipeline`), reading and
managing jobs, pausing and listing queues, counts, events and stopping. A client with
queues also owns the `Runtime` that works them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, final

import trio

from .._codec import row_to_job
from .._insert import InsertBuilder, InsertItem
from .._runtime.dispatcher import Subscription
from .._runtime.tree import Runtime
from ..config import ClientConfig, QueueConfig, args_types_by_kind
from ..current import running_client
from ..driver.protocol import Driver, JobRow
from ..errors import JobNotFoundError, JobRunningError, TrioqueueError, ValidationError
from ..events import EventKind
from ..job import (
    MAX_LIST_LIMIT,
    InsertOpts,
    Job,
    JobInsertResult,
    JobListParams,
    JobListResult,
    JobState,
    check_bigint,
    validate_queue_name,
    validate_workflow_id,
)
from ..periodic import PeriodicJobs
from ..transaction import Transaction
from ..workers import Workers
from ..workflow import Workflow
from ._info import (
    COUNT_EXACT_UP_TO,
    RECENT_COUNT_LIMIT,
    JobCounts,
    LeaderInfo,
    QueueInfo,
    leader_info,
    queue_info,
)
from ._pipeline import InsertPipeline
from ._wait import JobWaits

__all__ = ["Client"]


@final
class Client:
    """A connection to the job queue; made by :func:`open_client`, never directly.

    Every method that talks to the database is a checkpoint. Unless it says otherwise, a
    method cancelled part-way has either fully happened or not at all (each runs as one
    statement or one transaction).
    """

    def __init__(
        self,
        driver: Driver,
        config: ClientConfig,
        workers: Workers | None,
        queues: Mapping[str, QueueConfig],
        now: Callable[[], datetime],
    ) -> None:
        self._driver = driver
        self._config = config
        self._workers = workers
        self._queues = dict(queues)
        self._now = now
        self._inserts = InsertBuilder(workers, max_attempts=config.max_attempts)
        """Validates and encodes every insert: this client's, and its periodic runs'."""
        self._decode_types = args_types_by_kind(config.args_types)
        """Args types to decode on read beside the workers' (``args_types``)."""
        self._pipeline = InsertPipeline(driver, config, self._inserts, now, self._args_type)
        self._runtime: Runtime | None = None
        self._periodic_jobs = PeriodicJobs(config.periodic_jobs)
        if queues:
            assert workers is not None
            self._runtime = Runtime(
                driver,
                config,
                workers,
                self._queues,
                now,
                periodic_jobs=self._periodic_jobs,
                inserts=self._inserts,
                client=self,
            )

    def __repr__(self) -> str:
        return f"<trioqueue.Client id={self._config.id!r} queues={sorted(self._queues)!r}>"

    @property
    def id(self) -> str:
        return self._config.id

    @property
    def config(self) -> ClientConfig:
        return self._config

    @property
    def driver(self) -> Driver:
        return self._driver

    @property
    def periodic_jobs(self) -> PeriodicJobs:
        """This client's periodic jobs: ``add(job) -> handle``, ``remove(handle)``,
        ``clear()``, iteration and ``len``. Changes take effect at once.

        Every client enqueues its own periodic jobs, leader or not, and each run is
        inserted once however many clients have the job. A client with queues always
        takes part; an insert-only client only when it was opened with ``periodic_jobs``.
        """
        return self._periodic_jobs

    @property
    def is_leader(self) -> bool:
        """Whether this client is the leader, which runs the maintenance services
        (scheduler, rescuer, cleaners). Insert-only clients never lead."""
        return self._runtime is not None and self._runtime.is_leader

    # ---------------------------------------------------------------- decoding

    def _args_type(self, kind: str) -> type[Any] | None:
        """The type a stored job of ``kind`` is decoded to: the workers', else one of
        ``args_types``; None (args stay the stored JSON object) for any other kind."""
        found = self._workers.args_type(kind) if self._workers is not None else None
        return found if found is not None else self._decode_types.get(kind)

    def _job(self, row: JobRow) -> Job[Any]:
        return row_to_job(row, self._args_type(row.kind))

    # ---------------------------------------------------------------- inserting

    async def insert(self, args: Any, opts: InsertOpts | None = None) -> JobInsertResult[Any]:
        """Insert one job. A unique duplicate returns the existing job, flagged.

        Raises ValidationError (nothing written) for bad input; DatabaseError on failure.
        """
        return await self._pipeline.one(args, opts, None)

    async def insert_tx(
        self, tx: Transaction, args: Any, opts: InsertOpts | None = None
    ) -> JobInsertResult[Any]:
        """Insert one job inside ``tx``: it exists only if ``tx`` commits."""
        return await self._pipeline.one(args, opts, tx)

    async def insert_many(self, jobs: Sequence[InsertItem]) -> list[JobInsertResult[Any]]:
        """Insert a batch in one statement; results are in input order."""
        return await self._pipeline.many(jobs, None)

    async def insert_many_tx(
        self, tx: Transaction, jobs: Sequence[InsertItem]
    ) -> list[JobInsertResult[Any]]:
        """Insert a batch inside ``tx``."""
        return await self._pipeline.many(jobs, tx)

    async def insert_many_fast(self, jobs: Sequence[InsertItem]) -> int:
        """Insert a batch with COPY, the fastest way; returns how many were inserted.

        No jobs come back. A unique job that collides with a live one fails the whole
        batch with DatabaseError (nothing is inserted); use ``insert_many`` for batches
        of unique jobs.
        """
        return await self._pipeline.fast(jobs, None)

    async def insert_many_fast_tx(self, tx: Transaction, jobs: Sequence[InsertItem]) -> int:
        """``insert_many_fast`` inside ``tx``."""
        return await self._pipeline.fast(jobs, tx)

    async def insert_workflow(self, wf: Workflow) -> dict[str, Job[Any]]:
        """Insert every task of ``wf`` in one transaction; returns task name -> Job.

        Tasks with deps are inserted ``pending``. A task whose unique opts match a live
        job comes back as that job, and its dependents wait for it. Raises
        ValidationError (nothing written) for an empty workflow, a workflow id already
        used, or any bad task.
        """
        return await self._pipeline.workflow(wf, None)

    async def insert_workflow_tx(self, tx: Transaction, wf: Workflow) -> dict[str, Job[Any]]:
        """``insert_workflow`` inside ``tx``: the tasks exist only if ``tx`` commits."""
        return await self._pipeline.workflow(wf, tx)

    async def workflow_get(self, workflow_id: str) -> dict[str, Job[Any]]:
        """The tasks of a workflow, task name -> Job, in the order they were added
        (empty for an unknown workflow)."""
        validate_workflow_id("workflow_id", workflow_id)
        found: dict[str, Job[Any]] = {}
        after: int | None = None
        while True:
            params = JobListParams(workflow_id=workflow_id, limit=MAX_LIST_LIMIT, after=after)
            rows = await self._driver.job_list(params)
            for row in rows:
                found[row.workflow_task or str(row.id)] = self._job(row)
            if len(rows) < MAX_LIST_LIMIT:
                return found
            after = rows[-1].id

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Open a transaction on a pooled connection for the block.

        Commits when the block exits normally; rolls back (shielded, with a deadline) on
        an exception or cancellation.
        """
        async with self._driver.transaction() as conn:
            yield Transaction(conn, self._driver)

    # ---------------------------------------------------------------- managing jobs

    @staticmethod
    def _check_id(job_id: object) -> int:
        return check_bigint("job_id", job_id)

    async def job_get(self, job_id: int) -> Job[Any]:
        """The job with this id. Raises JobNotFoundError."""
        row = await self._driver.job_get(self._check_id(job_id))
        if row is None:
            raise JobNotFoundError(job_id)
        return self._job(row)

    async def job_get_tx(self, tx: Transaction, job_id: int) -> Job[Any]:
        row = await self._driver.job_get(self._check_id(job_id), ex=tx.connection)
        if row is None:
            raise JobNotFoundError(job_id)
        return self._job(row)

    async def job_list(self, params: JobListParams | None = None) -> JobListResult:
        """One page of jobs matching ``params``, ordered by id."""
        params = params or JobListParams()
        if not isinstance(params, JobListParams):
            raise ValidationError("params", "must be a JobListParams")
        rows = await self._driver.job_list(params)
        jobs = [self._job(r) for r in rows]
        return JobListResult(jobs, jobs[-1].id if jobs else None)

    async def job_cancel(self, job_id: int) -> Job[Any]:
        """Cancel a job. Queued jobs become ``cancelled`` now; a running job is cancelled
        by the client running it (its worker's scope is cancelled) and ends
        ``cancelled``; a finalized job is returned unchanged. Raises JobNotFoundError."""
        row = await self._driver.job_cancel(self._check_id(job_id), self._now())
        if row is None:
            raise JobNotFoundError(job_id)
        job = self._job(row)
        if job.state is JobState.RUNNING and self._runtime is not None:
            self._runtime.cancel_running_job(job.id, job.queue)
        return job

    async def job_retry(self, job_id: int) -> Job[Any]:
        """Make a job available to run now (a running job is left alone and returned).
        A job that used all its attempts gets one more. Raises JobNotFoundError."""
        row = await self._driver.job_retry(self._check_id(job_id), self._now())
        if row is None:
            raise JobNotFoundError(job_id)
        return self._job(row)

    async def job_delete(self, job_id: int) -> Job[Any]:
        """Delete a job; returns it as it was. Raises JobNotFoundError, or
        JobRunningError for a running job."""
        row = await self._driver.job_delete(self._check_id(job_id))
        if row is None:
            state = await self._driver.job_state(job_id)
            if state is None:
                raise JobNotFoundError(job_id)
            raise JobRunningError(job_id, "delete")
        return self._job(row)

    _waits: JobWaits | None = None
    """The service behind `job_wait`; `open_client` sets it for the client's block."""

    async def job_wait(self, job_id: int) -> Job[Any]:
        """Wait until the job is final — ``completed``, ``discarded`` or ``cancelled``,
        by any client — and return it as it then is (``job.state``, ``job.output``).

        Returns after one read (and one statement marking it as waited for) for a job
        already final. Raises ValidationError (field
        ``job_id``) for an id that is not a whole number a bigint holds, and
        JobNotFoundError for an id with no job, or when the job is deleted while waited
        for.

        There is no timeout: bound the wait with the caller's cancel scope
        (``trio.fail_after``, ``trio.move_on_after``). Cancelled, the call just stops
        waiting: its registration is removed, nothing is written, and the job and every
        other waiter are untouched.

        Woken by the completion notifications (``tq_final``) that the write ending the job
        sends (the completer's only for jobs marked as waited for, which this does
        first); all of a client's waiters share one LISTEN connection (the runtime's, or
        one opened at the first wait) and one read per wake-up. In ``poll_only`` mode
        (no LISTEN, as behind a transaction pooler) every waited job is re-read every
        ``fetch_poll_interval`` seconds instead.

        ``client.stop()`` does not end waits: they go on until the client's ``async
        with`` block ends. A call still waiting then (from a task outside the block)
        raises TrioqueueError saying the client closed, as does a call made after.
        """
        job_id = self._check_id(job_id)
        if self._waits is None:
            raise TrioqueueError("job_wait needs a client made by open_client")
        return self._job(await self._waits.wait(job_id))

    # ---------------------------------------------------------------- queues

    def _check_queue(self, name: object) -> str:
        if name == "*":
            return "*"
        return validate_queue_name("queue", name)

    async def queue_pause(self, name: str) -> None:
        """Pause a queue (``"*"``: every known queue): no client fetches from it until it
        is resumed. Running jobs carry on. Survives restarts."""
        changed = await self._driver.queue_pause(self._check_queue(name), self._now())
        if self._runtime is not None and self._config.poll_only:
            for queue in changed:
                self._runtime.queue_changed("pause", queue)

    async def queue_resume(self, name: str) -> None:
        """Resume a paused queue (``"*"``: every paused queue)."""
        changed = await self._driver.queue_resume(self._check_queue(name), self._now())
        if self._runtime is not None and self._config.poll_only:
            for queue in changed:
                self._runtime.queue_changed("resume", queue)

    async def queue_list(self) -> list[QueueInfo]:
        """Every known queue, ordered by name, with its available and running job counts.

        One statement: the rows and counts are one consistent snapshot. A checkpoint.
        """
        return [queue_info(row) for row in await self._driver.queue_list()]

    # ---------------------------------------------------------------- statistics

    async def job_counts(self) -> JobCounts:
        """Counts of jobs per state and queue, and how many finished recently.

        Bounded on any table size: live states are counted exactly from the fetch index;
        finalized states exactly up to ``COUNT_EXACT_UP_TO`` jobs, else estimated from the
        database's statistics; recent counts stop at ``RECENT_COUNT_LIMIT``. Four
        statements, so the numbers are not one snapshot. A checkpoint; reads only.
        """
        now = self._now()
        states = dict.fromkeys(JobState, 0)
        queues: dict[str, dict[JobState, int]] = {}
        for queue, state, count in await self._driver.job_count_live():
            queues.setdefault(queue, {})[JobState(state)] = count
            states[JobState(state)] += count
        estimated: set[JobState] = set()
        for state, capped, estimate in await self._driver.job_count_finalized(COUNT_EXACT_UP_TO):
            if capped is not None and capped < COUNT_EXACT_UP_TO:
                states[JobState(state)] = capped
            else:
                estimated.add(JobState(state))
                states[JobState(state)] = max(capped or 0, estimate or 0, COUNT_EXACT_UP_TO)

        async def recent(seconds: float) -> dict[JobState, int]:
            since = now - timedelta(seconds=seconds)
            found = await self._driver.job_count_finalized_since(since, RECENT_COUNT_LIMIT)
            return {JobState(s): n for s, n in sorted(found.items())}

        return JobCounts(
            states=states,
            estimated=frozenset(estimated),
            exact_up_to=COUNT_EXACT_UP_TO,
            queues=dict(sorted(queues.items())),
            finalized_last_minute=await recent(60),
            finalized_last_hour=await recent(3600),
            recent_limit=RECENT_COUNT_LIMIT,
        )

    async def leader_get(self) -> LeaderInfo | None:
        """The current leader as stored, or None when nobody leads (a term that has
        expired is still returned until another client takes over). A checkpoint."""
        row = await self._driver.leader_get()
        return None if row is None else leader_info(row)

    # ---------------------------------------------------------------- events and stopping

    @asynccontextmanager
    async def subscribe(self, *kinds: EventKind, buffer: int = 1000) -> AsyncIterator[Subscription]:
        """Receive events of ``kinds`` for the block, as an async iterator that ends when
        the client stops. A full buffer drops events for this subscriber only (counted in
        ``subscription.dropped``); the client never waits for a subscriber."""
        if self._runtime is None:
            raise TrioqueueError("an insert-only client (no queues) has no events to subscribe to")
        async with self._runtime.dispatcher.subscribe(kinds, buffer) as sub:
            yield sub

    async def stop(self, *, cancel: bool = False) -> None:
        """Stop working jobs and wait until the client has stopped.

        Soft stop: no more fetching, running jobs finish, outcomes are written,
        subscriptions end. ``cancel=True`` (hard stop): running jobs are cancelled and go
        back to ``available``. The client can still insert and manage jobs afterwards,
        until its ``async with`` block ends. If this call is cancelled, the stop goes on.

        Called from inside this client's own runtime (a job, its middleware or hooks, the
        error handler: where ``current_client()`` is this client), it starts the stop and
        returns at once, since waiting would wait for the caller itself. A soft stop then
        lets the calling job finish; a hard stop cancels it too (it goes back to
        ``available``, and runs again on the next client that fetches it).
        """
        if self._runtime is None:
            await trio.lowlevel.checkpoint()
            return
        if cancel:
            self._runtime.hard_stop()
        else:
            self._runtime.soft_stop()
        if running_client.get(None) is self:
            await trio.lowlevel.checkpoint()
            return
        await self._runtime.done.wait()

    def statistics(self) -> dict[str, Any]:
        """Counters of the running parts, for logs and dashboards."""
        rt = self._runtime
        if rt is None:
            return {}
        return {
            "producers": {q: p.statistics() for q, p in rt.producers.items()},
            "completer": rt.completer.statistics(),
            "dispatcher": rt.dispatcher.statistics(),
        }
