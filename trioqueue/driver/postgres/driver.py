"""The PostgreSQL driver: the Driver protocol over a pool of trio-native connections."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar, final

import psycopg
import trio

from ...errors import DatabaseError
from ...job import FINALIZED_STATES, JobListParams, JobState
from ..protocol import (
    CONTROL_CHANNEL,
    JobInsertParams,
    JobOutcome,
    JobRescue,
    Notification,
    PeriodicJobState,
    Row,
)
from .arrays import bool_array, bytea_array, int8_array, text_array, timestamptz_array
from .connection import PgConnection
from .pool import PgPool, open_pool
from .pooler import check_pooler, pooler_error
from .queries import QUERIES
from .transient import is_transient

__all__ = ["PgListener", "PostgresDriver", "open_postgres_driver"]

T = TypeVar("T")

_INSERT_COLUMNS = (
    "args, kind, max_attempts, metadata, priority, queue, scheduled_at, state, tags, "
    "unique_key, unique_states, created_at"
)


_ENCODING_ERRORS = (UnicodeEncodeError, OverflowError, struct.error)
"""What encoding a value for the server raises when the value cannot be sent at all (a lone
surrogate in text, a number too big for its column's type)."""
_FAILURES = (psycopg.Error, *_ENCODING_ERRORS)


def _database_error(doing: str, exc: BaseException) -> DatabaseError:
    """``exc`` (one of `_FAILURES`) as a DatabaseError. It is ``rejected_data`` when the
    values sent were at fault — a data exception or constraint (SQLSTATE classes 22 and
    23; psycopg raises DataError for a NUL in text before sending), a program limit
    (class 54: too big), or a value that could not be encoded — so that the caller does
    not send them again as they are. It is ``transient`` when a later try may get past
    it (`is_transient`: a lost or refused connection, a server restarting, ...). One of our
    prepared statements lost to a pooler says so, and what to do (`pooler_error`)."""
    if isinstance(exc, psycopg.Error):
        pooler = pooler_error(exc)
        if pooler is not None:
            return DatabaseError(doing, pooler)
        rejected = isinstance(exc, psycopg.DataError | psycopg.IntegrityError) or (
            exc.sqlstate or ""
        ).startswith("54")
    else:
        rejected = True
    return DatabaseError(doing, exc, rejected_data=rejected, transient=is_transient(exc))


@contextmanager
def _wrapped(doing: str) -> Iterator[None]:
    try:
        yield
    except _FAILURES as exc:
        raise _database_error(doing, exc) from exc


def _insert_arrays(params: Sequence[JobInsertParams]) -> list[Any]:
    # Binary arrays (see arrays.py); the smallint columns go as bigint[] and are cast.
    return [
        text_array([p.args_json for p in params]),
        text_array([p.kind for p in params]),
        int8_array([p.max_attempts for p in params]),
        text_array([p.metadata_json for p in params]),
        int8_array([p.priority for p in params]),
        text_array([p.queue for p in params]),
        timestamptz_array([p.scheduled_at for p in params]),
        text_array([p.state.value for p in params]),
        text_array([",".join(p.tags) for p in params]),
        bytea_array([p.unique_key for p in params]),
        text_array([p.unique_states for p in params]),
    ]


def _plain_completion(o: JobOutcome) -> bool:
    """A completed outcome that changes nothing but the state and finalized_at."""
    return (
        o.state is JobState.COMPLETED
        and o.error_json is None
        and o.metadata_json is None
        and o.scheduled_at is None
        and not o.give_back_attempt
    )


def _copy_text(value: str) -> str:
    """Escape a value for COPY's text format. Our values never hold raw tabs, newlines or
    carriage returns (JSON escapes them; names and tags are validated), only backslashes."""
    return value.replace("\\", "\\\\") if "\\" in value else value


def _copy_text_array(values: Sequence[str]) -> str:
    """A text[] literal for COPY's text format. Every element is quoted: unquoted, a tag
    spelled ``null`` (any case) would be read as a NULL element."""
    if not values:
        return "{}"
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return _copy_text("{" + ",".join(quoted) + "}")


_COPY_CHUNK_ROWS = 100
"""Small enough that a call of a thousand jobs streams in several chunks, each ingested by
the server while the next is prepared (100 beat 50, 250 and 500 here: ~81k against ~76k
jobs/s for 1,000-job calls, medians of alternating runs)."""


def _copy_text_chunks(params: Iterable[JobInsertParams], now: datetime) -> Iterator[bytes]:
    """The rows of ``params`` in COPY text format (columns as in ``_INSERT_COLUMNS``),
    ``_COPY_CHUNK_ROWS`` rows to a chunk, read from ``params`` only as each chunk is
    needed. Formatting by hand is several times faster than a generic row formatter,
    which matters for ``insert_many_fast``; and the columns after ``args`` are formatted
    again only when they differ from the previous row's (in a batch they seldom do)."""
    created = now.isoformat()
    lines: list[str] = []
    last: tuple[Any, ...] | None = None
    tail = ""
    for p in params:
        rest = p[1:]
        if rest != last:
            last = rest
            tail = "\t" + "\t".join(
                (
                    p.kind,
                    str(int(p.max_attempts)),  # int(): an int enum's str() is its name
                    _copy_text(p.metadata_json),
                    str(int(p.priority)),
                    p.queue,
                    created if p.scheduled_at is now else p.scheduled_at.isoformat(),
                    p.state.value,
                    _copy_text_array(p.tags),
                    "\\\\x" + p.unique_key.hex() if p.unique_key is not None else "\\N",
                    p.unique_states if p.unique_states is not None else "\\N",
                    created,
                )
            )
        lines.append(_copy_text(p.args_json) + tail)
        if len(lines) >= _COPY_CHUNK_ROWS:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


@final
class PgListener:
    """A LISTEN connection of its own (never from the pool)."""

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn

    async def wait(self) -> list[Notification]:
        with _wrapped("waiting for notifications"):
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
        from ...migrations import schema_version

        with _wrapped("checking the schema version"):
            async with self._pool.acquire() as conn:
                return await schema_version(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgConnection]:
        async with self._pool.acquire() as conn:
            with _wrapped("running a transaction"):
                async with conn.transaction():
                    yield conn

    async def _in_transaction(
        self, doing: str, run: Callable[[PgConnection], Awaitable[T]], ex: Any
    ) -> T:
        """``run(conn)`` inside ``ex``'s transaction, or else a transaction of its own."""
        with _wrapped(doing):
            if ex is not None:
                return await run(ex)
            async with self._pool.acquire() as conn, conn.transaction():
                return await run(conn)

    async def _fetch(self, doing: str, name: str, params: Sequence[Any], ex: Any) -> list[Row]:
        # What _wrapped does, spelled out: this is every job's path (insert, claim, outcome).
        try:
            if ex is not None:
                return await ex.fetch(QUERIES[name], params, prepare=self._prepare)  # type: ignore[no-any-return]
            return await self._pool.fetch(QUERIES[name], params, prepare=self._prepare)
        except _FAILURES as exc:
            raise _database_error(doing, exc) from exc

    async def _fetchrow(self, doing: str, name: str, params: Sequence[Any], ex: Any) -> Row | None:
        rows = await self._fetch(doing, name, params, ex)
        return rows[0] if rows else None

    async def job_insert_many(
        self,
        params: Sequence[JobInsertParams],
        notify_queues: Sequence[str],
        now: datetime,
        *,
        ex: Any = None,
    ) -> list[tuple[Row, bool]]:
        with _wrapped("inserting jobs"):
            return await self._job_insert_many(params, notify_queues, now, ex)

    async def _job_insert_many(
        self,
        params: Sequence[JobInsertParams],
        notify_queues: Sequence[str],
        now: datetime,
        ex: Any,
    ) -> list[tuple[Row, bool]]:
        if len(params) == 1:
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
                rows = await self._fetch("inserting a job", "job_insert_one_plain", [*one, now], ex)
            else:
                one += [
                    p.unique_key,
                    p.unique_states,
                    now,
                    notify_queues[0] if notify_queues else None,
                ]
                rows = await self._fetch("inserting a job", "job_insert_one", one, ex)
        else:
            args = [*_insert_arrays(params), now, text_array(list(notify_queues))]
            rows = await self._fetch("inserting jobs", "job_insert_many", args, ex)
        if len(rows) != len(params):
            raise DatabaseError(
                "inserting jobs",
                RuntimeError(f"expected {len(params)} rows back, got {len(rows)}"),
            )
        return [(r[:16], bool(r[16])) for r in rows]

    async def job_insert_fast(
        self,
        params: Iterable[JobInsertParams],
        notify_queues: Sequence[str] | Callable[[], Sequence[str]],
        now: datetime,
        *,
        ex: Any = None,
    ) -> int:
        # The rows are formatted chunk by chunk as the COPY sends them, so the server
        # ingests a chunk while the next is prepared; an exception from ``params`` aborts
        # the COPY (copy_in) and with it the transaction.
        chunks = _copy_text_chunks(params, now)
        query = f"COPY tq_job ({_INSERT_COLUMNS}) FROM STDIN"

        async def run(conn: PgConnection) -> int:
            count = await conn.copy_in_data(query, chunks)
            queues = notify_queues() if callable(notify_queues) else notify_queues
            if queues:
                await conn.execute(QUERIES["job_notify_insert"], [list(queues)])
            return count

        return await self._in_transaction("inserting jobs with COPY", run, ex)

    async def job_get_available(
        self, queue: str, now: datetime, limit: int, client_id: str
    ) -> list[Row]:
        return await self._fetch(
            f"fetching jobs of queue {queue!r}",
            "job_get_available",
            [queue, now, limit, client_id],
            None,
        )

    async def job_claim(self, job_id: int, now: datetime, client_id: str) -> Row | None:
        return await self._fetchrow(
            f"claiming job {job_id}", "job_claim", [job_id, now, client_id], None
        )

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[Row]:
        doing = "writing job outcomes"
        if not rows and all(_plain_completion(o) for o in outcomes):
            with _wrapped(doing):
                ids = [
                    int8_array([o.id for o in outcomes]),
                    timestamptz_array([o.finalized_at for o in outcomes]),
                    timestamptz_array([o.attempted_at for o in outcomes]),
                ]
            return await self._fetch(doing, "job_complete_many_ids", ids, None)
        with _wrapped(doing):
            args = [
                int8_array([o.id for o in outcomes]),
                text_array([o.state.value for o in outcomes]),
                timestamptz_array([o.finalized_at for o in outcomes]),
                timestamptz_array([o.scheduled_at for o in outcomes]),
                bool_array([o.give_back_attempt for o in outcomes]),
                text_array([o.error_json for o in outcomes]),
                text_array([o.metadata_json for o in outcomes]),
                now,
                timestamptz_array([o.attempted_at for o in outcomes]),
            ]
        name = "job_set_state_if_running_many" if rows else "job_set_state_if_running_many_ids"
        return await self._fetch(doing, name, args, None)

    async def job_get(self, job_id: int, *, ex: Any = None) -> Row | None:
        return await self._fetchrow(f"getting job {job_id}", "job_get", [job_id], ex)

    async def job_list(self, params: JobListParams, *, ex: Any = None) -> list[Row]:
        args = [
            list(params.ids) if params.ids is not None else None,
            list(params.kinds) if params.kinds is not None else None,
            list(params.queues) if params.queues is not None else None,
            [s.value for s in params.states] if params.states is not None else None,
            list(params.priorities) if params.priorities is not None else None,
            list(params.tags) if params.tags is not None else None,
            params.after,
            params.limit,
            params.within_newest,
        ]
        name = "job_list_desc" if params.descending else "job_list"
        if params.states and params.ids is None and not FINALIZED_STATES & set(params.states):
            name += "_live"
        return await self._fetch("listing jobs", name, args, ex)

    async def job_count_live(self) -> list[tuple[str, str, int]]:
        rows = await self._fetch("counting live jobs", "job_count_live", [], None)
        return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    async def job_count_finalized(
        self, exact_up_to: int
    ) -> list[tuple[str, int | None, int | None]]:
        rows = await self._fetch(
            "counting finalized jobs", "job_count_finalized", [exact_up_to], None
        )
        return [
            (str(r[0]), None if r[1] is None else int(r[1]), None if r[2] is None else int(r[2]))
            for r in rows
        ]

    async def job_count_finalized_since(self, since: datetime, limit: int) -> dict[str, int]:
        rows = await self._fetch(
            "counting recently finalized jobs", "job_count_finalized_since", [since, limit], None
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def job_cancel(self, job_id: int, now: datetime, *, ex: Any = None) -> Row | None:
        doing = f"cancelling job {job_id}"

        async def run(conn: PgConnection) -> Row | None:
            row = await conn.fetchrow(QUERIES["job_cancel"], [job_id, now])
            if row is None:
                return await conn.fetchrow(QUERIES["job_get"], [job_id])
            if row[4] == "running":
                payload = json.dumps({"action": "cancel", "job_id": job_id, "queue": row[3]})
                await conn.execute(QUERIES["notify_many"], [CONTROL_CHANNEL, [payload]])
            return row

        return await self._in_transaction(doing, run, ex)

    async def job_retry(self, job_id: int, now: datetime, *, ex: Any = None) -> Row | None:
        doing = f"retrying job {job_id}"

        async def run(conn: PgConnection) -> Row | None:
            row = await conn.fetchrow(QUERIES["job_retry"], [job_id, now])
            if row is None:
                return await conn.fetchrow(QUERIES["job_get"], [job_id])
            await conn.execute(QUERIES["job_notify_insert"], [[row[3]]])
            return row

        return await self._in_transaction(doing, run, ex)

    async def job_delete(self, job_id: int, *, ex: Any = None) -> Row | None:
        return await self._fetchrow(f"deleting job {job_id}", "job_delete", [job_id], ex)

    async def job_state(self, job_id: int, *, ex: Any = None) -> str | None:
        row = await self._fetchrow(f"reading job {job_id}", "job_state", [job_id], ex)
        return None if row is None else str(row[0])

    async def job_cancel_requested(self, job_ids: Sequence[int]) -> list[int]:
        rows = await self._fetch(
            "checking for cancel requests", "job_cancel_requested", [list(job_ids)], None
        )
        return [int(r[0]) for r in rows]

    async def job_schedule(self, horizon: datetime, now: datetime, limit: int) -> dict[str, int]:
        rows = await self._fetch("scheduling due jobs", "job_schedule", [horizon, limit, now], None)
        return {str(r[0]): int(r[1]) for r in rows}

    async def queue_upsert(self, name: str, now: datetime) -> bool:
        row = await self._fetchrow(f"registering queue {name!r}", "queue_upsert", [name, now], None)
        return bool(row and row[0])

    async def _queue_change(self, action: str, name: str, now: datetime, ex: Any) -> list[str]:
        doing = f"{'pausing' if action == 'pause' else 'resuming'} queue {name!r}"

        async def run(conn: PgConnection) -> list[str]:
            if name == "*":
                rows = await conn.fetch(QUERIES[f"queue_{action}_all"], [now])
            else:
                rows = await conn.fetch(QUERIES[f"queue_{action}"], [name, now])
            names = [str(r[0]) for r in rows]
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
        return {str(r[0]) for r in rows}

    async def queue_list(self) -> list[Row]:
        rows = await self._fetch("listing queues", "queue_list", [], None)
        return [(*r[:4], int(r[4]), int(r[5])) for r in rows]

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

    async def leader_get(self) -> tuple[str, datetime, datetime] | None:
        row = await self._fetchrow("reading the leader", "leader_get", [], None)
        return None if row is None else (str(row[0]), row[1], row[2])

    async def job_get_stuck(
        self, attempted_before: datetime, limit: int, after_id: int
    ) -> list[Row]:
        return await self._fetch(
            "looking for stuck jobs", "job_get_stuck", [attempted_before, limit, after_id], None
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
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

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
        return [str(r[0]) for r in rows]

    async def periodic_job_get_many(
        self, ids: Sequence[str], *, ex: Any = None
    ) -> dict[str, PeriodicJobState]:
        rows = await self._fetch(
            "reading periodic job state", "periodic_job_get_many", [list(ids)], ex
        )
        return {
            str(r[0]): PeriodicJobState(str(r[0]), None if r[1] is None else str(r[1]), r[2], r[3])
            for r in rows
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
        with _wrapped("opening the LISTEN connection"):
            conn = await PgConnection.connect(self._conninfo)
        try:
            with _wrapped("subscribing to notifications"):
                for channel in channels:
                    await conn.listen(channel)
            yield PgListener(conn)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def ping(self) -> None:
        with _wrapped("checking the database connection"):
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
        raise _database_error("connecting to the database", exc) from exc
    try:
        with _wrapped("connecting to the database"):
            await check_pooler(pool, conninfo, prepare=prepare, listen=listen)
        yield PostgresDriver(pool, conninfo, prepare=prepare)
    finally:
        with trio.CancelScope(shield=True):
            await pool_cm.__aexit__(None, None, None)
