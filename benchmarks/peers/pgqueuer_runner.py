"""pgqueuer's side of the benchmark harness; runs in benchmarks/.venv-peers.

pgqueuer at its documented best: the asyncpg driver (its benchmark tool's default and, by its
docs, about twice as fast as psycopg), ``QueueManager.run(batch_size=...)``, jobs counted in the
job function and confirmed done when the ``pgqueuer`` table is empty (finished jobs are
moved to ``pgqueuer_log`` by its status buffer).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import time
from typing import Any

import asyncpg
from _common import Counter, Spec, chunks, cpu_seconds, latency_loop, main, peak_rss_mb
from _common import wait_until_zero as _wait_until_zero
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.qm import QueueManager
from pgqueuer.queries import Queries

ENTRYPOINT = "noop"


def payload(i: int) -> bytes:
    return json.dumps({"i": i}).encode()


async def install(spec: Spec) -> dict[str, Any]:
    conn = await asyncpg.connect(spec["url"])
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    return {}


async def enqueue(spec: Spec) -> dict[str, Any]:
    """``Queries.enqueue`` with lists: one statement per batch."""
    batches = [
        ([ENTRYPOINT] * len(r), [payload(i) for i in r], [0] * len(r))
        for r in chunks(spec["jobs"], spec.get("batch", 1000))
    ]
    conn = await asyncpg.connect(spec["url"])
    try:
        queries = Queries(AsyncpgDriver(conn))
        start = time.perf_counter()
        for entrypoints, payloads, priorities in batches:
            await queries.enqueue(entrypoints, payloads, priorities)
        seconds = time.perf_counter() - start
    finally:
        await conn.close()
    return {"jobs": spec["jobs"], "seconds": seconds}


async def single(spec: Spec) -> dict[str, Any]:
    """``Queries.enqueue`` one job at a time, sequentially (after one warm-up insert)."""
    conn = await asyncpg.connect(spec["url"])
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.enqueue(ENTRYPOINT, payload(-1))
        start = time.perf_counter()
        for i in range(spec["jobs"]):
            await queries.enqueue(ENTRYPOINT, payload(i))
        seconds = time.perf_counter() - start
    finally:
        await conn.close()
    return {"jobs": spec["jobs"], "seconds": seconds}


async def _managers(spec: Spec, on_job: Any) -> tuple[list[QueueManager], list[Any]]:
    managers, conns = [], []
    for _ in range(spec.get("consumers", 1)):
        conn = await asyncpg.connect(spec["url"])
        conns.append(conn)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))
        qm.entrypoint(ENTRYPOINT)(on_job)
        managers.append(qm)
    return managers, conns


async def process(spec: Spec) -> dict[str, Any]:
    jobs = spec["jobs"]
    counter = Counter(jobs)

    async def noop(job: Job) -> None:
        counter.hit()

    rss_before = peak_rss_mb()
    poller = await asyncpg.connect(spec["url"])
    managers, conns = await _managers(spec, noop)
    cpu_start = cpu_seconds()
    opened = time.perf_counter()
    tasks = [asyncio.create_task(qm.run(batch_size=spec["batch_size"])) for qm in managers]

    async def remaining() -> int:
        return int(await poller.fetchval("SELECT count(*) FROM pgqueuer"))

    await asyncio.wait_for(counter.reached.wait(), spec.get("max_seconds", 900))
    polls = await _wait_until_zero(remaining, 60)
    end = time.perf_counter()
    cpu = cpu_seconds() - cpu_start
    rss_peak = peak_rss_mb()
    for qm in managers:
        qm.shutdown.set()
    await asyncio.gather(*tasks)
    for conn in [*conns, poller]:
        await conn.close()
    return counter.process_result(
        opened=opened, end=end, cpu=cpu, rss_before=rss_before, rss_peak=rss_peak, polls=polls
    )


async def latency(spec: Spec) -> dict[str, Any]:
    started: dict[int, float] = {}
    arrived: dict[int, asyncio.Event] = {}

    async def record(job: Job) -> None:
        i = json.loads(job.payload or b"{}")["i"]
        started[i] = time.perf_counter()
        if i in arrived:
            arrived[i].set()

    managers, conns = await _managers(spec, record)
    tasks = [asyncio.create_task(qm.run(batch_size=spec["batch_size"])) for qm in managers]
    conn = await asyncpg.connect(spec["url"])
    queries = Queries(AsyncpgDriver(conn))
    await asyncio.sleep(0.2)  # let the manager LISTEN before the first insert
    samples = await latency_loop(
        spec, arrived, started, lambda i: queries.enqueue(ENTRYPOINT, payload(i))
    )
    for qm in managers:
        qm.shutdown.set()
    await asyncio.gather(*tasks)
    for c in [*conns, conn]:
        await c.close()
    return samples


if __name__ == "__main__":
    main(
        {
            "install": install,
            "enqueue": enqueue,
            "single": single,
            "process": process,
            "latency": latency,
        },
        {name: importlib.metadata.version(name) for name in ("pgqueuer", "asyncpg", "uvloop")},
    )
