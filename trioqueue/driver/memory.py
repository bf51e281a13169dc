"""The memory driver: the whole Driver protocol in-process, for simulation and unit tests.

It reproduces the PostgreSQL driver's statements (``driver/postgres/queries/*.sql``) and the
schema they run against (``migrations/*.up.sql``): the same rows, the same CHECK constraints,
the same partial unique index over each job's ``unique_states`` bitmask, the same
notifications, and READ COMMITTED transactions with row locks:

- A transaction's writes are invisible to everything else until it commits, and are
  discarded when it rolls back. Reads through the transaction see its own writes.
- A row a transaction wrote (or locked, as ``INSERT ... ON CONFLICT DO UPDATE`` does) stays
  locked until the transaction ends. Claims (``job_get_available``, ``job_schedule``,
  ``job_delete_finalized``) skip locked rows, as ``FOR UPDATE SKIP LOCKED`` does; every other
  write of a locked row waits for the transaction to end and then re-evaluates, as an
  ``UPDATE`` does in PostgreSQL. So does making a row hold a unique key that another open
  transaction's uncommitted row holds.
- Two transactions waiting for each other: the one that would close the cycle fails with
  ``DatabaseError`` ("deadlock detected"), and its transaction is aborted.
- A statement that fails inside a transaction aborts it, as in PostgreSQL: further
  statements fail, and leaving the block normally raises ``DatabaseError`` after rolling back.

Every operation is one checkpoint followed by an atomic change (nothing awaits in the
middle of a mutation), so concurrent tasks interleave as they would against a database. An
operation cancelled at its checkpoint, or while waiting for a lock, has changed nothing.

Time comes from trio's clock (:meth:`MemoryDriver.clock`), so under
``trio.testing.MockClock(autojump_threshold=0)`` hours of retries, schedules and leadership
terms pass in milliseconds.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, NoReturn, TypeVar, final

import attrs
import trio

from .._validate import text_problem
from ..errors import DatabaseError, TrioqueueError
from ..job import FINALIZED_STATES, JobListParams, JobState
from .protocol import (
    CONTROL_CHANNEL,
    INSERT_CHANNEL,
    LEADERSHIP_CHANNEL,
    JobInsertParams,
    JobOutcome,
    JobRescue,
    Notification,
    PeriodicJobState,
    Row,
)

__all__ = [
    "MEMORY_URL_PREFIX",
    "MemoryDriver",
    "MemoryListener",
    "MemoryStoreError",
    "MemoryTransaction",
    "memory_driver_for_url",
]

T = TypeVar("T")

MEMORY_URL_PREFIX: Final = "memory://"

DEFAULT_LISTENER_BUFFER: Final = 10_000
"""Notifications a listener holds before it overflows (see :class:`MemoryListener`)."""

_SMALLINT_MAX: Final = 32767
_NAMEDATALEN: Final = 64
_NOTIFY_PAYLOAD_MAX: Final = 8000
_MAX_ATTEMPTED_BY: Final = 100

# The bit(8) unique_states string, leftmost character first: tq_job_state_in_bitmask()
# reads `available` from bit 7 (the rightmost) down to `scheduled` at bit 0 (the leftmost).
_BIT_ORDER: Final = (
    JobState.SCHEDULED,
    JobState.RUNNING,
    JobState.RETRYABLE,
    JobState.PENDING,
    JobState.DISCARDED,
    JobState.COMPLETED,
    JobState.CANCELLED,
    JobState.AVAILABLE,
)
_CANCEL_OVERRIDES: Final = frozenset({JobState.RETRYABLE, JobState.SCHEDULED, JobState.AVAILABLE})
_SCHEDULABLE: Final = (JobState.RETRYABLE, JobState.SCHEDULED)


class MemoryStoreError(Exception):
    """What PostgreSQL would have reported (a constraint violation, bad input, a
    deadlock); the memory driver raises it as the cause of a ``DatabaseError``."""


class MemoryDataError(MemoryStoreError):
    """What PostgreSQL (or psycopg, before sending) would have refused because of the
    values themselves: the ``DatabaseError`` it causes is ``rejected_data``."""


class _Blocked(Exception):
    """Raised inside a statement that must wait for ``tx`` to end; nothing was changed."""

    def __init__(self, tx: MemoryTransaction) -> None:
        super().__init__()
        self.tx = tx


# ------------------------------------------------------------------------------------------
# Values as PostgreSQL stores them


def _ts(value: datetime) -> datetime:
    """A timestamptz: aware datetimes in UTC; naive ones are taken as UTC, as a UTC
    session does."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _opt_ts(value: datetime | None) -> datetime | None:
    return None if value is None else _ts(value)


def _ts_json(value: datetime) -> str:
    """A timestamptz as ``to_json`` writes it in a UTC session:
    ``2026-01-01T00:00:00.5+00:00`` (trailing zeros of the fraction dropped)."""
    text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "+00:00"


def _numeric(text: str) -> int | float:
    """A JSON number as jsonb keeps it (numeric): ``1e3`` comes back as ``1000``."""
    if Decimal(text).as_tuple().exponent >= 0:  # type: ignore[operator]
        return int(Decimal(text))
    return float(text) + 0.0  # numeric has no negative zero: -0.0 reads back as 0.0


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"Token {name!r} is invalid")


def _jsonb_sorted(value: dict[str, Any]) -> dict[str, Any]:
    """jsonb's key order: shorter keys first, then bytewise."""
    return dict(sorted(value.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode())))


def _text(value: str) -> str:
    """``value`` if PostgreSQL can take it as text: psycopg refuses a NUL before sending,
    and a lone surrogate cannot be encoded at all."""
    problem = text_problem(value)
    if problem == "nul":
        raise MemoryDataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    if problem == "surrogate":
        raise MemoryDataError("'utf-8' codec can't encode a lone surrogate")
    return value


def _json_string(value: str) -> str:
    """A string inside a jsonb value: no NUL (``\\u0000``) and no lone surrogate."""
    problem = text_problem(value)
    if problem == "nul":
        raise MemoryDataError("unsupported Unicode escape sequence (\\u0000)")
    if problem == "surrogate":
        raise MemoryDataError("invalid Unicode surrogate in a JSON string")
    return value


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            _json_string(key)
        return _jsonb_sorted({k: _normalize(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, str):
        return _json_string(value)
    return value


def _jsonb(text: str) -> Any:
    """Parse ``text`` as ``::jsonb`` would, or raise MemoryStoreError."""
    _text(text)
    try:
        value = json.loads(text, parse_float=_numeric, parse_constant=_reject_constant)
    except (TypeError, ValueError) as exc:
        raise MemoryDataError(f"invalid input syntax for type json: {exc}") from None
    return _normalize(value)


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value, so callers cannot change stored rows."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _concat(left: Any, right: Any) -> Any:
    """jsonb ``||``: objects merge (right wins); otherwise arrays concatenate."""
    if isinstance(left, dict) and isinstance(right, dict):
        return _jsonb_sorted({**left, **right})
    return (left if isinstance(left, list) else [left]) + (
        right if isinstance(right, list) else [right]
    )


def _has_key(value: Any, key: str) -> bool:
    """jsonb ``?``."""
    if isinstance(value, dict):
        return key in value
    if isinstance(value, list):
        return key in [v for v in value if isinstance(v, str)]
    return isinstance(value, str) and value == key


def _minus(value: Any, key: str) -> Any:
    """jsonb ``- text``."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [v for v in value if v != key or not isinstance(v, str)]
    raise MemoryDataError("cannot delete from scalar")


def _rescue_count(metadata: Any) -> int:
    """The ``rescue_count`` as job_rescue_many reads it: a JSON number of one to nine
    digits, anything else 0 (so one odd row cannot fail a whole rescue)."""
    if not isinstance(metadata, dict):
        return 0
    value = metadata.get("rescue_count")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 999_999_999:
        return value
    return 0


def _json_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _insert_payload(queue: str) -> str:
    """``json_build_object('queue', q)::text``."""
    return '{"queue" : ' + _json_text(queue) + "}"


def _unique_states(bits: str | None) -> frozenset[JobState] | None:
    if bits is None:
        return None
    if len(bits) != 8 or set(bits) - {"0", "1"}:
        raise MemoryDataError(f'"{bits}" is not a valid bit(8) value')
    return frozenset(state for state, bit in zip(_BIT_ORDER, bits, strict=True) if bit == "1")


def _smallint(value: int) -> int:
    if not -_SMALLINT_MAX - 1 <= value <= _SMALLINT_MAX:
        raise MemoryDataError("smallint out of range")
    return value


def _check_length(relation: str, constraint: str, value: str) -> None:
    if not 0 < len(value) < 129:
        _violation(relation, constraint)


def _violation(relation: str, constraint: str) -> NoReturn:
    raise MemoryDataError(
        f'new row for relation "{relation}" violates check constraint "{constraint}"'
    )


# ------------------------------------------------------------------------------------------
# Rows


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

    @property
    def holds_key(self) -> bool:
        """Whether the row is in tq_job_unique_idx (its state is in its own bitmask)."""
        return (
            self.unique_key is not None
            and self.unique_states is not None
            and self.state in self.unique_states
        )

    def row(self) -> Row:
        return (
            self.id,
            self.kind,
            _copy(self.args),
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


_LockKey = tuple[str, Any]


# ------------------------------------------------------------------------------------------
# Transactions and listeners


@final
class MemoryTransaction:
    """An open transaction of a :class:`MemoryDriver`: pass it as ``ex=``.

    Made by :meth:`MemoryDriver.transaction`, never directly. Do not share it between tasks.
    It runs no SQL: :meth:`execute`, :meth:`fetch`, :meth:`fetchrow` and :meth:`fetchval`
    (what ``trioqueue.Transaction`` calls for the application's own statements) raise
    ``TrioqueueError`` and leave the transaction usable.
    """

    def __init__(self, driver: MemoryDriver) -> None:
        self._driver = driver
        self._owner = trio.lowlevel.current_task()
        self._done = trio.Event()
        self._open = True
        self._failed: MemoryStoreError | None = None
        self._waiting_for: MemoryTransaction | None = None
        # The transaction's own versions; None marks a deleted row.
        self._jobs: dict[int, _Job | None] = {}
        self._holders: dict[bytes, int | None] = {}
        self._queues: dict[str, _Queue | None] = {}
        self._periodic: dict[str, _Periodic] = {}
        self._notes: list[Notification] = []
        self._locks: set[_LockKey] = set()

    def __repr__(self) -> str:
        state = "failed" if self._failed else "open" if self._open else "closed"
        return f"<MemoryTransaction {state} writes={len(self._jobs)}>"

    async def _no_sql(self, query: str) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise TrioqueueError(
            "the memory driver runs no SQL; this transaction only carries trioqueue "
            f"operations (ex=tx / client.*_tx): refused {query[:60]!r}"
        )

    async def execute(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)

    async def fetch(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)

    async def fetchrow(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)

    async def fetchval(self, query: str, params: Sequence[Any] | None = None) -> NoReturn:
        """Always raises ``TrioqueueError``: there is no SQL database here."""
        await self._no_sql(query)


@final
class ListenerOverflowError(MemoryStoreError):
    """A listener's buffer filled up, so notifications were lost."""


@final
class MemoryListener:
    """Receives the notifications of its channels sent after it was opened.

    It buffers up to ``capacity`` notifications. If more arrive before :meth:`wait` takes
    them, it drops what it holds and the next :meth:`wait` raises ``DatabaseError`` (caused
    by ``ListenerOverflowError``) — what a lost LISTEN connection looks like — so the
    runtime's notifier reconnects and re-checks the database instead of missing work
    silently. After that it works normally again.
    """

    def __init__(self, channels: Iterable[str], capacity: int) -> None:
        self._channels = frozenset(channels)
        self._capacity = capacity
        self._pending: deque[Notification] = deque()
        self._overflowed = False
        self._lot = trio.lowlevel.ParkingLot()

    def _offer(self, note: Notification) -> None:
        if note.channel not in self._channels or self._overflowed:
            return
        if len(self._pending) >= self._capacity:
            self._overflowed = True
            self._pending.clear()
        else:
            self._pending.append(note)
        self._lot.unpark_all()

    async def wait(self) -> list[Notification]:
        """Wait for at least one notification; return all that are pending, oldest first.

        Always a checkpoint. On cancellation: nothing was taken.

        Raises:
          DatabaseError: notifications were lost because the buffer overflowed.
        """
        await trio.lowlevel.checkpoint()
        while not self._pending and not self._overflowed:
            await self._lot.park()
        if self._overflowed:
            self._overflowed = False
            raise DatabaseError(
                "waiting for notifications",
                ListenerOverflowError(
                    f"more than {self._capacity} notifications were pending; some were lost"
                ),
            )
        notes = list(self._pending)
        self._pending.clear()
        return notes


# ------------------------------------------------------------------------------------------
# One statement


class _Stmt:
    """One statement's view (committed rows, then its transaction's, then its own staged
    versions) and its staged writes, applied together by ``MemoryDriver._apply`` only if
    the statement finishes. Raising ``_Blocked`` or ``MemoryStoreError`` discards it."""

    def __init__(self, driver: MemoryDriver, tx: MemoryTransaction | None) -> None:
        self.d = driver
        self.tx = tx
        self.jobs: dict[int, _Job | None] = {}
        self.holders: dict[bytes, int | None] = {}
        self.queues: dict[str, _Queue | None] = {}
        self.periodic: dict[str, _Periodic] = {}
        self.leader: tuple[_Leader | None] | None = None
        self.notes: list[Notification] = []
        self.locks: set[_LockKey] = set()

    # ---- reading

    def job(self, job_id: int) -> _Job | None:
        if job_id in self.jobs:
            return self.jobs[job_id]
        if self.tx is not None and job_id in self.tx._jobs:
            return self.tx._jobs[job_id]
        return self.d._jobs.get(job_id)

    def visible_jobs(self) -> Iterator[_Job]:
        """Every row this statement's transaction sees (not its own staged versions)."""
        own = self.tx._jobs if self.tx is not None else {}
        for job_id, job in self.d._jobs.items():
            if job_id not in own:
                yield job
        for maybe in own.values():
            if maybe is not None:
                yield maybe

    def queue(self, name: str) -> _Queue | None:
        if name in self.queues:
            return self.queues[name]
        if self.tx is not None and name in self.tx._queues:
            return self.tx._queues[name]
        return self.d._queues.get(name)

    def visible_queues(self) -> list[_Queue]:
        own = self.tx._queues if self.tx is not None else {}
        found = [q for n, q in self.d._queues.items() if n not in own]
        return found + [q for q in own.values() if q is not None]

    def periodic_row(self, pid: str) -> _Periodic | None:
        if pid in self.periodic:
            return self.periodic[pid]
        if self.tx is not None and pid in self.tx._periodic:
            return self.tx._periodic[pid]
        return self.d._periodic.get(pid)

    def holder(self, key: bytes) -> int | None:
        """The id of the row that holds ``key`` in tq_job_unique_idx, as an index insertion
        sees it: raises _Blocked when the entry belongs to another open transaction (its
        uncommitted row, or a committed row it is changing)."""
        for layer in (self.holders, self.tx._holders if self.tx is not None else None):
            if layer is not None and key in layer:
                found = layer[key]
                if found is not None:
                    return found
                break
        else:
            committed = self.d._holders.get(key)
            if committed is not None:
                owner = self.d._locks.get(("job", committed))
                if owner is not None and owner is not self.tx:
                    raise _Blocked(owner)
                return committed
        for other in self.d._open_txs:
            if other is not self.tx and other._holders.get(key) is not None:
                raise _Blocked(other)
        return None

    # ---- locking and writing

    def lock(self, key: _LockKey) -> None:
        """Take the row lock ``key`` (kept until the transaction ends; released at once
        outside one). Raises _Blocked while another transaction holds it."""
        owner = self.d._locks.get(key)
        if owner is not None and owner is not self.tx:
            raise _Blocked(owner)
        self.locks.add(key)

    def skip_locked(self, key: _LockKey) -> bool:
        owner = self.d._locks.get(key)
        return owner is not None and owner is not self.tx

    def put_job(self, new: _Job, old: _Job | None) -> None:
        """Stage ``new`` (replacing ``old``, the visible version, if any), enforcing the CHECK
        constraints and the unique index the way each row's write does."""
        new.check()
        self.lock(("job", new.id))
        if new.holds_key:
            assert new.unique_key is not None
            found = self.holder(new.unique_key)
            if found is not None and found != new.id:
                raise MemoryDataError(
                    'duplicate key value violates unique constraint "tq_job_unique_idx"'
                )
        if old is not None and old.holds_key and not new.holds_key:
            assert old.unique_key is not None
            self.holders[old.unique_key] = None
        if new.holds_key:
            assert new.unique_key is not None
            self.holders[new.unique_key] = new.id
        self.jobs[new.id] = new

    def delete_job(self, old: _Job) -> None:
        self.lock(("job", old.id))
        if old.holds_key:
            assert old.unique_key is not None
            self.holders[old.unique_key] = None
        self.jobs[old.id] = None

    def notify(self, channel: str, payload: str) -> None:
        self.notes.append(Notification(channel, payload))


# ------------------------------------------------------------------------------------------
# The driver


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


@final
class MemoryDriver:
    """The Driver protocol in memory, with the PostgreSQL driver's semantics.

    Several clients may share one instance, as a fleet shares a database: notifications
    reach every open listener of the instance. ``memory://NAME`` URLs name process-wide
    instances (see :func:`memory_driver_for_url`). Use it from one thread (any number of
    trio runs, one after another).

    Differences from PostgreSQL, on purpose:

    - Rows that PostgreSQL returns in no particular order (outcome and rescue batches,
      ``queue_pause("*")``) come back in a fixed order: input order, queue creation order.
      (``job_get_available`` returns claim order on both.)
    - A task that would wait for a row lock held by a transaction that the same task has
      open (a hang in PostgreSQL) gets ``DatabaseError`` instead.
    - ``job_schedule`` waits for another transaction's uncommitted unique key and then
      discards the conflicting job, where PostgreSQL's statement fails with a unique
      violation (and the next run discards it).
    - Timestamps in ``metadata`` (``cancel_attempted_at``) are written with a ``+00:00``
      offset, as PostgreSQL does in a UTC session.
    """

    def __init__(self, *, listener_buffer: int = DEFAULT_LISTENER_BUFFER) -> None:
        if listener_buffer < 1:
            raise ValueError("listener_buffer must be at least 1")
        self._listener_buffer = listener_buffer
        self._ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._by_state: dict[JobState, set[int]] = {state: set() for state in JobState}
        self._available: dict[str, set[int]] = {}
        self._holders: dict[bytes, int] = {}
        self._queues: dict[str, _Queue] = {}
        self._periodic: dict[str, _Periodic] = {}
        self._leader: _Leader | None = None
        self._locks: dict[_LockKey, MemoryTransaction] = {}
        self._open_txs: dict[MemoryTransaction, None] = {}
        self._listeners: dict[MemoryListener, None] = {}
        # The clock: wall time at creation, advanced by trio's clock within each run.
        self._last = datetime.now(UTC)
        self._anchor: trio.lowlevel.RunVar[tuple[datetime, float]] = trio.lowlevel.RunVar(
            f"trioqueue.MemoryDriver.anchor.{id(self):x}"
        )
        try:
            self._anchor.set((self._last, trio.current_time()))
        except RuntimeError:
            pass  # not in a trio run: the first run anchors itself

    def __repr__(self) -> str:
        return (
            f"<trioqueue.MemoryDriver jobs={len(self._jobs)} queues={len(self._queues)} "
            f"transactions={len(self._open_txs)} listeners={len(self._listeners)}>"
        )

    # ---- time

    def clock(self) -> datetime:
        """Now, in UTC: the wall time when the driver was created, advanced by
        ``trio.current_time()``, so a ``MockClock`` moves it. In a later trio run (whose
        clock starts afresh) time goes on from the later of the last value returned and the
        wall clock; outside any run it is the wall clock. Never goes backwards."""
        try:
            current = trio.current_time()
        except RuntimeError:
            value = datetime.now(UTC)
        else:
            try:
                base, anchor = self._anchor.get()
            except LookupError:
                base, anchor = max(self._last, datetime.now(UTC)), current
                self._anchor.set((base, anchor))
            value = base + timedelta(seconds=current - anchor)
        if value < self._last:
            value = self._last
        self._last = value
        return value

    async def schema_version(self) -> int:
        """Always the newest migration: the store is made with the current schema."""
        from ..migrations import latest_version

        await trio.lowlevel.checkpoint()
        return latest_version()

    # ---- running statements

    def _tx(self, ex: Any) -> MemoryTransaction | None:
        if ex is None:
            return None
        if not isinstance(ex, MemoryTransaction) or ex._driver is not self:
            raise TrioqueueError(
                f"ex must be a transaction of this MemoryDriver, got {type(ex).__name__}"
            )
        return ex

    async def _run(self, doing: str, ex: Any, op: Callable[[_Stmt], T]) -> T:
        """Run ``op`` as one statement: checkpoint, then evaluate and apply atomically. A
        statement blocked by another transaction's lock waits for it to end and runs again.
        """
        tx = self._tx(ex)
        await trio.lowlevel.checkpoint()
        while True:
            stmt = _Stmt(self, tx)
            try:
                if tx is not None:
                    if not tx._open:
                        raise MemoryStoreError("the transaction is no longer open")
                    if tx._failed is not None:
                        raise MemoryStoreError(
                            "current transaction is aborted, commands ignored until end of "
                            f"transaction block (after: {tx._failed})"
                        )
                result = op(stmt)
            except _Blocked as blocked:
                try:
                    await self._wait(blocked.tx, tx)
                except MemoryStoreError as exc:
                    raise self._failure(doing, tx, exc) from exc
                continue
            except MemoryStoreError as exc:
                raise self._failure(doing, tx, exc) from exc
            self._apply(stmt)
            return result

    @staticmethod
    def _failure(doing: str, tx: MemoryTransaction | None, exc: MemoryStoreError) -> DatabaseError:
        if tx is not None and tx._open and tx._failed is None:
            tx._failed = exc
        return DatabaseError(doing, exc, rejected_data=isinstance(exc, MemoryDataError))

    async def _wait(self, blocker: MemoryTransaction, tx: MemoryTransaction | None) -> None:
        if blocker._owner is trio.lowlevel.current_task():
            raise MemoryStoreError(
                "this statement waits for a row of a transaction that the same task holds "
                "open, so it would wait forever (run it inside that transaction: ex=tx)"
            )
        if tx is None:
            await blocker._done.wait()
            return
        step: MemoryTransaction | None = blocker
        while step is not None:
            if step is tx:
                raise MemoryStoreError(
                    "deadlock detected: two transactions wait for each other's rows"
                )
            step = step._waiting_for
        tx._waiting_for = blocker
        try:
            await blocker._done.wait()
        except trio.Cancelled:
            # As in PostgreSQL, a statement cancelled inside a transaction aborts it.
            if tx._failed is None:
                tx._failed = MemoryStoreError("canceling statement due to user request")
            raise
        finally:
            tx._waiting_for = None

    def _apply(self, stmt: _Stmt) -> None:
        tx = stmt.tx
        if tx is not None:
            for key in stmt.locks:
                self._locks[key] = tx
            tx._locks |= stmt.locks
            tx._jobs.update(stmt.jobs)
            tx._holders.update(stmt.holders)
            tx._queues.update(stmt.queues)
            tx._periodic.update(stmt.periodic)
            tx._notes.extend(stmt.notes)
            assert stmt.leader is None
            return
        for job_id, job in stmt.jobs.items():
            self._store_job(job_id, job)
        for name, queue in stmt.queues.items():
            if queue is None:
                self._queues.pop(name, None)
            else:
                self._queues[name] = queue
        self._periodic.update(stmt.periodic)
        if stmt.leader is not None:
            self._leader = stmt.leader[0]
        self._deliver(stmt.notes)

    def _store_job(self, job_id: int, job: _Job | None) -> None:
        """Write one committed row, keeping the indexes right."""
        old = self._jobs.get(job_id)
        if old is not None:
            self._by_state[old.state].discard(job_id)
            if old.state is JobState.AVAILABLE:
                self._available[old.queue].discard(job_id)
            if old.holds_key and self._holders.get(old.unique_key) == job_id:  # type: ignore[arg-type]
                del self._holders[old.unique_key]  # type: ignore[arg-type]
        if job is None:
            self._jobs.pop(job_id, None)
            return
        self._jobs[job_id] = job
        self._by_state[job.state].add(job_id)
        if job.state is JobState.AVAILABLE:
            self._available.setdefault(job.queue, set()).add(job_id)
        if job.holds_key:
            assert job.unique_key is not None
            self._holders[job.unique_key] = job_id

    def _deliver(self, notes: Sequence[Notification]) -> None:
        # PostgreSQL sends identical notifications of one transaction once.
        for note in dict.fromkeys(notes):
            for listener in self._listeners:
                listener._offer(note)

    def _jobs_in(self, state: JobState) -> list[_Job]:
        return [self._jobs[i] for i in self._by_state[state]]

    # ---- transactions

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTransaction]:
        """A transaction for the block; pass the yielded executor as ``ex=``.

        Commits when the block exits normally: every write becomes visible at once and the
        notifications sent inside it are delivered. Rolls back when the block raises or is
        cancelled (also when cancelled just before the commit): nothing it wrote is kept
        and nothing it notified is sent. Ids it took are not reused.

        Raises:
          DatabaseError: a statement inside the block failed and the block went on (the
            transaction was aborted and has been rolled back), or the commit found a row
            that breaks the unique index (nothing was applied).
        """
        await trio.lowlevel.checkpoint()
        tx = MemoryTransaction(self)
        self._open_txs[tx] = None
        try:
            yield tx
        except BaseException:
            self._end(tx)
            raise
        if tx._failed is not None:
            self._end(tx)
            raise DatabaseError(
                "running a transaction",
                MemoryStoreError(
                    "the transaction had failed (an error was caught inside the block)"
                    f" and has been rolled back: {tx._failed}"
                ),
            )
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._end(tx)
            raise
        try:
            self._commit(tx)
        except MemoryStoreError as exc:
            raise DatabaseError("running a transaction", exc) from exc
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _commit(self, tx: MemoryTransaction) -> None:
        try:
            for job in tx._jobs.values():
                if job is not None and job.holds_key:
                    assert job.unique_key is not None
                    other = self._holders.get(job.unique_key)
                    if other is not None and other != job.id and other not in tx._jobs:
                        raise MemoryDataError(
                            'duplicate key value violates unique constraint "tq_job_unique_idx"'
                        )
            for job_id, maybe in tx._jobs.items():
                self._store_job(job_id, maybe)
            for name, queue in tx._queues.items():
                if queue is None:
                    self._queues.pop(name, None)
                else:
                    self._queues[name] = queue
            self._periodic.update(tx._periodic)
            notes = list(tx._notes)
        finally:
            self._end(tx)
        self._deliver(notes)

    def _end(self, tx: MemoryTransaction) -> None:
        """Close ``tx``: drop what it did not commit, release its locks, wake its waiters."""
        if not tx._open:
            return
        tx._open = False
        for key in tx._locks:
            if self._locks.get(key) is tx:
                del self._locks[key]
        tx._locks.clear()
        tx._jobs.clear()
        tx._holders.clear()
        tx._queues.clear()
        tx._periodic.clear()
        tx._notes.clear()
        self._open_txs.pop(tx, None)
        tx._done.set()

    # ---- inserting

    def _new_job(self, p: JobInsertParams, tags: tuple[str, ...], now: datetime) -> _Job:
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
    ) -> list[tuple[Row, bool]]:
        """Insert a batch in one statement; return ``(row, skipped)`` in input order.

        A job whose unique key a live job holds is not inserted: that job comes back with
        ``skipped=True`` (and is locked until ``ex`` ends, as ``ON CONFLICT DO UPDATE`` does).
        Two jobs of the batch with one key fail the statement, as in PostgreSQL ("cannot
        affect row a second time"). Notifies ``tq_insert`` for ``notify_queues`` (at
        commit, inside a transaction) unless the batch is empty.

        Raises DatabaseError for a CHECK violation or bad JSON; nothing is inserted.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[tuple[Row, bool]]:
            out: list[tuple[Row, bool]] = []
            touched: set[int] = set()
            for p in params:
                joined = ",".join(p.tags)
                job = self._new_job(p, tuple(joined.split(",")) if joined else (), at)
                if job.holds_key:
                    assert job.unique_key is not None
                    found = st.holder(job.unique_key)
                    if found is not None:
                        if found in touched:
                            raise MemoryStoreError(
                                "ON CONFLICT DO UPDATE command cannot affect row a second time"
                            )
                        existing = st.job(found)
                        assert existing is not None
                        updated = attrs.evolve(existing, kind=job.kind)
                        st.put_job(updated, existing)
                        touched.add(found)
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

    # ---- working jobs

    async def job_get_available(
        self, queue: str, now: datetime, limit: int, client_id: str
    ) -> list[Row]:
        """Claim up to ``limit`` available jobs of ``queue`` due at ``now``, in (priority,
        scheduled_at, id) order, unless the queue is paused: each becomes ``running`` with
        attempt + 1, attempted_at = now and ``client_id`` appended to attempted_by (the last
        100 kept). Rows an open transaction holds are skipped. Returned in claim order.

        On cancellation: nothing was claimed.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[Row]:
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

    async def job_claim(self, job_id: int, now: datetime, client_id: str) -> Row | None:
        """Claim one job by id (for ``trioqueue.testing``): an available, pending,
        retryable or scheduled job becomes ``running`` as ``job_get_available`` makes it,
        whatever its queue, schedule or pause; returns its row, else None. Waits while
        another transaction holds the row.

        On cancellation: nothing was claimed.
        """
        at = _ts(now)

        def op(st: _Stmt) -> Row | None:
            job = st.job(job_id)
            if job is None or job.state is JobState.RUNNING or job.state in FINALIZED_STATES:
                return None
            running = _claimed(job, at, client_id)
            st.put_job(running, job)
            return running.row()

        return await self._run(f"claiming job {job_id}", None, op)

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
    ) -> list[Row]:
        """Write a batch of outcomes, each only if its job is still ``running`` the run the
        outcome came from (its ``attempted_at``, when given); return the rows written (in
        input order; an id given twice is written once, from its first outcome). A job
        whose cancellation was requested (``cancel_attempted_at``) and whose outcome is
        retryable, scheduled or available ends ``cancelled`` with finalized_at = now. An
        error is appended to ``errors``; metadata is merged in. The rows come back with
        ``args`` None, as from PostgreSQL (the caller has them); with ``rows=False``, as
        ``(id,)`` only. Waits while an open
        transaction holds one of the rows.

        Raises DatabaseError (nothing written) when an outcome breaks a constraint, such as
        a finalized state without finalized_at. On cancellation: nothing was written.
        """
        at = _ts(now)

        def op(st: _Stmt) -> list[Row]:
            out = []
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
                )
                st.put_job(new, old)
                row = new.row()
                if rows:
                    out.append((*row[:2], None, *row[3:]))  # args left out, as the SQL does
                else:
                    out.append((row[0],))
            return out

        return await self._run("writing job outcomes", None, op)

    # ---- reading and managing jobs

    async def job_get(self, job_id: int, *, ex: Any = None) -> Row | None:
        """The job's row as the caller's transaction sees it, or None."""

        def op(st: _Stmt) -> Row | None:
            job = st.job(job_id)
            return None if job is None else job.row()

        return await self._run(f"getting job {job_id}", ex, op)

    async def job_list(self, params: JobListParams, *, ex: Any = None) -> list[Row]:
        """Jobs matching every given filter (tags: the job has all of them), with ids
        above ``params.after``, ordered by id, at most ``params.limit``."""
        ids = None if params.ids is None else set(params.ids)
        kinds = None if params.kinds is None else set(params.kinds)
        queues = None if params.queues is None else set(params.queues)
        states = None if params.states is None else {JobState(s) for s in params.states}
        priorities = None if params.priorities is None else set(params.priorities)
        tags = None if params.tags is None else {t[:255] for t in params.tags}
        after = params.after

        def match(job: _Job) -> bool:
            return (
                (ids is None or job.id in ids)
                and (kinds is None or job.kind in kinds)
                and (queues is None or job.queue in queues)
                and (states is None or job.state in states)
                and (priorities is None or job.priority in priorities)
                and (tags is None or tags.issubset(job.tags))
                and (after is None or (job.id < after if params.descending else job.id > after))
            )

        def op(st: _Stmt) -> list[Row]:
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

    async def job_count_live(self) -> list[tuple[str, str, int]]:
        """Exact ``(queue, state, count)`` of every queue and unfinalized state with jobs."""

        def op(st: _Stmt) -> list[tuple[str, str, int]]:
            counts: dict[tuple[str, str], int] = {}
            for job in st.visible_jobs():
                if job.state not in FINALIZED_STATES:
                    key = (job.queue, job.state.value)
                    counts[key] = counts.get(key, 0) + 1
            return [(q, s, n) for (q, s), n in sorted(counts.items())]

        return await self._run("counting live jobs", None, op)

    async def job_count_finalized(
        self, exact_up_to: int
    ) -> list[tuple[str, int | None, int | None]]:
        """``(state, count, estimate)`` per finalized state; the memory store counts
        exactly, so the estimate is the exact count."""

        def op(st: _Stmt) -> list[tuple[str, int | None, int | None]]:
            counts = dict.fromkeys(sorted(FINALIZED_STATES), 0)
            for job in st.visible_jobs():
                if job.state in counts:
                    counts[job.state] += 1
            return [(s.value, min(n, exact_up_to), n) for s, n in counts.items()]

        return await self._run("counting finalized jobs", None, op)

    async def job_count_finalized_since(self, since: datetime, limit: int) -> dict[str, int]:
        """Per finalized state, jobs finalized at or after ``since`` (at most ``limit``)."""
        start = _ts(since)

        def op(st: _Stmt) -> dict[str, int]:
            counts = dict.fromkeys(sorted(s.value for s in FINALIZED_STATES), 0)
            for job in st.visible_jobs():
                if job.finalized_at is not None and job.finalized_at >= start:
                    counts[job.state.value] += 1
            return {s: min(n, limit) for s, n in counts.items()}

        return await self._run("counting recently finalized jobs", None, op)

    async def job_cancel(self, job_id: int, now: datetime, *, ex: Any = None) -> Row | None:
        """Cancel a job; return its row afterwards, or None if there is no such job.

        A queued job becomes ``cancelled`` (finalized_at = now). A running job stays
        ``running`` with ``cancel_attempted_at`` in its metadata, and a ``cancel`` message
        goes to the control channel (at commit, inside a transaction). A finalized job is
        returned unchanged. Waits while another transaction holds the row.
        """
        at = _ts(now)

        def op(st: _Stmt) -> Row | None:
            old = st.job(job_id)
            if old is None or old.state in FINALIZED_STATES:
                return None if old is None else old.row()
            if old.state is JobState.RUNNING:
                new = attrs.evolve(
                    old,
                    finalized_at=None,
                    metadata=_concat(old.metadata, {"cancel_attempted_at": _ts_json(at)}),
                )
            else:
                new = attrs.evolve(old, state=JobState.CANCELLED, finalized_at=at)
            st.put_job(new, old)
            if new.state is JobState.RUNNING:
                payload = json.dumps({"action": "cancel", "job_id": job_id, "queue": new.queue})
                st.notify(CONTROL_CHANNEL, payload)
            return new.row()

        return await self._run(f"cancelling job {job_id}", ex, op)

    async def job_retry(self, job_id: int, now: datetime, *, ex: Any = None) -> Row | None:
        """Make a job available now; return its row afterwards, or None if there is none.

        A running job is returned unchanged. Otherwise: ``available``, finalized_at cleared,
        scheduled_at = now (an available job keeps an earlier one), one more attempt when it
        has used them all, ``cancel_attempted_at`` dropped; ``tq_insert`` is notified.
        Raises DatabaseError if another live job holds its unique key.
        """
        at = _ts(now)

        def op(st: _Stmt) -> Row | None:
            old = st.job(job_id)
            if old is None or old.state is JobState.RUNNING:
                return None if old is None else old.row()
            keep = old.state is JobState.AVAILABLE and old.scheduled_at < at
            new = attrs.evolve(
                old,
                state=JobState.AVAILABLE,
                finalized_at=None,
                scheduled_at=old.scheduled_at if keep else at,
                max_attempts=old.attempt + 1
                if old.attempt >= old.max_attempts
                else old.max_attempts,
                metadata=_minus(old.metadata, "cancel_attempted_at"),
            )
            st.put_job(new, old)
            st.notify(INSERT_CHANNEL, _insert_payload(new.queue))
            return new.row()

        return await self._run(f"retrying job {job_id}", ex, op)

    async def job_delete(self, job_id: int, *, ex: Any = None) -> Row | None:
        """Delete a job unless it is running; return the deleted row, else None."""

        def op(st: _Stmt) -> Row | None:
            old = st.job(job_id)
            if old is None or old.state is JobState.RUNNING:
                return None
            st.delete_job(old)
            return old.row()

        return await self._run(f"deleting job {job_id}", ex, op)

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

    async def job_schedule(self, horizon: datetime, now: datetime, limit: int) -> dict[str, int]:
        """Move up to ``limit`` scheduled/retryable jobs due by ``horizon`` to ``available``,
        in (priority, scheduled_at, id) order, skipping rows an open transaction holds;
        return how many became available per queue.

        A job whose unique key another live job holds, or an earlier job of the same
        batch takes, is ``discarded`` instead (finalized_at = now, metadata
        ``unique_key_conflict: scheduler_discarded``). Sends no notification (the
        scheduler does).
        """
        until, at = _ts(horizon), _ts(now)

        def op(st: _Stmt) -> dict[str, int]:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            candidates = [
                job
                for state in _SCHEDULABLE
                for job in self._jobs_in(state)
                if job.scheduled_at <= until and not st.skip_locked(("job", job.id))
            ]
            candidates.sort(key=lambda j: (j.priority, j.scheduled_at, j.id))
            due = candidates[:limit]
            ranked = [
                job
                for job in due
                if job.unique_key is not None
                and job.unique_states is not None
                and JobState.AVAILABLE in job.unique_states
            ]
            # Per key, the job holding it now ranks first, then (priority, scheduled_at, id).
            ranked.sort(key=lambda j: not j.holds_key)
            first: set[bytes] = set()
            conflicting: set[int] = set()
            for job in ranked:
                assert job.unique_key is not None
                if job.unique_key in first:
                    conflicting.add(job.id)
                    continue
                first.add(job.unique_key)
                # The statement's snapshot: committed rows, including other due rows.
                other = self._holders.get(job.unique_key)
                if other is not None and other != job.id:
                    conflicting.add(job.id)
            moved: dict[str, int] = {}
            for job in due:
                if job.id in conflicting:
                    assert job.unique_states is not None
                    new = attrs.evolve(
                        job,
                        state=JobState.DISCARDED,
                        finalized_at=at,
                        metadata=_concat(
                            job.metadata, {"unique_key_conflict": "scheduler_discarded"}
                        ),
                        # Discarded but still holding the key is what the index refuses.
                        unique_states=None
                        if JobState.DISCARDED in job.unique_states
                        else job.unique_states,
                    )
                else:
                    new = attrs.evolve(job, state=JobState.AVAILABLE, finalized_at=None)
                    moved[job.queue] = moved.get(job.queue, 0) + 1
                st.put_job(new, job)
            return moved

        return await self._run("scheduling due jobs", None, op)

    # ---- queues

    async def queue_upsert(self, name: str, now: datetime) -> bool:
        """Create the queue's row or touch its updated_at; return whether it is paused."""
        at = _ts(now)

        def op(st: _Stmt) -> bool:
            _check_length("tq_queue", "tq_queue_name_length", name)
            st.lock(("queue", name))
            old = st.queue(name)
            new = _Queue(name, at, None, at) if old is None else attrs.evolve(old, updated_at=at)
            st.queues[name] = new
            return new.paused_at is not None

        return await self._run(f"registering queue {name!r}", None, op)

    def _queue_change(self, action: str, name: str, at: datetime) -> Callable[[_Stmt], list[str]]:
        pause = action == "pause"

        def op(st: _Stmt) -> list[str]:
            changed: list[_Queue] = []
            if name == "*":
                for row in st.visible_queues():
                    if (row.paused_at is None) == pause:
                        st.lock(("queue", row.name))
                        changed.append(
                            attrs.evolve(row, paused_at=at if pause else None, updated_at=at)
                        )
            else:
                old = st.queue(name)
                if pause:
                    _check_length("tq_queue", "tq_queue_name_length", name)
                    st.lock(("queue", name))
                    changed.append(
                        _Queue(name, at, at, at)
                        if old is None
                        else attrs.evolve(old, paused_at=old.paused_at or at, updated_at=at)
                    )
                elif old is not None:
                    st.lock(("queue", name))
                    changed.append(attrs.evolve(old, paused_at=None, updated_at=at))
            for queue in changed:
                st.queues[queue.name] = queue
                st.notify(CONTROL_CHANNEL, json.dumps({"action": action, "queue": queue.name}))
            return [q.name for q in changed]

        return op

    async def queue_pause(self, name: str, now: datetime, *, ex: Any = None) -> list[str]:
        """Pause a queue, creating its row if need be, and return ``[name]`` (even when it
        was paused already); ``"*"`` pauses every known unpaused queue and returns those.
        Sends a ``pause`` control message per name returned (at commit, inside a
        transaction)."""
        op = self._queue_change("pause", name, _ts(now))
        return await self._run(f"pausing queue {name!r}", ex, op)

    async def queue_resume(self, name: str, now: datetime, *, ex: Any = None) -> list[str]:
        """Resume a queue and return ``[name]`` if it has a row (paused or not); ``"*"``
        resumes every paused queue and returns those. Sends a ``resume`` control message per
        name returned."""
        op = self._queue_change("resume", name, _ts(now))
        return await self._run(f"resuming queue {name!r}", ex, op)

    async def queue_paused(self, names: Sequence[str]) -> set[str]:
        """Which of these queues are paused (committed state)."""

        def op(st: _Stmt) -> set[str]:
            return {
                n
                for n in names
                if (q := self._queues.get(n)) is not None and q.paused_at is not None
            }

        return await self._run("reading queue state", None, op)

    async def queue_list(self) -> list[Row]:
        """Every queue row (committed state), ordered by name, with its available and
        running job counts: ``(name, paused_at, created_at, updated_at, available,
        running)``."""

        def op(st: _Stmt) -> list[Row]:
            counts: dict[tuple[str, JobState], int] = {}
            for job in st.visible_jobs():
                if job.state in (JobState.AVAILABLE, JobState.RUNNING):
                    key = (job.queue, job.state)
                    counts[key] = counts.get(key, 0) + 1
            return [
                (
                    q.name,
                    q.paused_at,
                    q.created_at,
                    q.updated_at,
                    counts.get((q.name, JobState.AVAILABLE), 0),
                    counts.get((q.name, JobState.RUNNING), 0),
                )
                for q in sorted(st.visible_queues(), key=lambda q: q.name)
            ]

        return await self._run("listing queues", None, op)

    async def queue_delete_stale(self, updated_before: datetime) -> list[str]:
        """Delete the queue rows not updated since ``updated_before``, unless paused;
        return their names."""
        before = _ts(updated_before)

        def op(st: _Stmt) -> list[str]:
            names = []
            for queue in list(self._queues.values()):
                if queue.updated_at < before and queue.paused_at is None:
                    st.lock(("queue", queue.name))
                    st.queues[queue.name] = None
                    names.append(queue.name)
            return names

        return await self._run("deleting stale queues", None, op)

    # ---- notifications

    async def notify_many(self, channel: str, payloads: Sequence[str]) -> None:
        """Send each payload on ``channel`` to every open listener of it (identical
        payloads once). Raises DatabaseError for an empty or too long channel name or a
        payload of 8000 bytes or more, sending nothing."""

        def op(st: _Stmt) -> None:
            if not payloads:
                return
            if not channel:
                raise MemoryDataError("channel name cannot be empty")
            if len(channel.encode()) >= _NAMEDATALEN:
                raise MemoryDataError("channel name too long")
            for payload in payloads:
                if len(payload.encode()) >= _NOTIFY_PAYLOAD_MAX:
                    raise MemoryDataError("payload string too long")
                st.notify(channel, payload)

        await self._run("sending notifications", None, op)

    @asynccontextmanager
    async def open_listener(self, channels: Sequence[str]) -> AsyncIterator[MemoryListener]:
        """A listener for ``channels`` for the block: it receives what is committed on them
        from now on (see :class:`MemoryListener` about overflow)."""
        await trio.lowlevel.checkpoint()
        listener = MemoryListener(channels, self._listener_buffer)
        self._listeners[listener] = None
        try:
            yield listener
        finally:
            self._listeners.pop(listener, None)

    # ---- leadership

    async def leader_attempt_elect(
        self, leader_id: str, now: datetime, expires_at: datetime
    ) -> bool:
        """Become leader (nobody leads, or the term has expired before ``now``) or extend
        our own term (keeping elected_at); return whether ``leader_id`` leads afterwards."""
        at, until = _ts(now), _ts(expires_at)

        def op(st: _Stmt) -> bool:
            _check_length("tq_leader", "tq_leader_id_length", leader_id)
            current = self._leader
            if current is None:
                st.leader = (_Leader(leader_id, at, until),)
                return True
            if current.expires_at < at or current.leader_id == leader_id:
                same = current.leader_id == leader_id
                st.leader = (_Leader(leader_id, current.elected_at if same else at, until),)
                return True
            return False

        return await self._run("electing a leader", None, op)

    async def leader_resign(self, leader_id: str) -> bool:
        """Give up leadership if ``leader_id`` holds it (announced on the leadership
        channel); return whether it did."""

        def op(st: _Stmt) -> bool:
            current = self._leader
            if current is None or current.leader_id != leader_id:
                return False
            st.leader = (None,)
            payload = '{"action" : "resigned", "leader_id" : ' + _json_text(leader_id) + "}"
            st.notify(LEADERSHIP_CHANNEL, payload)
            return True

        return await self._run("resigning leadership", None, op)

    async def leader_get(self) -> tuple[str, datetime, datetime] | None:
        """``(leader_id, elected_at, expires_at)``, or None when nobody leads."""

        def op(st: _Stmt) -> tuple[str, datetime, datetime] | None:
            current = self._leader
            if current is None:
                return None
            return (current.leader_id, current.elected_at, current.expires_at)

        return await self._run("reading the leader", None, op)

    # ---- maintenance

    async def job_get_stuck(
        self, attempted_before: datetime, limit: int, after_id: int
    ) -> list[Row]:
        """Running jobs attempted before ``attempted_before`` with ids above ``after_id``,
        by id, at most ``limit``."""
        before = _ts(attempted_before)

        def op(st: _Stmt) -> list[Row]:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            found = sorted(
                (
                    j
                    for j in self._jobs_in(JobState.RUNNING)
                    if j.attempted_at is not None and j.attempted_at < before and j.id > after_id
                ),
                key=lambda j: j.id,
            )
            return [j.row() for j in found[:limit]]

        return await self._run("looking for stuck jobs", None, op)

    async def job_rescue_many(self, rescues: Sequence[JobRescue]) -> list[tuple[int, str, str]]:
        """Apply the rescuer's decisions to jobs still running the same attempt (same
        attempted_at): new state, finalized_at, scheduled_at (if given), the error appended,
        ``rescue_count`` + 1. Returns ``(id, queue, state)`` of each row written."""

        def op(st: _Stmt) -> list[tuple[int, str, str]]:
            out = []
            seen: set[int] = set()
            for r in rescues:
                if r.id in seen:
                    continue
                seen.add(r.id)
                old = st.job(r.id)
                if (
                    old is None
                    or old.state is not JobState.RUNNING
                    or old.attempted_at != _ts(r.attempted_at)
                ):
                    continue
                new = attrs.evolve(
                    old,
                    state=JobState(r.state),
                    finalized_at=_opt_ts(r.finalized_at),
                    scheduled_at=_ts(r.scheduled_at) if r.scheduled_at else old.scheduled_at,
                    errors=(*old.errors, _jsonb(r.error_json)),
                    metadata=_concat(
                        old.metadata, {"rescue_count": _rescue_count(old.metadata) + 1}
                    ),
                )
                st.put_job(new, old)
                out.append((new.id, new.queue, new.state.value))
            return out

        return await self._run("rescuing stuck jobs", None, op)

    async def job_delete_finalized(
        self, state: JobState, finalized_before: datetime, limit: int
    ) -> int:
        """Delete up to ``limit`` jobs in ``state`` finalized before ``finalized_before``,
        oldest first, skipping rows an open transaction holds; return how many."""
        before = _ts(finalized_before)

        def op(st: _Stmt) -> int:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            doomed = sorted(
                (
                    j
                    for j in self._jobs_in(JobState(state))
                    if j.finalized_at is not None
                    and j.finalized_at < before
                    and not st.skip_locked(("job", j.id))
                ),
                key=lambda j: (j.finalized_at, j.id),
            )[:limit]
            for job in doomed:
                st.delete_job(job)
            return len(doomed)

        return await self._run(f"deleting old {JobState(state).value} jobs", None, op)

    # ---- periodic jobs

    async def periodic_job_get_many(
        self, ids: Sequence[str], *, ex: Any = None
    ) -> dict[str, PeriodicJobState]:
        """The stored state of each of these periodic jobs that has a row."""

        def op(st: _Stmt) -> dict[str, PeriodicJobState]:
            found = {}
            for pid in ids:
                row = st.periodic_row(pid)
                if row is not None:
                    found[pid] = row.state()
            return found

        return await self._run("reading periodic job state", ex, op)

    async def periodic_job_save(
        self,
        state: PeriodicJobState,
        expected: PeriodicJobState | None,
        now: datetime,
        *,
        ex: Any = None,
    ) -> bool:
        """Write ``state`` if there is no row yet, or if the row still has ``expected``'s
        next_run_at, schedule and last_run_at (None: matches no row); last_run_at never
        moves back.
        Returns whether it wrote. The row stays locked until ``ex`` ends either way."""
        at = _ts(now)
        next_run = _ts(state.next_run_at)
        last_run = _opt_ts(state.last_run_at)
        want_next = None if expected is None else _ts(expected.next_run_at)
        want_schedule = None if expected is None else expected.schedule
        want_last = None if expected is None else _opt_ts(expected.last_run_at)

        def op(st: _Stmt) -> bool:
            _check_length("tq_periodic_job", "tq_periodic_job_id_length", state.id)
            st.lock(("periodic", state.id))
            old = st.periodic_row(state.id)
            if old is None:
                st.periodic[state.id] = _Periodic(state.id, state.schedule, next_run, last_run, at)
                return True
            if (old.next_run_at, old.schedule, old.last_run_at) != (
                want_next,
                want_schedule,
                want_last,
            ):
                return False
            if old.last_run_at is None:
                latest = last_run
            elif last_run is None:
                latest = old.last_run_at
            else:
                latest = max(old.last_run_at, last_run)
            st.periodic[state.id] = _Periodic(state.id, state.schedule, next_run, latest, at)
            return True

        return await self._run(f"saving periodic job state of {state.id!r}", ex, op)

    # ---- the rest

    async def ping(self) -> None:
        """Always fine (a checkpoint)."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Nothing to close: the store lives as long as the driver (a named store as long
        as the process), so clients may come and go."""
        await trio.lowlevel.checkpoint()


_named: dict[str, MemoryDriver] = {}
_named_lock = threading.Lock()


def memory_driver_for_url(url: str) -> MemoryDriver:
    """The memory store for a ``memory://`` URL: ``memory://NAME`` is the process-wide
    store of that name (made on first use, shared by every client opened with it);
    ``memory://`` alone is a new private store each time."""
    if not url.startswith(MEMORY_URL_PREFIX):
        raise ValueError(f"not a memory URL (must start with {MEMORY_URL_PREFIX!r}): {url!r}")
    name = url[len(MEMORY_URL_PREFIX) :]
    if not name:
        return MemoryDriver()
    with _named_lock:
        driver = _named.get(name)
        if driver is None:
            driver = _named[name] = MemoryDriver()
        return driver
