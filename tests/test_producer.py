"""The producer: wake-ups, fetching after a stop, handing back claimed jobs, worker tasks
that fan out, prepared statements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import ClassVar

import attrs
import trio
import trio.testing
from support import eventually, fetches

import trioqueue as tq


@attrs.frozen
class PingArgs:
    kind: ClassVar[str] = "ping"
    n: int


async def test_job_whose_notification_was_rate_limited_still_runs_soon(database_url: str) -> None:
    # A client sends at most one insert notification per queue per fetch_cooldown. The
    # second insert below is silent; with a 60 s poll only the producer's second look one
    # cooldown after finding work can pick it up in time.
    workers = tq.Workers()
    started: list[int] = []

    async def ping(job: tq.Job[PingArgs]) -> None:
        started.append(job.args.n)

    workers.add(PingArgs, ping)
    async with tq.open_client(
        database_url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=5)},
        fetch_cooldown=0.5,
        fetch_poll_interval=60.0,
    ) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
            with trio.fail_after(10):
                # After the first (empty) fetch, so the insert wakes an idle producer.
                await eventually(lambda: fetches(client) >= 1)
                await client.insert(PingArgs(1))
                await events.receive()
                await client.insert(PingArgs(2))  # within the cooldown: no notification
                await events.receive()
    assert started == [1, 2]


async def _prepared(client: tq.Client) -> list[list[str]]:
    """The statements prepared on each idle connection of the client's pool."""
    pool = client.driver.pool  # type: ignore[attr-defined]
    return [
        [str(row[0]) for row in await conn.fetch("SELECT statement FROM pg_prepared_statements")]
        for conn in pool._idle
    ]


async def test_prepared_statements_can_be_turned_off(database_url: str) -> None:
    # Behind a transaction-pooling proxy a session's prepared statements vanish between
    # transactions, so the client must be able to run without them.
    workers = tq.Workers()

    async def ping(job: tq.Job[PingArgs]) -> None:
        pass

    workers.add(PingArgs, ping)
    for prepared in (False, True):
        async with tq.open_client(
            database_url,
            workers=workers,
            queues={"default": tq.QueueConfig(max_workers=5)},
            fetch_cooldown=0.01,
            fetch_poll_interval=0.1,
            prepared_statements=prepared,
        ) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                with trio.fail_after(10):
                    await client.insert_many([PingArgs(n) for n in range(5)])
                    for _ in range(5):
                        await events.receive()
            await client.stop()
            counts = [len(statements) for statements in await _prepared(client)]
        if prepared:
            assert sum(counts) > 0
        else:
            assert counts and sum(counts) == 0


async def test_plain_completions_are_written_with_the_short_statement(database_url: str) -> None:
    # With nobody subscribed, a batch of plain completions is written by a statement
    # without the general one's CASEs (the server's share of the common case).
    from trioqueue.driver.postgres.queries import QUERIES

    workers = tq.Workers()
    done = trio.Event()
    ran = 0

    async def ping(job: tq.Job[PingArgs]) -> None:
        nonlocal ran
        ran += 1
        if ran == 20:
            done.set()

    workers.add(PingArgs, ping)
    async with tq.open_client(database_url) as inserter:
        await inserter.insert_many([PingArgs(n) for n in range(20)])
    async with tq.open_client(
        database_url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=20)},
        fetch_cooldown=0.01,
    ) as client:
        with trio.fail_after(10):
            await done.wait()
        await client.stop()
        statements = await _prepared(client)
        async with client.transaction() as tx:
            row = await tx.fetchrow("SELECT count(*) FROM tq_job WHERE state = 'completed'")
    assert row is not None and row[0] == 20
    prepared = [s.strip() for on_one in statements for s in on_one]
    assert QUERIES["job_complete_many_ids"].strip() in prepared
    assert QUERIES["job_set_state_if_running_many_ids"].strip() not in prepared


@attrs.define
class SlowFetches:
    """Every fetch takes longer than the fetch cooldown."""

    inner: tq.MemoryDriver
    seconds: float
    fetches: int = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def job_get_available(self, *args: object, **kwargs: object) -> object:
        self.fetches += 1
        await trio.sleep(self.seconds)
        return await self.inner.job_get_available(*args, **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def _slow_fetch_client(
    driver: SlowFetches, workers: tq.Workers, jobs: int, max_workers: int
) -> AsyncIterator[tq.Client]:
    """``jobs`` queued ping jobs, then a client working them through ``driver``."""
    async with tq.open_client(driver=driver) as inserter:  # type: ignore[arg-type]
        await inserter.insert_many([PingArgs(n) for n in range(jobs)])
    async with tq.open_client(
        driver=driver,  # type: ignore[arg-type]
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=max_workers)},
        fetch_cooldown=0.01,
    ) as client:
        yield client


async def test_stopped_producer_stops_claiming_even_when_every_fetch_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With a backlog every fetch comes back full and the next one follows at once (the
    # fetch itself is shielded). A stop must still end the loop: once, this producer went
    # on claiming jobs until the queue was empty.
    driver = SlowFetches(tq.MemoryDriver(), seconds=0.05)
    workers = tq.Workers()
    started: list[int] = []
    first = trio.Event()

    async def ping(job: tq.Job[PingArgs]) -> None:
        started.append(job.args.n)
        first.set()

    workers.add(PingArgs, ping)
    with trio.fail_after(60):
        async with _slow_fetch_client(driver, workers, jobs=200, max_workers=4) as client:
            await first.wait()
            fetches = driver.fetches
            await client.stop()
    assert driver.fetches <= fetches + 1
    assert len(started) < 20


async def test_jobs_claimed_by_a_fetch_that_outlives_a_hard_stop_are_handed_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The fetch is shielded, so its claims land after the hard stop cancelled every
    # worker: each of those jobs must still get its interrupted outcome (never stay
    # running), whether a worker took it before ending or the producer handed it back.
    driver = SlowFetches(tq.MemoryDriver(), seconds=0.5)
    workers = tq.Workers()
    first = trio.Event()

    async def block(job: tq.Job[PingArgs]) -> None:
        first.set()
        await trio.sleep_forever()

    workers.add(PingArgs, block)
    with trio.fail_after(60):
        async with _slow_fetch_client(driver, workers, jobs=20, max_workers=8) as client:
            await first.wait()
            await trio.sleep(0.1)  # the next fetch is in flight now
            fetches = driver.fetches
            await client.stop(cancel=True)
    assert driver.fetches == fetches
    async with tq.open_client(driver=driver.inner) as reader:
        jobs = (await reader.job_list(tq.JobListParams(limit=100))).jobs
    assert {j.state for j in jobs} == {tq.JobState.AVAILABLE}
    assert {j.attempt for j in jobs} == {0}
    # Two fetches of 4 (half the slots each); the second ran after the stop had already
    # handed the first four back, so it may have claimed those again.
    assert sum(len(j.attempted_by) for j in jobs) == 8


async def test_jobs_that_block_all_run_at_once_up_to_max_workers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Worker tasks fan out as jobs block: 40 jobs that each wait until all 40 have started
    # finish only if all of them run concurrently.
    driver = tq.MemoryDriver()
    workers = tq.Workers()
    started = 0
    all_started = trio.Event()

    async def barrier(job: tq.Job[PingArgs]) -> None:
        nonlocal started
        started += 1
        if started == 40:
            all_started.set()
        await all_started.wait()

    workers.add(PingArgs, barrier)
    with trio.fail_after(30):
        async with tq.open_client(
            driver=driver,
            workers=workers,
            queues={"default": tq.QueueConfig(max_workers=40)},
            fetch_cooldown=0.01,
        ) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                await client.insert_many([PingArgs(n) for n in range(40)])
                for _ in range(40):
                    await events.receive()
    assert started == 40
