"""trioqueue.testing: the require_* assertions and work_one, on the memory driver and on
PostgreSQL, inside and outside a transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import pytest
import trio

import trioqueue as tq
import trioqueue.testing as tqt


@attrs.frozen
class SortArgs:
    kind: ClassVar[str] = "sort"
    strings: list[str]
    reverse: bool = False


@attrs.frozen
class EmailArgs:
    kind: ClassVar[str] = "email"
    to: str


@attrs.frozen
class QueuedArgs:
    """An args type with a field named like a job field."""

    kind: ClassVar[str] = "queued"
    queue: str


@attrs.frozen
class PointArgs:
    """Encodes a tuple as a JSON list, which its validator then refuses: undecodable."""

    kind: ClassVar[str] = "point"
    xy: tuple[int, int] = attrs.field(validator=attrs.validators.instance_of(tuple))


@pytest.fixture(params=["memory", "postgres"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``open_client`` keywords for a fresh store: a MemoryDriver, or a migrated database."""
    if request.param == "memory":
        return {"driver": tq.MemoryDriver()}
    return {"database_url": request.getfixturevalue("database_url")}


@asynccontextmanager
async def _client(storage: dict[str, Any]) -> AsyncIterator[tq.Client]:
    async with tq.open_client(**storage) as client:
        yield client


# ------------------------------------------------------------------------------------------
# require_inserted / require_not_inserted / require_many_inserted


async def test_require_inserted_finds_the_one_match_with_typed_args(
    storage: dict[str, Any],
) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    async with _client(storage) as client:
        await client.insert(SortArgs(["a"]))
        await client.insert(EmailArgs("ada@example.com"))
        inserted = await client.insert(
            SortArgs(["b", "a"], reverse=True),
            tq.InsertOpts(
                queue="q2",
                priority=2,
                max_attempts=5,
                tags=["xx", "y1"],
                metadata={"team": "ops", "n": [1, 2]},
                scheduled_at=at,
            ),
        )
        job = await tqt.require_inserted(
            client,
            SortArgs,
            strings=["b", "a"],
            reverse=True,
            queue="q2",
            priority=2,
            max_attempts=5,
            state=tq.JobState.SCHEDULED,
            tags=["xx", "y1"],
            metadata={"n": (1, 2)},
            scheduled_at=at,
        )
        assert job.id == inserted.job.id
        assert job.args == SortArgs(["b", "a"], reverse=True)
        # The whole args, and a state given as its value; no expectations: one of the kind.
        assert (await tqt.require_inserted(client, SortArgs, args=SortArgs(["a"]))).id != job.id
        assert (await tqt.require_inserted(client, EmailArgs, state="available")).args.to == (
            "ada@example.com"
        )
        await tqt.require_not_inserted(client, SortArgs, strings=["c"])
        await tqt.require_not_inserted(client, SortArgs, queue="q2", priority=3)


async def test_require_inserted_failures_say_what_differs(storage: dict[str, Any]) -> None:
    async with _client(storage) as client:
        with pytest.raises(AssertionError, match=r"no job of kind 'sort'.*no jobs of any kind"):
            await tqt.require_inserted(client, SortArgs)
        await client.insert(EmailArgs("a@b.c"))
        with pytest.raises(AssertionError, match=r"no job of kind 'sort'.*'email' x1"):
            await tqt.require_inserted(client, SortArgs, strings=["x"])
        first = (await client.insert(SortArgs(["a"]), tq.InsertOpts(priority=2))).job
        second = (await client.insert(SortArgs(["b"]), tq.InsertOpts(tags=["t1"]))).job
        with pytest.raises(AssertionError) as failed:
            await tqt.require_inserted(client, SortArgs, strings=["a"], priority=3, tags=["t1"])
        message = str(failed.value)
        assert "no job matches SortArgs(strings=['a'], priority=3, tags=['t1'])" in message
        assert "2 job(s) of kind 'sort' are visible to the client" in message
        assert f"job {first.id} (sort, available, queue 'default'): " in message
        assert "priority: expected 3, got 2; tags: expected ['t1'], got []" in message
        assert f"job {second.id} " in message
        assert "strings: expected ['a'], got ['b']" in message
        with pytest.raises(AssertionError, match=r"metadata\['k'\]: expected 1, got no such key"):
            await tqt.require_inserted(client, SortArgs, strings=["a"], metadata={"k": 1})
        with pytest.raises(
            AssertionError, match=rf"exactly one job.*found 2 .*ids {first.id}, {second.id}"
        ):
            await tqt.require_inserted(client, SortArgs)
        with pytest.raises(AssertionError) as failed:
            await tqt.require_not_inserted(client, SortArgs, priority=2)
        assert "expected no job matching SortArgs(priority=2), found 1" in str(failed.value)
        assert f"job {first.id} (sort, available, queue 'default'): args" in str(failed.value)


async def test_inside_a_transaction_the_helpers_see_its_own_inserts(
    storage: dict[str, Any],
) -> None:
    async with _client(storage) as client:
        async with client.transaction() as tx:
            await client.insert_tx(tx, SortArgs(["in-tx"]), tq.InsertOpts(priority=4))
            job = await tqt.require_inserted(tx, SortArgs, strings=["in-tx"], priority=4)
            [many] = await tqt.require_many_inserted(tx, [tqt.ExpectedJob(SortArgs, priority=4)])
            assert many.id == job.id
            await tqt.require_not_inserted(client, SortArgs)
            with pytest.raises(AssertionError, match="in the transaction"):
                await tqt.require_not_inserted(tx, SortArgs)
            with pytest.raises(AssertionError, match="no job of kind 'sort' visible to the"):
                await tqt.require_inserted(client, SortArgs)
        assert (await tqt.require_inserted(client, SortArgs, priority=4)).id == job.id


async def test_require_many_inserted_checks_order_and_count_of_the_listed_kinds(
    storage: dict[str, Any],
) -> None:
    async with _client(storage) as client:
        await client.insert_many(
            [
                SortArgs(["1"]),
                EmailArgs("a@b.c"),
                (SortArgs(["2"]), tq.InsertOpts(queue="q2")),
                QueuedArgs("x"),
            ]
        )
        jobs = await tqt.require_many_inserted(
            client,
            [
                tqt.ExpectedJob(SortArgs, strings=["1"]),
                EmailArgs,
                tqt.ExpectedJob(SortArgs, queue="q2"),
            ],
        )
        assert [type(j.args) for j in jobs] == [SortArgs, EmailArgs, SortArgs]
        assert [j.id for j in jobs] == sorted(j.id for j in jobs)
        # Only the listed kinds count: the QueuedArgs job is ignored.
        assert len(await tqt.require_many_inserted(client, [SortArgs, SortArgs])) == 2

        with pytest.raises(AssertionError) as failed:
            await tqt.require_many_inserted(client, [SortArgs])
        assert "expected 1 job(s) of kinds 'sort' in this order, found 2" in str(failed.value)
        assert "[1] unexpected: job" in str(failed.value)
        with pytest.raises(AssertionError, match=r"\[3\] missing: expected EmailArgs\(to='x'\)"):
            await tqt.require_many_inserted(
                client, [SortArgs, EmailArgs, SortArgs, tqt.ExpectedJob(EmailArgs, to="x")]
            )
        with pytest.raises(AssertionError) as failed:
            await tqt.require_many_inserted(
                client, [EmailArgs, tqt.ExpectedJob(SortArgs, queue="q3"), SortArgs]
            )
        message = str(failed.value)
        assert "[0] job" in message and "kind: expected 'email', got 'sort'" in message
        assert "[1] job" in message and "kind: expected 'sort', got 'email'" in message
        assert "[2]" not in message
        with pytest.raises(AssertionError, match=r"\[2\] .*queue: expected 'q3', got 'q2'"):
            await tqt.require_many_inserted(
                client, [SortArgs, EmailArgs, tqt.ExpectedJob(SortArgs, queue="q3")]
            )


async def test_a_job_whose_args_cannot_be_decoded_never_matches() -> None:
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        await client.insert(PointArgs((1, 2)))
        with pytest.raises(AssertionError, match="args: cannot be decoded as PointArgs"):
            await tqt.require_inserted(client, PointArgs)
        await tqt.require_not_inserted(client, PointArgs)


async def test_bad_expectations_are_validation_errors() -> None:
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"colour": "red"}, "colour: is neither a field of SortArgs"),
            ({"state": "done"}, "state: must be a JobState"),
            ({"priority": "2"}, "priority: must be an integer"),
            ({"tags": "t1"}, "tags: must be a sequence of strings"),
            ({"metadata": ["k"]}, "metadata: must be a mapping"),
            ({"scheduled_at": datetime(2030, 1, 1)}, "scheduled_at: must be a timezone-aware"),
            ({"args": EmailArgs("x")}, "args: must be a SortArgs"),
        ]
        for expected, message in cases:
            with pytest.raises(tq.ValidationError, match=message):
                await tqt.require_inserted(client, SortArgs, **expected)
        with pytest.raises(tq.ValidationError, match="queue: is both a job field and a field"):
            await tqt.require_not_inserted(client, QueuedArgs, queue="x")
        # Through args= the args field can be compared all the same.
        await tqt.require_not_inserted(client, QueuedArgs, args=QueuedArgs("x"))
        with pytest.raises(tq.ValidationError, match="colour: is neither"):
            tqt.ExpectedJob(SortArgs, colour="red")
        with pytest.raises(tq.ValidationError, match="expected: must be a non-empty list"):
            await tqt.require_many_inserted(client, [])
        with pytest.raises(tq.ValidationError, match=r"kind: .* has no `kind`"):
            await tqt.require_inserted(client, dict)
        with pytest.raises(tq.ValidationError, match=r"client_or_tx: must be a trioqueue\.Client"):
            await tqt.require_inserted(client.driver, SortArgs)  # type: ignore[arg-type]
    assert repr(tqt.ExpectedJob(SortArgs, priority=2)) == "ExpectedJob(SortArgs, priority=2)"


# ------------------------------------------------------------------------------------------
# work_one


async def _ok(job: tq.Job[SortArgs]) -> None:
    pass


def _recording(seen: list[Any]) -> Callable[[tq.Job[SortArgs]], Awaitable[None]]:
    """A worker that notes each job's args, for the test to check after the run (an
    assert inside a worker would only make a job error)."""

    async def work(job: tq.Job[SortArgs]) -> None:
        seen.append(job.args)

    return work


async def _boom(job: tq.Job[SortArgs]) -> None:
    raise RuntimeError(f"boom on attempt {job.attempt}")


async def test_work_one_completed_on_both_drivers(storage: dict[str, Any]) -> None:
    seen: list[Any] = []
    res = await tqt.work_one(
        _recording(seen), SortArgs(["a"]), opts=tq.InsertOpts(queue="q2"), **storage
    )
    assert seen == [SortArgs(["a"])]
    assert res.event_kind is tq.EventKind.JOB_COMPLETED
    job = res.job
    assert (job.state, job.attempt, job.queue, job.errors) == (
        tq.JobState.COMPLETED,
        1,
        "q2",
        [],
    )
    assert job.args == SortArgs(["a"]) and job.finalized_at is not None
    assert len(job.attempted_by) == 1


async def test_work_one_failures_on_postgres(database_url: str) -> None:
    async with tq.open_client(database_url) as client:
        res = await tqt.work_one(_boom, SortArgs(["a"]), client=client)
        # The default backoff for a first error (about 1 s) is within scheduler_interval.
        assert (res.event_kind, res.job.state) == (tq.EventKind.JOB_FAILED, tq.JobState.AVAILABLE)
        [error] = res.job.errors
        assert (error.attempt, error.error) == (1, "RuntimeError: boom on attempt 1")
        assert "_boom" in error.trace
        last = await tqt.work_one(
            _boom, SortArgs(["a"]), client=client, opts=tq.InsertOpts(max_attempts=1)
        )
        assert (last.event_kind, last.job.state) == (tq.EventKind.JOB_FAILED, "discarded")
        assert (await client.job_get(last.job.id)).state is tq.JobState.DISCARDED
        await tqt.require_many_inserted(
            client,
            [
                tqt.ExpectedJob(SortArgs, state="available"),
                tqt.ExpectedJob(SortArgs, state="discarded", max_attempts=1),
            ],
        )


async def test_work_one_outcomes() -> None:
    async def snooze(job: tq.Job[SortArgs]) -> None:
        raise tq.JobSnooze(float(job.args.strings[0]))

    async def cancel(job: tq.Job[SortArgs]) -> None:
        raise tq.JobCancel("not wanted")

    async def slow(job: tq.Job[SortArgs]) -> None:
        await trio.sleep_forever()

    retried = await tqt.work_one(_boom, SortArgs(["a"]), retry_policy=lambda job: 600.0)
    assert (retried.event_kind, retried.job.state) == (tq.EventKind.JOB_FAILED, "retryable")
    assert (retried.job.attempt, len(retried.job.errors)) == (1, 1)
    assert retried.job.finalized_at is None
    assert retried.job.attempted_at is not None
    assert retried.job.scheduled_at - retried.job.attempted_at >= timedelta(seconds=599)

    snoozed = await tqt.work_one(snooze, SortArgs(["600"]))
    assert (snoozed.event_kind, snoozed.job.state) == (tq.EventKind.JOB_SNOOZED, "scheduled")
    assert (snoozed.job.attempt, snoozed.job.errors) == (0, [])
    assert snoozed.job.metadata == {"snoozes": 1}
    soon = await tqt.work_one(snooze, SortArgs(["1"]))
    assert (soon.event_kind, soon.job.state, soon.job.attempt) == (
        tq.EventKind.JOB_SNOOZED,
        "available",
        0,
    )

    cancelled = await tqt.work_one(cancel, SortArgs(["a"]))
    assert (cancelled.event_kind, cancelled.job.state) == (tq.EventKind.JOB_CANCELLED, "cancelled")
    assert cancelled.job.errors[0].error == "JobCancel: not wanted"

    timed_out = await tqt.work_one(slow, SortArgs(["a"]), job_timeout=0.05)
    assert (timed_out.event_kind, timed_out.job.state) == (tq.EventKind.JOB_FAILED, "available")
    assert timed_out.job.errors[0].error == "JobTimeoutError: job timed out after 0.05 s"
    workers = tq.Workers()
    workers.add(SortArgs, slow, timeout=0.02)
    per_worker = await tqt.work_one(workers, SortArgs(["a"]), job_timeout=None)
    assert per_worker.job.errors[0].error == "JobTimeoutError: job timed out after 0.02 s"


async def test_work_one_error_handler_and_retry_policy() -> None:
    seen: list[tuple[int, str]] = []

    async def handler(job: tq.Job[Any], exc: BaseException) -> tq.ErrorHandlerResult:
        seen.append((job.id, str(exc)))
        return tq.ErrorHandlerResult(set_cancelled=True)

    res = await tqt.work_one(_boom, SortArgs(["a"]), error_handler=handler)
    assert (res.event_kind, res.job.state) == (tq.EventKind.JOB_CANCELLED, "cancelled")
    assert seen == [(res.job.id, "boom on attempt 1")]

    workers = tq.Workers()
    workers.add(SortArgs, _boom, next_retry=lambda job: 3600.0)
    res = await tqt.work_one(workers, SortArgs(["a"]), retry_policy=lambda job: 1.0)
    assert res.job.state is tq.JobState.RETRYABLE
    assert res.job.attempted_at is not None
    assert res.job.scheduled_at - res.job.attempted_at >= timedelta(seconds=3599)


async def test_work_one_records_an_args_decode_failure() -> None:
    ran: list[int] = []

    async def work(job: tq.Job[PointArgs]) -> None:
        ran.append(job.id)

    res = await tqt.work_one(work, PointArgs((1, 2)), retry_policy=lambda job: 60.0)
    assert ran == []
    assert (res.event_kind, res.job.state) == (tq.EventKind.JOB_FAILED, "retryable")
    error = res.job.errors[0].error
    assert error.startswith("TypeError") and "'xy' must be <class 'tuple'>" in error
    assert res.job.args == {"xy": [1, 2]}  # type: ignore[comparison-overlap]


async def test_work_one_claims_its_own_job_beside_a_running_client(database_url: str) -> None:
    """A working client on the same queue neither takes work_one's job nor loses its own
    jobs to work_one; a pause and a future scheduled_at do not stop work_one."""
    worked_by_client: list[int] = []
    client_workers = tq.Workers()

    @client_workers.worker(SortArgs)
    async def by_client(job: tq.Job[SortArgs]) -> None:
        worked_by_client.append(job.id)

    with trio.fail_after(20):
        async with tq.open_client(
            database_url,
            workers=client_workers,
            queues={"default": tq.QueueConfig(max_workers=5)},
            fetch_poll_interval=0.05,
            fetch_cooldown=0.01,
        ) as client:
            await client.queue_pause("default")
            theirs = (await client.insert(SortArgs(["theirs"]))).job
            later = datetime.now(UTC) + timedelta(hours=1)
            seen: list[Any] = []
            res = await tqt.work_one(
                _recording(seen),
                SortArgs(["a"]),
                client=client,
                opts=tq.InsertOpts(scheduled_at=later),
            )
            assert seen == [SortArgs(["a"])]
            assert res.job.state is tq.JobState.COMPLETED
            assert res.job.attempted_by == [client.id]
            assert (await client.job_get(theirs.id)).state is tq.JobState.AVAILABLE
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                await client.queue_resume("default")
                async for event in events:
                    assert event.job is not None
                    if event.job.id == theirs.id:
                        break
    assert worked_by_client == [theirs.id]


async def test_work_one_cancelled_gives_the_job_back() -> None:
    driver = tq.MemoryDriver()
    started = trio.Event()

    async def wait(job: tq.Job[SortArgs]) -> None:
        started.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: tqt.work_one(wait, SortArgs(["a"]), driver=driver))
        await started.wait()
        nursery.cancel_scope.cancel()
    async with tq.open_client(driver=driver) as client:
        job = await tqt.require_inserted(client, SortArgs)
    assert (job.state, job.attempt, job.errors) == (tq.JobState.AVAILABLE, 0, [])


async def test_work_one_rejects_bad_arguments() -> None:
    with pytest.raises(tq.UnknownJobKindError, match="'sort'"):
        await tqt.work_one(tq.Workers(), SortArgs(["a"]))
    with pytest.raises(tq.ValidationError, match="workers_or_fn: must be"):
        await tqt.work_one(42, SortArgs(["a"]))  # type: ignore[arg-type]
    with pytest.raises(tq.ValidationError, match="job_timout: is not a client config option"):
        await tqt.work_one(_ok, SortArgs(["a"]), job_timout=1.0)
    with pytest.raises(tq.ValidationError, match="job_timeout: must be a number"):
        await tqt.work_one(_ok, SortArgs(["a"]), job_timeout=-1)
    with pytest.raises(tq.ValidationError, match=r"opts: must be a trioqueue\.InsertOpts"):
        await tqt.work_one(_ok, SortArgs(["a"]), opts={"queue": "x"})  # type: ignore[arg-type]
    with pytest.raises(tq.ValidationError, match="database_url: give one of driver or"):
        await tqt.work_one(
            _ok, SortArgs(["a"]), driver=tq.MemoryDriver(), database_url="memory://x"
        )
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        with pytest.raises(tq.ValidationError, match="job_timeout: with client="):
            await tqt.work_one(_ok, SortArgs(["a"]), client=client, job_timeout=1.0)
        # Nothing was written by the refused calls.
        await tqt.require_not_inserted(client, SortArgs)


async def test_work_one_ignores_unique_so_equal_jobs_can_be_worked_again() -> None:
    driver = tq.MemoryDriver()
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    seen: list[Any] = []
    first = await tqt.work_one(_recording(seen), SortArgs(["a"]), opts=opts, driver=driver)
    second = await tqt.work_one(_recording(seen), SortArgs(["a"]), opts=opts, driver=driver)
    assert first.job.id != second.job.id
    assert seen == [SortArgs(["a"])] * 2


async def test_job_claim_takes_one_job_by_id(storage: dict[str, Any]) -> None:
    async with _client(storage) as client:
        driver = client.driver
        later = datetime.now(UTC) + timedelta(hours=1)
        pending = (await client.insert(SortArgs(["p"]), tq.InsertOpts(pending=True))).job
        scheduled = (await client.insert(SortArgs(["s"]), tq.InsertOpts(scheduled_at=later))).job
        other = (await client.insert(SortArgs(["o"]))).job
        now = driver.clock()
        for job in (pending, scheduled):
            row = await driver.job_claim(job.id, now, "tester")
            assert row is not None
            assert (row[0], row[4], row[6], row[9]) == (job.id, "running", 1, ["tester"])
            # Running, then finalized: not claimable again.
            assert await driver.job_claim(job.id, now, "tester") is None
        assert await driver.job_claim(10**9, now, "tester") is None
        assert (await client.job_get(other.id)).state is tq.JobState.AVAILABLE
        await client.job_cancel(other.id)
        assert await driver.job_claim(other.id, now, "tester") is None
