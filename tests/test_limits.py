"""Flow control with real clients (issue 16): several clients work one limited queue of
one store (``store_url``: the memory driver and PostgreSQL), and every job reports its
start and end to a `Probe` shared in this process. The probe's count of a partition's
running jobs rises after the claim and falls before the outcome is written, so it never
exceeds what the database counts: a limit the probe saw passed was passed.

A rate limit governs claims, whose time is the run's ``attempted_at``: the probe records
it at every start (retries included) and the windows are checked start by start.

Stops of clients whose jobs are held back, retries, snoozes and cancels under limits are
here too; bad limit values are a ValidationError naming the field. Processes are in
``test_limits_processes.py``.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, ClassVar

import attrs
import pytest
import trio
from support import FAST, eventually, wait_fetches

import trioqueue as tq
from trioqueue.driver.memory import MemoryDriver
from trioqueue.driver.postgres import open_pool
from trioqueue.driver.postgres.driver import PostgresDriver
from trioqueue.driver.protocol import Driver, JobInsertParams
from trioqueue.limits import PartitionInfo, QueueLimits

# ------------------------------------------------------------------------ jobs and probe


@attrs.frozen
class Call:
    """A call to a customer's downstream API: sleeps ``seconds``; raises on its first
    ``fail`` attempts and snoozes on its first ``snooze`` runs."""

    kind: ClassVar[str] = "call"
    customer: Any = None
    seconds: float = 0.02
    fail: int = 0
    snooze: int = 0


@attrs.frozen
class Email:
    kind: ClassVar[str] = "email"
    seconds: float = 0.02


@attrs.frozen
class Sms:
    kind: ClassVar[str] = "sms"
    seconds: float = 0.02


@attrs.frozen
class Push:
    kind: ClassVar[str] = "push"
    seconds: float = 0.02


Key = Callable[[tq.Job[Any]], Hashable]


def by_customer(job: tq.Job[Any]) -> Hashable:
    return ("customer", job.args.customer)


def by_kind(job: tq.Job[Any]) -> Hashable:
    return job.kind


def one_partition(job: tq.Job[Any]) -> Hashable:
    return "all"


class Probe:
    """What every client's jobs did, keyed by the test's idea of their partition."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.running: collections.Counter[Hashable] = collections.Counter()
        self.peak: collections.Counter[Hashable] = collections.Counter()
        self.starts: list[tuple[Hashable, datetime]] = []
        """(partition, attempted_at) of every run."""
        self.runs: collections.Counter[int] = collections.Counter()
        self.started_ids: set[int] = set()
        self.finished = 0

    def workers(self) -> tq.Workers:
        workers = tq.Workers()

        async def run(job: tq.Job[Any]) -> None:
            key = self.key(job)
            self.running[key] += 1
            self.peak[key] = max(self.peak[key], self.running[key])
            assert job.attempted_at is not None
            self.starts.append((key, job.attempted_at))
            self.runs[job.id] += 1
            self.started_ids.add(job.id)
            try:
                if isinstance(job.args, Call):
                    if self.runs[job.id] <= job.args.snooze:
                        raise tq.JobSnooze(0)
                    if job.attempt <= job.args.fail:
                        raise RuntimeError(f"attempt {job.attempt} fails")
                await trio.sleep(job.args.seconds)
            finally:
                self.running[key] -= 1
                self.finished += 1

        for kind in (Call, Email, Sms, Push):
            workers.add(kind, run, timeout=None)
        return workers


@asynccontextmanager
async def clients(
    url: str,
    probe: Probe,
    count: int,
    queue_config: tq.QueueConfig,
    **config: Any,
) -> AsyncIterator[list[tq.Client]]:
    """``count`` clients working the ``default`` queue of ``url`` alike."""
    async with AsyncExitStack() as stack:
        found = [
            await stack.enter_async_context(
                tq.open_client(
                    url,
                    workers=probe.workers(),
                    queues={"default": queue_config},
                    **{**FAST, "retry_policy": lambda job: 0.0, **config},
                )
            )
            for _ in range(count)
        ]
        yield found


async def states(client: tq.Client) -> collections.Counter[str]:
    """Every job's state."""
    found: collections.Counter[str] = collections.Counter()
    after = None
    while True:
        page = await client.job_list(tq.JobListParams(limit=500, after=after))
        found.update(job.state.value for job in page.jobs)
        if page.last_cursor is None or not page.jobs:
            return found
        after = page.last_cursor


async def wait_until_final(client: tq.Client, total: int, seconds: float = 60.0) -> None:
    """Wait until all ``total`` jobs are finalized (their outcomes written)."""
    finals = ("completed", "cancelled", "discarded")
    with trio.fail_after(seconds):
        while True:
            found = await states(client)
            if sum(found[s] for s in finals) == total:
                return
            await trio.sleep(0.05)


def assert_rate_kept(starts: Iterable[tuple[Hashable, datetime]], limit: int, per: float) -> int:
    """No window ``(t - per, t]`` ending at a start holds more than ``limit`` starts of
    one partition (a window holding the most starts can always be slid to end at one);
    returns the most seen."""
    window = timedelta(seconds=per)
    times: dict[Hashable, list[datetime]] = collections.defaultdict(list)
    for key, at in starts:
        times[key].append(at)
    most = 0
    for key, seen in times.items():
        seen.sort()
        for at in seen:
            inside = bisect.bisect_right(seen, at) - bisect.bisect_right(seen, at - window)
            assert inside <= limit, (
                f"partition {key!r}: {inside} starts in the {per} s up to {at} (limit {limit}):"
                f" {[t for t in seen if at - window < t <= at]}"
            )
            most = max(most, inside)
    return most


# ------------------------------------------------------------------------ global limits


async def test_global_limit_by_args_holds_across_three_clients(store_url: str) -> None:
    probe = Probe(by_customer)
    config = tq.QueueConfig(max_workers=10, global_limit=tq.GlobalLimit(2, by_args=("customer",)))
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            jobs = [Call(customer=c, seconds=0.03) for c in range(5) for _ in range(12)]
            # One job whose args lack the field, one with null: the same partition.
            jobs += [Call(customer=None, seconds=0.03) for _ in range(4)]
            await a.insert_many(jobs)
            await wait_until_final(a, len(jobs))
            assert await states(a) == {"completed": len(jobs)}
    assert sum(probe.runs.values()) == len(jobs)
    assert max(probe.peak.values()) <= 2, probe.peak
    # The limit was reached: the check above had something to check.
    assert max(probe.peak.values()) == 2


async def test_global_limit_by_kind_and_unpartitioned(store_url: str) -> None:
    probe = Probe(by_kind)
    config = tq.QueueConfig(max_workers=6, global_limit=tq.GlobalLimit(1, by_kind=True))
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            jobs = [kind(0.02) for kind in (Email, Sms, Push) for _ in range(8)]
            await a.insert_many(jobs)
            await wait_until_final(a, len(jobs))
            assert await states(a) == {"completed": len(jobs)}
    assert dict(probe.peak) == {"email": 1, "sms": 1, "push": 1}

    probe = Probe(one_partition)
    config = tq.QueueConfig(max_workers=5, global_limit=tq.GlobalLimit(3))
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            more = [Email(0.02) for _ in range(30)]
            await a.insert_many(more)
            await wait_until_final(a, len(jobs) + len(more))
    assert probe.peak["all"] == 3, probe.peak


async def test_a_full_partition_does_not_hold_back_others(store_url: str) -> None:
    # Customer 1 fills its partition with jobs that wait; its many queued jobs come first
    # in the fetch order, yet customer 2's run.
    probe = Probe(by_customer)
    config = tq.QueueConfig(max_workers=10, global_limit=tq.GlobalLimit(2, by_args=("customer",)))
    with trio.fail_after(60):
        async with clients(store_url, probe, 2, config) as (a, *_):
            first = await a.insert_many([Call(customer=1, seconds=30.0) for _ in range(2)])
            await eventually(lambda: probe.running[("customer", 1)] == 2)
            await a.insert_many([(Call(customer=1), tq.InsertOpts(priority=1)) for _ in range(50)])
            others = await a.insert_many(
                [(Call(customer=2), tq.InsertOpts(priority=4)) for _ in range(5)]
            )
            await eventually(lambda: all(r.job.id in probe.started_ids for r in others))
            # Customer 1 still has only its two running.
            assert probe.peak[("customer", 1)] == 2
            info = {q.name: q for q in await a.queue_list()}["default"]
            assert info.global_limit == tq.GlobalLimit(2, by_args=("customer",))
            assert info.rate_limit is None
            assert info.held_back == 50
            assert info.partitions[0] == PartitionInfo({"args.customer": 1}, 2, 50)
            for r in first:
                await a.job_cancel(r.job.id)
            await wait_until_final(a, 57)
            assert await states(a) == {"completed": 55, "cancelled": 2}
    assert max(probe.peak.values()) == 2


# ------------------------------------------------------------------------ rate limits


async def test_rate_limit_checked_start_by_start(store_url: str) -> None:
    probe = Probe(by_kind)
    limit, per = 3, 0.5
    config = tq.QueueConfig(max_workers=5, rate_limit=tq.RateLimit(limit, per, by_kind=True))
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            jobs = [kind(0.0) for kind in (Email, Sms) for _ in range(12)]
            await a.insert_many(jobs)
            await wait_until_final(a, len(jobs))
            assert await states(a) == {"completed": len(jobs)}
    assert len(probe.starts) == len(jobs)
    assert assert_rate_kept(probe.starts, limit, per) == limit


async def test_rate_limit_counts_every_retry_as_a_start(store_url: str) -> None:
    probe = Probe(one_partition)
    limit, per = 2, 0.4
    config = tq.QueueConfig(max_workers=4, rate_limit=tq.RateLimit(limit, per))
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            jobs = [Call(customer=n, seconds=0.0, fail=1) for n in range(8)]
            await a.insert_many(jobs)
            await wait_until_final(a, len(jobs))
            assert await states(a) == {"completed": len(jobs)}
    assert len(probe.starts) == 2 * len(jobs)
    assert assert_rate_kept(probe.starts, limit, per) == limit


async def test_global_and_rate_limit_together(store_url: str) -> None:
    probe = Probe(by_customer)
    config = tq.QueueConfig(
        max_workers=8,
        global_limit=tq.GlobalLimit(1, by_args=("customer",)),
        rate_limit=tq.RateLimit(4, 0.5, by_args=("customer",)),
    )
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            jobs = [Call(customer=c, seconds=0.01) for c in range(3) for _ in range(8)]
            await a.insert_many(jobs)
            await wait_until_final(a, len(jobs))
    assert max(probe.peak.values()) == 1
    assert_rate_kept(probe.starts, 4, 0.5)


# ------------------------------------------------------------------------ retries, snoozes, cancels


async def test_retries_snoozes_and_cancels_under_a_global_limit(store_url: str) -> None:
    probe = Probe(by_customer)
    config = tq.QueueConfig(max_workers=8, global_limit=tq.GlobalLimit(2, by_args=("customer",)))
    with trio.fail_after(90):
        async with clients(store_url, probe, 3, config) as (a, *_):
            long = await a.insert_many([Call(customer=c, seconds=60.0) for c in (0, 1)])
            later = tq.InsertOpts(scheduled_at=a_while_from_now())
            queued = await a.insert_many([(Call(customer=c), later) for c in (0, 1)])
            failing = await a.insert_many([Call(customer=c % 4, fail=1) for c in range(8)])
            snoozing = await a.insert_many([Call(customer=c % 4, snooze=1) for c in range(8)])
            plain = await a.insert_many([Call(customer=c % 4) for c in range(16)])
            await eventually(lambda: all(r.job.id in probe.started_ids for r in long))
            for r in (*long, *queued):
                await a.job_cancel(r.job.id)
            total = len(long) + len(queued) + len(failing) + len(snoozing) + len(plain)
            await wait_until_final(a, total)
            assert await states(a) == {"completed": total - 4, "cancelled": 4}
            for r in failing:
                job = await a.job_get(r.job.id)
                assert (job.state, job.attempt, len(job.errors)) == (tq.JobState.COMPLETED, 2, 1)
            for r in snoozing:
                job = await a.job_get(r.job.id)
                assert (job.state, job.metadata.get("snoozes")) == (tq.JobState.COMPLETED, 1)
            for r in queued:
                assert r.job.id not in probe.started_ids
    assert max(probe.peak.values()) <= 2, probe.peak


def a_while_from_now() -> datetime:
    return datetime.now().astimezone() + timedelta(hours=1)


# ------------------------------------------------------------------------ stopping while held back


class Holder:
    """A ``call`` worker that runs until released (or cancelled)."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.started = 0

    def workers(self) -> tq.Workers:
        workers = tq.Workers()

        @workers.worker(Call, timeout=None)
        async def hold(job: tq.Job[Call]) -> None:
            self.started += 1
            if job.args.seconds > 0:
                await self.release.wait()

        return workers


SLOW = {**FAST, "fetch_poll_interval": 10.0, "fetch_cooldown": 0.5}
"""Long waits between fetches: a stop that waited for one would fail its deadline."""


@pytest.mark.parametrize("cancel", [False, True], ids=["soft", "hard"])
async def test_stop_returns_promptly_while_jobs_are_held_back(store_url: str, cancel: bool) -> None:
    holder = Holder()
    config = tq.QueueConfig(max_workers=4, global_limit=tq.GlobalLimit(1))
    with trio.fail_after(60):
        async with tq.open_client(
            store_url, workers=holder.workers(), queues={"default": config}, **SLOW
        ) as a:
            await a.insert(Call(seconds=1.0))
            await eventually(lambda: holder.started == 1)
            await a.insert_many([Call(seconds=0.0) for _ in range(3)])
            async with tq.open_client(
                store_url, workers=holder.workers(), queues={"default": config}, **SLOW
            ) as b:
                await wait_fetches(b)
                assert holder.started == 1
                with trio.fail_after(5):
                    await b.stop(cancel=cancel)
            # Nothing lost: once the slot frees, the held-back jobs run here.
            holder.release.set()
            await wait_until_final(a, 4)
            assert await states(a) == {"completed": 4}


async def test_a_hard_stop_of_the_client_holding_the_slot_returns_promptly(
    store_url: str,
) -> None:
    holder = Holder()
    config = tq.QueueConfig(max_workers=4, global_limit=tq.GlobalLimit(1))
    with trio.fail_after(60):
        async with tq.open_client(store_url, args_types=[Call]) as admin:
            async with tq.open_client(
                store_url, workers=holder.workers(), queues={"default": config}, **SLOW
            ) as a:
                await admin.insert(Call(seconds=1.0))
                await eventually(lambda: holder.started == 1)
                await admin.insert_many([Call(seconds=0.0) for _ in range(3)])
                await wait_fetches(a)
                with trio.fail_after(5):
                    await a.stop(cancel=True)
            # The interrupted job went back to available, with the rest.
            assert await states(admin) == {"available": 4}
            holder.release.set()
            async with tq.open_client(
                store_url, workers=holder.workers(), queues={"default": config}, **FAST
            ):
                await wait_until_final(admin, 4)
            assert await states(admin) == {"completed": 4}


@pytest.mark.parametrize("cancel", [False, True], ids=["soft", "hard"])
async def test_stop_returns_promptly_while_a_rate_window_holds_jobs(
    store_url: str, cancel: bool
) -> None:
    holder = Holder()
    config = tq.QueueConfig(max_workers=4, rate_limit=tq.RateLimit(1, 3600.0))
    with trio.fail_after(60):
        async with tq.open_client(
            store_url, workers=holder.workers(), queues={"default": config}, **SLOW
        ) as a:
            await a.insert_many([Call(seconds=0.0) for _ in range(3)])
            await eventually(lambda: holder.started == 1)
            await wait_fetches(a, count=1)
            with trio.fail_after(5):
                await a.stop(cancel=cancel)
            assert holder.started == 1
            # Held back, not lost: still available.
            assert await states(a) == {"completed": 1, "available": 2}
            [info] = await a.queue_list()
            assert info.rate_limit == tq.RateLimit(1, 3600.0)
            assert (info.held_back, info.partitions) == (2, (PartitionInfo({}, 0, 2),))


# ------------------------------------------------------------------------ the drivers agree


async def busiest_partitions(driver: Driver) -> tuple[PartitionInfo, ...]:
    """Twelve partitions (kinds a and b, customers 1 to 6) with one job running each, as
    `queue_list` shows them: ties all, and only ten are shown."""
    limits = QueueLimits(tq.GlobalLimit(1, by_kind=True, by_args=("customer",)))
    now = driver.clock()
    await driver.queue_upsert("tie", now, limits)
    jobs = [
        JobInsertParams(
            args_json=f'{{"customer": {customer}}}',
            kind=kind,
            max_attempts=3,
            metadata_json="{}",
            priority=1,
            queue="tie",
            scheduled_at=now,
            state=tq.JobState.AVAILABLE,
            tags=(),
            unique_key=None,
            unique_states=None,
        )
        for kind in "ab"
        for customer in range(1, 7)
    ]
    await driver.job_insert_many(jobs, [], now)
    found = await driver.job_get_available_limited("tie", now, 100, "client-1", limits)
    assert len(found.rows) == 12
    [row] = [q for q in await driver.queue_list() if q.name == "tie"]
    return row.partitions


async def test_both_drivers_show_the_same_busiest_partitions(database_url: str) -> None:
    # Which ten of twelve equally busy partitions queue_list shows, and in which order,
    # must not depend on the driver.
    with trio.fail_after(30):
        in_memory = await busiest_partitions(MemoryDriver())
        async with open_pool(database_url, max_size=2) as pool:
            in_postgres = await busiest_partitions(PostgresDriver(pool, database_url))
    assert len(in_memory) == len(in_postgres) == 10
    assert in_memory == in_postgres


# ------------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: tq.GlobalLimit(0), "GlobalLimit.limit"),
        (lambda: tq.GlobalLimit(-1), "GlobalLimit.limit"),
        (lambda: tq.GlobalLimit(True), "GlobalLimit.limit"),
        (lambda: tq.GlobalLimit(1.5), "GlobalLimit.limit"),
        (lambda: tq.GlobalLimit(10**7), "GlobalLimit.limit"),
        (lambda: tq.GlobalLimit(1, by_kind=1), "GlobalLimit.by_kind"),
        (lambda: tq.GlobalLimit(1, by_args=("not an identifier",)), "GlobalLimit.by_args"),
        (lambda: tq.GlobalLimit(1, by_args="customer"), "GlobalLimit.by_args"),
        (lambda: tq.GlobalLimit(1, by_args=("a", "a")), "GlobalLimit.by_args"),
        (lambda: tq.GlobalLimit(1, by_args=(1,)), "GlobalLimit.by_args"),
        (lambda: tq.GlobalLimit(1, by_args=("ключ",)), "GlobalLimit.by_args"),
        (lambda: tq.RateLimit(0, 1.0), "RateLimit.limit"),
        (lambda: tq.RateLimit(1, 0), "RateLimit.per"),
        (lambda: tq.RateLimit(1, -1), "RateLimit.per"),
        (lambda: tq.RateLimit(1, float("nan")), "RateLimit.per"),
        (lambda: tq.RateLimit(1, float("inf")), "RateLimit.per"),
        (lambda: tq.RateLimit(1, True), "RateLimit.per"),
        (lambda: tq.RateLimit(1, "1"), "RateLimit.per"),
        (lambda: tq.RateLimit(1, 1.0, by_args=("x-y",)), "RateLimit.by_args"),
        (lambda: tq.RateLimit(1, 1.0, by_args=b"customer"), "RateLimit.by_args"),
        (lambda: tq.QueueConfig(global_limit=5), "QueueConfig.global_limit"),
        (lambda: tq.QueueConfig(rate_limit=tq.GlobalLimit(1)), "QueueConfig.rate_limit"),
        (lambda: tq.QueueConfig(global_limit=tq.RateLimit(1, 1.0)), "QueueConfig.global_limit"),
    ],
)
def test_bad_limit_values_raise_validation_error(make: Callable[[], Any], field: str) -> None:
    with pytest.raises(tq.ValidationError) as raised:
        make()
    assert raised.value.field == field
    assert str(raised.value).startswith(field + ": ")


def test_good_limit_values() -> None:
    assert tq.RateLimit(1, 2).per == 2.0 and isinstance(tq.RateLimit(1, 2).per, float)
    assert tq.GlobalLimit(1, by_args=["a", "b"]).by_args == ("a", "b")
    config = tq.QueueConfig(global_limit=tq.GlobalLimit(3), rate_limit=tq.RateLimit(2, 0.5))
    assert config.limits is not None and config.limits.global_limit == tq.GlobalLimit(3)
    assert tq.QueueConfig().limits is None
