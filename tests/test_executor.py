"""The executor on its own, under a MockClock: jobs run back to back share one cancel scope
(a "lane"), and nothing one job does to that scope reaches the next."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

import trioqueue as tq
from trioqueue._outcome import FinishedRun
from trioqueue._runtime import executor as executor_module
from trioqueue._runtime.claimed import ClaimedJobs, Wakeup
from trioqueue._runtime.executor import Executor
from trioqueue._runtime.lane import DEADLINE_SLACK, JobHandle
from trioqueue.config import ClientConfig
from trioqueue.events import EventKind

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@attrs.frozen
class Step:
    kind = "step"
    n: int


class _Outcomes:
    """What the executor needs of an outcome sender: it keeps the outcomes in order."""

    def __init__(self) -> None:
        self.outcomes: list[FinishedRun] = []

    def send_nowait(self, item: FinishedRun, *, force: bool = False) -> None:
        self.outcomes.append(item)

    async def send(self, item: FinishedRun) -> None:
        self.outcomes.append(item)


def _claimed(jobs: list[tq.Job[Any]], handles: list[JobHandle]) -> ClaimedJobs:
    """``jobs`` claimed and queued, as a producer queues them for one worker task."""
    claimed = ClaimedJobs("default", Wakeup())
    for job, handle in zip(jobs, handles, strict=True):
        claimed.add(job, handle)
    return claimed


def _job(n: int, kind: str = "step") -> tq.Job[Any]:
    return tq.Job(
        id=n,
        kind=kind,
        args=Step(n),
        queue="default",
        state=tq.JobState.RUNNING,
        priority=1,
        attempt=1,
        max_attempts=5,
        attempted_at=NOW,
        attempted_by=["test"],
        created_at=NOW,
        finalized_at=None,
        scheduled_at=NOW,
        errors=[],
        metadata={},
        tags=[],
    )


async def _run(
    workers: tq.Workers,
    jobs: list[tq.Job[Any]],
    handles: list[JobHandle] | None = None,
    **config: Any,
) -> tuple[list[FinishedRun], list[JobHandle]]:
    """Run ``jobs`` on one worker task, as a producer's worker runs what it has queued
    (with these ``handles``, or new ones)."""
    outcomes = _Outcomes()
    executor = Executor(workers, ClientConfig(**config), lambda: NOW)
    handles = handles if handles is not None else [JobHandle() for _ in jobs]
    claimed = _claimed(jobs, handles)
    await executor.run(claimed, outcomes)  # type: ignore[arg-type]
    assert not claimed.running  # every job ended
    assert [f.outcome.id for f in outcomes.outcomes] == [job.id for job in jobs]
    return outcomes.outcomes, handles


def _kinds(outcomes: list[FinishedRun]) -> list[EventKind]:
    return [f.event_kind for f in outcomes]


async def test_jobs_run_back_to_back_share_one_cancel_scope(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = 0
    real = trio.CancelScope

    def counting(**kwargs: Any) -> trio.CancelScope:
        nonlocal made
        made += 1
        return real(**kwargs)

    async def step(job: tq.Job[Step]) -> None:
        if job.args.n % 2:
            await trio.lowlevel.checkpoint()  # (trio.sleep would make a scope of its own)

    workers = tq.Workers()
    workers.add(Step, step)
    monkeypatch.setattr(executor_module.trio, "CancelScope", counting)
    outcomes, _ = await _run(workers, [_job(n) for n in range(100)])
    assert _kinds(outcomes) == [EventKind.JOB_COMPLETED] * 100
    assert made == 1


async def test_a_timed_out_job_leaves_the_next_its_whole_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ran: list[tuple[int, float]] = []

    async def step(job: tq.Job[Step]) -> None:
        start = trio.current_time()
        try:
            await trio.sleep(5.0 if job.args.n == 0 else 0.9)
        finally:
            ran.append((job.args.n, trio.current_time() - start))

    workers = tq.Workers()
    workers.add(Step, step, timeout=1.0)
    outcomes, _ = await _run(workers, [_job(0), _job(1), _job(2)])
    assert _kinds(outcomes) == [
        EventKind.JOB_FAILED,
        EventKind.JOB_COMPLETED,
        EventKind.JOB_COMPLETED,
    ]
    assert "JobTimeoutError: job timed out after 1.0 s" in (outcomes[0].outcome.error_json or "")
    # The timeout comes no earlier than it should and at most DEADLINE_SLACK of it late.
    assert 1.0 <= ran[0][1] <= 1.0 + DEADLINE_SLACK
    assert [n for n, _ in ran] == [0, 1, 2]


async def test_each_job_gets_its_own_timeout_though_they_share_a_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Ten jobs of 0.6 s each with a 1 s timeout: a deadline kept from an earlier job
    # would cut a later one short.
    async def step(job: tq.Job[Step]) -> None:
        await trio.sleep(0.6)

    workers = tq.Workers()
    workers.add(Step, step, timeout=1.0)
    outcomes, _ = await _run(workers, [_job(n) for n in range(10)])
    assert _kinds(outcomes) == [EventKind.JOB_COMPLETED] * 10


async def test_a_job_that_swallows_its_cancel_completes_and_the_next_runs_normally(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def step(job: tq.Job[Step]) -> None:
        if job.args.n == 0:
            try:
                await trio.sleep(5.0)
            except trio.Cancelled:
                return  # bad manners, but the run still ends as the job said
        await trio.sleep(0.5)

    workers = tq.Workers()
    workers.add(Step, step, timeout=1.0)
    outcomes, _ = await _run(workers, [_job(0), _job(1)])
    assert _kinds(outcomes) == [EventKind.JOB_COMPLETED, EventKind.JOB_COMPLETED]


async def test_a_cancel_for_a_finished_job_does_not_reach_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handles = [JobHandle(), JobHandle()]

    async def step(job: tq.Job[Step]) -> None:
        if job.args.n == 1:
            handles[0].cancel_remotely()  # job 0 has finished: nothing to cancel
            await trio.sleep(0.5)

    workers = tq.Workers()
    workers.add(Step, step)
    outcomes, _ = await _run(workers, [_job(0), _job(1)], handles)
    assert _kinds(outcomes) == [EventKind.JOB_COMPLETED, EventKind.JOB_COMPLETED]


async def test_a_cancel_requested_before_the_job_starts_cancels_it_at_its_first_checkpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def step(job: tq.Job[Step]) -> None:
        await trio.sleep(0.5)

    workers = tq.Workers()
    workers.add(Step, step)
    first = JobHandle()
    first.cancel_remotely()
    outcomes, _ = await _run(workers, [_job(0), _job(1)], [first, JobHandle()])
    assert _kinds(outcomes) == [EventKind.JOB_CANCELLED, EventKind.JOB_COMPLETED]
    assert "JobCancelledRemotelyError" in (outcomes[0].outcome.error_json or "")


@pytest.mark.parametrize("where", ["error_handler", "work_end"])
async def test_what_runs_after_a_job_is_outside_its_timeout(
    autojump_clock: trio.testing.MockClock, where: str
) -> None:
    # The error handler and work_end hooks run after the job, outside its timeout: here
    # each takes longer than the job's whole timeout, and must not be cut short.
    finished_after: list[float] = []

    async def step(job: tq.Job[Step]) -> None:
        raise ValueError("boom")

    async def slow_handler(job: tq.Job[Any], error: BaseException) -> None:
        await trio.sleep(2.0)
        finished_after.append(trio.current_time())

    class SlowEnd:
        async def work_end(self, job: tq.Job[Any], error: BaseException | None) -> None:
            await trio.sleep(2.0)
            finished_after.append(trio.current_time())

    workers = tq.Workers()
    workers.add(Step, step, timeout=1.0)
    config: dict[str, Any] = (
        {"error_handler": slow_handler} if where == "error_handler" else {"hooks": [SlowEnd()]}
    )
    outcomes, _ = await _run(workers, [_job(0), _job(1)], **config)
    assert len(finished_after) == 2
    assert _kinds(outcomes) == [EventKind.JOB_FAILED, EventKind.JOB_FAILED]
    assert all("ValueError: boom" in (f.outcome.error_json or "") for f in outcomes)


async def test_unknown_kind_after_a_job_with_a_timeout_is_recorded_as_such(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def step(job: tq.Job[Step]) -> None:
        pass

    async def slow_handler(job: tq.Job[Any], error: BaseException) -> None:
        await trio.sleep(2.0)

    workers = tq.Workers()
    workers.add(Step, step, timeout=1.0)
    outcomes, _ = await _run(
        workers, [_job(0), _job(1, kind="nobody"), _job(2)], error_handler=slow_handler
    )
    assert _kinds(outcomes) == [
        EventKind.JOB_COMPLETED,
        EventKind.JOB_FAILED,
        EventKind.JOB_COMPLETED,
    ]
    assert "UnknownJobKindError" in (outcomes[1].outcome.error_json or "")


async def test_outside_cancel_interrupts_the_running_job_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def step(job: tq.Job[Step]) -> None:
        await trio.sleep(math.inf if job.args.n == 2 else 0.1)

    workers = tq.Workers()
    workers.add(Step, step)
    outcomes = _Outcomes()
    executor = Executor(workers, ClientConfig(), lambda: NOW)
    claimed = _claimed([_job(n) for n in range(4)], [JobHandle() for _ in range(4)])
    with trio.move_on_after(5.0):
        await executor.run(claimed, outcomes)  # type: ignore[arg-type]
    assert _kinds(outcomes.outcomes) == [
        EventKind.JOB_COMPLETED,
        EventKind.JOB_COMPLETED,
        EventKind.JOB_INTERRUPTED,
    ]
    assert [f.outcome.id for f in outcomes.outcomes] == [0, 1, 2]
    assert list(claimed.running) == [3]  # job 3 was never taken


async def test_a_hard_stop_wins_over_a_timeout_that_passed_during_shielded_cleanup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Stopped at 0.8 s, the job's shielded cleanup runs past its 1 s timeout: the lane is
    # then cancelled too, but the stop came first; the job is interrupted (attempt given
    # back, no error), not failed as timed out.
    async def step(job: tq.Job[Step]) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.5)

    workers = tq.Workers()
    workers.add(Step, step, timeout=1.0)
    outcomes = _Outcomes()
    executor = Executor(workers, ClientConfig(), lambda: NOW)
    with trio.move_on_after(0.8):
        await executor.run(_claimed([_job(0)], [JobHandle()]), outcomes)  # type: ignore[arg-type]
    assert _kinds(outcomes.outcomes) == [EventKind.JOB_INTERRUPTED]


def test_the_positional_completed_builder_matches_the_keyword_built_record() -> None:
    """``_outcome.completed`` builds by position for speed; it must say what the
    keyword-built record says."""
    from trioqueue import _outcome
    from trioqueue.driver.protocol import JobOutcome

    job = _job(7)
    assert _outcome.completed(job, NOW, 0.25) == FinishedRun(
        outcome=JobOutcome(
            id=7,
            state=tq.JobState.COMPLETED,
            finalized_at=NOW,
            scheduled_at=None,
            give_back_attempt=False,
            error_json=None,
            metadata_json=None,
            attempted_at=job.attempted_at,
        ),
        event_kind=EventKind.JOB_COMPLETED,
        duration=0.25,
        attempted_at=job.attempted_at,
        args=job.args,
        attempt=job.attempt,
    )
