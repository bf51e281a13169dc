"""What happens to a job when a client works it, against a real PostgreSQL.

Each worker outcome (the README's outcome table) is driven end to end: insert, let a client
fetch and run the job, then read the row back and check the event the client published.
Tests wait on subscription events rather than sleeping wherever they can.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import pytest
import trio
from support import wait_fetches, working

import trioqueue as tq

JOB_EVENTS = (
    tq.EventKind.JOB_COMPLETED,
    tq.EventKind.JOB_FAILED,
    tq.EventKind.JOB_CANCELLED,
    tq.EventKind.JOB_SNOOZED,
    tq.EventKind.JOB_INTERRUPTED,
)


@attrs.frozen
class Task:
    kind: ClassVar[str] = "task"
    n: int = 0


@attrs.frozen
class Other:
    kind: ClassVar[str] = "other"
    n: int = 0


def now() -> datetime:
    return datetime.now(UTC)


async def next_event(sub: tq.Subscription, job_id: int | None = None) -> tq.Event:
    """The next event (of ``job_id``, if given); fails if the stream ends first."""
    async for event in sub:
        if job_id is None or (event.job is not None and event.job.id == job_id):
            return event
    raise AssertionError("the subscription ended before the expected event")


def assert_near(at: datetime, expected: datetime, slack: float) -> None:
    assert abs((at - expected).total_seconds()) <= slack, (at, expected)


# ------------------------------------------------------------------ outcomes


async def test_return_completes(database_url: str) -> None:
    workers = tq.Workers()
    seen: list[tq.Job[Task]] = []

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        seen.append(job)

    with trio.fail_after(30):
        async with (
            working(database_url, workers, id="client-a") as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task(7))).job
            event = await next_event(sub)
            job = await client.job_get(inserted.id)

    assert [j.args for j in seen] == [Task(7)]
    assert seen[0].state is tq.JobState.RUNNING
    assert event.kind is tq.EventKind.JOB_COMPLETED
    assert event.job is not None
    assert event.job.id == inserted.id
    assert event.job.state is tq.JobState.COMPLETED
    assert event.job.args == Task(7)
    assert event.duration is not None and event.duration >= 0
    assert job.state is tq.JobState.COMPLETED
    assert job.finalized_at is not None
    assert job.attempt == 1
    assert job.attempted_by == ["client-a"]
    assert job.errors == []


async def test_error_retried_soon_then_completes(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        if job.attempt == 1:
            raise ValueError("boom on the first attempt")

    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=lambda job: 0.05) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            failed = await next_event(sub, inserted.id)
            completed = await next_event(sub, inserted.id)

    assert failed.kind is tq.EventKind.JOB_FAILED
    assert failed.job is not None
    # Due within scheduler_interval: straight back to available, no scheduler round trip.
    assert failed.job.state is tq.JobState.AVAILABLE
    assert failed.job.finalized_at is None
    [error] = failed.job.errors
    assert error.attempt == 1
    assert "boom on the first attempt" in error.error
    assert "ValueError" in error.trace
    assert error.trace.strip()
    assert_near(error.at, now(), 30)

    assert completed.kind is tq.EventKind.JOB_COMPLETED
    assert completed.job is not None
    assert completed.job.state is tq.JobState.COMPLETED
    assert completed.job.attempt == 2
    assert len(completed.job.errors) == 1


async def test_error_with_long_retry_is_retryable(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        raise RuntimeError("try again much later")

    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=lambda job: 3600) as client,
            client.subscribe(tq.EventKind.JOB_FAILED) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)
            failed_at = now()
            job = await client.job_get(inserted.id)

    assert event.job is not None and event.job.state is tq.JobState.RETRYABLE
    assert job.state is tq.JobState.RETRYABLE
    assert job.attempt == 1
    assert job.finalized_at is None
    assert_near(job.scheduled_at, failed_at + timedelta(seconds=3600), 30)
    [error] = job.errors
    assert "try again much later" in error.error


async def test_default_retry_policy(database_url: str) -> None:
    """No policy: (errors + 1) ** 4 seconds ± 10%, so 1 s for the first error, which is
    beyond scheduler_interval=0.2: retryable."""
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        raise RuntimeError("fails")

    with trio.fail_after(30):
        async with (
            working(database_url, workers) as client,
            client.subscribe(tq.EventKind.JOB_FAILED) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)

    assert event.job is not None
    assert event.job.state is tq.JobState.RETRYABLE
    [error] = event.job.errors
    delay = (event.job.scheduled_at - error.at).total_seconds()
    assert 0.85 <= delay <= 1.15


async def test_worker_next_retry_overrides_client_policy(database_url: str) -> None:
    workers = tq.Workers()
    asked: list[int] = []

    def next_retry(job: tq.Job[Any]) -> float:
        asked.append(job.attempt)
        return 3600

    @workers.worker(Task, next_retry=next_retry)
    async def work(job: tq.Job[Task]) -> None:
        raise RuntimeError("fails")

    def client_policy(job: tq.Job[Any]) -> float:
        raise AssertionError("the worker's next_retry should have been used")

    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=client_policy) as client,
            client.subscribe(tq.EventKind.JOB_FAILED) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)

    assert asked == [1]
    assert event.job is not None
    assert event.job.state is tq.JobState.RETRYABLE
    delay = (event.job.scheduled_at - event.job.errors[0].at).total_seconds()
    assert 3500 <= delay <= 3700


async def test_last_attempt_is_discarded(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        raise RuntimeError("out of luck")

    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=lambda job: 0.01) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task(), tq.InsertOpts(max_attempts=1))).job
            event = await next_event(sub, inserted.id)
            job = await client.job_get(inserted.id)

    assert event.kind is tq.EventKind.JOB_FAILED
    assert event.job is not None and event.job.state is tq.JobState.DISCARDED
    assert job.state is tq.JobState.DISCARDED
    assert job.finalized_at is not None
    assert job.attempt == job.max_attempts == 1
    [error] = job.errors
    assert "out of luck" in error.error


async def test_job_cancel_exception_cancels(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        raise tq.JobCancel("why")

    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=lambda job: 0.01) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)
            job = await client.job_get(inserted.id)

    assert event.kind is tq.EventKind.JOB_CANCELLED
    assert job.state is tq.JobState.CANCELLED
    assert job.finalized_at is not None
    [error] = job.errors
    assert error.attempt == 1
    assert "why" in error.error


async def test_snooze_soon_runs_again_without_using_an_attempt(database_url: str) -> None:
    workers = tq.Workers()
    attempts: list[int] = []

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        attempts.append(job.attempt)
        if len(attempts) == 1:
            raise tq.JobSnooze(0.1)

    with trio.fail_after(30):
        async with (
            working(database_url, workers) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            snoozed = await next_event(sub, inserted.id)
            completed = await next_event(sub, inserted.id)
            job = await client.job_get(inserted.id)

    assert snoozed.kind is tq.EventKind.JOB_SNOOZED
    assert snoozed.job is not None
    assert snoozed.job.state is tq.JobState.AVAILABLE  # due within scheduler_interval
    assert snoozed.job.attempt == 0
    assert completed.kind is tq.EventKind.JOB_COMPLETED
    assert attempts == [1, 1]
    assert job.state is tq.JobState.COMPLETED
    assert job.attempt == 1
    assert job.metadata.get("snoozes") == 1
    assert job.errors == []


async def test_snooze_long_is_scheduled(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        raise tq.JobSnooze(3600)

    with trio.fail_after(30):
        async with (
            working(database_url, workers) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)
            snoozed_at = now()
            job = await client.job_get(inserted.id)

    assert event.kind is tq.EventKind.JOB_SNOOZED
    assert job.state is tq.JobState.SCHEDULED
    assert job.attempt == 0
    assert job.errors == []
    assert job.finalized_at is None
    assert job.metadata.get("snoozes") == 1
    assert_near(job.scheduled_at, snoozed_at + timedelta(seconds=3600), 30)


@pytest.mark.parametrize("where", ["client", "worker"])
async def test_timeout_is_an_error_and_retried(database_url: str, where: str) -> None:
    workers = tq.Workers()
    cancelled = trio.Event()

    async def work(job: tq.Job[Task]) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    if where == "client":
        workers.add(Task, work)
        config: dict[str, Any] = {"job_timeout": 0.2}
    else:
        workers.add(Task, work, timeout=0.2)
        config = {"job_timeout": 3600}

    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=lambda job: 3600, **config) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)

    assert cancelled.is_set()
    assert event.kind is tq.EventKind.JOB_FAILED
    assert event.job is not None
    assert event.job.state is tq.JobState.RETRYABLE
    [error] = event.job.errors
    assert "timed out" in error.error.lower() or "timeout" in error.error.lower()


async def test_worker_timeout_none_overrides_client_job_timeout(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task, timeout=None)
    async def work(job: tq.Job[Task]) -> None:
        await trio.sleep(0.5)

    with trio.fail_after(30):
        async with (
            working(database_url, workers, job_timeout=0.05) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)

    assert event.kind is tq.EventKind.JOB_COMPLETED


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_error_handler_called_with_job_and_exception(
    database_url: str, is_async: bool
) -> None:
    @attrs.frozen
    class Fail:
        kind: ClassVar[str] = "fail"

    @attrs.frozen
    class Cancel:
        kind: ClassVar[str] = "cancel"

    @attrs.frozen
    class Snooze:
        kind: ClassVar[str] = "snooze"

    workers = tq.Workers()
    snoozed: set[int] = set()

    @workers.worker(Fail)
    async def fail(job: tq.Job[Fail]) -> None:
        raise KeyError("handled")

    @workers.worker(Cancel)
    async def cancel(job: tq.Job[Cancel]) -> None:
        raise tq.JobCancel("no handler for this")

    @workers.worker(Snooze)
    async def snooze(job: tq.Job[Snooze]) -> None:
        if job.id not in snoozed:
            snoozed.add(job.id)
            raise tq.JobSnooze(0.05)

    calls: list[tuple[tq.Job[Any], BaseException]] = []

    def sync_handler(job: tq.Job[Any], exc: BaseException) -> None:
        calls.append((job, exc))

    async def async_handler(job: tq.Job[Any], exc: BaseException) -> None:
        await trio.lowlevel.checkpoint()
        calls.append((job, exc))

    handler = async_handler if is_async else sync_handler
    with trio.fail_after(30):
        async with (
            working(
                database_url, workers, error_handler=handler, retry_policy=lambda job: 3600
            ) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            results = await client.insert_many([Cancel(), Snooze(), Fail()])
            ids = {r.job.kind: r.job.id for r in results}
            final: dict[int, tq.Event] = {}
            while len(final) < 3:
                event = await next_event(sub)
                assert event.job is not None
                if event.kind is not tq.EventKind.JOB_SNOOZED:
                    final[event.job.id] = event

    assert final[ids["cancel"]].kind is tq.EventKind.JOB_CANCELLED
    assert final[ids["snooze"]].kind is tq.EventKind.JOB_COMPLETED
    failed_job = final[ids["fail"]].job
    assert final[ids["fail"]].kind is tq.EventKind.JOB_FAILED
    assert failed_job is not None and failed_job.state is tq.JobState.RETRYABLE
    [(job, exc)] = calls
    assert job.id == ids["fail"]
    assert job.args == Fail()
    assert isinstance(exc, KeyError) and exc.args == ("handled",)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_error_handler_can_cancel_the_job(database_url: str, is_async: bool) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        raise RuntimeError("hopeless")

    def sync_handler(job: tq.Job[Any], exc: BaseException) -> tq.ErrorHandlerResult:
        return tq.ErrorHandlerResult(set_cancelled=True)

    async def async_handler(job: tq.Job[Any], exc: BaseException) -> tq.ErrorHandlerResult:
        await trio.lowlevel.checkpoint()
        return tq.ErrorHandlerResult(set_cancelled=True)

    handler = async_handler if is_async else sync_handler
    with trio.fail_after(30):
        async with (
            working(
                database_url, workers, error_handler=handler, retry_policy=lambda job: 0.01
            ) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            event = await next_event(sub, inserted.id)
            job = await client.job_get(inserted.id)

    assert event.kind is tq.EventKind.JOB_CANCELLED
    assert job.state is tq.JobState.CANCELLED
    assert job.finalized_at is not None
    [error] = job.errors
    assert "hopeless" in error.error


async def test_unregistered_kind_is_an_error_and_retried(database_url: str) -> None:
    """A job of a kind this client has no worker for, in a queue it works: recorded as an
    error each attempt, retried, and discarded when attempts run out."""
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        pass

    with trio.fail_after(30):
        async with tq.open_client(database_url) as inserter:
            other = (await inserter.insert(Other(3), tq.InsertOpts(max_attempts=2))).job
        async with (
            working(database_url, workers, retry_policy=lambda job: 0.05) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            first = await next_event(sub, other.id)
            second = await next_event(sub, other.id)

    assert first.kind is tq.EventKind.JOB_FAILED
    assert first.job is not None and first.job.state is tq.JobState.AVAILABLE
    assert first.job.args == {"n": 3}
    assert second.kind is tq.EventKind.JOB_FAILED
    assert second.job is not None and second.job.state is tq.JobState.DISCARDED
    assert [e.attempt for e in second.job.errors] == [1, 2]
    for error in second.job.errors:
        assert "other" in error.error


async def test_priority_order(database_url: str) -> None:
    """Jobs inserted into a paused queue run in priority order once it is resumed."""
    workers = tq.Workers()
    ran: list[int] = []

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        ran.append(job.priority)

    with trio.fail_after(30):
        async with tq.open_client(database_url) as inserter:
            await inserter.queue_pause("default")
        async with (
            working(database_url, workers, max_workers=1) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as sub,
        ):
            for priority in (4, 1, 3, 2):
                await client.insert(Task(priority), tq.InsertOpts(priority=priority))
            await wait_fetches(client)  # fetches that saw the jobs: nothing runs while paused
            assert ran == []
            await client.queue_resume("default")
            for _ in range(4):
                await next_event(sub)

    assert ran == [1, 2, 3, 4]


async def test_priority_order_inserted_before_start(database_url: str) -> None:
    workers = tq.Workers()
    ran: list[int] = []

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        ran.append(job.priority)

    with trio.fail_after(30):
        async with tq.open_client(database_url) as inserter:
            await inserter.insert_many(
                [(Task(p), tq.InsertOpts(priority=p)) for p in (4, 1, 3, 2, 1)]
            )
        async with (
            working(database_url, workers, max_workers=1) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as sub,
        ):
            for _ in range(5):
                await next_event(sub)

    assert ran == [1, 1, 2, 3, 4]


async def test_scheduled_job_runs_only_when_due(database_url: str) -> None:
    workers = tq.Workers()
    started: list[datetime] = []

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        started.append(now())

    with trio.fail_after(30):
        async with (
            working(database_url, workers) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as sub,
        ):
            due = now() + timedelta(seconds=0.5)
            inserted = (await client.insert(Task(), tq.InsertOpts(scheduled_at=due))).job
            assert inserted.state is tq.JobState.SCHEDULED
            event = await next_event(sub, inserted.id)

    assert event.job is not None
    assert event.job.attempted_at is not None
    assert event.job.attempted_at >= due
    assert started[0] >= due


@pytest.mark.parametrize("via", ["same_client", "other_client", "other_client_poll_only"])
async def test_job_cancel_of_running_job(database_url: str, via: str) -> None:
    workers = tq.Workers()
    started = trio.Event()
    worker_cancelled = trio.Event()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            worker_cancelled.set()
            raise

    config: dict[str, Any] = {"job_timeout": None, "retry_policy": lambda job: 0.01}
    if via == "other_client_poll_only":
        config["poll_only"] = True

    with trio.fail_after(30):
        async with (
            working(database_url, workers, **config) as client,
            client.subscribe(*JOB_EVENTS) as sub,
        ):
            inserted = (await client.insert(Task())).job
            await started.wait()
            if via == "same_client":
                returned = await client.job_cancel(inserted.id)
            else:
                async with tq.open_client(database_url) as other:
                    returned = await other.job_cancel(inserted.id)
            assert returned.state is tq.JobState.RUNNING
            event = await next_event(sub, inserted.id)
            job = await client.job_get(inserted.id)

    assert worker_cancelled.is_set()
    assert event.kind is tq.EventKind.JOB_CANCELLED
    assert event.job is not None and event.job.state is tq.JobState.CANCELLED
    assert job.state is tq.JobState.CANCELLED
    assert job.finalized_at is not None


async def test_max_workers_respected(database_url: str) -> None:
    workers = tq.Workers()
    running = 0
    started = 0
    peak = 0
    wave = trio.Event()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        # Jobs run in waves: each job holds its slot until three run at once (or the last
        # job has started), so every wave reaches the peak whatever the timing; a fourth
        # at once, in any wave, would be max_workers broken.
        nonlocal running, started, peak, wave
        running += 1
        started += 1
        peak = max(peak, running)
        mine = wave
        if running == 3 or started == 10:
            mine.set()
            wave = trio.Event()
        try:
            await mine.wait()
        finally:
            running -= 1

    with trio.fail_after(30):
        async with tq.open_client(database_url) as inserter:
            await inserter.insert_many([Task(i) for i in range(10)])
        async with (
            working(database_url, workers, max_workers=3) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as sub,
        ):
            for _ in range(10):
                await next_event(sub)

    assert peak == 3


# ------------------------------------------------------------------ subscriptions


async def test_subscription_gets_only_requested_kinds(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        if job.args.n == 1:
            raise RuntimeError("fails")

    completed: list[tq.Event] = []
    failed: list[tq.Event] = []
    with trio.fail_after(30):
        async with (
            working(database_url, workers, retry_policy=lambda job: 3600) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as completed_sub,
            client.subscribe(tq.EventKind.JOB_FAILED) as failed_sub,
        ):
            ok, bad = (r.job for r in await client.insert_many([Task(0), Task(1)]))
            completed.append(await next_event(completed_sub))
            failed.append(await next_event(failed_sub))
            await client.stop()
            completed.extend([e async for e in completed_sub])
            failed.extend([e async for e in failed_sub])

    assert [(e.kind, e.job.id if e.job else None) for e in completed] == [
        (tq.EventKind.JOB_COMPLETED, ok.id)
    ]
    assert [(e.kind, e.job.id if e.job else None) for e in failed] == [
        (tq.EventKind.JOB_FAILED, bad.id)
    ]


async def test_iteration_ends_when_client_stops(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        pass

    received: list[tq.Event] = []
    got_one = trio.Event()
    loop_ended = trio.Event()

    with trio.fail_after(30):
        async with working(database_url, workers) as client:
            started = trio.Event()
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    async with client.subscribe(*JOB_EVENTS) as sub:
                        started.set()
                        async for event in sub:
                            received.append(event)
                            got_one.set()
                    loop_ended.set()

                nursery.start_soon(read)
                await started.wait()
                inserted = (await client.insert(Task())).job
                await got_one.wait()
                await client.stop()
                await loop_ended.wait()

    assert [e.job.id for e in received if e.job] == [inserted.id]


async def test_slow_subscriber_does_not_hold_up_the_client(database_url: str) -> None:
    """A subscriber that never reads (buffer=1) loses events, counted in ``dropped``; the
    reading subscriber still gets every event and stop() returns promptly."""
    n = 2000
    workers = tq.Workers()

    @workers.worker(Task)
    async def work(job: tq.Job[Task]) -> None:
        await trio.lowlevel.checkpoint()

    received: set[int] = set()
    with trio.fail_after(90):
        async with tq.open_client(database_url) as inserter:
            assert await inserter.insert_many_fast([Task(i) for i in range(n)]) == n
        async with (
            working(database_url, workers, max_workers=100) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED, buffer=1) as slow,
            client.subscribe(tq.EventKind.JOB_COMPLETED, buffer=n) as reader,
        ):
            async for event in reader:
                assert event.job is not None
                received.add(event.job.id)
                if len(received) == n:
                    break
            with trio.fail_after(10):
                await client.stop()
            assert [e async for e in reader] == []
            assert slow.dropped > 0
            assert slow.dropped == n - 1  # one fits in its buffer; it never reads
            page = await client.job_list(tq.JobListParams(limit=10_000))

    assert len(received) == n
    assert len(page.jobs) == n
    assert {j.state for j in page.jobs} == {tq.JobState.COMPLETED}
