"""Flow control in the differential test: the memory driver against PostgreSQL on plans
that press on limits.

``test_driver_differential.py`` runs every kind of storage step, limited fetches among
them; the plans here are made mostly of what flow control depends on: inserts (by every
path) into two queues worked with generated limits (`limits_plan.diff_limits`: global
and/or rate, partitioned by kind and/or args fields, limits of 1 to 3, windows of half a
second to a minute), limited fetches, outcomes, claims, cancels, retries, rescues, the
queue's limits stored and removed (``queue_upsert``), pauses, and ``queue_list`` (limits,
held back, partitions), on a clock that moves by small steps. Both drivers must claim the
same jobs in the same order, say the same about jobs held back and the next window, and
list the same partitions in the same order (`limits_plan.queue_rows`).

A queue's clients are configured alike: its limited fetches take the limits it is worked
with, and those change only when its clients are configured anew (`Reconfigure`: the
new limits are announced, and the fetches take them from then on). A job finalized under
the old limits, then retried, had kept its old partition key on PostgreSQL
(tq_job.limit_key), and a fetch within the new limits passed them: the tests at the end.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import attrs
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from limits_plan import DIFF_ARGS, FetchLimited, Reconfigure, UseLimits, diff_limits
from support import LONG, SOAK
from test_driver_differential import (
    QUEUES,
    START,
    Claim,
    Decision,
    Fetch,
    Insert,
    Manage,
    NewJob,
    Out,
    Outcomes,
    QueueOp,
    Rescue,
    Schedule,
    Tick,
    _again,
    inserts,
    outs,
    run_plan,
)

from trioqueue.driver.protocol import JobInsertParams, JobOutcome
from trioqueue.job import JobState
from trioqueue.limits import GlobalLimit, QueueLimits

settings.register_profile(
    "trioqueue-differential-limits",
    parent=settings.get_profile("trioqueue-differential"),
    max_examples=100,
)
settings.register_profile(
    "trioqueue-differential-limits-soak",
    parent=settings.get_profile("trioqueue-differential"),
    max_examples=3_000,
)
PROFILE = settings.get_profile(
    "trioqueue-differential-limits-soak" if SOAK else "trioqueue-differential-limits"
)

_ref = st.integers(0, 44)
_jobs = st.lists(
    st.builds(
        NewJob,
        kind=st.sampled_from(["a", "a", "b"]),
        queue=st.sampled_from([QUEUES[0], QUEUES[0], QUEUES[1]]),
        priority=st.sampled_from([1, 1, 2]),
        max_attempts=st.integers(1, 3),
        due=st.sampled_from([-1.0, 0.0, 0.0, 0.5, 5.0]),
        state=st.sampled_from(["available"] * 6 + ["scheduled", "pending"]),
        key=st.sampled_from([None, None, None, 0, 1]),
        # Few partitions, so that they fill.
        args_json=st.sampled_from(['{"c": 1}'] * 4 + ['{"c": 2}'] * 2 + list(DIFF_ARGS)),
    ),
    min_size=1,
    max_size=6,
    # A batch that names one unique key twice fails whole (ON CONFLICT cannot update a
    # row twice): those are left to the other test.
    unique_by=lambda job: (job.kind, job.key) if job.key is not None else id(job),
).map(tuple)
_inserts = st.one_of(
    st.builds(Insert, _jobs),
    st.builds(
        Insert,
        _jobs.map(lambda jobs: tuple(attrs.evolve(j, key=None) for j in jobs)),
        st.just("fast"),
    ),
)
"""Jobs that go in (the other test inserts every odd value), many, so that partitions
fill. (The fast path fails whole on a unique key that collides: it gets none.)"""
_fetches = st.builds(
    FetchLimited,
    st.sampled_from([QUEUES[0], QUEUES[0], QUEUES[1]]),
    st.sampled_from([0, 1, 2, 2, 3, 3]),
    st.sampled_from(["c1", "c2"]),
)
_outcomes = st.builds(Outcomes, st.lists(outs, min_size=1, max_size=3).map(tuple), st.booleans())

# A strategy listed twice (as another object: `_again`) is drawn about twice as often.
operations = st.one_of(
    st.builds(Tick, st.sampled_from([0.0, 0.000001, 0.25, 0.5, 1.0, 5.0])),
    st.builds(Tick, st.sampled_from([0.0, 0.5, 1.0, 60.0])),
    _inserts,
    _again(_inserts),
    _again(_inserts),
    inserts(),
    *[_again(_fetches) for _ in range(8)],
    st.builds(Fetch, st.sampled_from(QUEUES), st.integers(1, 3)),
    st.builds(Claim, _ref),
    _outcomes,
    _again(_outcomes),
    st.builds(Schedule, st.sampled_from([0.0, 1.0]), st.just(100)),
    st.builds(Manage, st.sampled_from(["cancel", "retry", "delete"]), _ref),
    st.builds(
        QueueOp,
        st.just("upsert"),
        st.sampled_from(QUEUES),
        limited=st.sampled_from([True, True, True, False]),
    ),
    st.builds(QueueOp, st.just("list")),
    st.builds(QueueOp, st.just("list")),  # (another object: drawn twice as often)
    st.builds(Reconfigure, st.sampled_from(QUEUES)),
    st.builds(QueueOp, st.sampled_from(["pause", "resume", "resume"]), st.sampled_from(QUEUES)),
    st.builds(
        Rescue,
        st.sampled_from([0.0, 1.0]),
        st.sampled_from([1, 10]),
        st.none(),
        st.lists(
            st.builds(
                Decision,
                st.sampled_from(["retryable", "available", "discarded"]),
                st.sampled_from([None, 0.0, 1.0]),
            ),
            max_size=3,
        ).map(tuple),
    ),
)

plans = st.tuples(
    st.builds(UseLimits, st.tuples(diff_limits(), diff_limits(), diff_limits())),
    st.builds(QueueOp, st.just("upsert"), st.sampled_from(QUEUES), limited=st.just(True)),
    _inserts,
    _again(_inserts),
    st.lists(operations, min_size=20, max_size=60),
).map(lambda p: [*p[:4], *p[4]])


@LONG
@PROFILE
@given(plan=plans)
def test_memory_driver_answers_as_postgres_does_under_limits(
    plan: list[Any], database_url: str
) -> None:
    note(f"{len(plan)} steps")
    features = run_plan(plan, database_url)
    for feature in sorted(features):  # see --hypothesis-show-statistics
        event(feature)


def test_a_worked_limited_plan(database_url: str) -> None:
    """A hand-written plan through the limited steps, so that a broken harness shows
    here rather than as a generated failure."""
    from trioqueue.limits import RateLimit

    plan: list[Any] = [
        UseLimits(
            (
                QueueLimits(GlobalLimit(1, by_args=("c",)), RateLimit(2, 1.0)),
                QueueLimits(None, RateLimit(1, 5.0, by_kind=True)),
            )
        ),
        QueueOp("upsert", "q1", limited=True),
        Insert(tuple(NewJob(args_json=a) for a in ('{"c": 1}', '{"c": 1.0}', '{"c": 2}', "{}"))),
        Insert((NewJob(queue="q2"), NewJob(queue="q2", kind="b")), path="fast"),
        FetchLimited("q1", 3),
        QueueOp("list"),
        FetchLimited("q1", 3),
        Outcomes((Out(0, "completed"),)),
        FetchLimited("q2", 3),
        FetchLimited("q2", 3),
        QueueOp("list"),
        Tick(1.0),
        FetchLimited("q1", 3),
        Tick(5.0),
        FetchLimited("q2", 3),
        QueueOp("upsert", "q1"),
        QueueOp("list"),
        FetchLimited("q1", 3),
    ]
    run_plan(plan, database_url)


# ------------------------------------------------------------- limits that change

OLD = QueueLimits(GlobalLimit(1, by_args=("c",)))
NEW = QueueLimits(GlobalLimit(1, by_kind=True))


def _job(c: int) -> JobInsertParams:
    return JobInsertParams(
        args_json=f'{{"c": {c}}}',
        kind="a",
        max_attempts=3,
        metadata_json="{}",
        priority=1,
        queue="q1",
        scheduled_at=START,
        state=JobState.AVAILABLE,
        tags=(),
        unique_key=None,
        unique_states=None,
    )


async def _retried_under_new_limits(d: Any) -> int:
    """A job completed while its queue was limited per ``c`` is retried after the
    queue's clients changed to one job per kind; with another job of its kind due, a
    fetch within the new limits may claim one of them only. Returns how many it claimed."""
    now = START
    await d.queue_upsert("q1", now, OLD)
    [(first, _)] = await d.job_insert_many([_job(1)], [], now)
    run = await d.job_claim(first[0], now, "c1")
    done = JobOutcome(first[0], JobState.COMPLETED, now, None, False, None, None, run[8])
    assert len(await d.job_set_state_if_running_many([done], now)) == 1
    now += timedelta(seconds=1)
    await d.queue_upsert("q1", now, NEW)  # the clients now limit one job per kind
    assert await d.job_retry(first[0], now) is not None
    await d.job_insert_many([_job(2)], [], now)
    found = await d.job_get_available_limited("q1", now, 2, "c1", NEW)
    return len(found.rows)


async def test_retried_job_takes_the_current_limits_memory() -> None:
    from trioqueue.driver.memory import MemoryDriver

    assert await _retried_under_new_limits(MemoryDriver()) == 1


async def test_retried_job_takes_the_current_limits_postgres(database_url: str) -> None:
    from trioqueue.driver.postgres.driver import open_postgres_driver

    async with open_postgres_driver(database_url) as d:
        assert await _retried_under_new_limits(d) == 1
