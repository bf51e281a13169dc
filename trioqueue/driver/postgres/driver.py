"""The PostgreSQL driver: the Driver protocol over a pool of trio-native connections."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar, final, overload

import psycopg
import trio
from psycopg.rows import RowMaker

from ...errors import DatabaseError
from ...job import JobListParams, JobState
from ...limits import LimitedFetch, QueueLimits
from ..protocol import (
    CONTROL_CHANNEL,
    JobInsertParams,
    JobOutcome,
    JobRescue,
    JobRow,
    LeaderRow,
    Notification,
    PeriodicJobState,
    QueueRow,
    WorkflowTaskParams,
    WrittenRow,
)
from .arrays import int8_array, text_array
from .connection import PgConnection
from .failures import FAILURES, database_error, wrapped
from .inserts import copy_jobs, insert_arrays
from .limits import limited_fetch, queue_row
from .pool import PgPool, open_pool
from .pooler import check_pooler
from .queries import QUERIES
from .statements import (
    inserted_row,
    job_list_statement,
    job_row,
    outcome_statement,
)
from .workflows import insert_workflow

__all__ = ["PgListener", "PostgresDriver", "open_postgres_driver"]

T = TypeVar("T")
RowT = TypeVar("RowT")


@final
class PgListener:
    """A LISTEN connection of its own (never from the pool)."""

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn

    async def wait(self) -> list[Notification]:
        with wrapped("waiting for notifications"):
            notes = await self._conn.wait_notifies()
        return [Notification(n.channel, n.payload) for n in notes]


@final
class PostgresDriver:
    """Every storage operation trioqueue needs, as one SQL statement where possible.

    Operations that take ``ex`` run on that connection (the caller's transaction);
    otherwise they borrow a pooled connection for the one statement. Cancellation of an
    operation cancels its statement on the server; a statement outside a transaction is
    then either fully applied or not at all.
    """

    def __init__(self, pool: PgPool, conninfo: str, *, prepare: bool = True) -> None:
        """``prepare``: run the hot statements as named prepared statements (faster); turn
        it off behind a transaction-pooling proxy, which cannot keep them."""
        self._pool = pool
        self._conninfo = conninfo
        self._prepare = prepare

    @property
    def pool(self) -> PgPool:
        return self._pool

    def clock(self) -> datetime:
        """The wall clock: clients in several processes share the database's notion of
        time through it (keep their clocks in sync)."""
        return datetime.now(UTC)

    async def schema_version(self) -> int:
        with wrapped("checking the schema version"):
            async with self._pool.acquire() as conn:
                if not await conn.fetchval("SELECT to_regclass('tq_migration') IS NOT NULL"):
                    return 0  # nothing was ever migrated here
                version = await conn.fetchval("SELECT max(version) FROM tq_migration")
                return 0 if version is None else int(version)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgConnection]:
        async with self._pool.acquire() as conn:
            with wrapped("running a transaction"):
                async with conn.transaction():
                    yield conn

    async def _in_transaction(
        self, doing: str, run: Callable[[PgConnection], Awaitable[T]], ex: Any
    ) -> T:
        """``run(conn)`` inside ``ex``'s transaction, or else a transaction of its own."""
        with wrapped(doing):
            if ex is not None:
                return await run(ex)
            async with self._pool.acquire() as conn, conn.transaction():
                return await run(conn)

    @overload
    async def _fetch(
        self, doing: str, name: str, params: Sequence[Any], ex: Any
    ) -> list[tuple[Any, ...]]: ...

    @overload
    async def _fetch(
        self, doing: str, name: str, params: Sequence[Any], ex: Any, make_row: RowMaker[RowT]
    ) -> list[RowT]: ...

    async def _fetch(
        self,
        doing: str,
        name: str,
        params: Sequence[Any],
        ex: Any,
        make_row: RowMaker[Any] = tuple,
    ) -> list[Any]:
        """The rows of statement ``name``, each made by ``make_row`` (default: a tuple)."""
        # What `wrapped` does, spelled out: this is every job's path (insert, claim, outcome).
        query = QUERIES[name]
        try:
            if ex is not None:
                return await ex.fetch(query, params, prepare=self._prepare, make_row=make_row)  # type: ignore[no-any-return]
            return await self._pool.fetch(query, params, prepare=self._prepare, make_row=make_row)
        except FAILURES as exc:
            raise database_error(doing, exc) from exc

    @overload
    async def _fetchrow(
        self, doing: str, name: str, params: Sequence[Any], ex: Any
    ) -> tuple[Any, ...] | None: ...

    @overload
    async def _fetchrow(
        self, doing: str, name: str, params: Sequence[Any], ex: Any, make_row: RowMaker[RowT]
    ) -> RowT | None: ...

    async def _fetchrow(
        self,
        doing: str,
        name: str,
        params: Sequence[Any],
        ex: Any,
        make_row: RowMaker[Any] = tuple,
    ) -> Any:
        rows = await self._fetch(doing, name, params, ex, make_row)
        return rows[0] if rows else None

    async def job_insert_many(
        self,
        params: Sequence[JobInsertParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[JobRow, bool]]:
        with wrapped("inserting jobs"):
            return await self._job_insert_many(params, notify_queues, now, ex)

    async def _job_insert_many(
        self,
        params: Sequence[JobInsertParams],
        notify_queues: Sequence[str],
        now: datetime,
        ex: Any,
    ) -> list[tuple[JobRow, bool]]:
        if len(params) == 1 and len(notify_queues) <= 1:
            p = params[0]
            one: list[Any] = [
                p.args_json,
                p.kind,
                p.max_attempts,
                p.metadata_json,
                p.priority,
                p.queue,
                p.scheduled_at,
                p.state.value,
                text_array(p.tags),
            ]
            if p.unique_key is None and not notify_queues:
                rows = await self._fetch(
                    "inserting a job", "job_insert_one_plain", [*one, now], ex, inserted_row
                )
            else:
                one += [
                    p.unique_key,
                    p.unique_states,
                    now,
                    notify_queues[0] if notify_queues else None,
                ]
                rows = await self._fetch("inserting a job", "job_insert_one", one, ex, inserted_row)
        else:
            args = [*insert_arrays(params), now, text_array(list(notify_queues))]
            rows = await self._fetch("inserting jobs", "job_insert_many", args, ex, inserted_row)
        if len(rows) != len(params):
            raise DatabaseError(
                "inserting jobs",
                RuntimeError(f"expected {len(params)} rows back, got {len(rows)}"),
            )
        return rows

    async def job_insert_fast(
        self,
        params: Iterable[JobInsertParams],
        notify_queues: Sequence[str] | Callable[[], Sequence[str]],
        now: datetime,
        *,
        ex: Any = None,
    ) -> int:
        async def run(conn: PgConnection) -> int:
            return await copy_jobs(conn, params, notify_queues, now)

        return await self._in_transaction("inserting jobs with COPY", run, ex)

    async def job_insert_workflow(
        self,
        workflow_id: str,
        tasks: Sequence[WorkflowTaskParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[JobRow, bool]]:
        async def run(conn: PgConnection) -> list[tuple[JobRow, bool]]:
            return await insert_workflow(
                conn, workflow_id, tasks, notify_queues, now, prepare=self._prepare
            )

        return await self._in_transaction(f"inserting workflow {workflow_id!r}", run, ex)

    async def job_get_available(
        self, queue: str, now: datetime, limit: int, client_id: str
    ) -> list[JobRow]:
        return await self._fetch(
            f"fetching jobs of queue {queue!r}",
            "job_get_available",
            [queue, now, limit, client_id],
            None,
            job_row,
        )

    async def job_get_available_limited(
        self, queue: str, now: datetime, limit: int, client_id: str, limits: QueueLimits
    ) -> LimitedFetch:
        rows = await self._fetch(
            f"fetching jobs of queue {queue!r}",
            "job_get_available_limited",
            [queue, now, limit, client_id, limits.to_json()],
            None,
        )
        return limited_fetch(rows)

    async def job_claim(self, job_id: int, now: datetime, client_id: str) -> JobRow | None:
        return await self._fetchrow(
            f"claiming job {job_id}", "job_claim", [job_id, now, client_id], None, job_row
        )

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[JobRow] | list[WrittenRow]:
        doing = "writing job outcomes"
        with wrapped(doing):
            name, args, make_row = outcome_statement(outcomes, now, rows)
        return await self._fetch(doing, name, args, None, make_row)

    async def job_get(self, job_id: int, *, ex: Any = None) -> JobRow | None:
        return await self._fetchrow(f"getting job {job_id}", "job_get", [job_id], ex, job_row)

    async def job_list(self, params: JobListParams, *, ex: Any = None) -> list[JobRow]:
        name, args = job_list_statement(params)
        return await self._fetch("listing jobs", name, args, ex, job_row)

    async def job_count_live(self) -> list[tuple[str, str, int]]:
        rows = await self._fetch("counting live jobs", "job_count_live", [], None)
        return [(str(queue), str(state), int(count)) for queue, state, count in rows]

    async def job_count_finalized(
        self, exact_up_to: int
    ) -> list[tuple[str, int | None, int | None]]:
        rows = await self._fetch(
            "counting finalized jobs", "job_count_finalized", [exact_up_to], None
        )
        return [
            (
                str(state),
                None if count is None else int(count),
                None if estimate is None else int(estimate),
            )
            for state, count, estimate in rows
        ]

    async def job_count_finalized_since(self, since: datetime, limit: int) -> dict[str, int]:
        rows = await self._fetch(
            "counting recently finalized jobs", "job_count_finalized_since", [since, limit], None
        )
        return {str(state): int(count) for state, count in rows}

    async def job_cancel(self, job_id: int, now: datetime, *, ex: Any = None) -> JobRow | None:
        doing = f"cancelling job {job_id}"

        async def run(conn: PgConnection) -> JobRow | None:
            row = await conn.fetchrow(QUERIES["job_cancel"], [job_id, now], make_row=job_row)
            if row is None:
                return await conn.fetchrow(QUERIES["job_get"], [job_id], make_row=job_row)
            if row.state == "running":
                payload = json.dumps({"action": "cancel", "job_id": job_id, "queue": row.queue})
                await conn.execute(QUERIES["notify_many"], [CONTROL_CHANNEL, [payload]])
            return row

        return await self._in_transaction(doing, run, ex)

    async def job_retry(self, job_id: int, now: datetime, *, ex: Any = None) -> JobRow | None:
        doing = f"retrying job {job_id}"

        async def run(conn: PgConnection) -> JobRow | None:
            row = await conn.fetchrow(QUERIES["job_retry"], [job_id, now], make_row=job_row)
            if row is None:
                return await conn.fetchrow(QUERIES["job_get"], [job_id], make_row=job_row)
            await conn.execute(QUERIES["job_notify_insert"], [[row.queue]])
            if row.workflow_deps:
                # A workflow task was settled in the same statement, after its row was
                # returned: read what it is now.
                return await conn.fetchrow(QUERIES["job_get"], [job_id], make_row=job_row)
            return row

        return await self._in_transaction(doing, run, ex)

    async def job_mark_waited(self, job_ids: Sequence[int]) -> list[int]:
        rows = await self._fetch(
            "marking waited jobs", "job_mark_waited", [int8_array(job_ids)], None
        )
        return [int(job_id) for (job_id,) in rows]

    async def job_delete(self, job_id: int, *, ex: Any = None) -> JobRow | None:
        return await self._fetchrow(f"deleting job {job_id}", "job_delete", [job_id], ex, job_row)

    async def job_state(self, job_id: int, *, ex: Any = None) -> str | None:
        row = await self._fetchrow(f"reading job {job_id}", "job_state", [job_id], ex)
        return None if row is None else str(row[0])

    async def job_cancel_requested(self, job_ids: Sequence[int]) -> list[int]:
        rows = await self._fetch(
            "checking for cancel requests", "job_cancel_requested", [list(job_ids)], None
        )
        return [int(job_id) for (job_id,) in rows]

    async def job_schedule(self, horizon: datetime, now: datetime, limit: int) -> dict[str, int]:
        rows = await self._fetch("scheduling due jobs", "job_schedule", [horizon, limit, now], None)
        return {str(queue): int(count) for queue, count in rows if queue is not None}

    async def queue_upsert(
        self, name: str, now: datetime, limits: QueueLimits | None = None, *, rekey: bool = False
    ) -> bool:
        stored = None if limits is None else limits.to_json()
        doing = f"registering queue {name!r}"
        row = await self._fetchrow(doing, "queue_upsert", [name, now, stored], None)
        if row and (row[1] or (rekey and stored is not None)):
            await self._fetch(doing, "queue_rekey", [name, stored], None)
        return bool(row and row[0])

    async def _queue_change(self, action: str, name: str, now: datetime, ex: Any) -> list[str]:
        doing = f"{'pausing' if action == 'pause' else 'resuming'} queue {name!r}"

        async def run(conn: PgConnection) -> list[str]:
            if name == "*":
                rows = await conn.fetch(QUERIES[f"queue_{action}_all"], [now])
            else:
                rows = await conn.fetch(QUERIES[f"queue_{action}"], [name, now])
            names = [str(queue) for (queue,) in rows]
            if names:
                payloads = [json.dumps({"action": action, "queue": n}) for n in names]
                await conn.execute(QUERIES["notify_many"], [CONTROL_CHANNEL, payloads])
            return names

        return await self._in_transaction(doing, run, ex)

    async def queue_pause(self, name: str, now: datetime, *, ex: Any = None) -> list[str]:
        return await self._queue_change("pause", name, now, ex)

    async def queue_resume(self, name: str, now: datetime, *, ex: Any = None) -> list[str]:
        return await self._queue_change("resume", name, now, ex)

    async def queue_paused(self, names: Sequence[str]) -> set[str]:
        rows = await self._fetch("reading queue state", "queue_paused", [list(names)], None)
        return {str(queue) for (queue,) in rows}

    async def queue_list(self) -> list[QueueRow]:
        rows = await self._fetch("listing queues", "queue_list", [], None)
        partitions = partial(self._fetch, ex=None)
        return [await queue_row(values, self.clock(), partitions) for values in rows]

    async def notify_many(self, channel: str, payloads: Sequence[str]) -> None:
        if payloads:
            await self._fetch(
                "sending notifications", "notify_many", [channel, list(payloads)], None
            )

    async def leader_attempt_elect(
        self, leader_id: str, now: datetime, expires_at: datetime
    ) -> bool:
        rows = await self._fetch(
            "electing a leader", "leader_attempt_elect", [leader_id, now, expires_at], None
        )
        return bool(rows)

    async def leader_resign(self, leader_id: str) -> bool:
        row = await self._fetchrow("resigning leadership", "leader_resign", [leader_id], None)
        return bool(row and row[0])

    async def leader_get(self) -> LeaderRow | None:
        row = await self._fetchrow("reading the leader", "leader_get", [], None)
        if row is None:
            return None
        leader_id, elected_at, expires_at = row
        return LeaderRow(str(leader_id), elected_at, expires_at)

    async def job_get_stuck(
        self, attempted_before: datetime, limit: int, after_id: int
    ) -> list[JobRow]:
        return await self._fetch(
            "looking for stuck jobs",
            "job_get_stuck",
            [attempted_before, limit, after_id],
            None,
            job_row,
        )

    async def job_rescue_many(self, rescues: Sequence[JobRescue]) -> list[tuple[int, str, str]]:
        args = [
            [r.id for r in rescues],
            [r.state.value for r in rescues],
            [r.finalized_at for r in rescues],
            [r.scheduled_at for r in rescues],
            [r.error_json for r in rescues],
            [r.attempted_at for r in rescues],
        ]
        rows = await self._fetch("rescuing stuck jobs", "job_rescue_many", args, None)
        return [(int(job_id), str(queue), str(state)) for job_id, queue, state in rows]

    async def job_delete_finalized(
        self, state: JobState, finalized_before: datetime, limit: int
    ) -> int:
        row = await self._fetchrow(
            f"deleting old {state.value} jobs",
            "job_delete_finalized",
            [state.value, finalized_before, limit],
            None,
        )
        return int(row[0]) if row else 0

    async def queue_delete_stale(self, updated_before: datetime) -> list[str]:
        rows = await self._fetch(
            "deleting stale queues", "queue_delete_stale", [updated_before], None
        )
        return [str(name) for (name,) in rows]

    async def periodic_job_get_many(
        self, ids: Sequence[str], *, ex: Any = None
    ) -> dict[str, PeriodicJobState]:
        rows = await self._fetch(
            "reading periodic job state", "periodic_job_get_many", [list(ids)], ex
        )
        return {
            str(job_id): PeriodicJobState(
                str(job_id), None if schedule is None else str(schedule), next_run_at, last_run_at
            )
            for job_id, schedule, next_run_at, last_run_at in rows
        }

    async def periodic_job_save(
        self,
        state: PeriodicJobState,
        expected: PeriodicJobState | None,
        now: datetime,
        *,
        ex: Any = None,
    ) -> bool:
        args = [
            state.id,
            state.schedule,
            state.next_run_at,
            state.last_run_at,
            now,
            expected.next_run_at if expected is not None else None,
            expected.schedule if expected is not None else None,
            expected.last_run_at if expected is not None else None,
        ]
        doing = f"saving periodic job state of {state.id!r}"
        if ex is None:
            return bool(await self._fetch(doing, "periodic_job_save", args, ex))
        # The row stays locked until the transaction ends (a claim): bound how long
        # we wait for another claimant's, and how long a stuck session may hold ours.
        [(lock_timeout, *_)] = await self._fetch(doing, "periodic_claim_limits", [], ex)
        try:
            rows = await self._fetch(doing, "periodic_job_save", args, ex)
        except DatabaseError as exc:
            if getattr(exc.__cause__, "sqlstate", None) == "55P03":
                return False  # another client holds the row longer than lock_timeout
            raise
        await self._fetch(doing, "periodic_claim_lock_timeout_restore", [lock_timeout], ex)
        return bool(rows)

    @asynccontextmanager
    async def open_listener(self, channels: Sequence[str]) -> AsyncIterator[PgListener]:
        with wrapped("opening the LISTEN connection"):
            conn = await PgConnection.connect(self._conninfo)
        try:
            with wrapped("subscribing to notifications"):
                for channel in channels:
                    await conn.listen(channel)
            yield PgListener(conn)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def ping(self) -> None:
        with wrapped("checking the database connection"):
            await self._pool.fetchval("SELECT 1")

    async def aclose(self) -> None:
        await self._pool.aclose()


@asynccontextmanager
async def open_postgres_driver(
    conninfo: str, *, max_size: int = 10, prepare: bool = True, listen: bool = True
) -> AsyncIterator[PostgresDriver]:
    """A PostgresDriver over a pool of up to ``max_size`` connections, for the block
    (``prepare`` as in `PostgresDriver`; ``listen``: whether ``open_listener`` will be
    used).

    Connects at once, to check that no connection pooler stands in the way of prepared
    statements (``prepare``) or LISTEN (``listen``): raises PoolerError if one does (see
    pooler.py), DatabaseError if the database cannot be reached. On exit the pool is
    closed (shielded), whatever the block did.
    """
    try:
        pool_cm = open_pool(conninfo, max_size=max_size)
        pool = await pool_cm.__aenter__()
    except psycopg.Error as exc:
        raise database_error("connecting to the database", exc) from exc
    try:
        with wrapped("connecting to the database"):
            await check_pooler(pool, conninfo, prepare=prepare, listen=listen)
        yield PostgresDriver(pool, conninfo, prepare=prepare)
    finally:
        with trio.CancelScope(shield=True):
            await pool_cm.__aexit__(None, None, None)
