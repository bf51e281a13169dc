"""trioqueue's side of the workflow benchmark: ``python -m benchmarks.workflows_runner SPEC``.

Like ``limits_runner``, it runs one command from a JSON spec and prints one JSON object as
the last line of stdout, so every measurement is a process of its own. The database is
migrated first. The commands:

- ``diamonds``: insert ``diamonds`` workflows of 4 tasks (a, then b and c, then d), then
  work them with one worker client.
- ``plain``: insert the same number of jobs (4 per diamond) without deps, with
  ``insert_many`` in batches, then work them the same way.
- ``fanin``: insert one workflow of ``deps`` tasks and one task that depends on all of
  them, work it, and report how long after the last dep's completion the fan-in started
  (the dep's ``finalized_at`` to the fan-in's ``attempted_at``, both the client's clock,
  which writes them; the completion is committed a little after its ``finalized_at``, so
  this includes the completer's write).

Working is timed from the first job's start until the database shows no job of the
queue available, pending or running (polled every 2 ms once every job has started).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq

Spec = dict[str, Any]
QUEUE = "default"
LIVE = ("available", "pending", "running", "scheduled", "retryable")


@attrs.frozen
class StepArgs:
    kind: ClassVar[str] = "bench_step"
    i: int


def _options(spec: Spec) -> dict[str, Any]:
    return {
        "fetch_cooldown": spec.get("fetch_cooldown", 0.002),
        "fetch_poll_interval": spec.get("fetch_poll_interval", 0.05),
        "job_timeout": None,
    }


async def _live(client: tq.Client) -> int:
    rows = await client.driver.job_count_live()
    return sum(n for queue, state, n in rows if queue == QUEUE and state in LIVE)


async def _analyze(client: tq.Client) -> None:
    async with client.transaction() as tx:
        await tx.execute("ANALYZE tq_job")


async def _work(url: str, spec: Spec, jobs: int) -> dict[str, Any]:
    """Work the queue's ``jobs`` jobs with one worker client; the timing above."""
    first: float | None = None
    started = 0
    all_started = trio.Event()

    async def step(job: tq.Job[StepArgs]) -> None:
        nonlocal first, started
        if first is None:
            first = time.perf_counter()
        started += 1
        if started >= jobs:
            all_started.set()

    workers = tq.Workers()
    workers.add(StepArgs, step)
    queues = {QUEUE: tq.QueueConfig(max_workers=spec.get("max_workers", 100))}
    async with tq.open_client(url, workers=workers, queues=queues, **_options(spec)) as client:
        with trio.fail_after(spec.get("max_seconds", 600)):
            await all_started.wait()
            while await _live(client):  # noqa: ASYNC110 - the database is what we time
                await trio.sleep(0.002)
        done = time.perf_counter()
    assert first is not None
    seconds = done - first
    return {"jobs": jobs, "seconds": seconds, "jobs_per_second": jobs / seconds}


async def diamonds(url: str, spec: Spec) -> dict[str, Any]:
    n = spec["diamonds"]
    began = time.perf_counter()
    async with tq.open_client(url, **_options(spec)) as client:
        for i in range(n):
            wf = tq.Workflow()
            wf.add("a", StepArgs(4 * i))
            wf.add("b", StepArgs(4 * i + 1), deps=["a"])
            wf.add("c", StepArgs(4 * i + 2), deps=["a"])
            wf.add("d", StepArgs(4 * i + 3), deps=["b", "c"])
            await client.insert_workflow(wf)
        await _analyze(client)
    inserted = time.perf_counter() - began
    return {"insert_seconds": inserted, **await _work(url, spec, 4 * n)}


async def plain(url: str, spec: Spec) -> dict[str, Any]:
    jobs = 4 * spec["diamonds"]
    began = time.perf_counter()
    async with tq.open_client(url, **_options(spec)) as client:
        for start in range(0, jobs, 1000):
            await client.insert_many([StepArgs(i) for i in range(start, min(jobs, start + 1000))])
        await _analyze(client)
    inserted = time.perf_counter() - began
    return {"insert_seconds": inserted, **await _work(url, spec, jobs)}


async def fanin(url: str, spec: Spec) -> dict[str, Any]:
    n = spec["deps"]
    wf = tq.Workflow()
    names = [f"dep-{i}" for i in range(n)]
    for i, name in enumerate(names):
        wf.add(name, StepArgs(i))
    wf.add("fan-in", StepArgs(n), deps=names)
    began = time.perf_counter()
    async with tq.open_client(url, **_options(spec)) as client:
        inserted_jobs = await client.insert_workflow(wf)
        await _analyze(client)
        inserted = time.perf_counter() - began
        worked = await _work(url, spec, n + 1)
        tasks = await client.workflow_get(inserted_jobs["fan-in"].workflow_id)
    last_dep = max(
        j.finalized_at for name, j in tasks.items() if name != "fan-in" and j.finalized_at
    )
    fan_in = tasks["fan-in"].attempted_at
    assert fan_in is not None
    return {
        "insert_seconds": inserted,
        **worked,
        "fan_in_delay_seconds": (fan_in - last_dep).total_seconds(),
    }


COMMANDS = {"diamonds": diamonds, "plain": plain, "fanin": fanin}


async def main(spec: Spec) -> dict[str, Any]:
    await tq.migrate(spec["url"])
    result = await COMMANDS[spec["command"]](spec["url"], spec)
    return {"command": spec["command"], "trioqueue": tq.__name__, **result}


if __name__ == "__main__":
    print(json.dumps(trio.run(main, json.loads(sys.argv[1]))))
