"""The client: ``open_client`` and everything an application does with its queue."""

from __future__ import annotations

import logging
import os
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, final

import attrs
import trio

from ._codec import (
    encode_args,
    encode_metadata,
    row_to_job,
    row_to_job_with_args,
    sorted_args_json,
    unique_key,
    unique_states_bits,
)
from ._maintenance.periodic import PeriodicEnqueuer, PeriodicEnqueuerConfig
from ._runtime.dispatcher import Subscription
from ._runtime.failure import fatal_unwrapped
from ._runtime.notifier import NotifyLimiter
from ._runtime.startup import Startup
from ._runtime.tree import Runtime
from .config import ClientConfig, QueueConfig, args_types_by_kind, validate_queues
from .current import running_client
from .driver.postgres.driver import open_postgres_driver
from .driver.protocol import Driver, JobInsertParams, Row
from .errors import (
    JobNotFoundError,
    JobRunningError,
    TrioqueueError,
    UnknownJobKindError,
    ValidationError,
)
from .events import EventKind
from .job import (
    InsertOpts,
    Job,
    JobInsertResult,
    JobListParams,
    JobListResult,
    JobState,
    check_bigint,
    validate_queue_name,
)
from .middleware import InsertParams, insert_layers, run_insert_begin, run_insert_chain
from .periodic import PeriodicJobs
from .settings import WorkerSettings, merge_settings
from .transaction import Transaction
from .workers import Workers, args_kind

__all__ = ["Client", "JobCounts", "LeaderInfo", "QueueInfo", "open_client"]

log = logging.getLogger("trioqueue.client")

A = TypeVar("A")

InsertItem = Any
"""An args object, or an ``(args, InsertOpts | None)`` pair."""

_DEFAULT_OPTS = InsertOpts()


@final
@attrs.frozen
class QueueInfo:
    """One queue as stored, from :meth:`Client.queue_list`.

    A queue has a row once a client with that queue has run, or once it was paused.
    """

    name: str
    paused_at: datetime | None
    """When the queue was paused; None while it is not paused."""
    created_at: datetime
    updated_at: datetime
    """Bumped by every client working the queue; the queue cleaner deletes rows that
    stay untouched for a day (unless paused)."""
    available: int
    """Jobs of this queue waiting to run now."""
    running: int
    """Jobs of this queue that some client is running."""


@final
@attrs.frozen
class JobCounts:
    """How many jobs there are, from :meth:`Client.job_counts`: bounded work on any
    table size, so some numbers are estimates or floors (each says which)."""

    states: dict[JobState, int]
    """Jobs per state, every state present. Exact, except the states in ``estimated``."""
    estimated: frozenset[JobState]
    """Finalized states with more jobs than ``exact_up_to``: their count is the database's
    estimate (from its planner statistics), never below ``exact_up_to``."""
    exact_up_to: int
    """Finalized states are counted exactly up to this many jobs."""
    queues: dict[str, dict[JobState, int]]
    """Per queue, the exact count of each state that is not finalized (queues with such
    jobs only; states without jobs are left out)."""
    finalized_last_minute: dict[JobState, int]
    """Jobs that reached each finalized state in the last minute, up to ``recent_limit``."""
    finalized_last_hour: dict[JobState, int]
    """Jobs that reached each finalized state in the last hour, up to ``recent_limit``."""
    recent_limit: int
    """The recent counts stop here: a count equal to it means "at least"."""


@final
@attrs.frozen
class LeaderInfo:
    """The client that currently leads (runs maintenance), from :meth:`Client.leader_get`."""

    leader_id: str
    elected_at: datetime
    expires_at: datetime
    """Unless it renews its term before then, another client takes over."""


COUNT_EXACT_UP_TO = 10_000
"""Finalized states are counted exactly up to this many jobs, then estimated."""
RECENT_COUNT_LIMIT = 50_000
"""Recent throughput counts stop at this many jobs."""


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
        self._notify_limiter = NotifyLimiter(config.fetch_cooldown)
        self._kinds: dict[type[Any], str] = {}
        """Args types already checked, with their kind: the insert path's cache."""
        self._own_opts: dict[type[Any], bool] = {}
        """Whether an args type has ``insert_opts`` (most have not)."""
        self._decode_types = args_types_by_kind(config.args_types)
        """Args types to decode on read beside the workers' (``args_types``)."""
        self._insert_layers, self._insert_begins = insert_layers(config.middleware, config.hooks)
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
                prepare_insert=self._params,
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

    # ---------------------------------------------------------------- inserting

    def _args_type(self, kind: str) -> type[Any] | None:
        """The type a stored job of ``kind`` is decoded to: the workers', else one of
        ``args_types``; None (args stay the stored JSON object) for any other kind."""
        found = self._workers.args_type(kind) if self._workers is not None else None
        return found if found is not None else self._decode_types.get(kind)

    def _job(self, row: Row) -> Job[Any]:
        return row_to_job(row, self._args_type(row[1]))

    def _inserted(self, row: Row, args: Any, skipped: bool) -> JobInsertResult[Any]:
        """An insert's result. A new job carries the very args object inserted; a unique
        duplicate is the existing job, its args decoded as the inserted object's type."""
        if skipped:
            return JobInsertResult(row_to_job(row, self._args_type(row[1]) or type(args)), True)
        return JobInsertResult(row_to_job_with_args(row, args), False)

    def _split(self, item: InsertItem) -> tuple[Any, str, InsertOpts]:
        """An insert item's args, kind (checked) and opts (defaulted)."""
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValidationError("jobs", "each item must be args or an (args, opts) pair")
            args, opts = item
        else:
            args, opts = item, None
        args_type = type(args)
        kind = self._kinds.get(args_type)
        if kind is None:
            kind = args_kind(args_type)
            if self._workers is not None and len(self._workers) and not self._workers.get(kind):
                raise UnknownJobKindError(kind)
            self._kinds[args_type] = kind
        if opts is None:
            # Most args types have no insert_opts: remember that per type.
            has_own = self._own_opts.get(args_type)
            if has_own is None:
                has_own = self._own_opts[args_type] = hasattr(args_type, "insert_opts")
            own = getattr(args, "insert_opts", None) if has_own else None
            opts = own() if callable(own) else _DEFAULT_OPTS
        if not isinstance(opts, InsertOpts):
            raise ValidationError("opts", "must be an InsertOpts")
        return args, kind, opts

    def _params(self, item: InsertItem, now: datetime) -> JobInsertParams:
        args, kind, opts = self._split(item)
        args_json = encode_args(args)
        metadata_json = encode_metadata(opts.metadata) if opts.metadata else "{}"
        scheduled_at = opts.scheduled_at.astimezone(UTC) if opts.scheduled_at else now
        if opts.pending:
            state = JobState.PENDING
        elif scheduled_at > now:
            state = JobState.SCHEDULED
        else:
            state = JobState.AVAILABLE
        key = states = None
        if opts.unique is not None:
            sorted_json = sorted_args_json(args) if opts.unique.by_args else None
            key = unique_key(kind, sorted_json, opts, opts.unique, now)
            states = unique_states_bits(opts.unique.states)
        return JobInsertParams(
            args_json=args_json,
            kind=kind,
            max_attempts=opts.max_attempts or self._config.max_attempts,
            metadata_json=metadata_json,
            priority=opts.priority,
            queue=opts.queue,
            scheduled_at=scheduled_at,
            state=state,
            tags=tuple(opts.tags),
            unique_key=key,
            unique_states=states,
        )

    def _params_many(
        self, items: Iterable[InsertItem], now: datetime, noted: list[Any] | None = None
    ) -> Iterator[JobInsertParams]:
        """``_params`` of each item, lazily. An item whose args type and opts object (the
        same object, or none) an earlier item had gets that item's fields with its own
        args: the other fields depend on nothing else, unless a unique key (it may hash
        the args) or the args type's own ``insert_opts`` is involved, which are never
        shared. Saves most of the per-job work of a big batch. Each item's args object is
        appended to ``noted`` (if given) as it is read: a sequence may build its items
        as they are read, so they are read once."""
        # Keyed by id(opts), holding opts itself: a sequence may build its items as they
        # are read, and an id is only unique while its object lives.
        shared: dict[tuple[type[Any], int], tuple[object, tuple[Any, ...]]] = {}
        make = JobInsertParams._make
        for item in items:
            if isinstance(item, tuple):
                if len(item) != 2:
                    yield self._params(item, now)  # raises
                    continue
                args, opts = item
            else:
                args, opts = item, None
            if noted is not None:
                noted.append(args)
            key = (type(args), id(opts))
            entry = shared.get(key)
            if entry is not None and entry[0] is opts:
                yield make((encode_args(args), *entry[1]))
                continue
            p = self._params(item, now)
            if p.unique_key is None and (opts is not None or not self._own_opts[key[0]]):
                shared[key] = (opts, p[1:])
            yield p

    @staticmethod
    def _check_items(items: object) -> None:
        if isinstance(items, str | bytes) or not isinstance(items, Sequence):
            raise ValidationError("jobs", "must be a list of args or (args, opts) pairs")
        if not items:
            raise ValidationError("jobs", "insert_many needs at least one job")

    def _prepare(
        self, items: Sequence[InsertItem], noted: list[Any] | None = None
    ) -> tuple[list[JobInsertParams], datetime]:
        self._check_items(items)
        now = self._now()
        return list(self._params_many(items, now, noted)), now

    async def _through_middleware(
        self,
        items: Sequence[InsertItem],
        write: Callable[[list[JobInsertParams], list[Any], datetime], Awaitable[A]],
    ) -> A:
        """Insert ``items`` through the insert middleware and ``insert_begin`` hooks: what
        the middleware passes on is validated and encoded, then the hooks see it, then
        ``write`` writes it (with the args objects passed on). Only used when the client
        has middleware or hooks."""
        self._check_items(items)
        now = self._now()
        first: list[InsertParams] = []
        for item in items:
            args, _, opts = self._split(item)
            first.append(
                InsertParams(
                    args=args,
                    queue=opts.queue,
                    priority=opts.priority,
                    max_attempts=opts.max_attempts or self._config.max_attempts,
                    scheduled_at=opts.scheduled_at.astimezone(UTC) if opts.scheduled_at else now,
                    tags=opts.tags,
                    metadata=dict(opts.metadata or {}),
                    pending=opts.pending,
                    unique=opts.unique,
                )
            )

        async def inner(params: list[InsertParams]) -> A:
            if not isinstance(params, list) or not params:
                raise ValidationError("jobs", "insert middleware must pass on a non-empty list")
            encoded = []
            for p in params:
                if not isinstance(p, InsertParams):
                    raise ValidationError("jobs", "insert middleware must pass on InsertParams")
                encoded.append(self._params((p.args, p.opts()), now))
            await run_insert_begin(self._insert_begins, params)
            return await write(encoded, [p.args for p in params], now)

        return await run_insert_chain(self._insert_layers, first, inner)

    def _notify_queues(self, params: Iterable[JobInsertParams]) -> list[str]:
        queues = sorted({p.queue for p in params if p.state is JobState.AVAILABLE})
        return self._notify_limiter.take(queues) if queues else []

    async def _insert_many(
        self, items: Sequence[InsertItem], tx: Transaction | None
    ) -> list[JobInsertResult[Any]]:
        if self._insert_layers or self._insert_begins:
            return await self._through_middleware(
                items, lambda ps, args, now: self._write(ps, args, now, tx)
            )
        args: list[Any] = []
        params, now = self._prepare(items, args)
        return await self._write(params, args, now, tx)

    async def _write(
        self,
        params: list[JobInsertParams],
        args: list[Any],
        now: datetime,
        tx: Transaction | None,
    ) -> list[JobInsertResult[Any]]:
        # Two jobs of one batch with the same unique key: only the first is inserted.
        first_of_key: dict[bytes, int] = {}
        to_insert: list[JobInsertParams] = []
        slots: list[int] = []
        for p in params:
            if p.unique_key is not None and p.unique_key in first_of_key:
                slots.append(-1 - first_of_key[p.unique_key])
                continue
            if p.unique_key is not None:
                first_of_key[p.unique_key] = len(to_insert)
            slots.append(len(to_insert))
            to_insert.append(p)
        rows = await self._driver.job_insert_many(
            to_insert,
            self._notify_queues(to_insert),
            now,
            ex=tx.connection if tx is not None else None,
        )
        results: list[JobInsertResult[Any]] = []
        for slot, given in zip(slots, args, strict=True):
            if slot >= 0:
                row, skipped = rows[slot]
                results.append(self._inserted(row, given, skipped))
            else:
                row, _ = rows[-1 - slot]
                results.append(self._inserted(row, given, True))
        return results

    async def insert(self, args: Any, opts: InsertOpts | None = None) -> JobInsertResult[Any]:
        """Insert one job. A unique duplicate returns the existing job, flagged.

        Raises ValidationError (nothing written) for bad input; DatabaseError on failure.
        """
        return await self._insert_one(args, opts, None)

    async def insert_tx(
        self, tx: Transaction, args: Any, opts: InsertOpts | None = None
    ) -> JobInsertResult[Any]:
        """Insert one job inside ``tx``: it exists only if ``tx`` commits."""
        return await self._insert_one(args, opts, tx)

    async def _insert_one(
        self, args: Any, opts: InsertOpts | None, tx: Transaction | None
    ) -> JobInsertResult[Any]:
        """``_insert_many`` of one job, without a batch's bookkeeping."""
        if self._insert_layers or self._insert_begins:
            return (await self._insert_many([(args, opts)], tx))[0]
        now = self._now()
        params = [self._params((args, opts), now)]
        rows = await self._driver.job_insert_many(
            params,
            self._notify_queues(params),
            now,
            ex=tx.connection if tx is not None else None,
        )
        row, skipped = rows[0]
        return self._inserted(row, args, skipped)

    async def insert_many(self, jobs: Sequence[InsertItem]) -> list[JobInsertResult[Any]]:
        """Insert a batch in one statement; results are in input order."""
        return await self._insert_many(jobs, None)

    async def insert_many_tx(
        self, tx: Transaction, jobs: Sequence[InsertItem]
    ) -> list[JobInsertResult[Any]]:
        """Insert a batch inside ``tx``."""
        return await self._insert_many(jobs, tx)

    async def _insert_fast(self, jobs: Sequence[InsertItem], tx: Transaction | None) -> int:
        if self._insert_layers or self._insert_begins:
            return await self._through_middleware(
                jobs, lambda ps, _, now: self._write_fast(ps, now, tx)
            )
        if tx is not None:
            # The caller's transaction: every job is checked before anything is sent, so
            # a bad one raises without aborting that transaction.
            checked, at = self._prepare(jobs)
            return await self._write_fast(checked, at, tx)
        # A transaction of our own: each job is checked and encoded as the COPY streams,
        # so the server ingests the first jobs while the later ones are prepared. A bad
        # job aborts the COPY and the transaction: nothing is written, and its
        # ValidationError propagates as usual.
        self._check_items(jobs)
        now = self._now()
        sent: list[JobInsertParams] = []

        def stream() -> Iterator[JobInsertParams]:
            for p in self._params_many(jobs, now):
                sent.append(p)
                yield p

        return await self._driver.job_insert_fast(stream(), lambda: self._notify_queues(sent), now)

    async def _write_fast(
        self, params: list[JobInsertParams], now: datetime, tx: Transaction | None
    ) -> int:
        return await self._driver.job_insert_fast(
            params,
            self._notify_queues(params),
            now,
            ex=tx.connection if tx is not None else None,
        )

    async def insert_many_fast(self, jobs: Sequence[InsertItem]) -> int:
        """Insert a batch with COPY, the fastest way; returns how many were inserted.

        No jobs come back. A unique job that collides with a live one fails the whole
        batch with DatabaseError (nothing is inserted); use ``insert_many`` for batches
        of unique jobs.
        """
        return await self._insert_fast(jobs, None)

    async def insert_many_fast_tx(self, tx: Transaction, jobs: Sequence[InsertItem]) -> int:
        """``insert_many_fast`` inside ``tx``."""
        return await self._insert_fast(jobs, tx)

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
        return [QueueInfo(*row) for row in await self._driver.queue_list()]

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
        return None if row is None else LeaderInfo(*row)

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
            "completer": rt.completer.statistics() if rt.completer else None,
            "dispatcher": rt.dispatcher.statistics(),
        }


@asynccontextmanager
async def open_client(
    database_url: str | None = None,
    *,
    workers: Workers | None = None,
    queues: Mapping[str, QueueConfig] | None = None,
    driver: Driver | None = None,
    settings: WorkerSettings | None = None,
    **config: Any,
) -> AsyncIterator[Client]:
    """Open a client for the block; with ``queues`` it also works jobs until the block ends.

    Storage: ``driver`` when given (for example ``trioqueue.MemoryDriver()``); else
    ``database_url`` — a PostgreSQL URL, or ``memory://NAME`` for the in-process memory
    store of that name; ``None`` means ``$TRIOQUEUE_DATABASE_URL``, else a private
    PostgreSQL server started (and migrated) for the block.

    ``settings``: a ``WorkerSettings`` holding workers, queues and options; ``workers``,
    ``queues`` (when not None) and option keywords given beside it win.

    Leaving the block is a soft stop (running jobs finish); cancellation from outside is a
    hard stop whose final writes are shielded for up to ``shutdown_timeout`` seconds.
    Config errors raise ValidationError before anything starts.

    Start-up (connecting, the schema check, registering the queues) retries transient
    database errors (``DatabaseError.transient``: a lost or refused connection, a server
    restarting, too many connections) with backoff for up to ``startup_timeout`` seconds,
    logging each retry at WARNING, then raises a DatabaseError naming the step, the time
    tried and the last error; other errors (a failed login, a missing database, a schema
    needing ``trioqueue migrate``) are raised at once. Cancelled while it waits to retry,
    it just cancels.
    """
    workers, queues, config = merge_settings(settings, workers, queues, config)
    cfg = ClientConfig(**config)
    queue_configs = validate_queues(queues)
    if workers is not None and not isinstance(workers, Workers):
        raise ValidationError("workers", "must be a trioqueue.Workers")
    if queue_configs and (workers is None or not len(workers)):
        raise ValidationError("workers", "a client with queues needs at least one worker")
    if driver is not None:
        if database_url is not None:
            raise ValidationError("driver", "give a driver or a database_url, not both")
        async with _run_client(driver, cfg, workers, queue_configs) as client:
            yield client
        return

    from .embedded import open_embedded_server, resolve_database_url

    url = resolve_database_url(database_url)
    if url is not None and url.startswith("memory://"):
        from .driver.memory import memory_driver_for_url

        async with _run_client(memory_driver_for_url(url), cfg, workers, queue_configs) as client:
            yield client
        return
    if url is None:
        async with open_embedded_server() as embedded_url:
            from .migrations import migrate

            await migrate(embedded_url)
            async with _open_postgres(embedded_url, cfg, workers, queue_configs) as client:
                yield client
        return
    async with _open_postgres(url, cfg, workers, queue_configs) as client:
        yield client


@asynccontextmanager
async def _open_postgres(
    url: str,
    cfg: ClientConfig,
    workers: Workers | None,
    queues: Mapping[str, QueueConfig],
) -> AsyncIterator[Client]:
    pool_size = int(os.environ.get("TRIOQUEUE_POOL_SIZE", "0")) or 8 + 2 * len(queues)
    # Only a client with queues LISTENs (its notifier); the driver checks at once that
    # no pooler is in the way of that or of prepared statements.
    listen = bool(queues) and not cfg.poll_only
    # Start-up retries transient faults within one startup_timeout, from here on.
    startup = Startup(cfg.startup_timeout)
    async with (
        startup.entered(
            "connecting to the database",
            lambda: open_postgres_driver(
                url, max_size=pool_size, prepare=cfg.prepared_statements, listen=listen
            ),
        ) as driver,
        _run_client(driver, cfg, workers, queues, startup) as client,
    ):
        yield client


@asynccontextmanager
async def _run_client(
    driver: Driver,
    cfg: ClientConfig,
    workers: Workers | None,
    queues: Mapping[str, QueueConfig],
    startup: Startup | None = None,
) -> AsyncIterator[Client]:
    """Check the schema, then run the client (and its runtime, if it has queues).

    The start-up's database steps retry transient errors under ``startup`` (a fresh
    budget of ``startup_timeout`` when None); a schema that is too old fails at once.
    """
    from .migrations import latest_version

    if startup is None:
        startup = Startup(cfg.startup_timeout)
    version = await startup.retry("checking the schema version", driver.schema_version)
    if version < latest_version():
        raise TrioqueueError(
            f"the database schema is at version {version}, this trioqueue needs "
            f"{latest_version()}: run `trioqueue migrate` (or `await trioqueue.migrate(url)`)"
        )
    client = Client(driver, cfg, workers, queues, driver.clock)
    if client._runtime is None:
        # An insert-only client enqueues its periodic jobs too: those it was opened with
        # and any added later (with none, its enqueuer just waits for a change).
        enqueuer = PeriodicEnqueuer(
            driver,
            driver.clock,
            client.periodic_jobs,
            client._params,
            PeriodicEnqueuerConfig(max_sleep=cfg.leader_interval),
        )

        async def enqueue() -> None:
            running_client.set(client)  # for the args functions; this task's context only
            await enqueuer.run()

        # The block's own exception comes out as itself, as from a client without the
        # enqueuer's nursery: it is held while the nursery closes, then raised, also when
        # the nursery ends with only the Cancelled of a scope around the client.
        raised: BaseException | None = None
        others: BaseExceptionGroup[BaseException] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(enqueue)
                try:
                    yield client
                except BaseException as exc:  # raised again below
                    raised = exc
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _, others = group.split(trio.Cancelled)
            # A Cancelled in the block that the enqueuer's failure caused (its nursery
            # cancelled the block) is not the block's own: the group says what happened.
            if raised is None or (others is not None and isinstance(raised, trio.Cancelled)):
                raise
        if raised is not None and others is not None:
            raise BaseExceptionGroup(
                "the client's block and its periodic enqueuer failed",
                [
                    raised,
                    *others.exceptions,
                ],
            )
        if raised is not None:
            raise raised
        return
    # A job's KeyboardInterrupt or SystemExit stops the client once its outcome is written
    # (docs/failure-modes.md), and comes out as itself, not nested in nursery groups; so
    # does the DatabaseError a start-up step (registering the queues) failed with.
    with fatal_unwrapped(), startup.failure_unwrapped():
        async with trio.open_nursery() as nursery:
            await nursery.start(client._runtime.run, startup)
            try:
                yield client
            finally:
                client._runtime.soft_stop()
