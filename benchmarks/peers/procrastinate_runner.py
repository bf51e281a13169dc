"""procrastinate's side of the benchmark harness; runs in benchmarks/.venv-peers.

``App(connector=PsycopgConnector(...))``, one async task, ``defer_async`` /
``batch_defer_async``, and a worker started with ``run_worker_async(concurrency=...)``
(listen/notify on, the default). Jobs are counted in the task and confirmed done when no
row of ``procrastinate_jobs`` is ``todo`` or ``doing``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from typing import Any

import procrastinate
from _common import Counter, Spec, chunks, cpu_seconds, latency_loop, main, peak_rss_mb
from _common import wait_until_zero as _wait_until_zero


def make_app(spec: Spec) -> tuple[procrastinate.App, Any]:
    # The pool must hold the worker's concurrent fetches, its LISTEN connection and the
    # inserter (psycopg_pool's default max_size is 4).
    pool_size = spec.get("concurrency", 1) + 4
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=spec["url"], min_size=2, max_size=pool_size
        )
    )

    @app.task(name="noop", queue="default")
    async def noop(i: int) -> None:
        hook = app_hooks.get(app)
        if hook is not None:
            hook(i)

    return app, noop


app_hooks: dict[procrastinate.App, Any] = {}


async def install(spec: Spec) -> dict[str, Any]:
    app, _ = make_app(spec)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    return {}


async def enqueue(spec: Spec) -> dict[str, Any]:
    """``Task.batch_defer_async``: one call per batch."""
    batches = [[{"i": i} for i in r] for r in chunks(spec["jobs"], spec.get("batch", 1000))]
    app, noop = make_app(spec)
    async with app.open_async():
        start = time.perf_counter()
        for batch in batches:
            await noop.batch_defer_async(*batch)
        seconds = time.perf_counter() - start
    return {"jobs": spec["jobs"], "seconds": seconds}


async def single(spec: Spec) -> dict[str, Any]:
    """``Task.defer_async`` one job at a time, sequentially (after one warm-up defer)."""
    app, noop = make_app(spec)
    async with app.open_async():
        await noop.defer_async(i=-1)
        start = time.perf_counter()
        for i in range(spec["jobs"]):
            await noop.defer_async(i=i)
        seconds = time.perf_counter() - start
    return {"jobs": spec["jobs"], "seconds": seconds}


def _worker(app: procrastinate.App, spec: Spec) -> asyncio.Task[None]:
    return asyncio.create_task(
        app.run_worker_async(
            concurrency=spec.get("concurrency", 1),
            install_signal_handlers=False,
            wait=True,
        )
    )


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def process(spec: Spec) -> dict[str, Any]:
    jobs = spec["jobs"]
    counter = Counter(jobs)
    app, _ = make_app(spec)
    app_hooks[app] = lambda i: counter.hit()
    rss_before = peak_rss_mb()
    async with app.open_async():
        pool = app.connector._async_pool
        async with pool.connection() as poll_conn:
            await poll_conn.set_autocommit(True)

            async def remaining() -> int:
                cur = await poll_conn.execute(
                    "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
                )
                row = await cur.fetchone()
                return int(row[0]) if row else 0

            cpu_start = cpu_seconds()
            opened = time.perf_counter()
            worker = _worker(app, spec)
            await asyncio.wait_for(counter.reached.wait(), spec.get("max_seconds", 900))
            polls = await _wait_until_zero(remaining, 60)
            end = time.perf_counter()
            cpu = cpu_seconds() - cpu_start
            rss_peak = peak_rss_mb()
            await _stop(worker)
    return counter.process_result(
        opened=opened, end=end, cpu=cpu, rss_before=rss_before, rss_peak=rss_peak, polls=polls
    )


async def latency(spec: Spec) -> dict[str, Any]:
    started: dict[int, float] = {}
    arrived: dict[int, asyncio.Event] = {}

    def record(i: int) -> None:
        started[i] = time.perf_counter()
        if i in arrived:
            arrived[i].set()

    app, noop = make_app(spec)
    app_hooks[app] = record
    async with app.open_async():
        worker = _worker(app, spec)
        await asyncio.sleep(0.2)  # let the worker LISTEN before the first defer
        samples = await latency_loop(spec, arrived, started, lambda i: noop.defer_async(i=i))
        await _stop(worker)
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
        {
            name: importlib.metadata.version(name)
            for name in ("procrastinate", "psycopg", "psycopg-pool", "uvloop")
        },
    )
