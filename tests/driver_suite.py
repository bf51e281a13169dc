"""The driver conformance suite (the protocol in trioqueue/driver/protocol.py).

Every ``case`` is a plain ``async def name(driver) -> None`` that exercises the Driver
protocol only, so ``test_driver_conformance.py`` runs each one against every driver. Times
are fixed (``NOW`` plus offsets), never the wall clock. Where a test needs another task to
be blocked on a lock before it checks that nothing happened yet, it first waits until that
task is seen waiting (``waiting_for_a_lock``): on PostgreSQL a session of the database
waits on a lock (``pg_stat_activity``, read through the driver's own pool, outside the
protocol); in memory every other task is blocked.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import trioqueue as tq
from trioqueue._codec import row_to_job, unique_states_bits
from trioqueue.driver.protocol import (
    CONTROL_CHANNEL,
    INSERT_CHANNEL,
    LEADERSHIP_CHANNEL,
    Driver,
    JobInsertParams,
    JobOutcome,
    JobRescue,
    JobRow,
    LeaderRow,
    Listener,
    Notification,
    PeriodicJobState,
    QueueRow,
    WrittenRow,
)
from trioqueue.job import DEFAULT_UNIQUE_STATES, JobListParams, JobState
from trioqueue.migrations import latest_version

Case = Callable[[Driver], Awaitable[None]]
SUITE: list[Case] = []


def case(fn: Case) -> Case:
    SUITE.append(fn)
    return fn


NOW = datetime(2026, 1, 1, tzinfo=UTC)
FINALIZED = (JobState.COMPLETED, JobState.CANCELLED, JobState.DISCARDED)
ALL_STATES = frozenset(JobState)
MINIMAL_STATES = frozenset(
    {JobState.AVAILABLE, JobState.PENDING, JobState.RUNNING, JobState.SCHEDULED}
)

Row = JobRow

# Row positions (a JobRow is a tuple too; the named fields say the same).
ID, KIND, ARGS, QUEUE, STATE, PRIORITY, ATTEMPT, MAX_ATTEMPTS = range(8)
ATTEMPTED_AT, ATTEMPTED_BY, CREATED_AT, FINALIZED_AT, SCHEDULED_AT = range(8, 13)
ERRORS, METADATA, TAGS = range(13, 16)


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def params(
    *,
    queue: str = "default",
    kind: str = "noop",
    args: Any = None,
    priority: int = 1,
    max_attempts: int = 3,
    scheduled_at: datetime = NOW,
    state: JobState = JobState.AVAILABLE,
    tags: tuple[str, ...] = (),
    metadata: Any = None,
    unique_key: bytes | None = None,
    unique_states: frozenset[JobState] | None = None,
    args_json: str | None = None,
    metadata_json: str | None = None,
) -> JobInsertParams:
    if unique_key is not None and unique_states is None:
        unique_states = DEFAULT_UNIQUE_STATES
    return JobInsertParams(
        args_json=args_json if args_json is not None else json.dumps(args or {}),
        kind=kind,
        max_attempts=max_attempts,
        metadata_json=metadata_json if metadata_json is not None else json.dumps(metadata or {}),
        priority=priority,
        queue=queue,
        scheduled_at=scheduled_at,
        state=state,
        tags=tags,
        unique_key=unique_key,
        unique_states=None if unique_states is None else unique_states_bits(unique_states),
    )


async def insert(driver: Driver, *many: JobInsertParams, now: datetime = NOW) -> list[Row]:
    return [row for row, _ in await driver.job_insert_many(list(many), [], now)]


async def insert_one(driver: Driver, now: datetime = NOW, **kw: Any) -> Row:
    [row] = await insert(driver, params(**kw), now=now)
    return row


async def get(driver: Driver, job_id: int) -> Row:
    row = await driver.job_get(job_id)
    assert row is not None, f"job {job_id} is gone"
    return row


_queue_numbers = itertools.count()


async def running_job(driver: Driver, now: datetime = NOW, **kw: Any) -> Row:
    """Insert one job (by default in a queue of its own, due ``now``) and claim it at ``now``."""
    kw.setdefault("queue", f"rq{next(_queue_numbers)}")
    kw.setdefault("scheduled_at", now)
    row = await insert_one(driver, now=now, **kw)
    [claimed] = await driver.job_get_available(row[QUEUE], now, 1, "client-1")
    assert claimed[ID] == row[ID]
    return claimed


def outcome(job_id: int, state: JobState, **kw: Any) -> JobOutcome:
    finalized = at(10) if state in FINALIZED else None
    values: dict[str, Any] = {
        "id": job_id,
        "state": state,
        "finalized_at": finalized,
        "scheduled_at": None,
        "give_back_attempt": False,
        "error_json": None,
        "metadata_json": None,
    }
    values.update(kw)
    return JobOutcome(**values)


async def finalize(driver: Driver, state: JobState, finalized_at: datetime, **kw: Any) -> Row:
    job = await running_job(driver, **kw)
    [row] = await driver.job_set_state_if_running_many(
        [outcome(job[ID], state, finalized_at=finalized_at)], finalized_at
    )
    # The write may leave out args (the caller has them): return the whole stored row.
    assert row[ARGS] in (None, job[ARGS])
    stored = await driver.job_get(job[ID])
    assert stored is not None and stored[:ARGS] + stored[ARGS + 1 :] == row[:ARGS] + row[ARGS + 1 :]
    return stored


class _AnyEstimate:
    """Equal to any estimate: an int, or None (no statistics yet)."""

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, int)

    def __lt__(self, other: object) -> bool:
        return False


ANY_ESTIMATE: Any = _AnyEstimate()


def ids(rows: list[Row]) -> list[int]:
    return [r[ID] for r in rows]


LOCK_WAITS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def waiting_for_a_lock(driver: Driver) -> None:
    """Return once another task's statement waits for a lock: the positive fact a check
    that it has not gone through yet needs first."""
    pool = getattr(driver, "pool", None)
    if pool is None:  # the memory driver: the task is parked on its lock
        await trio.testing.wait_all_tasks_blocked()
        return
    with trio.fail_after(10):
        while True:
            if await pool.fetchval(LOCK_WAITS):
                return
            await trio.sleep(0.01)


async def collect_until(listener: Listener, channel: str, marker: str) -> list[Notification]:
    """Every notification up to (not including) ``marker`` on ``channel``."""
    got: list[Notification] = []
    with trio.fail_after(5):
        while True:
            for note in await listener.wait():
                if note.channel == channel and note.payload == marker:
                    return got
                got.append(note)


async def notes_of(driver: Driver, listener: Listener, marker: str) -> list[tuple[str, Any]]:
    """Send ``marker`` and return what the listener got before it, payloads decoded."""
    await driver.notify_many(INSERT_CHANNEL, [marker])
    return [
        (n.channel, json.loads(n.payload))
        for n in await collect_until(listener, INSERT_CHANNEL, marker)
    ]


CHANNELS = [INSERT_CHANNEL, CONTROL_CHANNEL, LEADERSHIP_CHANNEL, "custom"]


# ---------------------------------------------------------------------------------- basics


@case
async def schema_version_clock_and_ping(driver: Driver) -> None:
    assert await driver.schema_version() == latest_version()
    await driver.ping()
    now = driver.clock()
    assert now.utcoffset() == timedelta(0)
    assert driver.clock() >= now


@case
async def rows_come_typed(driver: Driver) -> None:
    """Every row comes back as the protocol's NamedTuple, so callers read it by name."""
    [(inserted, skipped)] = await driver.job_insert_many([params(queue="typed")], [], NOW)
    assert type(inserted) is JobRow and skipped is False
    assert inserted.queue == "typed" and inserted.state == "available"
    assert type(await driver.job_get(inserted.id)) is JobRow
    assert all(type(r) is JobRow for r in await driver.job_list(JobListParams(limit=5)))
    [claimed] = await driver.job_get_available("typed", NOW, 1, "client-1")
    assert type(claimed) is JobRow and claimed.attempted_by == ["client-1"]
    written = await driver.job_set_state_if_running_many(
        [outcome(claimed.id, JobState.COMPLETED)], at(1), rows=False
    )
    assert written == [WrittenRow(claimed.id)] and type(written[0]) is WrittenRow
    await driver.queue_upsert("typed", NOW)
    queues = await driver.queue_list()
    assert queues and all(type(q) is QueueRow for q in queues)
    assert await driver.leader_attempt_elect("typed-leader", NOW, at(30))
    leader = await driver.leader_get()
    assert type(leader) is LeaderRow and leader.leader_id == "typed-leader"


# ---------------------------------------------------------------------------------- inserting


@case
async def insert_many_returns_rows_in_input_order(driver: Driver) -> None:
    results = await driver.job_insert_many(
        [
            params(
                kind="k1",
                args={"b": 1, "a": 2, "aa": {"z": 1, "y": 2}},
                queue="q1",
                priority=2,
                max_attempts=5,
                tags=("t1", "t2"),
                metadata={"m": 1},
            ),
            params(kind="k2", scheduled_at=at(60), state=JobState.SCHEDULED),
            params(kind="k3", state=JobState.PENDING),
        ],
        [],
        NOW,
    )
    assert [skipped for _, skipped in results] == [False, False, False]
    first, second, third = (row for row, _ in results)
    assert len(first) == 20
    assert first[ID] < second[ID] < third[ID]
    assert first[1:] == (
        "k1",
        {"a": 2, "b": 1, "aa": {"y": 2, "z": 1}},
        "q1",
        "available",
        2,
        0,
        5,
        None,
        [],
        NOW,
        None,
        NOW,
        [],
        {"m": 1},
        ["t1", "t2"],
        None,
        None,
        None,
        None,
    )
    # jsonb orders keys by length, then bytewise.
    assert list(first[ARGS]) == ["a", "b", "aa"]
    assert isinstance(first[ID], int)
    assert (second[STATE], second[SCHEDULED_AT]) == ("scheduled", at(60))
    assert third[STATE] == "pending"
    assert await get(driver, first[ID]) == first


@case
async def insert_stores_json_as_jsonb_does(driver: Driver) -> None:
    row = await insert_one(driver, args_json='{"n": 1e3, "f": 1.0, "g": 1.5e2, "s": "é"}')
    assert row[ARGS] == {"f": 1.0, "g": 150, "n": 1000, "s": "é"}
    assert isinstance(row[ARGS]["n"], int) and isinstance(row[ARGS]["f"], float)
    # numeric has no negative zero.
    negative_zero = await insert_one(driver, args_json='{"z": -0.0}')
    assert math.copysign(1.0, negative_zero[ARGS]["z"]) == 1.0
    await driver.job_delete(negative_zero[ID])
    for bad in ('{"x": NaN}', '{"x": "\\u0000"}', "{not json"):
        with pytest.raises(tq.DatabaseError):
            await insert(driver, params(args_json=bad))
    assert await driver.job_list(tq.JobListParams()) == [await get(driver, row[ID])]


@case
async def insert_enforces_check_constraints(driver: Driver) -> None:
    bad = [
        params(priority=0),
        params(priority=5),
        params(max_attempts=0),
        params(state=JobState.COMPLETED),  # finalized without finalized_at
        params(kind=""),
        params(queue="q" * 129),
    ]
    for p in bad:
        with pytest.raises(tq.DatabaseError):
            await driver.job_insert_many([params(), p], [], NOW)
        with pytest.raises(tq.DatabaseError):
            await driver.job_insert_fast([params(), p], [], NOW)
    assert await driver.job_list(tq.JobListParams()) == []


@case
async def insert_fast_inserts_and_counts(driver: Driver) -> None:
    count = await driver.job_insert_fast(
        [params(queue="f1", tags=("a", "b")), params(queue="f2", priority=4)], [], NOW
    )
    assert count == 2
    rows = await driver.job_list(tq.JobListParams())
    assert [(r[QUEUE], r[PRIORITY], r[TAGS], r[STATE]) for r in rows] == [
        ("f1", 1, ["a", "b"], "available"),
        ("f2", 4, [], "available"),
    ]
    assert rows[0][CREATED_AT] == NOW
    assert await driver.job_insert_fast([], [], NOW) == 0


@case
async def insert_fast_streams_an_iterator_and_calls_notify_after(driver: Driver) -> None:
    read: list[int] = []

    def stream() -> Iterator[JobInsertParams]:
        for n in range(600):  # several COPY chunks
            read.append(n)
            yield params(queue="s", priority=1 + n % 4)

    def notify() -> list[str]:
        assert len(read) == 600, "called before every job was read"
        return ["s"]

    async with driver.open_listener(CHANNELS) as listener:
        assert await driver.job_insert_fast(stream(), notify, NOW) == 600
        got = await notes_of(driver, listener, "marker")
    assert got == [(INSERT_CHANNEL, {"queue": "s"})]
    assert len(await driver.job_list(tq.JobListParams(limit=1000))) == 600


@case
async def insert_fast_aborted_by_its_iterator_writes_nothing(driver: Driver) -> None:
    def stream() -> Iterator[JobInsertParams]:
        for n in range(600):
            if n == 550:
                raise tq.ValidationError("priority", "a bad job in the middle")
            yield params(queue="s")

    with pytest.raises(tq.ValidationError, match="middle"):
        await driver.job_insert_fast(stream(), list, NOW)
    assert await driver.job_list(tq.JobListParams()) == []
    # Inside a transaction, the abort takes the transaction with it.
    with pytest.raises(tq.TrioqueueError):
        async with driver.transaction() as tx:
            with pytest.raises(tq.ValidationError):
                await driver.job_insert_fast(stream(), [], NOW, ex=tx)
            await driver.job_insert_many([params()], [], NOW, ex=tx)
    assert await driver.job_list(tq.JobListParams()) == []


@case
async def tags_round_trip_through_both_insert_paths(driver: Driver) -> None:
    tags = ("null", "NULL", "a-b", "x_y")
    [row] = await insert(driver, params(tags=tags))
    assert row[TAGS] == list(tags)
    assert await driver.job_insert_fast([params(tags=tags), params(tags=())], [], NOW) == 2
    assert [r[TAGS] for r in await driver.job_list(tq.JobListParams())] == [
        list(tags),
        list(tags),
        [],
    ]
    assert len(await driver.job_list(tq.JobListParams(tags=["null"]))) == 2


@case
async def insert_notifies_the_given_queues(driver: Driver) -> None:
    async with driver.open_listener(CHANNELS) as listener:
        await driver.job_insert_many([params(queue="a"), params(queue="b")], ["a", "b"], NOW)
        await driver.job_insert_many([params(queue="c")], [], NOW)
        await driver.job_insert_fast([params(queue="d")], ["d"], NOW)
        # One job, two queues named: both are notified (the single-row path too).
        await driver.job_insert_many([params(queue="e")], ["e", "f"], NOW)
        got = await notes_of(driver, listener, "marker")
    assert got == [
        (INSERT_CHANNEL, {"queue": "a"}),
        (INSERT_CHANNEL, {"queue": "b"}),
        (INSERT_CHANNEL, {"queue": "d"}),
        (INSERT_CHANNEL, {"queue": "e"}),
        (INSERT_CHANNEL, {"queue": "f"}),
    ]


# ---------------------------------------------------------------------------------- unique jobs


@case
async def unique_insert_returns_the_live_job(driver: Driver) -> None:
    first = await insert_one(driver, unique_key=b"k1", args={"n": 1})
    (row, skipped), (other, other_skipped) = await driver.job_insert_many(
        [params(unique_key=b"k1", args={"n": 2}), params(unique_key=b"k2")], [], at(1)
    )
    assert skipped and row[ID] == first[ID] and row[ARGS] == {"n": 1}
    assert not other_skipped
    # A different key, or no key, is not a duplicate.
    assert (await insert_one(driver))[ID] not in (first[ID], other[ID])


@case
async def unique_key_held_only_in_its_own_states(driver: Driver) -> None:
    # Default states include completed: a completed job still holds its key ...
    done = await finalize(driver, JobState.COMPLETED, at(5), unique_key=b"d")
    [(row, skipped)] = await driver.job_insert_many([params(unique_key=b"d")], [], at(6))
    assert skipped and row[ID] == done[ID]
    # ... a cancelled one does not.
    cancelled = await insert_one(driver, unique_key=b"c")
    await driver.job_cancel(cancelled[ID], at(1))
    [(row, skipped)] = await driver.job_insert_many([params(unique_key=b"c")], [], at(2))
    assert not skipped and row[ID] != cancelled[ID]
    # With the minimal states, a completed job releases its key.
    done = await finalize(
        driver, JobState.COMPLETED, at(5), unique_key=b"m", unique_states=MINIMAL_STATES
    )
    [(row, skipped)] = await driver.job_insert_many(
        [params(unique_key=b"m", unique_states=MINIMAL_STATES)], [], at(6)
    )
    assert not skipped and row[ID] != done[ID]
    # A retryable job holds its key by default but not with the minimal states.
    for key, states, expect_skip in ((b"r1", None, True), (b"r2", MINIMAL_STATES, False)):
        job = await running_job(driver, unique_key=key, unique_states=states)
        await driver.job_set_state_if_running_many(
            [outcome(job[ID], JobState.RETRYABLE, scheduled_at=at(100), error_json="{}")], at(1)
        )
        [(row, skipped)] = await driver.job_insert_many(
            [params(unique_key=key, unique_states=states)], [], at(2)
        )
        assert skipped is expect_skip and (row[ID] == job[ID]) is expect_skip


@case
async def unique_duplicates_within_one_batch_fail_it(driver: Driver) -> None:
    with pytest.raises(tq.DatabaseError):
        await driver.job_insert_many(
            [params(), params(unique_key=b"x"), params(unique_key=b"x")], [], NOW
        )
    existing = await insert_one(driver, unique_key=b"y")
    with pytest.raises(tq.DatabaseError):
        await driver.job_insert_many([params(unique_key=b"y"), params(unique_key=b"y")], [], NOW)
    assert ids(await driver.job_list(tq.JobListParams())) == [existing[ID]]


@case
async def insert_fast_fails_the_whole_batch_on_a_unique_conflict(driver: Driver) -> None:
    existing = await insert_one(driver, unique_key=b"k")
    with pytest.raises(tq.DatabaseError):
        await driver.job_insert_fast([params(), params(unique_key=b"k")], [], NOW)
    with pytest.raises(tq.DatabaseError):
        await driver.job_insert_fast([params(unique_key=b"n"), params(unique_key=b"n")], [], NOW)
    assert ids(await driver.job_list(tq.JobListParams())) == [existing[ID]]
    assert await driver.job_insert_fast([params(unique_key=b"n")], [], NOW) == 1


# ---------------------------------------------------------------------------------- fetching


@case
async def fetch_claims_in_priority_then_time_then_id_order(driver: Driver) -> None:
    rows = await insert(
        driver,
        params(priority=2, scheduled_at=at(-10)),  # 0
        params(priority=1, scheduled_at=at(-5)),  # 1
        params(priority=1, scheduled_at=at(-20)),  # 2
        params(priority=1, scheduled_at=at(-5)),  # 3
        params(priority=4, scheduled_at=at(-30)),  # 4
        params(priority=1, scheduled_at=at(30), state=JobState.SCHEDULED),  # not due
        params(priority=1, scheduled_at=at(-30), queue="other"),  # another queue
        params(priority=1, state=JobState.PENDING),  # never fetched
    )
    # An available job whose scheduled_at is still ahead is not due either.
    later = await insert_one(driver, scheduled_at=at(5))
    # A limited claim takes the first jobs, and returns them in the order to run them.
    claimed = await driver.job_get_available("default", NOW, 3, "c1")
    assert ids(claimed) == [rows[i][ID] for i in (2, 1, 3)]
    for job_id in ids(claimed):
        await driver.job_set_state_if_running_many([outcome(job_id, JobState.AVAILABLE)], NOW)
    one_by_one = [ids(await driver.job_get_available("default", NOW, 1, "c1")) for _ in range(6)]
    assert one_by_one == [[rows[i][ID]] for i in (2, 1, 3, 0, 4)] + [[]]
    assert await driver.job_get_available("default", NOW, 10, "c1") == []
    assert ids(await driver.job_get_available("default", at(5), 10, "c1")) == [later[ID]]
    assert await driver.job_get_available("default", NOW, 0, "c1") == []


@case
async def fetch_marks_running(driver: Driver) -> None:
    row = await insert_one(driver, queue="q")
    [claimed] = await driver.job_get_available("q", at(1), 5, "client-a")
    assert claimed[STATE] == "running"
    assert claimed[ATTEMPT] == 1
    assert claimed[ATTEMPTED_AT] == at(1)
    assert claimed[ATTEMPTED_BY] == ["client-a"]
    assert claimed[:STATE] == row[:STATE] and claimed[SCHEDULED_AT] == row[SCHEDULED_AT]
    # (A claimed row may carry empty errors and metadata as None.)
    assert row_to_job(await get(driver, row[ID]), None) == row_to_job(claimed, None)
    await driver.job_set_state_if_running_many(
        [outcome(row[ID], JobState.AVAILABLE, error_json="{}")], at(2)
    )
    [again] = await driver.job_get_available("q", at(3), 5, "client-b")
    assert (again[ATTEMPT], again[ATTEMPTED_BY]) == (2, ["client-a", "client-b"])


@case
async def fetch_keeps_the_last_100_attempted_by(driver: Driver) -> None:
    row = await insert_one(driver, queue="q", max_attempts=200)
    for n in range(105):
        [claimed] = await driver.job_get_available("q", NOW, 1, f"c{n}")
        await driver.job_set_state_if_running_many([outcome(row[ID], JobState.AVAILABLE)], NOW)
    assert claimed[ATTEMPTED_BY] == [f"c{n}" for n in range(5, 105)]
    assert claimed[ATTEMPT] == 105


@case
async def fetch_skips_paused_queues(driver: Driver) -> None:
    await insert(driver, params(queue="p"), params(queue="p"))
    assert await driver.queue_pause("p", NOW) == ["p"]
    assert await driver.job_get_available("p", NOW, 10, "c") == []
    assert await driver.queue_resume("p", NOW) == ["p"]
    assert len(await driver.job_get_available("p", NOW, 10, "c")) == 2


@case
async def concurrent_fetches_claim_disjoint_jobs(driver: Driver) -> None:
    await insert(driver, *[params(queue="c") for _ in range(20)])
    results: list[list[Row]] = []

    async def fetch(client: str) -> None:
        results.append(await driver.job_get_available("c", NOW, 15, client))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch, "a")
        nursery.start_soon(fetch, "b")
    first, second = (set(ids(r)) for r in results)
    assert not first & second
    assert len(first | second) == 20
    assert sorted(len(r) for r in results) == [5, 15]


# ---------------------------------------------------------------------------------- outcomes


@case
async def outcomes_apply_only_to_running_jobs(driver: Driver) -> None:
    job = await running_job(driver)
    queued = await insert_one(driver)
    written = await driver.job_set_state_if_running_many(
        [
            outcome(job[ID], JobState.COMPLETED, finalized_at=at(10)),
            outcome(queued[ID], JobState.COMPLETED, finalized_at=at(10)),
            outcome(10_000_000, JobState.COMPLETED, finalized_at=at(10)),
        ],
        at(10),
    )
    assert ids(written) == [job[ID]]
    assert written[0][STATE] == "completed" and written[0][FINALIZED_AT] == at(10)
    assert await get(driver, queued[ID]) == queued
    # Completing it again changes nothing.
    again = await driver.job_set_state_if_running_many(
        [outcome(job[ID], JobState.DISCARDED, finalized_at=at(20))], at(20)
    )
    assert again == []
    assert (await get(driver, job[ID]))[STATE] == "completed"


@case
async def outcomes_without_rows_come_back_as_ids(driver: Driver) -> None:
    done = await running_job(driver)
    failed = await running_job(driver)
    stale = await running_job(driver)
    queued = await insert_one(driver)
    error = '{"error": "ünï \\"quoted\\"", "attempt": 1}'
    written = await driver.job_set_state_if_running_many(
        [
            outcome(done[ID], JobState.COMPLETED, finalized_at=at(10)),
            outcome(failed[ID], JobState.RETRYABLE, scheduled_at=at(50), error_json=error),
            outcome(stale[ID], JobState.COMPLETED, finalized_at=at(10), attempted_at=at(-1)),
            outcome(queued[ID], JobState.COMPLETED, finalized_at=at(10)),
        ],
        at(10),
        rows=False,
    )
    assert sorted(written) == sorted([(done[ID],), (failed[ID],)])
    assert (await get(driver, done[ID]))[STATE] == "completed"
    row = await get(driver, failed[ID])
    assert (row[STATE], row[SCHEDULED_AT]) == ("retryable", at(50))
    assert row[ERRORS] == [{"error": 'ünï "quoted"', "attempt": 1}]
    assert (await get(driver, stale[ID]))[STATE] == "running"
    assert (await get(driver, queued[ID]))[STATE] == "available"


@case
async def completions_only_without_rows_change_only_their_own_runs(driver: Driver) -> None:
    # A batch of nothing but plain completions (the common case, which the PostgreSQL
    # driver writes with a statement of its own) follows the same rules as any batch.
    done = await running_job(driver, metadata={"keep": 1})
    any_run = await running_job(driver)
    stale = await running_job(driver)
    queued = await insert_one(driver)
    cancel_asked = await running_job(driver)
    await driver.job_cancel(cancel_asked[ID], at(5))
    written = await driver.job_set_state_if_running_many(
        [
            outcome(done[ID], JobState.COMPLETED, finalized_at=at(10)),
            outcome(any_run[ID], JobState.COMPLETED, finalized_at=at(11), attempted_at=None),
            outcome(stale[ID], JobState.COMPLETED, finalized_at=at(10), attempted_at=at(-1)),
            outcome(queued[ID], JobState.COMPLETED, finalized_at=at(10)),
            outcome(cancel_asked[ID], JobState.COMPLETED, finalized_at=at(12)),
        ],
        at(12),
        rows=False,
    )
    assert sorted(written) == sorted([(done[ID],), (any_run[ID],), (cancel_asked[ID],)])
    row = await get(driver, done[ID])
    assert (row[STATE], row[FINALIZED_AT], row[METADATA]) == ("completed", at(10), {"keep": 1})
    assert (row[ATTEMPT], row[ERRORS], row[SCHEDULED_AT]) == (1, [], done[SCHEDULED_AT])
    assert (await get(driver, any_run[ID]))[FINALIZED_AT] == at(11)
    # A job that finished even though its cancellation was asked for stays completed.
    assert (await get(driver, cancel_asked[ID]))[STATE] == "completed"
    assert (await get(driver, stale[ID]))[STATE] == "running"
    assert (await get(driver, queued[ID]))[STATE] == "available"


@case
async def outcome_records_errors_metadata_and_schedule(driver: Driver) -> None:
    job = await running_job(driver, metadata={"a": 1, "b": 1})
    error = {"at": "2026-01-01T00:00:01+00:00", "attempt": 1, "error": "boom", "trace": "tb"}
    [row] = await driver.job_set_state_if_running_many(
        [
            outcome(
                job[ID],
                JobState.RETRYABLE,
                scheduled_at=at(16),
                error_json=json.dumps(error),
                metadata_json='{"b": 2, "c": 3}',
            )
        ],
        at(1),
    )
    assert row[STATE] == "retryable"
    assert row[SCHEDULED_AT] == at(16)
    assert row[FINALIZED_AT] is None
    assert row[ATTEMPT] == 1
    assert row[ERRORS] == [error]
    assert row[METADATA] == {"a": 1, "b": 2, "c": 3}
    assert await driver.job_schedule(at(20), at(20), 10) == {row[QUEUE]: 1}
    assert ids(await driver.job_get_available(row[QUEUE], at(20), 1, "c")) == [job[ID]]
    [row] = await driver.job_set_state_if_running_many(
        [outcome(job[ID], JobState.DISCARDED, finalized_at=at(30), error_json='{"n": 2}')],
        at(30),
    )
    assert row[ERRORS] == [error, {"n": 2}]
    assert row[SCHEDULED_AT] == at(16)  # kept when the outcome gives none
    assert (row[STATE], row[FINALIZED_AT], row[ATTEMPT]) == ("discarded", at(30), 2)


@case
async def outcome_that_breaks_a_constraint_writes_nothing(driver: Driver) -> None:
    a = await running_job(driver)
    b = await running_job(driver)
    with pytest.raises(tq.DatabaseError):
        await driver.job_set_state_if_running_many(
            [
                outcome(a[ID], JobState.COMPLETED, finalized_at=at(1)),
                outcome(b[ID], JobState.COMPLETED, finalized_at=None),
            ],
            at(1),
        )
    assert (await get(driver, a[ID]))[STATE] == "running"


@case
async def outcomes_the_database_refuses_are_rejected_data(driver: Driver) -> None:
    # What no retry can get past is marked rejected_data (so the completer isolates the
    # outcome instead of retrying it): JSON PostgreSQL cannot store (\u0000), text that
    # cannot be encoded (a lone surrogate), a broken constraint. Nothing is written.
    a = await running_job(driver)
    b = await running_job(driver)
    good = outcome(a[ID], JobState.COMPLETED, finalized_at=at(1))
    bad_outcomes = [
        outcome(b[ID], JobState.RETRYABLE, error_json='{"error": "nul \\u0000 here"}'),
        outcome(b[ID], JobState.RETRYABLE, error_json='{"error": "lone \udc80 here"}'),
        outcome(b[ID], JobState.RETRYABLE, metadata_json='{"k": "\udc80"}'),
        outcome(b[ID], JobState.COMPLETED, finalized_at=None),
    ]
    for bad in bad_outcomes:
        with pytest.raises(tq.DatabaseError) as caught:
            await driver.job_set_state_if_running_many([good, bad], at(1), rows=False)
        assert caught.value.rejected_data, bad
        assert (await get(driver, a[ID]))[STATE] == "running"
        assert (await get(driver, b[ID]))[STATE] == "running"
    # A failure of another kind is not the data's fault.
    listen_error = tq.DatabaseError("doing something", RuntimeError("connection lost"))
    assert not listen_error.rejected_data


@case
async def snooze_gives_the_attempt_back(driver: Driver) -> None:
    job = await running_job(driver)
    [row] = await driver.job_set_state_if_running_many(
        [
            outcome(
                job[ID],
                JobState.SCHEDULED,
                scheduled_at=at(600),
                give_back_attempt=True,
                metadata_json='{"snoozes": 1}',
            )
        ],
        at(1),
    )
    assert (row[STATE], row[ATTEMPT], row[SCHEDULED_AT], row[ERRORS]) == (
        "scheduled",
        0,
        at(600),
        [],
    )
    assert row[METADATA] == {"snoozes": 1}


@case
async def cancel_requested_while_running_ends_cancelled(driver: Driver) -> None:
    for target in (JobState.RETRYABLE, JobState.SCHEDULED, JobState.AVAILABLE):
        job = await running_job(driver)
        cancelled = await driver.job_cancel(job[ID], at(1))
        assert cancelled is not None and cancelled[STATE] == "running"
        [row] = await driver.job_set_state_if_running_many(
            [outcome(job[ID], target, scheduled_at=at(50), error_json='{"e": 1}')], at(2)
        )
        assert (row[STATE], row[FINALIZED_AT]) == ("cancelled", at(2)), target
        assert row[ERRORS] == [{"e": 1}]
    # A job that completes anyway stays completed; a discard stays a discard.
    for target in (JobState.COMPLETED, JobState.DISCARDED):
        job = await running_job(driver)
        await driver.job_cancel(job[ID], at(1))
        [row] = await driver.job_set_state_if_running_many(
            [outcome(job[ID], target, finalized_at=at(3))], at(2)
        )
        assert (row[STATE], row[FINALIZED_AT]) == (target.value, at(3))


@case
async def cancel_requested_jobs_are_reported(driver: Driver) -> None:
    a = await running_job(driver)
    b = await running_job(driver)
    c = await insert_one(driver)
    await driver.job_cancel(b[ID], at(1))
    await driver.job_cancel(c[ID], at(1))
    assert await driver.job_cancel_requested([a[ID], b[ID], c[ID], 999_999]) == [b[ID]]
    assert await driver.job_cancel_requested([]) == []


# ---------------------------------------------------------------------------------- get, list


@case
async def get_and_state_of_missing_jobs(driver: Driver) -> None:
    assert await driver.job_get(123_456) is None
    assert await driver.job_state(123_456) is None
    row = await insert_one(driver)
    assert await driver.job_state(row[ID]) == "available"


@case
async def list_filters_and_pages(driver: Driver) -> None:
    rows = await insert(
        driver,
        params(kind="a", queue="q1", priority=1, tags=("x", "y")),
        params(kind="b", queue="q2", priority=2, tags=("x",)),
        params(kind="a", queue="q2", priority=3, state=JobState.PENDING),
        params(kind="c", queue="q1", priority=1, tags=("y", "z")),
    )
    i = ids(rows)

    async def listed(**kw: Any) -> list[int]:
        return ids(await driver.job_list(tq.JobListParams(**kw)))

    assert await listed() == i
    assert await listed(ids=[i[3], i[1], 999_999]) == [i[1], i[3]]
    assert await listed(kinds=["a"]) == [i[0], i[2]]
    assert await listed(queues=["q2"]) == [i[1], i[2]]
    assert await listed(states=[JobState.PENDING]) == [i[2]]
    assert await listed(priorities=[1, 3]) == [i[0], i[2], i[3]]
    assert await listed(tags=["x"]) == [i[0], i[1]]
    assert await listed(tags=["x", "y"]) == [i[0]]
    assert await listed(tags=[]) == i
    assert await listed(ids=[]) == []
    assert await listed(kinds=["a"], queues=["q1"]) == [i[0]]
    assert await listed(limit=2) == i[:2]
    assert await listed(limit=2, after=i[1]) == i[2:]
    assert await listed(after=i[3]) == []


@case
async def list_newest_first_and_within_the_newest_ids(driver: Driver) -> None:
    rows = await insert(driver, *[params(kind="a" if n % 2 else "b") for n in range(6)])
    i = ids(rows)

    async def listed(**kw: Any) -> list[int]:
        return ids(await driver.job_list(tq.JobListParams(**kw)))

    assert await listed(descending=True) == i[::-1]
    assert await listed(descending=True, limit=2) == [i[5], i[4]]
    assert await listed(descending=True, limit=2, after=i[4]) == [i[3], i[2]]
    assert await listed(descending=True, kinds=["a"], after=i[5]) == [i[3], i[1]]
    # within_newest=N: only ids above the highest id minus N.
    assert await listed(within_newest=3) == i[3:]
    assert await listed(descending=True, kinds=["b"], within_newest=3) == [i[4]]
    assert await listed(descending=True, within_newest=100) == i[::-1]


# ---------------------------------------------------------------------------------- cancel


@case
async def cancel_queued_running_finalized_and_missing(driver: Driver) -> None:
    async with driver.open_listener(CHANNELS) as listener:
        queued = await insert_one(driver, scheduled_at=at(60), state=JobState.SCHEDULED)
        row = await driver.job_cancel(queued[ID], at(1))
        assert row is not None
        assert (row[STATE], row[FINALIZED_AT], row[METADATA]) == ("cancelled", at(1), {})

        job = await running_job(driver, queue="rq")
        row = await driver.job_cancel(job[ID], at(1.5))
        assert row is not None
        assert (row[STATE], row[FINALIZED_AT]) == ("running", None)
        assert row[METADATA] == {"cancel_attempted_at": "2026-01-01T00:00:01.5+00:00"}

        done = await finalize(driver, JobState.COMPLETED, at(3))
        assert await driver.job_cancel(done[ID], at(4)) == done
        assert await driver.job_cancel(123_456, at(4)) is None
        got = await notes_of(driver, listener, "m")
    assert got == [(CONTROL_CHANNEL, {"action": "cancel", "job_id": job[ID], "queue": "rq"})]


# ---------------------------------------------------------------------------------- retry


@case
async def retry_makes_jobs_available_now(driver: Driver) -> None:
    async with driver.open_listener(CHANNELS) as listener:
        # A discarded job out of attempts gets one more, and loses cancel_attempted_at.
        job = await running_job(driver, queue="r", max_attempts=1)
        await driver.job_cancel(job[ID], at(1))
        await driver.job_set_state_if_running_many(
            [outcome(job[ID], JobState.DISCARDED, finalized_at=at(2))], at(2)
        )
        row = await driver.job_retry(job[ID], at(3))
        assert row is not None
        assert (row[STATE], row[FINALIZED_AT], row[SCHEDULED_AT]) == ("available", None, at(3))
        assert (row[ATTEMPT], row[MAX_ATTEMPTS], row[METADATA]) == (1, 2, {})
        # A scheduled job runs now; an available one keeps an earlier time.
        future = await insert_one(driver, queue="r", scheduled_at=at(90), state=JobState.SCHEDULED)
        past = await insert_one(driver, queue="r", scheduled_at=at(-90))
        assert (await get_retried(driver, future[ID]))[SCHEDULED_AT] == at(3)
        assert (await get_retried(driver, past[ID]))[SCHEDULED_AT] == at(-90)
        got = await notes_of(driver, listener, "m")
    # Identical notifications are sent once per transaction, not once per process.
    assert [n for n in got if n[0] == INSERT_CHANNEL] == [(INSERT_CHANNEL, {"queue": "r"})] * 3
    # A running job is left alone; a missing one is None.
    running = await running_job(driver)
    left = await driver.job_retry(running[ID], at(4))
    assert left is not None and row_to_job(left, None) == row_to_job(running, None)
    assert await driver.job_retry(123_456, at(4)) is None


async def get_retried(driver: Driver, job_id: int) -> Row:
    row = await driver.job_retry(job_id, at(3))
    assert row is not None
    return row


@case
async def retry_into_a_taken_unique_key_fails(driver: Driver) -> None:
    old = await insert_one(driver, unique_key=b"u")
    await driver.job_cancel(old[ID], at(1))
    live = await insert_one(driver, unique_key=b"u")
    with pytest.raises(tq.DatabaseError):
        await driver.job_retry(old[ID], at(2))
    assert (await get(driver, old[ID]))[STATE] == "cancelled"
    assert (await get(driver, live[ID]))[STATE] == "available"


# ---------------------------------------------------------------------------------- delete


@case
async def delete_refuses_running_jobs(driver: Driver) -> None:
    queued = await insert_one(driver)
    assert await driver.job_delete(queued[ID]) == queued
    assert await driver.job_get(queued[ID]) is None
    assert await driver.job_delete(queued[ID]) is None
    job = await running_job(driver)
    assert await driver.job_delete(job[ID]) is None
    assert await driver.job_state(job[ID]) == "running"
    done = await finalize(driver, JobState.COMPLETED, at(1))
    assert await driver.job_delete(done[ID]) == done


# ---------------------------------------------------------------------------------- scheduler


@case
async def schedule_moves_due_jobs(driver: Driver) -> None:
    rows = await insert(
        driver,
        params(queue="a", scheduled_at=at(3), state=JobState.SCHEDULED),
        params(queue="a", scheduled_at=at(-3), state=JobState.SCHEDULED),
        params(queue="b", scheduled_at=at(4), state=JobState.SCHEDULED),
        params(queue="b", scheduled_at=at(6), state=JobState.SCHEDULED),  # beyond the horizon
        params(queue="b", scheduled_at=at(-6), state=JobState.PENDING),  # never scheduled
    )
    retry = await running_job(driver, queue="a")
    await driver.job_set_state_if_running_many(
        [outcome(retry[ID], JobState.RETRYABLE, scheduled_at=at(1), error_json="{}")], NOW
    )
    moved = await driver.job_schedule(at(5), NOW, 100)
    assert moved == {"a": 3, "b": 1}
    states = {r[ID]: r[STATE] for r in await driver.job_list(tq.JobListParams())}
    assert [states[r[ID]] for r in rows] == [
        "available",
        "available",
        "available",
        "scheduled",
        "pending",
    ]
    assert states[retry[ID]] == "available"
    row = await get(driver, rows[0][ID])
    assert (row[SCHEDULED_AT], row[FINALIZED_AT]) == (at(3), None)
    assert await driver.job_schedule(at(5), NOW, 100) == {}


@case
async def schedule_respects_the_limit_in_priority_order(driver: Driver) -> None:
    rows = await insert(
        driver,
        *[
            params(priority=p, scheduled_at=at(s), state=JobState.SCHEDULED)
            for p, s in ((2, 1), (1, 3), (1, 2), (3, 0))
        ],
        now=at(-10),
    )
    assert await driver.job_schedule(at(5), NOW, 2) == {"default": 2}
    available = ids(await driver.job_list(tq.JobListParams(states=[JobState.AVAILABLE])))
    assert available == sorted([rows[1][ID], rows[2][ID]])
    assert await driver.job_schedule(at(5), NOW, 2) == {"default": 2}
    assert await driver.job_schedule(at(5), NOW, 2) == {}


@case
async def schedule_discards_unique_conflicts(driver: Driver) -> None:
    # A retryable job (minimal states: retryable does not hold the key) whose key a
    # new job took meanwhile is discarded when it comes due.
    old = await running_job(driver, queue="u", unique_key=b"k", unique_states=MINIMAL_STATES)
    await driver.job_set_state_if_running_many(
        [outcome(old[ID], JobState.RETRYABLE, scheduled_at=at(2), error_json="{}")], NOW
    )
    live = await insert_one(driver, queue="u", unique_key=b"k", unique_states=MINIMAL_STATES)
    # Two due jobs with one key: the first in (priority, scheduled_at, id) order wins.
    twins = []
    for n in range(2):
        job = await running_job(driver, queue="t", unique_key=b"t", unique_states=MINIMAL_STATES)
        await driver.job_set_state_if_running_many(
            [outcome(job[ID], JobState.RETRYABLE, scheduled_at=at(2 - n), error_json="{}")], NOW
        )
        twins.append(job)
    moved = await driver.job_schedule(at(5), at(3), 100)
    assert moved == {"t": 1}
    row = await get(driver, old[ID])
    assert (row[STATE], row[FINALIZED_AT]) == ("discarded", at(3))
    assert row[METADATA] == {"unique_key_conflict": "scheduler_discarded"}
    assert (await get(driver, live[ID]))[STATE] == "available"
    assert (await get(driver, twins[1][ID]))[STATE] == "available"
    assert (await get(driver, twins[0][ID]))[STATE] == "discarded"


@case
async def schedule_lets_the_due_key_holder_through(driver: Driver) -> None:
    # `first` released its key when it became retryable (minimal states); `second` took it
    # and waits, scheduled. Both come due: `second` keeps its key and becomes available
    # although `first` comes first in (priority, scheduled_at, id) order; `first` is
    # discarded. Never both.
    first = await running_job(driver, queue="u", unique_key=b"k", unique_states=MINIMAL_STATES)
    await driver.job_set_state_if_running_many(
        [outcome(first[ID], JobState.RETRYABLE, scheduled_at=at(1), error_json="{}")], NOW
    )
    second = await insert_one(
        driver,
        queue="u",
        unique_key=b"k",
        unique_states=MINIMAL_STATES,
        scheduled_at=at(2),
        state=JobState.SCHEDULED,
    )
    assert await driver.job_schedule(at(5), at(3), 100) == {"u": 1}
    assert await driver.job_state(second[ID]) == "available"
    row = await get(driver, first[ID])
    assert (row[STATE], row[METADATA]) == (
        "discarded",
        {"unique_key_conflict": "scheduler_discarded"},
    )


@case
async def schedule_discards_a_conflict_even_if_discarded_jobs_hold_keys(driver: Driver) -> None:
    # Unique states that include `discarded`: the conflicting job cannot be discarded and
    # keep holding the key (the index refuses two holders); it must not stop the scheduler.
    states = MINIMAL_STATES | {JobState.DISCARDED}
    old = await running_job(driver, queue="v", unique_key=b"v", unique_states=states)
    await driver.job_set_state_if_running_many(
        [outcome(old[ID], JobState.RETRYABLE, scheduled_at=at(1), error_json="{}")], NOW
    )
    live = await insert_one(driver, queue="v", unique_key=b"v", unique_states=states)
    other = await insert_one(driver, queue="w", scheduled_at=at(1), state=JobState.SCHEDULED)
    assert await driver.job_schedule(at(5), at(3), 100) == {"w": 1}
    row = await get(driver, old[ID])
    assert (row[STATE], row[METADATA]) == (
        "discarded",
        {"unique_key_conflict": "scheduler_discarded"},
    )
    assert await driver.job_state(other[ID]) == "available"
    # The live job keeps the key.
    [(row, skipped)] = await driver.job_insert_many(
        [params(unique_key=b"v", unique_states=states)], [], at(4)
    )
    assert skipped and row[ID] == live[ID]


# ---------------------------------------------------------------------------------- queues


@case
async def queue_rows_pause_and_resume(driver: Driver) -> None:
    async with driver.open_listener(CHANNELS) as listener:
        assert await driver.queue_upsert("a", NOW) is False
        assert await driver.queue_upsert("b", NOW) is False
        assert await driver.queue_pause("a", at(1)) == ["a"]
        assert await driver.queue_pause("a", at(2)) == ["a"]  # returned even if paused already
        assert await driver.queue_upsert("a", at(3)) is True
        assert await driver.queue_paused(["a", "b", "zz"]) == {"a"}
        # Pausing an unknown queue creates its row; resuming one does nothing.
        assert await driver.queue_pause("new", at(4)) == ["new"]
        assert await driver.queue_resume("ghost", at(4)) == []
        assert await driver.queue_resume("b", at(4)) == ["b"]  # has a row, not paused
        assert sorted(await driver.queue_pause("*", at(5))) == ["b"]
        assert sorted(await driver.queue_resume("*", at(6))) == ["a", "b", "new"]
        assert await driver.queue_resume("*", at(7)) == []
        assert await driver.queue_paused(["a", "b", "new"]) == set()
        got = await notes_of(driver, listener, "m")
    control = [payload for channel, payload in got if channel == CONTROL_CHANNEL]
    assert control[:4] == [
        {"action": "pause", "queue": "a"},
        {"action": "pause", "queue": "a"},
        {"action": "pause", "queue": "new"},
        {"action": "resume", "queue": "b"},
    ]
    assert control[4:5] == [{"action": "pause", "queue": "b"}]
    assert sorted(p["queue"] for p in control[5:]) == ["a", "b", "new"]
    assert all(p["action"] == "resume" for p in control[5:])


@case
async def stale_queues_are_deleted_unless_paused(driver: Driver) -> None:
    await driver.queue_upsert("old", NOW)
    await driver.queue_upsert("fresh", NOW)
    await driver.queue_pause("paused", NOW)
    await driver.queue_upsert("fresh", at(100))
    assert await driver.queue_delete_stale(at(50)) == ["old"]
    assert await driver.queue_delete_stale(at(50)) == []
    # The paused row survives; the deleted one is created afresh by the next upsert.
    assert await driver.queue_paused(["paused"]) == {"paused"}
    assert await driver.queue_upsert("old", at(200)) is False


@case
async def queue_list_counts_available_and_running_jobs(driver: Driver) -> None:
    assert await driver.queue_list() == []
    await driver.queue_upsert("b", NOW)
    await driver.queue_pause("a", at(1))
    await finalize(driver, JobState.COMPLETED, at(1), queue="b")  # finalized: not counted
    await insert(driver, *[params(queue="b") for _ in range(3)], params(queue="a"))
    await insert(driver, params(queue="b", state=JobState.SCHEDULED, scheduled_at=at(60)))
    await insert(driver, params(queue="nowhere"))  # a queue without a row is not listed
    await driver.job_get_available("b", at(2), 1, "client-1")
    assert await driver.queue_list() == [
        ("a", at(1), at(1), at(1), 1, 0, None, 0, ()),
        ("b", None, NOW, NOW, 2, 1, None, 0, ()),
    ]
    await driver.queue_resume("a", at(4))
    [a, _] = await driver.queue_list()
    assert a[1] is None and a[3] == at(4)


@case
async def job_counts_live_finalized_and_recent(driver: Driver) -> None:
    assert await driver.job_count_live() == []
    assert sorted(await driver.job_count_finalized(10)) == [
        ("cancelled", 0, ANY_ESTIMATE),
        ("completed", 0, ANY_ESTIMATE),
        ("discarded", 0, ANY_ESTIMATE),
    ]
    await insert(driver, *[params(queue="a") for _ in range(3)], params(queue="b"))
    await insert(driver, params(queue="a", state=JobState.SCHEDULED, scheduled_at=at(60)))
    await insert(driver, params(queue="b", state=JobState.PENDING))
    await running_job(driver, queue="r")
    for n in range(4):
        await finalize(driver, JobState.COMPLETED, at(n * 600), queue="c")
    await finalize(driver, JobState.DISCARDED, at(30), queue="c")
    assert sorted(await driver.job_count_live()) == [
        ("a", "available", 3),
        ("a", "scheduled", 1),
        ("b", "available", 1),
        ("b", "pending", 1),
        ("r", "running", 1),
    ]
    # Counted exactly below the limit, stopping at it above.
    found = {s: n for s, n, _ in await driver.job_count_finalized(10)}
    assert found == {"cancelled": 0, "completed": 4, "discarded": 1}
    found = {s: n for s, n, _ in await driver.job_count_finalized(3)}
    assert found == {"cancelled": 0, "completed": 3, "discarded": 1}
    # Finalized at or after the given time, at most `limit` each.
    assert await driver.job_count_finalized_since(at(600), 10) == {
        "cancelled": 0,
        "completed": 3,
        "discarded": 0,
    }
    assert await driver.job_count_finalized_since(at(0), 2) == {
        "cancelled": 0,
        "completed": 2,
        "discarded": 1,
    }


# ---------------------------------------------------------------------------------- leader


@case
async def leader_election_expiry_and_resignation(driver: Driver) -> None:
    assert await driver.leader_get() is None
    assert await driver.leader_attempt_elect("a", NOW, at(10)) is True
    assert await driver.leader_get() == ("a", NOW, at(10))
    assert await driver.leader_attempt_elect("b", at(5), at(15)) is False
    # Re-election extends the term and keeps elected_at.
    assert await driver.leader_attempt_elect("a", at(8), at(18)) is True
    assert await driver.leader_get() == ("a", NOW, at(18))
    # At the expiry instant the term still holds; after it another client takes over.
    assert await driver.leader_attempt_elect("b", at(18), at(28)) is False
    assert await driver.leader_attempt_elect("b", at(19), at(29)) is True
    assert await driver.leader_get() == ("b", at(19), at(29))
    async with driver.open_listener(CHANNELS) as listener:
        assert await driver.leader_resign("a") is False
        assert await driver.leader_resign("b") is True
        assert await driver.leader_resign("b") is False
        got = await notes_of(driver, listener, "m")
    assert got == [(LEADERSHIP_CHANNEL, {"action": "resigned", "leader_id": "b"})]
    assert await driver.leader_get() is None
    assert await driver.leader_attempt_elect("a", at(20), at(30)) is True
    assert await driver.leader_get() == ("a", at(20), at(30))


# ---------------------------------------------------------------------------------- rescuer


@case
async def stuck_jobs_are_paged_by_id(driver: Driver) -> None:
    old = [await running_job(driver, now=at(-7200), queue="s") for _ in range(3)]
    await running_job(driver, now=at(-10), queue="s")  # recent
    await insert_one(driver, queue="s", now=at(-7200))  # not running
    cutoff = at(-3600)
    first = await driver.job_get_stuck(cutoff, 2, 0)
    assert ids(first) == ids(old[:2])
    assert ids(await driver.job_get_stuck(cutoff, 2, first[-1][ID])) == [old[2][ID]]
    assert await driver.job_get_stuck(cutoff, 2, old[2][ID]) == []


@case
async def rescue_applies_only_to_the_same_attempt(driver: Driver) -> None:
    job = await running_job(driver, now=at(-7200), queue="s", metadata={"rescue_count": 1})
    other = await running_job(driver, now=at(-7200), queue="s")
    error = '{"error": "stuck"}'
    written = await driver.job_rescue_many(
        [
            JobRescue(job[ID], JobState.RETRYABLE, None, at(30), error, job[ATTEMPTED_AT]),
            # Another attempt (attempted_at differs): left alone.
            JobRescue(other[ID], JobState.DISCARDED, at(0), None, error, at(-1)),
        ]
    )
    assert written == [(job[ID], "s", "retryable")]
    row = await get(driver, job[ID])
    assert (row[STATE], row[SCHEDULED_AT], row[ERRORS]) == (
        "retryable",
        at(30),
        [{"error": "stuck"}],
    )
    assert row[METADATA] == {"rescue_count": 2}
    assert (await get(driver, other[ID]))[STATE] == "running"
    # Not running any more: nothing happens.
    assert (
        await driver.job_rescue_many(
            [JobRescue(job[ID], JobState.DISCARDED, at(0), None, error, job[ATTEMPTED_AT])]
        )
        == []
    )
    written = await driver.job_rescue_many(
        [JobRescue(other[ID], JobState.DISCARDED, at(0), None, error, other[ATTEMPTED_AT])]
    )
    assert written == [(other[ID], "s", "discarded")]
    row = await get(driver, other[ID])
    assert (row[FINALIZED_AT], row[METADATA]) == (at(0), {"rescue_count": 1})


@case
async def rescue_counts_an_odd_rescue_count_as_none(driver: Driver) -> None:
    # Inserts refuse the reserved key, but a row written by hand may hold anything: it must
    # not fail the whole batch of rescues, run after run.
    odd = [
        await running_job(driver, now=at(-7200), queue="s", metadata_json=text)
        for text in ('{"rescue_count": "x"}', '{"rescue_count": 1.5}', '{"rescue_count": -3}')
    ]
    normal = await running_job(driver, now=at(-7200), queue="s", metadata={"rescue_count": 4})
    error = '{"error": "stuck"}'
    written = await driver.job_rescue_many(
        [
            JobRescue(job[ID], JobState.RETRYABLE, None, at(30), error, job[ATTEMPTED_AT])
            for job in [*odd, normal]
        ]
    )
    assert len(written) == 4
    assert [(await get(driver, job[ID]))[METADATA]["rescue_count"] for job in odd] == [1, 1, 1]
    assert (await get(driver, normal[ID]))[METADATA] == {"rescue_count": 5}


# ---------------------------------------------------------------------------------- cleaner


@case
async def delete_finalized_in_batches_oldest_first(driver: Driver) -> None:
    done = [await finalize(driver, JobState.COMPLETED, at(t)) for t in (30, 10, 20, 500)]
    cancelled = await insert_one(driver)
    await driver.job_cancel(cancelled[ID], at(5))
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(100), 2) == 2
    left = ids(await driver.job_list(tq.JobListParams(states=[JobState.COMPLETED])))
    assert left == sorted([done[0][ID], done[3][ID]])
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(100), 2) == 1
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(100), 2) == 0
    assert await driver.job_delete_finalized(JobState.CANCELLED, at(5), 10) == 0
    assert await driver.job_delete_finalized(JobState.CANCELLED, at(6), 10) == 1


# ---------------------------------------------------------------------------------- periodic


@case
async def periodic_state_is_compare_and_set(driver: Driver) -> None:
    assert await driver.periodic_job_get_many(["p"]) == {}
    first = PeriodicJobState("p", "every=60", at(60), None)
    assert await driver.periodic_job_save(first, None, NOW) is True
    assert await driver.periodic_job_get_many(["p", "q"]) == {"p": first}
    second = PeriodicJobState("p", "every=60", at(120), at(60))
    # The stored row no longer matches "no row" or a stale read.
    assert await driver.periodic_job_save(second, None, at(60)) is False
    stale = attrs.evolve(first, next_run_at=at(0))
    assert await driver.periodic_job_save(second, stale, at(60)) is False
    other_schedule = attrs.evolve(first, schedule="every=30")
    assert await driver.periodic_job_save(second, other_schedule, at(60)) is False
    assert await driver.periodic_job_save(second, first, at(60)) is True
    assert await driver.periodic_job_get_many(["p"]) == {"p": second}
    # last_run_at never moves back; a None schedule is compared as such.
    third = PeriodicJobState("p", None, at(180), at(30))
    assert await driver.periodic_job_save(third, second, at(120)) is True
    assert await driver.periodic_job_get_many(["p"]) == {
        "p": PeriodicJobState("p", None, at(180), at(60))
    }
    stored = PeriodicJobState("p", None, at(180), at(60))
    fourth = PeriodicJobState("p", None, at(240), None)
    # last_run_at is compared too: a read from before another run was recorded (the
    # same next run time and schedule, as a run_on_start run leaves them) is stale.
    assert await driver.periodic_job_save(fourth, third, at(180)) is False
    assert await driver.periodic_job_save(fourth, stored, at(180)) is True
    assert (await driver.periodic_job_get_many(["p"]))["p"].last_run_at == at(60)


# ---------------------------------------------------------------------------------- notifications


@case
async def notifications_reach_listeners_of_their_channel(driver: Driver) -> None:
    async with (
        driver.open_listener(["custom"]) as mine,
        driver.open_listener([INSERT_CHANNEL]) as other,
    ):
        await driver.notify_many("custom", ["1", "2", "1", "3"])
        await driver.notify_many("custom", [])
        await driver.notify_many("custom", ["1"])
        await driver.notify_many("custom", ["end"])
        got = [n.payload for n in await collect_until(mine, "custom", "end")]
        assert got == ["1", "2", "3", "1"]
        await driver.notify_many(INSERT_CHANNEL, ["x"])
        assert [n.payload for n in await other.wait()] == ["x"]
    with pytest.raises(tq.DatabaseError):
        await driver.notify_many("custom", ["x" * 8000])


# ---------------------------------------------------------------------------------- transactions


@case
async def transaction_writes_are_invisible_until_commit(driver: Driver) -> None:
    async with driver.transaction() as tx:
        [(row, _)] = await driver.job_insert_many([params(queue="tx")], [], NOW, ex=tx)
        assert await driver.job_get(row[ID]) is None
        assert await driver.job_get(row[ID], ex=tx) == row
        assert await driver.job_state(row[ID], ex=tx) == "available"
        assert ids(await driver.job_list(tq.JobListParams(), ex=tx)) == [row[ID]]
        assert await driver.job_list(tq.JobListParams()) == []
        assert await driver.job_get_available("tx", NOW, 10, "c") == []
        assert await driver.job_insert_fast([params(queue="tx")], [], NOW, ex=tx) == 1
    assert await driver.job_get(row[ID]) == row
    assert len(await driver.job_get_available("tx", NOW, 10, "c")) == 2


@case
async def transaction_rolls_back_on_error_and_cancellation(driver: Driver) -> None:
    existing = await insert_one(driver)
    with pytest.raises(KeyError):
        async with driver.transaction() as tx:
            [(row, _)] = await driver.job_insert_many([params()], [], NOW, ex=tx)
            await driver.job_delete(existing[ID], ex=tx)
            assert await driver.job_get(existing[ID], ex=tx) is None
            raise KeyError("boom")
    assert await driver.job_get(row[ID]) is None
    assert await driver.job_get(existing[ID]) == existing
    with trio.CancelScope() as cs:
        async with driver.transaction() as tx:
            [(cancelled_row, _)] = await driver.job_insert_many([params()], [], NOW, ex=tx)
            cs.cancel()
            await trio.sleep(1)
    assert cs.cancelled_caught
    assert await driver.job_get(cancelled_row[ID]) is None
    # Ids are not reused.
    later = await insert_one(driver)
    assert later[ID] > cancelled_row[ID] > row[ID]
    assert ids(await driver.job_list(tq.JobListParams())) == [existing[ID], later[ID]]


@case
async def transaction_ops_cancel_retry_delete_queue_periodic(driver: Driver) -> None:
    queued = await insert_one(driver)
    done = await finalize(driver, JobState.COMPLETED, at(1))
    doomed = await insert_one(driver)
    state = PeriodicJobState("p", "every=60", at(60), None)
    async with driver.transaction() as tx:
        cancelled = await driver.job_cancel(queued[ID], at(2), ex=tx)
        assert cancelled is not None and cancelled[STATE] == "cancelled"
        retried = await driver.job_retry(done[ID], at(2), ex=tx)
        assert retried is not None and retried[STATE] == "available"
        assert await driver.job_delete(doomed[ID], ex=tx) == doomed
        assert await driver.queue_pause("txq", at(2), ex=tx) == ["txq"]
        assert await driver.periodic_job_save(state, None, at(2), ex=tx) is True
        assert await driver.periodic_job_get_many(["p"], ex=tx) == {"p": state}
        # Outside the transaction nothing has happened yet.
        assert await driver.job_state(queued[ID]) == "available"
        assert await driver.job_state(done[ID]) == "completed"
        assert await driver.job_state(doomed[ID]) == "available"
        assert await driver.queue_paused(["txq"]) == set()
        assert await driver.periodic_job_get_many(["p"]) == {}
    assert await driver.job_state(queued[ID]) == "cancelled"
    assert await driver.job_state(done[ID]) == "available"
    assert await driver.job_state(doomed[ID]) is None
    assert await driver.queue_paused(["txq"]) == {"txq"}
    assert await driver.periodic_job_get_many(["p"]) == {"p": state}
    async with driver.transaction() as tx:
        assert await driver.queue_resume("*", at(3), ex=tx) == ["txq"]
    assert await driver.queue_paused(["txq"]) == set()


@case
async def notifications_in_a_transaction_wait_for_commit(driver: Driver) -> None:
    async with driver.open_listener(CHANNELS) as listener:
        async with driver.transaction() as tx:
            await driver.job_insert_many([params(queue="n1")], ["n1"], NOW, ex=tx)
            assert await notes_of(driver, listener, "before-commit") == []
        assert await notes_of(driver, listener, "after-commit") == [
            (INSERT_CHANNEL, {"queue": "n1"})
        ]
        with pytest.raises(KeyError):
            async with driver.transaction() as tx:
                await driver.job_insert_many([params(queue="n2")], ["n2"], NOW, ex=tx)
                job = await running_job(driver, queue="n3")
                await driver.job_cancel(job[ID], at(1), ex=tx)
                await driver.queue_pause("n2", NOW, ex=tx)
                raise KeyError("roll back")
        assert await notes_of(driver, listener, "after-rollback") == []


@case
async def a_failed_statement_aborts_the_transaction(driver: Driver) -> None:
    await insert_one(driver, unique_key=b"k")
    with pytest.raises(tq.DatabaseError):
        async with driver.transaction() as tx:
            [(row, _)] = await driver.job_insert_many([params()], [], NOW, ex=tx)
            with pytest.raises(tq.DatabaseError):
                await driver.job_insert_fast([params(unique_key=b"k")], [], NOW, ex=tx)
            with pytest.raises(tq.DatabaseError):
                await driver.job_get(row[ID], ex=tx)
            # Leaving the block normally raises: the transaction was rolled back.
    assert await driver.job_get(row[ID]) is None


@case
async def fetch_skips_rows_a_transaction_holds(driver: Driver) -> None:
    a = await insert_one(driver, queue="l")
    b = await insert_one(driver, queue="l")
    async with driver.transaction() as tx:
        await driver.job_retry(a[ID], NOW, ex=tx)  # locks the row, changes nothing visible
        claimed = await driver.job_get_available("l", at(1), 10, "c")
        assert ids(claimed) == [b[ID]]
        # The scheduler and the cleaner skip held rows too.
    assert ids(await driver.job_get_available("l", at(1), 10, "c")) == [a[ID]]


@case
async def writes_wait_for_a_transactions_row_lock(driver: Driver) -> None:
    job = await running_job(driver)
    written: list[list[Row]] = []

    async def complete_it() -> None:
        written.append(
            await driver.job_set_state_if_running_many(
                [outcome(job[ID], JobState.RETRYABLE, scheduled_at=at(9), error_json="{}")], at(5)
            )
        )

    async with trio.open_nursery() as nursery:
        async with driver.transaction() as tx:
            await driver.job_cancel(job[ID], at(1), ex=tx)
            nursery.start_soon(complete_it)
            await waiting_for_a_lock(driver)
            assert written == []  # waiting for the row lock
        # After the commit it sees the cancel request: the job ends cancelled.
    [[row]] = written
    assert (row[STATE], row[FINALIZED_AT]) == ("cancelled", at(5))


@case
async def unique_insert_waits_for_another_transactions_key(driver: Driver) -> None:
    results: list[tuple[Row, bool]] = []

    async def insert_dup() -> None:
        results.extend(await driver.job_insert_many([params(unique_key=b"w")], [], at(1)))

    async with trio.open_nursery() as nursery:
        async with driver.transaction() as tx:
            [(mine, _)] = await driver.job_insert_many([params(unique_key=b"w")], [], NOW, ex=tx)
            nursery.start_soon(insert_dup)
            await waiting_for_a_lock(driver)
            assert results == []
    [(row, skipped)] = results
    assert skipped and row[ID] == mine[ID]
    # After a rollback the waiting insert goes ahead.
    results.clear()
    async with trio.open_nursery() as nursery:
        with pytest.raises(KeyError):
            async with driver.transaction() as tx:
                [(gone, _)] = await driver.job_insert_many(
                    [params(unique_key=b"w")], [], NOW, ex=tx
                )
                assert gone[ID] == mine[ID]  # the committed job is found, not a new one
                await driver.job_delete(mine[ID], ex=tx)
                [(_, skipped)] = await driver.job_insert_many(
                    [params(unique_key=b"w")], [], NOW, ex=tx
                )
                assert not skipped
                nursery.start_soon(insert_dup)
                await waiting_for_a_lock(driver)
                assert results == []
                raise KeyError("roll back")
    [(row, skipped)] = results
    assert skipped and row[ID] == mine[ID]
    # A key only a rolled-back transaction took is free for the waiting insert.
    results.clear()
    async with trio.open_nursery() as nursery:
        with pytest.raises(KeyError):
            async with driver.transaction() as tx:
                [(gone, _)] = await driver.job_insert_many(
                    [params(unique_key=b"v")], [], NOW, ex=tx
                )
                nursery.start_soon(_insert_key, driver, b"v", results)
                await waiting_for_a_lock(driver)
                assert results == []
                raise KeyError("roll back")
    [(row, skipped)] = results
    assert not skipped and row[ID] != gone[ID]


async def _insert_key(driver: Driver, key: bytes, results: list[tuple[Row, bool]]) -> None:
    results.extend(await driver.job_insert_many([params(unique_key=key)], [], at(1)))


@case
async def scheduler_and_cleaner_skip_rows_a_transaction_holds(driver: Driver) -> None:
    scheduled = await insert_one(
        driver, unique_key=b"s", scheduled_at=at(1), state=JobState.SCHEDULED
    )
    done = await finalize(driver, JobState.COMPLETED, at(1), unique_key=b"d")
    async with driver.transaction() as tx:
        # A duplicate insert locks the live job (ON CONFLICT DO UPDATE) until commit.
        for key in (b"s", b"d"):
            [(_, skipped)] = await driver.job_insert_many([params(unique_key=key)], [], NOW, ex=tx)
            assert skipped
        assert await driver.job_schedule(at(5), at(5), 10) == {}
        assert await driver.job_delete_finalized(JobState.COMPLETED, at(100), 10) == 0
    assert await driver.job_schedule(at(5), at(5), 10) == {"default": 1}
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(100), 10) == 1
    assert await driver.job_state(scheduled[ID]) == "available"
    assert await driver.job_state(done[ID]) is None


@case
async def transactions_waiting_for_each_other_deadlock(driver: Driver) -> None:
    a = await insert_one(driver)
    b = await insert_one(driver)
    locked = [trio.Event(), trio.Event()]
    failures: list[Exception] = []

    async def lock_both(me: int, first: int, second: int) -> None:
        try:
            async with driver.transaction() as tx:
                await driver.job_retry(first, NOW, ex=tx)
                locked[me].set()
                await locked[1 - me].wait()
                await driver.job_retry(second, NOW, ex=tx)
        except tq.DatabaseError as exc:
            failures.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock_both, 0, a[ID], b[ID])
            nursery.start_soon(lock_both, 1, b[ID], a[ID])
    [failure] = failures
    assert "deadlock detected" in str(failure)


# The flow control cases live in modules of their own; importing them adds them to SUITE.
import driver_suite_limits  # noqa: E402, F401  (registers its cases)
import driver_suite_partitions  # noqa: E402, F401  (registers its cases)
import driver_suite_workflows  # noqa: E402, F401  (registers its cases)
