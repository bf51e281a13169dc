"""Workflow tasks for the workflow tests (tests/test_workflows*.py), in this process or in
an OS process of its own.

In this process, `Steps` runs ``wf_step`` tasks and records what they did: every start,
end and failure in order, with the number of tasks running at once per queue. Nothing is
asserted inside a task (an assert there would only fail its attempt): tests assert on the
record afterwards. `working`, `read` and `wait_until` are the tests' client helpers.

As a program, for the killed-process test:

    python tests/workflow_worker.py DATABASE_URL

Works the ``default`` queue until SIGTERM (or SIGINT), then stops softly and exits 0.
Prints ``ready <pid>`` (flushed) once it works. Each ``wf_step`` run first inserts
``(job_id, attempt, pid)`` into the ``wf_runs`` table (which the test creates), committed at
once, then holds (sleeps an hour) on its first ``hold`` attempts: a task caught running
when the process is killed. It exits at once when its standard input closes (the test that
started it is gone), so that no worker outlives an aborted test.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import attrs
import trio
from support import FAST

import trioqueue as tq


@attrs.frozen
class Step:
    """A workflow task: fails its first ``fail`` attempts, and holds its first ``hold``
    attempts until the test releases it (`Steps.release`), or (in a worker process) for an
    hour. Returns ``{"task": name, "attempt": attempt}``."""

    kind: ClassVar[str] = "wf_step"
    name: str
    fail: int = 0
    hold: int = 0


@attrs.frozen
class Callback:
    """The batch recipe's final task: reads its workflow's tasks through
    ``current_client().workflow_get`` (`Steps.seen`)."""

    kind: ClassVar[str] = "wf_callback"


@attrs.frozen
class Seen:
    """A task as the callback read it."""

    state: tq.JobState
    output: Any


class Steps:
    """What the ``wf_step`` and ``wf_callback`` tasks of this process did."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []
        """``(event, task name, attempt)`` in order; events are ``start``, ``end`` (the
        task returns next) and ``fail`` (it raises next)."""
        self.running: collections.Counter[str] = collections.Counter()
        """Tasks running now, per queue."""
        self.peak: collections.Counter[str] = collections.Counter()
        """The most tasks that ran at once, per queue."""
        self.callbacks: list[dict[str, Seen]] = []
        """Per callback run: its workflow's other tasks as ``workflow_get`` returned them."""
        self._gate = trio.Event()
        self._changed = trio.Event()

    def release(self) -> None:
        """Let every held task (now or later) go on."""
        self._gate.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds (checked after every recorded event)."""
        while not predicate():
            await self._changed.wait()

    def events(self, event: str) -> list[str]:
        """The task names of every ``event``, in order."""
        return [name for e, name, _ in self.log if e == event]

    def index(self, event: str, name: str) -> int:
        """Where the first ``event`` of task ``name`` is in the log."""
        return next(i for i, (e, n, _) in enumerate(self.log) if (e, n) == (event, name))

    def workers(self) -> tq.Workers:
        workers = tq.Workers()

        @workers.worker(Step)
        async def step(job: tq.Job[Step]) -> dict[str, Any]:
            name = job.args.name
            self.log.append(("start", name, job.attempt))
            self.running[job.queue] += 1
            self.peak[job.queue] = max(self.peak[job.queue], self.running[job.queue])
            self._notify()
            try:
                if job.attempt <= job.args.hold:
                    await self._gate.wait()
                if job.attempt <= job.args.fail:
                    self.log.append(("fail", name, job.attempt))
                    raise RuntimeError(f"{name} fails attempt {job.attempt}")
                self.log.append(("end", name, job.attempt))
                return {"task": name, "attempt": job.attempt}
            finally:
                self.running[job.queue] -= 1
                self._notify()

        @workers.worker(Callback)
        async def callback(job: tq.Job[Callback]) -> None:
            assert job.workflow_id is not None
            tasks = await tq.current_client().workflow_get(job.workflow_id)
            seen = {
                name: Seen(task.state, task.output)
                for name, task in tasks.items()
                if task.id != job.id
            }
            self.callbacks.append(seen)
            self._notify()

        return workers


FINAL = frozenset({tq.JobState.COMPLETED, tq.JobState.CANCELLED, tq.JobState.DISCARDED})

Tasks = Mapping[str, tq.Job[Any]]


@asynccontextmanager
async def working(
    url: str,
    steps: Steps,
    queues: Mapping[str, tq.QueueConfig] | None = None,
    **config: Any,
) -> AsyncIterator[tq.Client]:
    """A client running ``steps``' tasks on ``queues`` (default: ``default``, 10 workers),
    with `FAST` timings and retries at once (``config`` wins over both)."""
    async with tq.open_client(
        url,
        workers=steps.workers(),
        queues=dict(queues or {"default": tq.QueueConfig(max_workers=10)}),
        **{**FAST, "retry_policy": lambda job: 0.0, **config},
    ) as client:
        yield client


async def read(client: tq.Client, tasks: Tasks) -> dict[str, tq.Job[Any]]:
    """``tasks`` as stored now, by the same names; a deleted one is missing."""
    names = {job.id: name for name, job in tasks.items()}
    found = await client.job_list(tq.JobListParams(ids=tuple(names), limit=len(names)))
    return {names[job.id]: job for job in found.jobs}


async def wait_until(
    client: tq.Client, tasks: Tasks, done: Callable[[dict[str, tq.Job[Any]]], bool]
) -> dict[str, tq.Job[Any]]:
    """Poll ``tasks`` until ``done`` holds for them as stored; return them then. Bounded
    only by the caller's cancel scope (tests wrap it in ``trio.fail_after``)."""
    while True:
        now = await read(client, tasks)
        if done(now):
            return now
        await trio.sleep(0.05)


async def wait_final(client: tq.Client, tasks: Tasks) -> dict[str, tq.Job[Any]]:
    """`wait_until` every one of ``tasks`` is final (completed, cancelled or discarded)."""
    return await wait_until(
        client,
        tasks,
        lambda now: len(now) == len(tasks) and all(j.state in FINAL for j in now.values()),
    )


async def count_jobs(client: tq.Client) -> int:
    """How many jobs the store holds (tests hold far fewer than a page)."""
    return len((await client.job_list(tq.JobListParams(limit=10_000))).jobs)


# ------------------------------------------------------------------ as a program


async def exit_when_orphaned() -> None:
    """Exit the process, at once, when stdin reaches its end: the test has gone."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some():
        pass
    os._exit(3)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str) -> None:
    workers = tq.Workers()
    holder: list[tq.Client] = []

    @workers.worker(Step)
    async def step(job: tq.Job[Step]) -> dict[str, Any]:
        async with holder[0].transaction() as tx:
            await tx.execute(
                "INSERT INTO wf_runs (job_id, attempt, pid) VALUES ($1, $2, $3)",
                job.id,
                job.attempt,
                os.getpid(),
            )
        if job.attempt <= job.args.hold:
            await trio.sleep(3600)
        if job.attempt <= job.args.fail:
            raise RuntimeError(f"{job.args.name} fails attempt {job.attempt}")
        return {"task": job.args.name, "attempt": job.attempt}

    queues = {"default": tq.QueueConfig(max_workers=4)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_when_orphaned)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with tq.open_client(url, workers=workers, queues=queues, **FAST) as client:
                holder.append(client)
                say(f"ready {os.getpid()}")
                async for _ in signals:
                    break
                await client.stop()
        say(f"stopped {os.getpid()}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    ns = parser.parse_args()
    trio.run(main, ns.database_url)
