"""The jobs a producer has claimed and not yet handed over, and the worker tasks that run
them.

A claimed job is queued (waiting for a worker task) or running, and in `running` until
its outcome is with the completer. Whatever happens, every one of them hands over exactly
one outcome: run by a worker, or, if the producer ends with jobs still queued, handed back
as "interrupted" by `ClaimedJobs.hand_back` (see `Producer.run`).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, final

import trio

from .. import _outcome as outcome
from .._outcome import FinishedRun
from ..job import Job
from .lane import JobHandle

if TYPE_CHECKING:
    from .completer import OutcomeSender
    from .executor import Executor

__all__ = ["ClaimedJobs", "Wakeup"]


@final
class Wakeup:
    """Asks a producer's fetch loop to look again. Not a checkpoint, except `wait`."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> None:
        """Return once set (at once if it is). Always a checkpoint."""
        await self._event.wait()


@final
class ClaimedJobs:
    """Claimed jobs and the worker tasks that run them, for one producer."""

    def __init__(self, name: str, wakeup: Wakeup) -> None:
        self.name = name
        self.running: dict[int, JobHandle] = {}
        """Every claimed job that has not handed its outcome over yet (queued or
        running)."""
        self.wake_when_free = False
        """Set the wake-up when a job ends (the last fetch was full: more may wait)."""
        self._wakeup = wakeup
        self._queued: collections.deque[tuple[Job[Any], JobHandle]] = collections.deque()
        self._idle = trio.lowlevel.ParkingLot()
        """Worker tasks waiting for a job."""
        self._waking = 0
        """Worker tasks woken or started that have not run yet."""
        self._accepting = True
        self.last_ended: FinishedRun | None = None
        """The outcome of the job that ended last."""
        self._pool: tuple[trio.Nursery, Executor, OutcomeSender] | None = None
        """Where worker tasks start and what they run with (see `serve`)."""

    def __len__(self) -> int:
        return len(self.running)

    def serve(self, nursery: trio.Nursery, executor: Executor, outcomes: OutcomeSender) -> None:
        """Run claimed jobs on worker tasks in ``nursery``, through ``executor``, handing
        outcomes to ``outcomes``. Not a checkpoint."""
        self._pool = (nursery, executor, outcomes)

    def add(self, job: Job[Any], handle: JobHandle | None = None) -> None:
        """Queue a claimed job for a worker task. Not a checkpoint."""
        handle = JobHandle() if handle is None else handle
        self.running[job.id] = handle
        self._queued.append((job, handle))

    def call_workers(self, n: int = 1) -> None:
        """Unless a worker is already on its way, wake (or start) ``n`` workers. Not a
        checkpoint.

        Workers fan out: each that takes a job while more are queued calls two more, so
        jobs that block all start within a few scheduling rounds, while jobs that never
        block are run back to back by the first worker instead of waking one per job."""
        pool = self._pool
        if self._waking or pool is None or not self._queued:
            return
        nursery, executor, outcomes = pool
        self._waking = n
        for _ in range(n):
            if self._idle:
                self._idle.unpark()
            else:
                nursery.start_soon(
                    self._worker, executor, outcomes, name=f"trioqueue worker ({self.name})"
                )

    def take(self) -> tuple[Job[Any], JobHandle] | None:
        """The next queued job to run, or None. Not a checkpoint."""
        queued = self._queued
        if not queued:
            return None
        item = queued.popleft()
        if queued:
            self.call_workers(min(2, len(queued)))
        return item

    def ended(self, job_id: int, finished: FinishedRun) -> None:
        """A job's outcome is with the completer: its slot is free. Not a checkpoint."""
        del self.running[job_id]
        self.last_ended = finished
        if self.wake_when_free:
            self._wakeup.set()

    def cancel(self, job_id: int) -> bool:
        """Cancel a claimed job (at once if it runs, else as it starts); False if it is
        not ours. Not a checkpoint."""
        handle = self.running.get(job_id)
        if handle is None:
            return False
        handle.cancel_remotely()
        return True

    def stop_accepting(self) -> None:
        """No more jobs will be added: the workers drain the queue, then end. Not a
        checkpoint."""
        self._accepting = False
        self._waking += len(self._idle)
        self._idle.unpark_all()

    def hand_back(self, outcomes: OutcomeSender) -> None:
        """Hand every job still queued back as "interrupted". Not a checkpoint.

        Workers take every queued job, even after a hard stop (each then reports
        "interrupted"); should the workers end while jobs are queued, this hands those
        back the same way, so no claimed job stays running."""
        while self._queued:
            job, _ = self._queued.popleft()
            outcomes.send_nowait(outcome.interrupted(job, 0.0), force=True)
            del self.running[job.id]

    async def _worker(self, executor: Executor, outcomes: OutcomeSender) -> None:
        """Run queued jobs one after another; wait while there are none; end once no
        more jobs will come and the queue is empty. A worker runs the next queued job
        without a scheduling point in between (a job's own awaits are its checkpoints)."""
        self._waking -= 1
        while True:
            if self._queued:
                await executor.run(self, outcomes)
            elif self._accepting:
                await self._idle.park()
                self._waking -= 1
            else:
                return
