"""Flow control cases of the driver conformance suite (``driver_suite.py`` imports this
module at its end, so these cases join ``SUITE`` and run against every driver).

They exercise `Driver.job_get_available_limited`, the limits `queue_upsert` stores and what
`queue_list` reports for a limited queue. Times are fixed (``NOW`` plus offsets) wherever
the driver takes ``now``; `queue_list` reads the driver's own clock, so the cases that
look at a rate window through it start their jobs at ``driver.clock()``.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any

from driver_suite import (
    ATTEMPT,
    ATTEMPTED_AT,
    ATTEMPTED_BY,
    ERRORS,
    ID,
    NOW,
    STATE,
    TAGS,
    at,
    case,
    get,
    ids,
    insert,
    insert_one,
    outcome,
    params,
)

from trioqueue.driver.protocol import Driver, JobRescue, QueueRow
from trioqueue.job import JobState
from trioqueue.limits import GlobalLimit, LimitedFetch, QueueLimits, RateLimit

_queues = itertools.count()


def fresh_queue() -> str:
    """A queue name of its own for each use, so that one case can set up several."""
    return f"lq{next(_queues)}"


def limits(
    global_limit: GlobalLimit | None = None, rate_limit: RateLimit | None = None
) -> QueueLimits:
    return QueueLimits(global_limit, rate_limit)


async def fetch(
    driver: Driver,
    queue: str,
    lim: QueueLimits,
    now: datetime = NOW,
    most: int = 10,
    client: str = "client-1",
) -> LimitedFetch:
    return await driver.job_get_available_limited(queue, now, most, client, lim)


async def jobs_of(driver: Driver, queue: str, *many: dict[str, Any]) -> list[int]:
    """Insert one job per keyword dict (``params`` keywords) into ``queue``; their ids."""
    return ids(await insert(driver, *[params(queue=queue, **kw) for kw in many]))


async def complete(driver: Driver, job_id: int, now: datetime) -> None:
    [row] = await driver.job_set_state_if_running_many(
        [outcome(job_id, JobState.COMPLETED, finalized_at=now)], now
    )
    assert row[STATE] == "completed"


async def queue_row(driver: Driver, name: str) -> QueueRow:
    [row] = [q for q in await driver.queue_list() if q.name == name]
    return row


# ------------------------------------------------------------------------ the global limit


@case
async def limited_fetch_global_limit_unpartitioned(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(2))
    job = await jobs_of(driver, q, *[{} for _ in range(5)])
    # Not due yet: neither claimed nor counted as held back.
    await insert_one(driver, queue=q, scheduled_at=at(600))

    first = await fetch(driver, q, lim, at(1), client="c-a")
    assert ids(first.rows) == job[:2]
    assert (first.held_back, first.next_open) == (True, None)
    for row in first.rows:
        # Claimed as job_get_available claims: running, one attempt, at ``now``, by us.
        assert (row[STATE], row[ATTEMPT], row[ATTEMPTED_AT], row[ATTEMPTED_BY]) == (
            "running",
            1,
            at(1),
            ["c-a"],
        )
        stored = await get(driver, row[ID])
        assert row[:ERRORS] == stored[:ERRORS] and row[TAGS] == stored[TAGS]

    again = await fetch(driver, q, lim, at(2), client="c-b")
    assert (again.rows, again.held_back, again.next_open) == ([], True, None)

    await complete(driver, job[0], at(3))
    third = await fetch(driver, q, lim, at(4), client="c-b")
    assert ids(third.rows) == [job[2]] and third.held_back
    for running in (job[1], job[2]):
        await complete(driver, running, at(5))
    # Room for two, two due left: both claimed, nothing held back.
    rest = await fetch(driver, q, lim, at(6))
    assert ids(rest.rows) == job[3:] and not rest.held_back
    # Nothing due at all: nothing held back.
    for running in job[3:]:
        await complete(driver, running, at(7))
    assert await fetch(driver, q, lim, at(8)) == LimitedFetch([], False, None)


@case
async def limited_fetch_takes_no_more_than_asked(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(10))
    job = await jobs_of(driver, q, *[{} for _ in range(5)])
    found = await fetch(driver, q, lim, most=2)
    # Fewer than the limit allows, but all that was asked: not held back by the limit.
    assert ids(found.rows) == job[:2] and not found.held_back
    assert ids((await fetch(driver, q, lim, most=0)).rows) == []


@case
async def limited_fetch_partitions_by_args_fields(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)))
    job = await jobs_of(
        driver,
        q,
        {"args": {"customer": 1, "n": 1}},
        {"args": {"customer": 1, "n": 2}},
        {"args": {"customer": "1"}},  # a string: another partition than the number
        {"args": {"n": 3}},  # no such field: the partition where it is null
        {"args": {"customer": None}},  # explicitly null: that same partition
        {"args_json": "[1, 2]"},  # not an object: null too
        {"args": {"customer": {"id": 7}}},  # any JSON value partitions
        {"args": {"customer": {"id": 7}, "other": 1}},
        {"args": {"customer": 2}},
    )
    found = await fetch(driver, q, lim)
    assert ids(found.rows) == [job[0], job[2], job[3], job[6], job[8]]
    assert found.held_back
    # The null partition is full: the explicit null and the array wait with the missing field.
    await complete(driver, job[3], at(1))
    assert ids((await fetch(driver, q, lim, at(2))).rows) == [job[4]]
    await complete(driver, job[4], at(3))
    assert ids((await fetch(driver, q, lim, at(4))).rows) == [job[5]]


@case
async def limited_fetch_partitions_by_several_args_fields(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer", "region")))
    job = await jobs_of(
        driver,
        q,
        {"args": {"customer": 1, "region": "eu"}},
        {"args": {"customer": 1, "region": "eu", "x": 0}},
        {"args": {"customer": 1, "region": "us"}},
        {"args": {"customer": 2, "region": "eu"}},
        {"args": {"customer": 1}},
        {"args": {"customer": 1, "region": None}},
    )
    found = await fetch(driver, q, lim)
    assert ids(found.rows) == [job[0], job[2], job[3], job[4]] and found.held_back


@case
async def limited_fetch_partitions_by_kind_and_by_kind_and_args(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(2, by_kind=True))
    job = await jobs_of(driver, q, *[{"kind": k} for k in "aaabbbc"])
    found = await fetch(driver, q, lim)
    assert ids(found.rows) == [job[0], job[1], job[3], job[4], job[6]]
    assert found.held_back

    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_kind=True, by_args=("customer",)))
    job = await jobs_of(
        driver,
        q,
        {"kind": "a", "args": {"customer": 1}},
        {"kind": "a", "args": {"customer": 1}},
        {"kind": "a", "args": {"customer": 2}},
        {"kind": "b", "args": {"customer": 1}},
        {"kind": "b", "args": {"customer": 1}},
    )
    assert ids((await fetch(driver, q, lim)).rows) == [job[0], job[2], job[3]]


@case
async def limited_fetch_a_full_partition_holds_back_only_its_own_jobs(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(2, by_args=("customer",)))
    busy = await jobs_of(driver, q, *[{"args": {"customer": 1}} for _ in range(2)])
    assert ids((await fetch(driver, q, lim)).rows) == busy
    # Far more jobs of the full partition than any window of candidates, all of them
    # first in the fetch order (better priority, earlier), then a few of another.
    await jobs_of(driver, q, *[{"args": {"customer": 1}, "priority": 1} for _ in range(60)])
    other = await jobs_of(
        driver,
        q,
        *[{"args": {"customer": 2}, "priority": 4, "scheduled_at": at(1)} for _ in range(3)],
    )
    found = await fetch(driver, q, lim, at(2), most=1)
    assert ids(found.rows) == other[:1]
    found = await fetch(driver, q, lim, at(2), most=5)
    assert ids(found.rows) == other[1:2] and found.held_back
    # Both partitions are full now.
    assert (await fetch(driver, q, lim, at(3))).rows == []


@case
async def limited_fetch_a_backlog_of_one_partition_does_not_crowd_out_the_others(
    driver: Driver,
) -> None:
    # Customer 1 has room for one more, and 60 jobs first in the fetch order: the fetch
    # takes that one and then other customers' jobs, however far behind they lie.
    q = fresh_queue()
    lim = limits(GlobalLimit(2, by_args=("customer",)))
    await driver.queue_upsert(q, NOW, lim)
    [busy] = await jobs_of(driver, q, {"args": {"customer": 1}})
    assert ids((await fetch(driver, q, lim)).rows) == [busy]
    backlog = await jobs_of(driver, q, *[{"args": {"customer": 1}} for _ in range(60)])
    others = await jobs_of(
        driver, q, *[{"args": {"customer": c}, "scheduled_at": at(1)} for c in (2, 3, 2)]
    )
    found = await fetch(driver, q, lim, at(2), most=5)
    assert ids(found.rows) == [backlog[0], *others]
    # Without a stored queue row (its limits not announced yet), the same.
    q = fresh_queue()
    await jobs_of(driver, q, *[{"args": {"customer": 1}} for _ in range(60)])
    others = await jobs_of(driver, q, *[{"args": {"customer": c}} for c in (2, 3)])
    found = await fetch(driver, q, lim, at(2), most=5)
    assert ids(found.rows)[2:] == others and len(found.rows) == 4


@case
async def limited_fetch_round_robin_within_a_priority(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(3, by_args=("customer",)))
    a = await jobs_of(driver, q, *[{"args": {"customer": "a"}} for _ in range(3)])
    b = await jobs_of(driver, q, *[{"args": {"customer": "b"}} for _ in range(3)])
    c = await jobs_of(driver, q, *[{"args": {"customer": "c"}} for _ in range(3)])
    # When the limit may bind (the busiest partition could not take every job a fetch
    # may claim), the first of each, then the second of each, in the order to run them.
    assert ids((await fetch(driver, q, lim, most=4)).rows) == [a[0], a[1], b[0], c[0]]
    assert ids((await fetch(driver, q, lim, most=4)).rows) == [a[2], b[1], b[2], c[1]]
    assert ids((await fetch(driver, q, lim, most=4)).rows) == [c[2]]


@case
async def limited_fetch_takes_in_fetch_order_while_no_limit_can_bind(driver: Driver) -> None:
    # The busiest partition has room for every job the fetch may take: a limit that
    # cannot bind changes nothing, the jobs come in fetch order as without limits.
    q = fresh_queue()
    lim = limits(GlobalLimit(10, by_args=("customer",)))
    a = await jobs_of(driver, q, *[{"args": {"customer": "a"}} for _ in range(3)])
    b = await jobs_of(driver, q, *[{"args": {"customer": "b"}} for _ in range(3)])
    assert ids((await fetch(driver, q, lim, most=4)).rows) == [*a, b[0]]


@case
async def limited_fetch_round_robin_under_a_rate_limit_alone(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(rate_limit=RateLimit(3, 60.0, by_kind=True))
    a = await jobs_of(driver, q, *[{"kind": "a"} for _ in range(3)])
    b = await jobs_of(driver, q, *[{"kind": "b"} for _ in range(3)])
    assert ids((await fetch(driver, q, lim, most=4)).rows) == [a[0], a[1], b[0], b[1]]


@case
async def limited_fetch_priority_wins_across_partitions(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(10, by_args=("customer",)))
    low = await jobs_of(driver, q, *[{"args": {"customer": "a"}, "priority": 2} for _ in range(3)])
    high = await jobs_of(driver, q, *[{"args": {"customer": "b"}, "priority": 1} for _ in range(3)])
    # Priority 1 first, even though one partition gives all of them.
    assert ids((await fetch(driver, q, lim, most=4)).rows) == [*high, low[0]]


@case
async def limited_fetch_counts_only_the_running_jobs_of_its_queue(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)))
    other = fresh_queue()
    # Running jobs of another queue, of the same partition: not counted.
    for _ in range(2):
        await insert_one(driver, queue=other, args={"customer": 1})
    assert len(await driver.job_get_available(other, NOW, 5, "client-9")) == 2
    # Jobs of this queue in other states: not counted either.
    done = await jobs_of(driver, q, {"args": {"customer": 1}})
    assert ids((await fetch(driver, q, lim)).rows) == done
    await complete(driver, done[0], at(1))
    await insert_one(
        driver, queue=q, args={"customer": 1}, state=JobState.SCHEDULED, scheduled_at=at(60)
    )
    await insert_one(driver, queue=q, args={"customer": 1}, state=JobState.PENDING)
    job = await jobs_of(driver, q, {"args": {"customer": 1}})
    assert ids((await fetch(driver, q, lim, at(2))).rows) == job


# ------------------------------------------------------------------------ the rate limit


@case
async def limited_fetch_rate_limit_counts_starts_in_a_sliding_window(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(rate_limit=RateLimit(2, 10.0))
    job = await jobs_of(driver, q, *[{} for _ in range(8)])
    first = await fetch(driver, q, lim, at(0))
    assert ids(first.rows) == job[:2]
    assert (first.held_back, first.next_open) == (True, at(10))
    # Ending the jobs frees no start: the window counts starts.
    for done in job[:2]:
        await complete(driver, done, at(1))
    assert await fetch(driver, q, lim, at(5)) == LimitedFetch([], True, at(10))
    # At 10 s both starts at 0 have left the window (it is (now - per, now]).
    second = await fetch(driver, q, lim, at(10), most=1)
    assert ids(second.rows) == job[2:3]
    assert not second.held_back  # it took all it asked for
    third = await fetch(driver, q, lim, at(16))
    assert ids(third.rows) == job[3:4]
    assert (third.held_back, third.next_open) == (True, at(20))
    # At 20 s the start at 10 has left, the one at 16 has not: one more.
    fourth = await fetch(driver, q, lim, at(20))
    assert ids(fourth.rows) == job[4:5]
    assert (fourth.held_back, fourth.next_open) == (True, at(26))
    assert ids((await fetch(driver, q, lim, at(26))).rows) == job[5:6]
    assert ids((await fetch(driver, q, lim, at(40))).rows) == job[6:8]


@case
async def limited_fetch_rate_limit_counts_a_retry_as_a_start(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(rate_limit=RateLimit(1, 10.0))
    [job] = await jobs_of(driver, q, {})
    assert ids((await fetch(driver, q, lim, at(0))).rows) == [job]
    await driver.job_set_state_if_running_many(
        [outcome(job, JobState.RETRYABLE, scheduled_at=at(1), error_json='{"e": 1}')], at(1)
    )
    assert await driver.job_schedule(at(2), at(2), 10) == {q: 1}
    # Due again, but its first start is still in the window.
    assert await fetch(driver, q, lim, at(5)) == LimitedFetch([], True, at(10))
    [again] = (await fetch(driver, q, lim, at(10))).rows
    assert (again[ID], again[ATTEMPT], again[ATTEMPTED_AT]) == (job, 2, at(10))


@case
async def limited_fetch_rate_limit_partitioned_by_kind_and_args(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(rate_limit=RateLimit(1, 10.0, by_kind=True, by_args=("provider",)))
    job = await jobs_of(
        driver,
        q,
        {"kind": "a", "args": {"provider": "x"}},
        {"kind": "a", "args": {"provider": "x"}},
        {"kind": "a", "args": {"provider": "y"}},
        {"kind": "b", "args": {"provider": "x"}},
    )
    found = await fetch(driver, q, lim, at(0))
    assert ids(found.rows) == [job[0], job[2], job[3]]
    assert (found.held_back, found.next_open) == (True, at(10))
    # next_open is when the oldest start of a full partition leaves the window.
    await jobs_of(driver, q, {"kind": "b", "args": {"provider": "y"}})
    later = await fetch(driver, q, lim, at(4))
    assert len(later.rows) == 1 and later.next_open == at(10)
    assert ids((await fetch(driver, q, lim, at(10))).rows) == [job[1]]


@case
async def limited_fetch_global_and_rate_limit_together(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)), RateLimit(3, 10.0))
    job = await jobs_of(driver, q, *[{"args": {"customer": c}} for c in (1, 1, 2, 3, 4, 5)])
    found = await fetch(driver, q, lim, at(0))
    # The global limit takes one per customer, the rate limit three in all: the second
    # job of customer 1, held back by its global partition, uses up no rate slot.
    claimed = ids(found.rows)
    assert claimed == [job[0], job[2], job[3]]
    for done in claimed:
        await complete(driver, done, at(1))
    # Only the global limit's partitions are free: the rate window holds everything.
    assert await fetch(driver, q, lim, at(2)) == LimitedFetch([], True, at(10))
    assert ids((await fetch(driver, q, lim, at(10))).rows) == [job[1], job[4], job[5]]


@case
async def limited_fetch_global_and_rate_limit_partitioned_differently(driver: Driver) -> None:
    # Each limit takes its own partitions out of the job: per customer, per kind. A job
    # held back by its rate partition leaves its global partition's room to the next job
    # of that partition (customer 3's kind b job runs, though its kind a job came first);
    # a fetch may leave such a job to the next fetch (the choice is ranked per limit, not
    # job by job), but no fetch goes over either limit.
    q = fresh_queue()
    lim = limits(GlobalLimit(1, by_args=("customer",)), RateLimit(2, 10.0, by_kind=True))
    await driver.queue_upsert(q, NOW, lim)
    job = await jobs_of(
        driver,
        q,
        {"kind": "a", "args": {"customer": 1}},
        {"kind": "a", "args": {"customer": 1}},  # customer 1 is full
        {"kind": "a", "args": {"customer": 2}},
        {"kind": "a", "args": {"customer": 3}},  # kind a's two starts are used
        {"kind": "b", "args": {"customer": 3}},
        {"kind": "b", "args": {"customer": 4}},
    )
    found = await fetch(driver, q, lim, at(0))
    claimed = ids(found.rows)
    assert set(claimed) <= {job[0], job[2], job[4], job[5]}
    assert (found.held_back, found.next_open) == (True, at(10))
    claimed += ids((await fetch(driver, q, lim, at(0))).rows)
    assert sorted(claimed) == [job[0], job[2], job[4], job[5]]
    for done in claimed:
        await complete(driver, done, at(1))
    assert (await fetch(driver, q, lim, at(5))).rows == []
    assert ids((await fetch(driver, q, lim, at(10))).rows) == [job[1], job[3]]


@case
async def limited_fetch_next_open_is_none_when_only_the_global_limit_holds(
    driver: Driver,
) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(1), RateLimit(5, 10.0))
    await jobs_of(driver, q, {}, {})
    found = await fetch(driver, q, lim, at(0))
    assert len(found.rows) == 1
    assert (found.held_back, found.next_open) == (True, None)


@case
async def limited_fetch_rate_window_holds_after_a_fetch_with_a_later_now(
    driver: Driver,
) -> None:
    # Two clients fetch at once: B takes its ``now`` after A's, but its statement runs
    # first (the lock is granted in arrival order, not in order of ``now``). The start at
    # 89.5 must still count for A's fetch at 95: within 10 s of it.
    q = fresh_queue()
    lim = limits(rate_limit=RateLimit(1, 10.0))
    [first] = await jobs_of(driver, q, {})
    assert ids((await fetch(driver, q, lim, at(89.5))).rows) == [first]
    assert (await fetch(driver, q, lim, at(100), client="client-b")).rows == []
    await jobs_of(driver, q, {})
    found = await fetch(driver, q, lim, at(95), client="client-a")
    assert found.rows == [] and found.held_back and found.next_open == at(99.5)


# ------------------------------------------------------------------------ pause, slots freed


@case
async def limited_fetch_claims_nothing_from_a_paused_queue(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(5), RateLimit(5, 10.0))
    job = await jobs_of(driver, q, {}, {})
    await driver.queue_upsert(q, NOW, lim)
    assert await driver.queue_pause(q, NOW) == [q]
    assert await fetch(driver, q, lim, at(1)) == LimitedFetch([], False, None)
    await driver.queue_resume(q, at(2))
    assert ids((await fetch(driver, q, lim, at(3))).rows) == job


@case
async def limited_fetch_slots_freed_by_outcomes_rescues_and_cancels(driver: Driver) -> None:
    q = fresh_queue()
    lim = limits(GlobalLimit(1))
    job = await jobs_of(driver, q, *[{} for _ in range(7)])
    [a] = (await fetch(driver, q, lim, at(1))).rows
    assert a[ID] == job[0]
    assert (await fetch(driver, q, lim, at(2))).rows == []
    # An outcome written (completed) frees the slot.
    await complete(driver, job[0], at(3))
    [b] = (await fetch(driver, q, lim, at(4))).rows
    assert b[ID] == job[1]
    # A rescue (to retryable, later) frees it.
    error = '{"error": "stuck"}'
    rescued = await driver.job_rescue_many(
        [JobRescue(b[ID], JobState.RETRYABLE, None, at(600), error, b[ATTEMPTED_AT])]
    )
    assert rescued == [(b[ID], q, "retryable")]
    [c] = (await fetch(driver, q, lim, at(5))).rows
    assert c[ID] == job[2]
    # A cancel request of a running job frees nothing until its outcome is written.
    cancelling = await driver.job_cancel(c[ID], at(6))
    assert cancelling is not None and cancelling[STATE] == "running"
    assert (await fetch(driver, q, lim, at(7))).rows == []
    await driver.job_set_state_if_running_many(
        [outcome(c[ID], JobState.CANCELLED, finalized_at=at(8))], at(8)
    )
    # A queued job cancelled is never claimed.
    cancelled = await driver.job_cancel(job[3], at(8))
    assert cancelled is not None and cancelled[STATE] == "cancelled"
    [d] = (await fetch(driver, q, lim, at(9))).rows
    assert d[ID] == job[4]
    # A snooze (back to scheduled, the attempt given back) and a discard free it too.
    await driver.job_set_state_if_running_many(
        [outcome(d[ID], JobState.SCHEDULED, scheduled_at=at(600), give_back_attempt=True)],
        at(10),
    )
    [e] = (await fetch(driver, q, lim, at(11))).rows
    assert e[ID] == job[5]
    await driver.job_set_state_if_running_many(
        [outcome(e[ID], JobState.DISCARDED, finalized_at=at(12))], at(12)
    )
    [f] = (await fetch(driver, q, lim, at(13))).rows
    assert f[ID] == job[6]
