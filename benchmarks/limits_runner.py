"""trioqueue's side of the flow control benchmark: ``python -m benchmarks.limits_runner SPEC``.

Like ``trioqueue_runner``, it runs one command from a JSON spec and prints one JSON object
as the last line of stdout, so every measurement is a process of its own. The commands:

- ``install``: migrate the database (``enqueue`` and ``fairness`` do it first when the spec
  says ``"install": true``, saving a process start).
- ``enqueue``: insert ``jobs`` no-op jobs whose args carry a ``customer`` field (job ``i``
  is customer ``i % customers``), with ``insert_many_fast`` in batches.
- ``process``: work the queued jobs with one worker client whose queue has the limits of
  the spec (``limits``: ``{"global": {...}, "rate": {...}}``, either may be missing); timed
  as ``trioqueue.bench.process`` times it, from the first job's start until the database
  shows no job of the queue available or running.
- ``rate``: work a backlog under a rate limit for ``seconds`` after the first start, then
  stop; the starts are read back from the jobs' ``attempted_at``.
- ``fairness``: a bulk customer's backlog is queued, the worker starts, and once it has
  started ``arrive_after`` jobs every other customer inserts a few jobs; each job's wait is
  its ``attempted_at`` minus its ``created_at`` (both read from the client's clock).
"""

from __future__ import annotations

import bisect
import importlib.metadata
import json
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

import trioqueue
from trioqueue import (
    GlobalLimit,
    InsertOpts,
    Job,
    QueueConfig,
    RateLimit,
    Workers,
    migrate,
    open_client,
)

Spec = dict[str, Any]


@attrs.frozen
class CustomerArgs:
    """A job of one customer that does nothing (or sleeps ``job_seconds``)."""

    kind: ClassVar[str] = "bench_customer"
    customer: int
    i: int


def _limits(spec: Spec) -> dict[str, Any]:
    raw = spec.get("limits") or {}
    out: dict[str, Any] = {}
    if g := raw.get("global"):
        out["global_limit"] = GlobalLimit(
            g["limit"], by_kind=g.get("by_kind", False), by_args=tuple(g.get("by_args", ()))
        )
    if r := raw.get("rate"):
        out["rate_limit"] = RateLimit(
            r["limit"],
            r["per"],
            by_kind=r.get("by_kind", False),
            by_args=tuple(r.get("by_args", ())),
        )
    return out


def _client_options(spec: Spec) -> dict[str, Any]:
    return {
        "fetch_cooldown": spec.get("fetch_cooldown", 0.002),
        "fetch_poll_interval": spec.get("fetch_poll_interval", 0.05),
    }


def _queues(spec: Spec) -> dict[str, QueueConfig]:
    config = QueueConfig(max_workers=spec.get("max_workers", 1000), **_limits(spec))
    return {spec["queue"]: config}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class Counter:
    """Counts job starts (all, and those of customers other than customer 0); notes the
    first start; fires events at given counts."""

    def __init__(self, job_seconds: float) -> None:
        self.started = 0
        self.others = 0
        self.first: float | None = None
        self.job_seconds = job_seconds
        self._waits: list[tuple[bool, int, trio.Event]] = []

    def at(self, count: int, *, others: bool = False) -> trio.Event:
        """An event set once ``count`` jobs (of other customers only, with ``others``)
        have started."""
        event = trio.Event()
        if (self.others if others else self.started) >= count:
            event.set()
        else:
            self._waits.append((others, count, event))
        return event

    async def run(self, job: Job[CustomerArgs]) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.started += 1
        if job.args.customer != 0:
            self.others += 1
        if self._waits:
            for wait in list(self._waits):
                others, count, event = wait
                if (self.others if others else self.started) >= count:
                    event.set()
                    self._waits.remove(wait)
        if self.job_seconds > 0:
            await trio.sleep(self.job_seconds)

    def workers(self) -> Workers:
        workers = Workers()
        workers.add(CustomerArgs, self.run)
        return workers


async def _insert(
    client: trioqueue.Client, queue: str, items: list[tuple[int, int]], batch: int
) -> float:
    """Insert ``(customer, i)`` jobs in batches; returns the seconds it took."""
    opts = InsertOpts(queue=queue)
    rows = [(CustomerArgs(c, i), opts) for c, i in items]
    start = time.perf_counter()
    for at in range(0, len(rows), batch):
        await client.insert_many_fast(rows[at : at + batch])
    return time.perf_counter() - start


async def _count(client: trioqueue.Client, queue: str, states: str) -> int:
    async with client.transaction() as tx:
        row = await tx.fetchrow(
            f"SELECT count(*) FROM tq_job WHERE queue = $1 AND state IN ({states})", queue
        )
    return int(row[0]) if row else 0


async def _drained(client: trioqueue.Client, queue: str) -> int:
    """Poll every 2 ms until no job of ``queue`` is available or running; returns polls."""
    polls = 1
    while await _count(client, queue, "'available', 'running'"):
        polls += 1
        await trio.sleep(0.002)
    return polls


async def _prepare(spec: Spec) -> None:
    """Migrate a fresh database (with ``"install": true``); then let a worker client
    announce the queue with its limits and stop: the queue's limits are known before its
    jobs are inserted, as when workers are already running."""
    if spec.get("install"):
        await migrate(spec["url"])
    if spec.get("limits"):
        async with open_client(spec["url"], workers=Counter(0.0).workers(), queues=_queues(spec)):
            pass


async def install(spec: Spec) -> dict[str, Any]:
    await migrate(spec["url"])
    return {}


async def enqueue(spec: Spec) -> dict[str, Any]:
    customers = spec.get("customers", 1)
    items = [(i % customers, i) for i in range(spec["jobs"])]
    await _prepare(spec)
    async with open_client(spec["url"]) as client:
        seconds = await _insert(client, spec["queue"], items, spec.get("batch", 1000))
        # As benchmarks/server.py does after its enqueue: planner statistics for the queued
        # jobs, which autovacuum keeps on a production table. A never-analyzed table makes
        # the planner take the fetch index for the limited fetch's partition lookups.
        async with client.transaction() as tx:
            await tx.execute("ANALYZE tq_job")
    return {"jobs": len(items), "seconds": seconds}


async def process(spec: Spec) -> dict[str, Any]:
    jobs = spec["jobs"]
    counter = Counter(spec.get("job_seconds", 0.0))
    all_started = counter.at(jobs)
    cpu_start = _cpu_seconds()
    opened = time.perf_counter()
    async with open_client(
        spec["url"], workers=counter.workers(), queues=_queues(spec), **_client_options(spec)
    ) as client:
        with trio.fail_after(spec.get("max_seconds", 900)):
            await all_started.wait()
            polls = await _drained(client, spec["queue"])
        end = time.perf_counter()
        cpu = _cpu_seconds() - cpu_start
        failed = await _count(client, spec["queue"], "'retryable', 'discarded'")
    begin = counter.first if counter.first is not None else opened
    return {
        "jobs": counter.started - failed,
        "failed": failed,
        "seconds": end - begin,
        "startup_seconds": begin - opened,
        "cpu_seconds": cpu,
        "rss_peak_mb": _peak_rss_mb(),
        "own_transactions": polls + 1,
    }


def max_in_window(times: list[float], width: float) -> int:
    """The most of the sorted ``times`` that fall in any window ``(t - width, t]``."""
    best = 0
    low = 0
    for high, t in enumerate(times):
        while times[low] <= t - width:
            low += 1
        best = max(best, high - low + 1)
    return best


async def rate(spec: Spec) -> dict[str, Any]:
    seconds = float(spec["seconds"])
    counter = Counter(spec.get("job_seconds", 0.0))
    first = counter.at(1)
    async with open_client(
        spec["url"], workers=counter.workers(), queues=_queues(spec), **_client_options(spec)
    ) as client:
        with trio.fail_after(seconds + 120):
            await first.wait()
            await trio.sleep(seconds + 1.0)
    # The client has stopped (a soft stop: every claimed job ended and was written).
    async with open_client(spec["url"]) as client, client.transaction() as tx:
        rows = await tx.fetch(
            "SELECT attempted_at FROM tq_job WHERE queue = $1 AND attempted_at IS NOT NULL"
            " ORDER BY attempted_at",
            spec["queue"],
        )
        left = await tx.fetchrow(
            "SELECT count(*) FROM tq_job WHERE queue = $1 AND state = 'available'",
            spec["queue"],
        )
    stamps: list[datetime] = [r[0] for r in rows]
    t0 = stamps[0]
    times = [(s - t0).total_seconds() for s in stamps]
    in_window = bisect.bisect_left(times, seconds)
    per_second = [0] * int(seconds)
    for t in times[:in_window]:
        per_second[min(int(t), len(per_second) - 1)] += 1
    per = float(spec["limits"]["rate"]["per"])
    return {
        "starts": len(times),
        "starts_in_window": in_window,
        "window_seconds": seconds,
        "achieved_per_s": in_window / seconds,
        "max_in_any_window": max_in_window(times, per),
        "per_second": per_second,
        "backlog_left": int(left[0]) if left else 0,
    }


def _fairness_summary(
    rows: list[tuple[Any, ...]], arrival: datetime, bulk_jobs: int
) -> dict[str, Any]:
    """Per customer, the worst wait of its started jobs; and the bulk customer's (customer
    0) backlog when the others arrived, and how it went on from there."""
    waits: dict[int, list[float]] = {}
    bulk_before = bulk_after = 0
    last_bulk_start: datetime | None = None
    for customer, created, attempted in rows:
        waits.setdefault(customer, []).append((attempted - created).total_seconds())
        if customer == 0:
            if attempted < arrival:
                bulk_before += 1
            else:
                bulk_after += 1
                if last_bulk_start is None or attempted > last_bulk_start:
                    last_bulk_start = attempted
    worst = {c: max(w) * 1000 for c, w in waits.items()}
    others = sorted(v for c, v in worst.items() if c != 0)
    drained = bulk_before + bulk_after == bulk_jobs
    span = (last_bulk_start - arrival).total_seconds() if last_bulk_start is not None else 0.0
    return {
        "worst_wait_ms_by_customer": {str(c): v for c, v in sorted(worst.items())},
        "others_worst_wait_ms": others[-1] if others else None,
        "others_median_worst_wait_ms": others[len(others) // 2] if others else None,
        "bulk_worst_wait_ms": worst.get(0) if drained else None,
        "bulk_backlog_at_arrival": bulk_jobs - bulk_before,
        "bulk_started_after_arrival": bulk_after,
        "bulk_left_at_end": bulk_jobs - bulk_before - bulk_after,
        "bulk_drain_after_arrival_ms": span * 1000 if drained else None,
        "bulk_jobs_per_s_after_arrival": bulk_after / span if span > 0 else None,
    }


async def fairness(spec: Spec) -> dict[str, Any]:
    queue = spec["queue"]
    bulk_jobs = spec["bulk_jobs"]
    customers = spec["customers"]
    per_customer = spec["jobs_per_customer"]
    batch = spec.get("batch", 1000)
    counter = Counter(spec.get("job_seconds", 0.0))
    # Customer 0's bulk first; then, one customer after another, a few jobs each.
    others = [
        (c, bulk_jobs + (c - 1) * per_customer + k)
        for c in range(1, customers)
        for k in range(per_customer)
    ]
    all_started = counter.at(bulk_jobs + len(others))
    others_started = counter.at(len(others), others=True)
    arrive = counter.at(min(spec.get("arrive_after", 1), bulk_jobs))
    await _prepare(spec)
    async with open_client(spec["url"]) as inserter:
        await _insert(inserter, queue, [(0, i) for i in range(bulk_jobs)], batch)
        async with inserter.transaction() as tx:
            await tx.execute("ANALYZE tq_job")  # as in enqueue
        async with open_client(
            spec["url"], workers=counter.workers(), queues=_queues(spec), **_client_options(spec)
        ) as client:
            with trio.fail_after(spec.get("max_seconds", 900)):
                await arrive.wait()
                await _insert(inserter, queue, others, batch)
                arrived = trio.current_time()
                await others_started.wait()
                # Then the bulk's backlog, for at most drain_seconds after the arrival
                # (under a small limit it drains slowly: that is the limit, not fairness).
                with trio.move_on_at(arrived + spec.get("drain_seconds", 20.0)):
                    await all_started.wait()
                    await _drained(client, queue)
        async with inserter.transaction() as tx:
            rows = await tx.fetch(
                "SELECT (args->>'customer')::int, created_at, attempted_at FROM tq_job"
                " WHERE queue = $1 AND attempted_at IS NOT NULL",
                queue,
            )
            arrival = await tx.fetchrow(
                "SELECT min(created_at) FROM tq_job WHERE queue = $1"
                " AND (args->>'customer')::int <> 0",
                queue,
            )
    assert arrival is not None and arrival[0] is not None
    summary = _fairness_summary(rows, arrival[0], bulk_jobs)
    return {"jobs": len(rows), "customers": customers, **summary}


COMMANDS = {
    "install": install,
    "enqueue": enqueue,
    "process": process,
    "rate": rate,
    "fairness": fairness,
}


def main() -> None:
    spec: Spec = json.loads(sys.argv[1])
    spec.setdefault("queue", "default")
    result = trio.run(COMMANDS[spec["command"]], spec)
    result["versions"] = {
        name: importlib.metadata.version(name) for name in ("trioqueue", "trio", "psycopg")
    }
    result["trioqueue_path"] = str(Path(trioqueue.__file__).parent)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
