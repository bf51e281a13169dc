"""``trioqueue bench``: throughput and latency of trioqueue alone, with a progress line and a
summary table.

The measuring functions here are also what the comparison harness in ``benchmarks/`` runs
in its trioqueue subprocesses, so ``trioqueue bench`` and the harness measure the same way:

- :func:`enqueue_batch`: ``insert_many_fast`` (COPY) in batches; jobs/s.
- :func:`enqueue_single`: ``insert`` one job at a time, sequentially; jobs/s.
- :func:`process`: a worker client works ``jobs`` no-op jobs that were queued beforehand;
  jobs/s from the first job's start until the database shows every one of them finished
  (outcomes committed), plus the process's CPU time and peak RSS. Jobs are counted in the
  job function and the end is confirmed by polling, as for the peers; a subscription is
  not used because its per-event scheduling would slow the worker and hold events.
- :func:`idle_latency`: an insert-only client and a worker client in one process; one job at
  a time into the idle worker, seconds from just before ``insert`` to the start of the
  worker function (both read with ``time.perf_counter``).

Jobs go to a queue of their own (``bench_<pid>`` by default), so running it against a
database that holds other jobs neither works nor counts them; with ``--database-url`` the
bench's jobs are deleted afterwards.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, TextIO

import attrs
import trio

from .client import open_client
from .config import QueueConfig
from .job import InsertOpts, Job
from .workers import Workers

__all__ = [
    "BenchSettings",
    "EnqueueResult",
    "LatencyResult",
    "NoopArgs",
    "ProcessResult",
    "enqueue_batch",
    "enqueue_single",
    "idle_latency",
    "percentile",
    "process",
    "run_bench",
]

DEFAULT_BATCH: Final = 1000
"""Jobs per ``insert_many_fast`` call."""


@attrs.frozen
class NoopArgs:
    """A job that does nothing; ``i`` tells the jobs apart (and sizes the args)."""

    kind: ClassVar[str] = "bench_noop"
    i: int


@attrs.frozen
class BenchSettings:
    """Client settings of the benchmark's worker clients (documented in docs/benchmarks.md)."""

    max_workers: int = 1000
    fetch_cooldown: float = 0.002
    fetch_poll_interval: float = 0.05

    def client_options(self) -> dict[str, Any]:
        return {
            "fetch_cooldown": self.fetch_cooldown,
            "fetch_poll_interval": self.fetch_poll_interval,
        }


@attrs.frozen
class EnqueueResult:
    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else float("nan")


@attrs.frozen
class ProcessResult:
    jobs: int
    """Jobs worked and not failed."""
    failed: int
    """Jobs that failed instead (should be 0)."""
    seconds: float
    """First job start → no job of the queue left available or running."""
    startup_seconds: float
    """Opening the client → first job start."""
    cpu_seconds: float
    """User + system CPU time of this process from opening the client to the last event."""
    rss_before_mb: float
    """Peak RSS of this process before the client opened."""
    rss_peak_mb: float
    """Peak RSS of this process (``ru_maxrss``) at the end."""
    own_transactions: int
    """Transactions of the polling that timed the end (not the queue's own work)."""

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else float("nan")


@attrs.frozen
class LatencyResult:
    samples: list[float]
    """Seconds from just before ``insert`` to the worker function's start."""
    insert_seconds: list[float]
    """How long each ``insert`` call itself took (its share of the sample)."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``, linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def default_queue() -> str:
    return f"bench_{os.getpid()}"


async def enqueue_batch(
    url: str,
    jobs: int,
    *,
    queue: str,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> EnqueueResult:
    """Insert ``jobs`` no-op jobs with ``insert_many_fast``, ``batch`` per call.

    The args objects are built before the clock starts; building the rows from them is
    part of ``insert_many_fast`` and is timed.
    """
    opts = InsertOpts(queue=queue)
    chunks = [
        [(NoopArgs(i), opts) for i in range(start, min(start + batch, jobs))]
        for start in range(0, jobs, batch)
    ]
    async with open_client(url) as client:
        done = 0
        start = time.perf_counter()
        for chunk in chunks:
            done += await client.insert_many_fast(chunk)
            if progress is not None:
                progress(done)
        seconds = time.perf_counter() - start
    return EnqueueResult(done, seconds)


async def enqueue_single(url: str, jobs: int, *, queue: str) -> EnqueueResult:
    """Insert ``jobs`` no-op jobs with ``insert``, one at a time, sequentially."""
    opts = InsertOpts(queue=queue)
    async with open_client(url) as client:
        await client.insert(NoopArgs(-1), opts)  # warm up: connection, prepared statements
        start = time.perf_counter()
        for i in range(jobs):
            await client.insert(NoopArgs(i), opts)
        seconds = time.perf_counter() - start
    return EnqueueResult(jobs, seconds)


async def process(
    url: str,
    jobs: int,
    settings: BenchSettings,
    *,
    queue: str,
    progress: Callable[[int, float], None] | None = None,
    max_seconds: float = 900.0,
) -> ProcessResult:
    """Work ``jobs`` queued no-op jobs of ``queue`` with one worker client.

    Timed from the first job's start to the moment the database shows none of the queue's
    jobs ``available`` or ``running`` any more (polled every 2 ms once every job has
    started: the way the peers are timed too). ``progress(started, elapsed)`` is called
    about 10 times a second.
    """
    first_start: float | None = None
    started = 0
    all_started = trio.Event()

    async def noop(job: Job[NoopArgs]) -> None:
        nonlocal first_start, started
        if first_start is None:
            first_start = time.perf_counter()
        started += 1
        if started >= jobs:
            all_started.set()

    workers = Workers()
    workers.add(NoopArgs, noop)
    rss_before = _peak_rss_mb()
    cpu_start = _cpu_seconds()
    opened = time.perf_counter()
    polls = 0
    async with open_client(
        url,
        workers=workers,
        queues={queue: QueueConfig(max_workers=settings.max_workers)},
        **settings.client_options(),
    ) as client:

        async def count(states: str) -> int:
            nonlocal polls
            polls += 1
            async with client.transaction() as tx:
                row = await tx.fetchrow(
                    f"SELECT count(*) FROM tq_job WHERE queue = $1 AND state IN ({states})",
                    queue,
                )
            return int(row[0]) if row else 0

        async def report() -> None:
            assert progress is not None
            while True:
                progress(started, time.perf_counter() - opened)
                await trio.sleep(0.1)

        with trio.fail_after(max_seconds):
            async with trio.open_nursery() as nursery:
                if progress is not None:
                    nursery.start_soon(report)
                await all_started.wait()
                # No event says "outcome committed" without a subscription: poll.
                while True:
                    if not await count("'available', 'running'"):
                        break
                    await trio.sleep(0.002)
                nursery.cancel_scope.cancel()
        end = time.perf_counter()
        cpu = _cpu_seconds() - cpu_start
        rss_peak = _peak_rss_mb()
        failed = await count("'retryable', 'discarded'")
    if progress is not None:
        progress(started, end - opened)
    begin = first_start if first_start is not None else opened
    return ProcessResult(
        jobs=started - failed,
        failed=failed,
        seconds=end - begin,
        startup_seconds=begin - opened,
        cpu_seconds=cpu,
        rss_before_mb=rss_before,
        rss_peak_mb=rss_peak,
        own_transactions=polls,
    )


async def idle_latency(
    url: str,
    samples: int,
    settings: BenchSettings,
    *,
    queue: str,
    gap: tuple[float, float] = (0.005, 0.015),
    warmup: int = 10,
    seed: int = 1,
    progress: Callable[[int], None] | None = None,
) -> LatencyResult:
    """Seconds from just before ``insert`` to the worker function's start, one job at a time
    into an idle worker client (a second, insert-only client inserts; same settings), after
    a random pause of ``gap`` seconds each time. The first ``warmup`` samples are dropped."""
    rng = random.Random(seed)
    started: dict[int, float] = {}
    arrived: dict[int, trio.Event] = {}

    async def record(job: Job[NoopArgs]) -> None:
        started[job.args.i] = time.perf_counter()
        waiter = arrived.get(job.args.i)
        if waiter is not None:
            waiter.set()

    workers = Workers()
    workers.add(NoopArgs, record)
    opts = InsertOpts(queue=queue)
    latencies: list[float] = []
    insert_seconds: list[float] = []
    async with (
        open_client(
            url,
            workers=workers,
            queues={queue: QueueConfig(max_workers=settings.max_workers)},
            **settings.client_options(),
        ),
        open_client(url, **settings.client_options()) as inserter,
    ):
        for i in range(warmup + samples):
            await trio.sleep(rng.uniform(*gap))
            arrived[i] = waiter = trio.Event()
            before = time.perf_counter()
            await inserter.insert(NoopArgs(i), opts)
            returned = time.perf_counter()
            with trio.fail_after(30):
                await waiter.wait()
            if i >= warmup:
                latencies.append(started[i] - before)
                insert_seconds.append(returned - before)
                if progress is not None:
                    progress(len(latencies))
    return LatencyResult(latencies, insert_seconds)


# ------------------------------------------------------------------------------ the command


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, else a line a second."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = -1e9

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self._tty else 1.0):
            return
        self._last = now
        if self._tty:
            self._out.write("\r\x1b[K" + text)
        else:
            self._out.write(text + "\n")
        self._out.flush()

    def done(self, text: str) -> None:
        self.show(text, force=True)
        if self._tty:
            self._out.write("\n")
            self._out.flush()
        self._last = -1e9


async def _server_version(url: str) -> str:
    async with open_client(url) as client, client.transaction() as tx:
        row = await tx.fetchrow("SHOW server_version")
    return str(row[0]).split()[0] if row else "?"


async def _delete_queue(url: str, queue: str) -> None:
    async with open_client(url) as client, client.transaction() as tx:
        await tx.execute("DELETE FROM tq_job WHERE queue = $1", queue)
        await tx.execute("DELETE FROM tq_queue WHERE name = $1", queue)


async def run_bench(
    database_url: str | None,
    jobs: int = 20_000,
    max_workers: int = 1000,
    latency_samples: int = 200,
    single_inserts: int = 1000,
) -> int:
    """``trioqueue bench``: print progress to stderr and a summary table to stdout."""
    from ._urls import resolve_database_url
    from .embedded import open_embedded_server

    url = resolve_database_url(database_url)
    out = sys.stderr
    if url is None:
        print("trioqueue bench: starting a temporary PostgreSQL server", file=out)
        async with open_embedded_server(temporary=True) as embedded_url:
            return await _bench(
                embedded_url,
                "embedded, temporary",
                jobs,
                max_workers,
                latency_samples,
                single_inserts,
                cleanup=False,
            )
    return await _bench(
        url, "given URL", jobs, max_workers, latency_samples, single_inserts, cleanup=True
    )


async def _bench(
    url: str,
    where: str,
    jobs: int,
    max_workers: int,
    latency_samples: int,
    single_inserts: int,
    *,
    cleanup: bool,
) -> int:
    from ._migrate import migrate

    await migrate(url)
    settings = BenchSettings(max_workers=max_workers)
    queue = default_queue()
    bar = _Progress(sys.stderr)
    try:
        version = await _server_version(url)
        inserted = await enqueue_batch(
            url,
            jobs,
            queue=queue,
            progress=lambda n: bar.show(f"insert_many_fast  {n:,}/{jobs:,} jobs"),
        )
        bar.done(f"insert_many_fast  {inserted.jobs:,} jobs in {inserted.seconds:.3f} s")

        def show(done: int, elapsed: float) -> None:
            rate = done / elapsed if elapsed > 0 else 0.0
            bar.show(f"processing  {done:,}/{jobs:,} jobs  {rate:,.0f} jobs/s")

        worked = await process(url, jobs, settings, queue=queue, progress=show)
        bar.done(f"processing  {worked.jobs:,}/{jobs:,} jobs in {worked.seconds:.3f} s")
        single = None
        if single_inserts:
            bar.show("insert  one at a time ...", force=True)
            single = await enqueue_single(url, single_inserts, queue=queue + "_single")
            bar.done(f"insert  {single.jobs:,} jobs one at a time in {single.seconds:.3f} s")
        latency = await idle_latency(
            url,
            latency_samples,
            settings,
            queue=queue,
            progress=lambda n: bar.show(f"idle latency  {n}/{latency_samples} samples"),
        )
        bar.done(f"idle latency  {len(latency.samples)} samples")
    finally:
        if cleanup:
            with trio.CancelScope(shield=True):
                await _delete_queue(url, queue)
                await _delete_queue(url, queue + "_single")

    ms = [x * 1000 for x in latency.samples]
    insert_ms = percentile([x * 1000 for x in latency.insert_seconds], 0.5)
    rows = [
        ("insert_many_fast (batches of 1000)", f"{inserted.rate:,.0f} jobs/s"),
        ("insert (one at a time)", f"{single.rate:,.0f} jobs/s" if single else "-"),
        ("processing no-op jobs", f"{worked.rate:,.0f} jobs/s"),
        (
            "idle latency insert → start",
            f"p50 {percentile(ms, 0.5):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms, "
            f"max {max(ms):.2f} ms",
        ),
        ("  of which the insert call", f"p50 {insert_ms:.2f} ms"),
        ("worker process CPU", f"{worked.cpu_seconds / max(worked.jobs, 1) * 1e6:.0f} µs/job"),
        ("worker process peak RSS", f"{worked.rss_peak_mb:.0f} MB"),
    ]
    print()
    print(
        f"trioqueue bench: {jobs:,} no-op jobs, max_workers {max_workers}, "
        f"fetch_cooldown {settings.fetch_cooldown} s, fetch_poll_interval "
        f"{settings.fetch_poll_interval} s; PostgreSQL {version} ({where})"
    )
    width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    print(f"| {'measure':<{width}} | {'result':<{value_width}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:<{value_width}} |")
    failed = worked.failed or worked.jobs < jobs
    if failed:
        print(f"warning: {worked.failed} jobs failed", file=sys.stderr)
    return 1 if failed else 0
