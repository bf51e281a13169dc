"""Periodic jobs: validation, schedules, and the leader's enqueuer against PostgreSQL."""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, cast

import attrs
import pytest
import trio
from support import FAST

import trioqueue as tq
import trioqueue.periodic as periodic_module
from trioqueue._maintenance.periodic import (
    PeriodicEnqueuer,
    _StateMoved,
    plan_job,
    run_unique_key,
)
from trioqueue.driver.faults import Fault, FaultyDriver
from trioqueue.driver.postgres import PgConnection, open_pool
from trioqueue.driver.postgres.driver import PostgresDriver
from trioqueue.driver.protocol import Driver, PeriodicJobState
from trioqueue.periodic import MISSED_RUNS_COUNT_LIMIT, PeriodicJobs, Schedule


@attrs.frozen
class TickArgs:
    kind: ClassVar[str] = "tick"
    n: int = 0


def _workers() -> tq.Workers:
    workers = tq.Workers()

    async def tick(job: tq.Job[TickArgs]) -> None:
        pass

    workers.add(TickArgs, tick)
    return workers


QUEUES = {"default": tq.QueueConfig(max_workers=5)}


def _tick() -> TickArgs:
    return TickArgs()


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@asynccontextmanager
async def _client(
    store: str | FaultyDriver, *jobs: tq.PeriodicJob, **extra: Any
) -> AsyncIterator[tq.Client]:
    """A client working ``QUEUES`` with ``jobs``, on a database URL or a driver."""
    config = {**FAST, **extra}
    if isinstance(store, str):
        config["database_url"] = store
    else:
        config["driver"] = cast(Driver, store)
    async with tq.open_client(
        workers=_workers(), queues=QUEUES, periodic_jobs=jobs, **config
    ) as client:
        yield client


@asynccontextmanager
async def _counted(url: str) -> AsyncIterator[FaultyDriver]:
    """A driver of its own for one client, counting its calls (a FaultyDriver without
    faults): each pass of the enqueuer over a list that is not empty reads the stored
    states once (``periodic_job_get_many``)."""
    async with open_pool(url, max_size=4) as pool:
        yield FaultyDriver(PostgresDriver(pool, url))


async def _passes(driver: FaultyDriver, count: int = 2) -> None:
    """Return once ``count`` more passes of the enqueuer have begun. Passes run one after
    another, and a pass takes the list of jobs just before it reads the states: so from
    the first such pass on, every pass has the list as it is at this call, and every pass
    before it has finished."""
    target = driver.calls["periodic_job_get_many"] + count
    await _wait_for(lambda: driver.calls["periodic_job_get_many"] >= target)


async def _sql(client: tq.Client, query: str, *params: Any) -> list[tuple[Any, ...]]:
    async with client.transaction() as tx:
        return await tx.fetch(query, *params)


async def _runs(client: tq.Client, periodic_id: str) -> dict[str, int]:
    """Jobs per run time of one periodic job, over every state."""
    rows = await _sql(
        client,
        "SELECT metadata->>'periodic_run_at', count(*) FROM tq_job "
        "WHERE metadata->>'periodic_job_id' = $1 GROUP BY 1",
        periodic_id,
    )
    return {str(r[0]): int(r[1]) for r in rows}


async def _assert_no_run_lost(client: tq.Client, periodic_id: str, every: float) -> None:
    """Each run time of the job has one job, and every run time between the first and
    the last has its own job or is counted in the next job's ``missed_runs``."""
    rows = await _sql(
        client,
        "SELECT metadata->>'periodic_run_at', coalesce((metadata->>'missed_runs')::int, 0) "
        "FROM tq_job WHERE metadata->>'periodic_job_id' = $1",
        periodic_id,
    )
    runs = sorted((datetime.fromisoformat(str(at)), int(missed)) for at, missed in rows)
    times = [at for at, _ in runs]
    assert len(set(times)) == len(times), f"a run time inserted twice: {times}"
    step = timedelta(seconds=every)
    for (before, _), (after, missed) in itertools.pairwise(runs):
        assert after - before == step * (1 + missed), f"runs lost between {before} and {after}"


async def _wait_for(predicate: Callable[[], Any], seconds: float = 10.0) -> None:
    """Poll ``predicate`` (sync, or returning an awaitable) until true, or fail."""
    with trio.fail_after(seconds):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(0.05)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "every"),
        ({"every": 5, "cron": "* * * * *"}, "cron"),
        ({"every": 0}, "every"),
        ({"every": -1}, "every"),
        ({"every": float("nan")}, "every"),
        ({"every": float("inf")}, "every"),
        ({"every": True}, "every"),
        ({"every": "5"}, "every"),
        ({"every": 1e12}, "every"),  # before: accepted, then the enqueuer overflowed
        ({"every": periodic_module.EVERY_MAX + 1}, "every"),
        ({"cron": "* * * *"}, "cron"),
        ({"cron": "0 * * * * *"}, "cron"),
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "0 0 30 2 *"}, "cron"),
        ({"cron": 5}, "cron"),
        ({"every": 5, "args": "not callable"}, "args"),
        ({"every": 5, "run_on_start": 1}, "run_on_start"),
        ({"every": 5, "id": ""}, "id"),
        ({"every": 5, "id": " padded"}, "id"),
        ({"every": 5, "id": "x" * 129}, "id"),
        ({"every": 5, "id": 7}, "id"),
    ],
)
def test_periodic_job_validation(kwargs: dict[str, Any], field: str) -> None:
    kwargs.setdefault("args", _tick)
    with pytest.raises(tq.ValidationError) as info:
        tq.PeriodicJob(**kwargs)
    assert info.value.field == f"PeriodicJob.{field}"


def test_the_longest_every_has_run_times() -> None:
    job = tq.PeriodicJob(every=periodic_module.EVERY_MAX, args=_tick, id="decade")
    now = datetime(9990, 1, 1, tzinfo=UTC)
    assert job.schedule.latest_at_or_before(now) <= now < job.schedule.next_after(now)


def test_cron_without_cronsim_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(periodic_module, "_cronsim", lambda: None)
    with pytest.raises(tq.ValidationError, match=r"pip install 'trioqueue\[cron\]'"):
        tq.PeriodicJob(cron="*/5 * * * *", args=_tick)
    tq.PeriodicJob(every=60, args=_tick)  # every= needs nothing extra


def test_client_config_checks_periodic_jobs() -> None:
    job = tq.PeriodicJob(every=60, args=_tick)
    assert tq.ClientConfig(periodic_jobs=[job]).periodic_jobs == (job,)
    with pytest.raises(tq.ValidationError, match="periodic_jobs"):
        tq.ClientConfig(periodic_jobs=job)
    with pytest.raises(tq.ValidationError, match=r"periodic_jobs\[1\]"):
        tq.ClientConfig(periodic_jobs=[job, "nope"])
    with pytest.raises(tq.ValidationError, match="used twice"):
        tq.ClientConfig(periodic_jobs=[job, tq.PeriodicJob(every=60, args=_tick)])
    # Distinct ids (explicit, or derived from a different schedule) are fine.
    tq.ClientConfig(
        periodic_jobs=[
            job,
            tq.PeriodicJob(every=60, args=_tick, id="other"),
            tq.PeriodicJob(every=30, args=_tick),
        ]
    )


def test_ids_explicit_or_derived() -> None:
    assert tq.PeriodicJob(every=60, args=_tick, id="nightly").effective_id == "nightly"
    assert tq.PeriodicJob(every=60, args=_tick).effective_id == f"{__name__}._tick@every=60"
    assert tq.PeriodicJob(every=0.25, args=_tick).effective_id.endswith("@every=0.25")
    cron_job = tq.PeriodicJob(cron="*/5  *  * * *", args=_tick)
    assert cron_job.effective_id == f"{__name__}._tick@cron=*/5 * * * *"

    def long_named_function_to_push_the_derived_id_well_past_the_limit_of_characters() -> None:
        return None

    fn = long_named_function_to_push_the_derived_id_well_past_the_limit_of_characters
    long_id = tq.PeriodicJob(every=60, args=fn).effective_id
    assert len(long_id) <= 128
    assert long_id == tq.PeriodicJob(every=60, args=fn).effective_id


# ------------------------------------------------------------------ schedule arithmetic


def test_every_runs_on_a_grid_since_the_epoch() -> None:
    hourly = Schedule(interval_us=3600 * 10**6)
    now = _at("2024-05-01T10:17:03.5")
    assert hourly.next_after(now) == _at("2024-05-01T11:00:00")
    assert hourly.next_after(_at("2024-05-01T11:00:00")) == _at("2024-05-01T12:00:00")
    assert hourly.latest_at_or_before(now) == _at("2024-05-01T10:00:00")
    assert hourly.latest_at_or_before(_at("2024-05-01T10:00:00")) == _at("2024-05-01T10:00:00")
    assert hourly.count_between(_at("2024-05-01T05:00:00"), _at("2024-05-01T10:00:00")) == 6
    assert hourly.count_between(_at("2024-05-01T05:30:00"), _at("2024-05-01T10:00:00")) == 5
    assert hourly.count_between(_at("2024-05-01T10:30:00"), _at("2024-05-01T10:00:00")) == 0
    far = hourly.count_between(_at("1990-01-01T00:00:00"), now)
    assert far == MISSED_RUNS_COUNT_LIMIT

    # A fractional interval is exact in microseconds: two leaders agree to the microsecond.
    job = tq.PeriodicJob(every=0.3, args=_tick)
    step = job.schedule
    t = step.next_after(now)
    assert t > now
    assert t - now <= timedelta(seconds=0.3)
    assert ((t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)) % 300_000 == 0
    assert step.next_after(t) - t == timedelta(seconds=0.3)
    assert step.latest_at_or_before(t) == t


def test_cron_schedule_in_utc() -> None:
    five = tq.PeriodicJob(cron="*/5 * * * *", args=_tick).schedule
    now = _at("2024-01-01T00:03:07")
    assert five.next_after(now) == _at("2024-01-01T00:05:00")
    assert five.next_after(_at("2024-01-01T00:05:00")) == _at("2024-01-01T00:10:00")
    assert five.latest_at_or_before(now) == _at("2024-01-01T00:00:00")
    assert five.latest_at_or_before(_at("2024-01-01T00:05:00")) == _at("2024-01-01T00:05:00")
    assert five.latest_at_or_before(_at("2024-01-01T00:05:00.5")) == _at("2024-01-01T00:05:00")
    assert five.count_between(_at("2024-01-01T00:00:00"), _at("2024-01-01T01:00:00")) == 13

    mondays = tq.PeriodicJob(cron="30 9 * * MON", args=_tick).schedule
    assert mondays.next_after(now) == _at("2024-01-01T09:30:00")  # 2024-01-01 is a Monday
    assert mondays.next_after(_at("2024-01-01T09:30:00")) == _at("2024-01-08T09:30:00")
    # Another offset in the input changes nothing: schedules are UTC.
    east = now.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    assert mondays.next_after(east) == _at("2024-01-01T09:30:00")


def _state(job: tq.PeriodicJob, next_run_at: str, last: str | None = None) -> PeriodicJobState:
    return PeriodicJobState(
        job.effective_id, job.schedule.key, _at(next_run_at), _at(last) if last else None
    )


def test_plan_first_sight_missed_runs_and_run_on_start() -> None:
    job = tq.PeriodicJob(every=3600, args=_tick, id="h")
    eager = tq.PeriodicJob(every=3600, args=_tick, id="h", run_on_start=True)
    now = _at("2024-05-01T10:17:00")

    # Never seen: no run now, the next one on the grid.
    plan = plan_job(job, None, now, first_seen=True)
    assert plan.run_at is None
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T11:00:00")
    # ... unless run_on_start: a run for the current slot.
    plan = plan_job(eager, None, now, first_seen=True)
    assert plan.run_at == _at("2024-05-01T10:00:00")

    # On time (or merely late): one run, nothing missed.
    plan = plan_job(job, _state(job, "2024-05-01T10:00:00"), now, first_seen=False)
    assert (plan.run_at, plan.missed_runs) == (_at("2024-05-01T10:00:00"), 0)
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T11:00:00")

    # Down since 05:00: one catch-up run for 10:00; 05:00-09:00 (5 runs) were missed.
    plan = plan_job(job, _state(job, "2024-05-01T05:00:00"), now, first_seen=True)
    assert (plan.run_at, plan.missed_runs) == (_at("2024-05-01T10:00:00"), 5)
    assert plan.missed_since == _at("2024-05-01T05:00:00")

    # Not due yet: nothing to do, nothing to write.
    plan = plan_job(job, _state(job, "2024-05-01T11:00:00"), now, first_seen=True)
    assert plan.run_at is None and plan.state is None
    # run_on_start when the current slot already ran: nothing either.
    ran = _state(eager, "2024-05-01T11:00:00", last="2024-05-01T10:00:00")
    assert plan_job(eager, ran, now, first_seen=True).state is None
    # ... when it did not: a run for the current slot, the schedule unchanged.
    not_ran = _state(eager, "2024-05-01T11:00:00", last="2024-05-01T09:00:00")
    plan = plan_job(eager, not_ran, now, first_seen=True)
    assert plan.run_at == _at("2024-05-01T10:00:00")
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T11:00:00")
    # ... and only the first time this leader sees the job.
    assert plan_job(eager, not_ran, now, first_seen=False).state is None

    # A changed schedule whose stored run time passed: one run in our current slot,
    # nothing counts as missed (the stored times are not on our grid).
    minutely = tq.PeriodicJob(every=60, args=_tick, id="h")
    plan = plan_job(minutely, _state(job, "2024-05-01T05:00:00"), now, first_seen=True)
    assert (plan.run_at, plan.missed_runs) == (_at("2024-05-01T10:17:00"), 0)
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T10:18:00")
    assert plan.state.schedule == "every=60"


def test_plan_run_on_start_when_the_stored_next_run_time_is_off_our_grid() -> None:
    """A disagreeing client stored our schedule with its own sooner, off-grid next run
    time (10:01:30), which has passed while our latest run time (10:01) is before it: no
    run is due by the grid, but run_on_start fires our latest run time unless it had its
    run already (before, it fired it again: a duplicate)."""
    eager = tq.PeriodicJob(every=60, args=_tick, id="m", run_on_start=True)
    now = _at("2024-05-01T10:01:45")
    ran_before = _state(eager, "2024-05-01T10:01:30", "2024-05-01T10:00:00")
    plan = plan_job(eager, ran_before, now, first_seen=True)
    assert plan.run_at == _at("2024-05-01T10:01:00")
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T10:02:00")
    ran_already = _state(eager, "2024-05-01T10:01:30", "2024-05-01T10:01:00")
    plan = plan_job(eager, ran_already, now, first_seen=True)
    assert plan.run_at is None
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T10:02:00")
    assert plan_job(eager, ran_before, now, first_seen=False).run_at is None


def test_plan_clients_that_disagree_on_a_schedule_both_fire() -> None:
    """Two clients with one id but different schedules (a rolling deploy): each stores its
    own schedule in turn; neither resets the other for ever, and both schedules fire: each
    inserts its latest run time that is after the last run anyone inserted."""
    hourly = tq.PeriodicJob(every=3600, args=_tick, id="h")
    minutely = tq.PeriodicJob(every=60, args=_tick, id="h")
    now = _at("2024-05-01T10:17:30")
    # The hourly client stored 11:00; the minutely one keeps its own sooner time.
    plan = plan_job(minutely, _state(hourly, "2024-05-01T11:00:00"), now, first_seen=False)
    assert plan.run_at is None and plan.missed_runs == 0
    assert plan.state is not None and plan.state.next_run_at == _at("2024-05-01T10:18:00")
    # Both clients pass every 20 s in turn for three hours.
    stored: PeriodicJobState | None = plan.state
    runs: set[datetime] = set()
    for step in range(3 * 180):
        now += timedelta(seconds=20)
        job = (hourly, minutely)[step % 2]
        plan = plan_job(job, stored, now, first_seen=False)
        if plan.run_at is not None:
            runs.add(plan.run_at)
        stored = plan.state or stored
    # Every minute fired (the hours are minutes too), none lost to the hourly client's
    # turns: 10:18 to 13:17.
    first = _at("2024-05-01T10:18:00")
    assert runs == {first + timedelta(minutes=m) for m in range(180)}


def test_periodic_jobs_collection() -> None:
    jobs = PeriodicJobs()
    a = tq.PeriodicJob(every=1, args=_tick, id="a")
    b = tq.PeriodicJob(every=1, args=_tick, id="b")
    ha = jobs.add(a)
    jobs.add(b)
    assert list(jobs) == [a, b] and len(jobs) == 2
    with pytest.raises(tq.ValidationError, match="used twice"):
        jobs.add(tq.PeriodicJob(every=5, args=_tick, id="a"))
    with pytest.raises(tq.ValidationError):
        jobs.add("nope")  # type: ignore[arg-type]
    _, changed = jobs.watch()
    assert jobs.remove(ha) is True
    assert changed.is_set()
    assert jobs.remove(ha) is False
    assert list(jobs) == [b]
    jobs.clear()
    assert len(jobs) == 0
    jobs.add(a)  # its id is free again


# ------------------------------------------------------------------ the enqueuer, one pass


@asynccontextmanager
async def _enqueuer(
    url: str, *jobs: tq.PeriodicJob
) -> AsyncIterator[tuple[tq.Client, PeriodicEnqueuer, list[datetime]]]:
    """An enqueuer over a real database with a clock the test sets (clock[0])."""
    clock = [datetime.now(UTC)]
    async with open_pool(url, max_size=4) as pool, tq.open_client(url) as client:
        driver = PostgresDriver(pool, url)
        enqueuer = PeriodicEnqueuer(driver, lambda: clock[0], PeriodicJobs(jobs), client._inserts)
        yield client, enqueuer, clock


async def test_enqueuer_passes_with_a_fixed_clock(database_url: str) -> None:
    job = tq.PeriodicJob(every=3600, args=lambda: TickArgs(1), id="hourly", run_on_start=True)
    with trio.fail_after(20):
        async with _enqueuer(database_url, job) as (client, enqueuer, clock):
            clock[0] = _at("2024-05-01T10:17:00")
            result = await enqueuer.run_once()
            [run] = result.runs
            assert run.run_at == _at("2024-05-01T10:00:00") and not run.duplicate
            assert run.job is not None
            assert run.job.metadata == {
                "periodic": True,
                "periodic_job_id": "hourly",
                "periodic_run_at": "2024-05-01T10:00:00+00:00",
            }
            assert result.next_run_at == _at("2024-05-01T11:00:00")

            # Same instant again: nothing due.
            assert (await enqueuer.run_once()).runs == []
            # The next hour: one run.
            clock[0] = _at("2024-05-01T11:00:00.2")
            [run] = (await enqueuer.run_once()).runs
            assert run.run_at == _at("2024-05-01T11:00:00") and run.missed_runs == 0
            # Down until 15:30: one catch-up run for 15:00, 12:00-14:00 missed.
            clock[0] = _at("2024-05-01T15:30:00")
            [run] = (await enqueuer.run_once()).runs
            assert run.run_at == _at("2024-05-01T15:00:00") and run.missed_runs == 3
            assert run.job is not None
            assert run.job.metadata["missed_runs"] == 3
            assert run.job.metadata["missed_since"] == "2024-05-01T12:00:00+00:00"
            assert await _runs(client, "hourly") == {
                "2024-05-01T10:00:00+00:00": 1,
                "2024-05-01T11:00:00+00:00": 1,
                "2024-05-01T15:00:00+00:00": 1,
            }
            [state] = await _sql(
                client, "SELECT schedule, next_run_at, last_run_at FROM tq_periodic_job"
            )
            assert state == ("every=3600", _at("2024-05-01T16:00:00"), _at("2024-05-01T15:00:00"))


async def test_a_run_is_never_inserted_twice_even_once_finished(database_url: str) -> None:
    job = tq.PeriodicJob(every=3600, args=_tick, id="once", run_on_start=True)
    with trio.fail_after(20):
        async with _enqueuer(database_url, job) as (client, enqueuer, clock):
            clock[0] = _at("2024-05-01T10:17:00")
            [run] = (await enqueuer.run_once()).runs
            assert run.job is not None
            await client.job_cancel(run.job.id)
            # Lose the durable state: a new leader sees the job for the first time.
            await _sql(client, "DELETE FROM tq_periodic_job")
            fresh = PeriodicEnqueuer(enqueuer.driver, enqueuer.now, enqueuer.jobs, client._inserts)
            [again] = (await fresh.run_once()).runs
            assert again.duplicate and again.job is not None and again.job.id == run.job.id
            assert await _runs(client, "once") == {"2024-05-01T10:00:00+00:00": 1}


async def test_state_moved_by_another_leader_rolls_the_run_back(database_url: str) -> None:
    job = tq.PeriodicJob(every=3600, args=_tick, id="race")
    with trio.fail_after(20):
        async with _enqueuer(database_url, job) as (client, enqueuer, clock):
            clock[0] = _at("2024-05-01T10:17:00")
            await enqueuer.run_once()  # state: next run 11:00
            stale = (await enqueuer.driver.periodic_job_get_many(["race"]))["race"]
            clock[0] = _at("2024-05-01T11:00:01")
            await enqueuer.run_once()  # the 11:00 run; state: next run 12:00
            assert await _runs(client, "race") == {"2024-05-01T11:00:00+00:00": 1}
            # A stale leader, still believing the next run is 11:00, acts at 12:00:01.
            clock[0] = _at("2024-05-01T12:00:01")
            plan = plan_job(job, stale, clock[0], first_seen=False)
            assert plan.run_at == _at("2024-05-01T12:00:00")
            with pytest.raises(_StateMoved):
                await enqueuer._apply(job, stale, plan, clock[0])
            # Its job insert went with the failed state write.
            assert await _runs(client, "race") == {"2024-05-01T11:00:00+00:00": 1}
            # A pass with fresh state inserts the 12:00 run normally.
            [run] = (await enqueuer.run_once()).runs
            assert run.run_at == _at("2024-05-01T12:00:00") and run.missed_runs == 0
    assert run_unique_key("a", _at("2024-05-01T12:00:00")) != run_unique_key(
        "b", _at("2024-05-01T12:00:00")
    )


async def test_a_claim_held_elsewhere_is_a_lost_race_not_a_hang(database_url: str) -> None:
    """Another session holds the job's state row (a claimant whose ``args`` is slow, or
    whose process is wedged): this pass waits at most the claim's lock_timeout (2 s),
    counts a conflict and goes on; the next pass, once the row is free, inserts the run."""
    job = tq.PeriodicJob(every=3600, args=_tick, id="held")
    with trio.fail_after(30):
        async with _enqueuer(database_url, job) as (_, enqueuer, clock):
            clock[0] = _at("2024-05-01T10:17:00")
            await enqueuer.run_once()  # state: next run 11:00
            clock[0] = _at("2024-05-01T11:00:01")
            async with await PgConnection.connect(database_url) as other:
                await other.execute("BEGIN")
                await other.execute("SELECT 1 FROM tq_periodic_job WHERE id = 'held' FOR UPDATE")
                with trio.fail_after(15):
                    result = await enqueuer.run_once()
                assert result.conflicts == 1 and result.runs == []
                await other.execute("ROLLBACK")
            [run] = (await enqueuer.run_once()).runs
            assert run.run_at == _at("2024-05-01T11:00:00") and not run.duplicate
            # The 2 s bound is the claim's alone: the rest of its transaction (the run's
            # insert, the commit) waits as the session's settings say.
            state = PeriodicJobState("other", "every=60", clock[0], None)
            async with enqueuer.driver.transaction() as tx:
                before = await tx.fetchval("SELECT current_setting('lock_timeout')")
                assert await enqueuer.driver.periodic_job_save(state, None, clock[0], ex=tx)
                assert await tx.fetchval("SELECT current_setting('lock_timeout')") == before
                idle = "SELECT current_setting('idle_in_transaction_session_timeout')"
                assert await tx.fetchval(idle) == "30s"


async def test_a_database_error_on_one_job_leaves_the_others_their_runs() -> None:
    """The first job's insert fails (say, its session ended by the server): the pass goes
    on to the next job, and the failed one is retried (before, the whole pass failed, and
    a job listed after one that always failed never fired)."""
    jobs = [tq.PeriodicJob(every=60, args=_tick, id=name) for name in ("first", "second")]
    clock = [_at("2024-05-01T10:00:30")]
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        faulty = FaultyDriver(client.driver, [Fault("job_insert_many", call=1)])
        enqueuer = PeriodicEnqueuer(
            cast(Driver, faulty), lambda: clock[0], PeriodicJobs(jobs), client._inserts
        )
        await enqueuer.run_once()  # first sight: plans the 10:01 runs
        clock[0] = _at("2024-05-01T10:01:00")
        result = await enqueuer.run_once()
        assert result.errors == 1
        assert [r.periodic_job_id for r in result.runs] == ["second"]
        [run] = (await enqueuer.run_once()).runs  # the retry
        assert (run.periodic_job_id, run.run_at) == ("first", _at("2024-05-01T10:01:00"))


async def test_args_returning_none_skips_the_run_and_raising_leaves_it(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``args`` returning None skips that run; raising leaves it uninserted and the state
    unmoved, so the next pass (here a minute later) inserts it as a catch-up run."""
    calls = itertools.count()

    def sometimes() -> Any:
        n = next(calls)
        if n == 1:
            return None
        if n == 2:
            raise RuntimeError("boom")
        return TickArgs(n), tq.InsertOpts(priority=3, metadata={"mine": 1})

    job = tq.PeriodicJob(every=60, args=sometimes, id="sometimes")
    with trio.fail_after(20):
        async with _enqueuer(database_url, job) as (client, enqueuer, clock):
            clock[0] = _at("2024-05-01T10:00:30")
            await enqueuer.run_once()
            for minute in range(1, 5):
                clock[0] = _at(f"2024-05-01T10:0{minute}:00")
                await enqueuer.run_once()
            jobs = (await client.job_list(tq.JobListParams(kinds=["tick"]))).jobs
            # Calls 0..3 were for 10:01..10:04; call 1 returned None (10:02 skipped), call
            # 2 raised (10:03 not inserted, the state not moved), so call 3 made one
            # catch-up run for 10:04 that counts 10:03 as missed.
            assert [j.args["n"] for j in jobs] == [0, 3]
            assert all(j.priority == 3 and j.metadata["mine"] == 1 for j in jobs)
            assert [j.metadata["periodic_run_at"] for j in jobs] == [
                "2024-05-01T10:01:00+00:00",
                "2024-05-01T10:04:00+00:00",
            ]
            assert jobs[1].metadata["missed_runs"] == 1
            assert jobs[1].metadata["missed_since"] == "2024-05-01T10:03:00+00:00"
    failures = [r for r in caplog.records if "building the run" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None


# ------------------------------------------------------------------ running clients


async def test_every_runs_repeatedly_on_the_leader(database_url: str) -> None:
    job = tq.PeriodicJob(every=0.3, args=_tick, id="fast")
    with trio.fail_after(20):
        async with (
            _client(database_url, job) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as events,
        ):
            seen: list[tq.Job[Any]] = []
            async for event in events:
                assert event.job is not None
                seen.append(event.job)
                if len(seen) == 3:
                    break
            assert client.is_leader
    run_times = [datetime.fromisoformat(j.metadata["periodic_run_at"]) for j in seen]
    assert len(set(run_times)) == 3
    for job_done, at in zip(seen, run_times, strict=True):
        assert job_done.metadata["periodic"] is True
        assert job_done.metadata["periodic_job_id"] == "fast"
        assert (at - datetime(1970, 1, 1, tzinfo=UTC)) % timedelta(seconds=0.3) == timedelta(0)


async def test_cron_job_in_a_running_client_stores_its_next_run(database_url: str) -> None:
    job = tq.PeriodicJob(cron="*/5 * * * *", args=_tick, id="five")
    started = datetime.now(UTC)
    async with _client(database_url, job) as client:

        async def stored() -> bool:
            return bool(await _sql(client, "SELECT 1 FROM tq_periodic_job WHERE id = 'five'"))

        await _wait_for(stored)
        [(schedule, next_run_at)] = await _sql(
            client, "SELECT schedule, next_run_at FROM tq_periodic_job"
        )
        assert schedule == "cron=*/5 * * * *"
        # Computed from the client's clock at some instant between start and now.
        candidates = {job.schedule.next_after(started), job.schedule.next_after(datetime.now(UTC))}
        assert next_run_at in candidates
        assert next_run_at.minute % 5 == 0 and next_run_at.second == 0
        assert await _runs(client, "five") == {}  # no run_on_start: nothing yet


async def test_run_on_start_inserts_once_per_slot(database_url: str) -> None:
    job = tq.PeriodicJob(every=3600, args=_tick, id="boot", run_on_start=True)
    slot = job.schedule.latest_at_or_before(datetime.now(UTC)).isoformat()
    for _ in range(2):  # a restart within the slot does not run it again
        async with _client(database_url, job) as client:

            async def inserted(c: tq.Client = client) -> bool:
                return bool(await _runs(c, "boot"))

            await _wait_for(inserted)
            runs = await _runs(client, "boot")
    if slot in runs:  # the hour did not turn meanwhile
        assert runs == {slot: 1}
    assert all(n == 1 for n in runs.values())


async def test_missed_runs_give_one_catch_up_job(database_url: str) -> None:
    job = tq.PeriodicJob(every=3600, args=_tick, id="hourly")
    seeded = job.schedule.latest_at_or_before(datetime.now(UTC)) - timedelta(hours=5)
    async with tq.open_client(database_url) as admin:
        await _sql(
            admin,
            "INSERT INTO tq_periodic_job (id, next_run_at) VALUES ('hourly', $1)",
            seeded,
        )
    async with _counted(database_url) as driver, _client(driver, job) as client:

        async def inserted() -> bool:
            return bool(await _runs(client, "hourly"))

        await _wait_for(inserted)
        await _passes(driver, 3)  # a few more passes: still one job
        [caught_up] = (await client.job_list(tq.JobListParams(kinds=["tick"]))).jobs
    run_at = datetime.fromisoformat(caught_up.metadata["periodic_run_at"])
    assert caught_up.metadata["missed_runs"] == (run_at - seeded) // timedelta(hours=1)
    assert caught_up.metadata["missed_runs"] >= 5
    assert caught_up.metadata["missed_since"] == seeded.isoformat()
    assert caught_up.metadata["periodic"] is True
    # A restart finds the schedule up to date: no second catch-up.
    async with _counted(database_url) as driver, _client(driver, job) as client:
        await _passes(driver, 3)
        assert len((await client.job_list(tq.JobListParams(kinds=["tick"]))).jobs) == 1
        [(schedule, next_run_at)] = await _sql(
            client, "SELECT schedule, next_run_at FROM tq_periodic_job"
        )
        assert (schedule, next_run_at) == ("every=3600", run_at + timedelta(hours=1))


async def test_no_run_twice_across_clients_and_a_leader_change(database_url: str) -> None:
    job = tq.PeriodicJob(every=0.2, args=_tick, id="shared")
    async with _client(database_url, job, id="a") as a, _client(database_url, job, id="b") as b:
        await _wait_for(lambda: a.is_leader or b.is_leader)
        leader, follower = (a, b) if a.is_leader else (b, a)

        async def enough(n: int) -> bool:
            return len(await _runs(follower, "shared")) >= n

        await _wait_for(lambda: enough(4))
        assert not follower.is_leader
        before = len(await _runs(follower, "shared"))
        await leader.stop()
        await _wait_for(lambda: follower.is_leader, seconds=5)
        await _wait_for(lambda: enough(before + 4))
        runs = await _runs(follower, "shared")
    # Every run time has exactly one job, whichever leader inserted it.
    assert all(n == 1 for n in runs.values()), runs


async def test_add_and_remove_at_runtime(database_url: str) -> None:
    # A job due in an hour stays in the list, so that every pass reads the stored states
    # and can be counted (a pass over an empty list reads nothing).
    idle = tq.PeriodicJob(every=3600, args=_tick, id="idle")
    live = tq.PeriodicJob(every=0.2, args=_tick, id="live")
    async with _counted(database_url) as driver, _client(driver) as client:
        assert len(client.periodic_jobs) == 0
        client.periodic_jobs.add(idle)
        handle = client.periodic_jobs.add(live)
        assert [j.effective_id for j in client.periodic_jobs] == ["idle", "live"]

        async def runs_at_least(n: int) -> bool:
            return sum((await _runs(client, "live")).values()) >= n

        await _wait_for(lambda: runs_at_least(2))
        assert client.periodic_jobs.remove(handle)
        assert [j.effective_id for j in client.periodic_jobs] == ["idle"]
        await _passes(driver, 1)  # a pass that had already started has finished
        settled = await _runs(client, "live")
        await _passes(driver, 3)  # passes without it (live was due at each): no run
        assert await _runs(client, "live") == settled

        # Adding back (same id) resumes from the stored state; clear() stops everything.
        client.periodic_jobs.add(live)
        await _wait_for(lambda: runs_at_least(sum(settled.values()) + 1))
        client.periodic_jobs.clear()
        assert len(client.periodic_jobs) == 0
        client.periodic_jobs.add(idle)  # back, only to count the passes that follow
        await _passes(driver, 1)
        settled = await _runs(client, "live")
        await _passes(driver, 3)
        assert await _runs(client, "live") == settled
        assert all(n == 1 for n in settled.values())


# ------------------------------------------------------------------ whoever leads


async def test_a_follower_fires_its_periodic_job_while_a_leader_without_it_leads(
    database_url: str,
) -> None:
    """The case seen in production: the leader (a CLI worker) had no periodic jobs, another
    process had one, and it never fired while that leader led."""
    job = tq.PeriodicJob(every=0.2, args=_tick, id="follower-only")
    with trio.fail_after(30):
        async with _client(database_url, id="plain-leader") as leader:
            await _wait_for(lambda: leader.is_leader)
            async with _client(database_url, job, id="follower") as follower:
                await _wait_for(lambda: _count_at_least(follower, "follower-only", 3))
                assert leader.is_leader and not follower.is_leader
                runs = await _runs(follower, "follower-only")
    assert all(n == 1 for n in runs.values()), runs


async def _count_at_least(client: tq.Client, periodic_id: str, n: int) -> bool:
    return len(await _runs(client, periodic_id)) >= n


async def test_an_insert_only_client_opened_with_periodic_jobs_fires_them(
    database_url: str,
) -> None:
    job = tq.PeriodicJob(every=0.2, args=_tick, id="from-web")
    with trio.fail_after(30):
        async with tq.open_client(database_url, periodic_jobs=[job], **FAST) as web:
            assert not web.is_leader
            await _wait_for(lambda: _count_at_least(web, "from-web", 3))
            runs = await _runs(web, "from-web")
    assert all(n == 1 for n in runs.values()), runs


async def test_three_clients_configured_alike_insert_each_run_once(database_url: str) -> None:
    """Each run once, none lost, and ``args`` called by the client inserting a run only
    (before, every client due at once called it, and the losers' results were dropped)."""
    calls = 0

    def counted() -> TickArgs:
        nonlocal calls
        calls += 1
        return TickArgs()

    job = tq.PeriodicJob(every=0.1, args=counted, id="alike", run_on_start=True)
    with trio.fail_after(30):
        async with (
            _client(database_url, job, id="one") as one,
            _client(database_url, job, id="two"),
            _client(database_url, job, id="three"),
        ):
            await _wait_for(lambda: _count_at_least(one, "alike", 15))
    async with tq.open_client(database_url) as admin:
        runs = await _runs(admin, "alike")
        await _assert_no_run_lost(admin, "alike", 0.1)
    assert len(runs) >= 15
    assert all(n == 1 for n in runs.values()), runs
    # A client stopped between calling args and committing adds a call without a run.
    assert len(runs) <= calls <= len(runs) + 3, (calls, len(runs))


async def test_a_client_without_the_worker_leaves_the_runs_to_one_that_has_it(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two clients have the periodic job, but only one has a worker for its kind (the
    other refuses to insert it): every run is inserted, by the one that can. Before, the
    other client advanced the schedule past runs it could not insert, and most were lost."""

    @attrs.frozen
    class Other:
        kind: ClassVar[str] = "other"

    async def other(job: tq.Job[Other]) -> None:
        pass

    lacking = tq.Workers()
    lacking.add(Other, other)
    job = tq.PeriodicJob(every=0.2, args=_tick, id="kind-here-only")

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "has no worker for kind 'tick'" in r.getMessage()]

    caplog.set_level(logging.DEBUG, logger="trioqueue.periodic")
    with trio.fail_after(30):
        async with tq.open_client(
            database_url,
            workers=lacking,
            queues={"other": tq.QueueConfig()},
            periodic_jobs=[job],
            **FAST,
        ) as alone:
            # Alone, it refuses the run (more than once, as it stays due) and inserts none.
            await _wait_for(lambda: len(refusals()) >= 3)
            assert await _runs(alone, "kind-here-only") == {}
            async with _client(database_url, job, id="has-it") as has_it:
                await _wait_for(lambda: _count_at_least(has_it, "kind-here-only", 8))
                await _assert_no_run_lost(has_it, "kind-here-only", 0.2)
    # Expected of a client without the worker: one WARNING, the later refusals at DEBUG.
    assert [r.levelno for r in refusals()].count(logging.WARNING) == 1
    assert refusals()[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_insert_only_client_fires_periodic_jobs_added_later(database_url: str) -> None:
    """``client.periodic_jobs.add`` works on any client, not only one opened with
    periodic jobs; and the block's exception comes out bare, as without the enqueuer."""
    with trio.fail_after(30):
        with pytest.raises(ValueError, match=r"^the block's own$"):
            async with tq.open_client(database_url, **FAST) as web:
                web.periodic_jobs.add(tq.PeriodicJob(every=0.2, args=_tick, id="added"))
                await _wait_for(lambda: _count_at_least(web, "added", 3))
                raise ValueError("the block's own")
        job = tq.PeriodicJob(every=0.2, args=_tick, id="opened")
        with pytest.raises(ValueError, match=r"^also$"):
            async with tq.open_client(database_url, periodic_jobs=[job], **FAST):
                raise ValueError("also")
        # Also while a scope around the client is cancelled (its enqueuer then ends with
        # that scope's Cancelled, which must not take the block's exception's place).
        with pytest.raises(ValueError, match=r"^while cancelled$"), trio.CancelScope() as scope:
            async with tq.open_client(database_url, **FAST):
                scope.cancel()
                raise ValueError("while cancelled")
        with trio.CancelScope() as scope:
            async with tq.open_client(database_url, **FAST):
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught


async def test_an_insert_only_clients_enqueuer_failing_is_what_comes_out() -> None:
    """The enqueuer failing (a bug of its own) cancels the block: what comes out is the
    failure, not also the block's Cancelled (which would escape every scope)."""
    driver = tq.MemoryDriver()

    async def broken(ids: list[str]) -> Any:
        raise RuntimeError("the enqueuer's own bug")

    driver.periodic_job_get_many = broken  # type: ignore[method-assign]
    job = tq.PeriodicJob(every=1, args=_tick, id="x")
    with trio.fail_after(10), pytest.RaisesGroup(RuntimeError):
        async with tq.open_client(driver=driver, periodic_jobs=[job]):
            await trio.sleep_forever()


async def test_the_leader_changes_to_a_client_without_the_job_mid_schedule(
    database_url: str,
) -> None:
    """A leads and has the job; B has none. A stops leading (it stops, a new A' without
    leadership carries the job on): the job keeps firing while B leads."""
    job = tq.PeriodicJob(every=0.2, args=_tick, id="carried")
    stop_first = trio.Event()

    async def run_first(task_status: trio.TaskStatus[tq.Client]) -> None:
        async with _client(database_url, job, id="first") as first:
            await _wait_for(lambda: first.is_leader)
            task_status.started(first)
            await stop_first.wait()

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_first)
            async with _client(database_url, id="plain") as plain:
                # ``first`` led when it started (run_first waited for it); not asserted
                # again here, since a stall on a loaded machine may move leadership.
                await _wait_for(lambda: _count_at_least(plain, "carried", 3))
                stop_first.set()  # it resigns as it stops: ``plain`` leads next
                await _wait_for(lambda: plain.is_leader, seconds=10)
                before = len(await _runs(plain, "carried"))
                async with _client(database_url, job, id="second") as second:
                    await _wait_for(lambda: _count_at_least(second, "carried", before + 3))
                    assert plain.is_leader and not second.is_leader
                runs = await _runs(plain, "carried")
    assert all(n == 1 for n in runs.values()), runs
