"""trioqueue's side of the benchmark harness: ``python -m benchmarks.trioqueue_runner SPEC``.

Like the peer runners, it runs one command from a JSON spec and prints one JSON object as
the last line of stdout. The measuring itself is ``trioqueue.bench`` (also behind
``trioqueue bench``), so the harness and the command measure the same way.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import trio

import trioqueue
from trioqueue import bench, migrate

Spec = dict[str, Any]


def _settings(spec: Spec) -> bench.BenchSettings:
    return bench.BenchSettings(
        max_workers=spec.get("max_workers", 1000),
        fetch_cooldown=spec.get("fetch_cooldown", 0.002),
        fetch_poll_interval=spec.get("fetch_poll_interval", 0.05),
    )


async def install(spec: Spec) -> dict[str, Any]:
    await migrate(spec["url"])
    return {}


async def enqueue(spec: Spec) -> dict[str, Any]:
    result = await bench.enqueue_batch(
        spec["url"], spec["jobs"], queue=spec["queue"], batch=spec.get("batch", 1000)
    )
    return {"jobs": result.jobs, "seconds": result.seconds}


async def single(spec: Spec) -> dict[str, Any]:
    result = await bench.enqueue_single(spec["url"], spec["jobs"], queue=spec["queue"])
    return {"jobs": result.jobs, "seconds": result.seconds}


async def process(spec: Spec) -> dict[str, Any]:
    result = await bench.process(
        spec["url"],
        spec["jobs"],
        _settings(spec),
        queue=spec["queue"],
        max_seconds=spec.get("max_seconds", 900),
    )
    return {
        "jobs": result.jobs,
        "failed": result.failed,
        "seconds": result.seconds,
        "startup_seconds": result.startup_seconds,
        "cpu_seconds": result.cpu_seconds,
        "rss_before_mb": result.rss_before_mb,
        "rss_peak_mb": result.rss_peak_mb,
        "own_transactions": result.own_transactions,
    }


async def latency(spec: Spec) -> dict[str, Any]:
    result = await bench.idle_latency(
        spec["url"],
        spec["samples"],
        _settings(spec),
        queue=spec["queue"],
        gap=(float(spec.get("gap", (0.005, 0.015))[0]), float(spec.get("gap", (0.005, 0.015))[1])),
        warmup=spec.get("warmup", 10),
        seed=spec.get("seed", 1),
    )
    return {"samples": result.samples, "insert_samples": result.insert_seconds}


def ceiling(spec: Spec) -> dict[str, Any]:
    """The database's own ceiling for this schema: claim 1000 available rows (the shape
    of trioqueue's fetch: FOR UPDATE SKIP LOCKED, set running) and mark them completed,
    two autocommit statements per 1000 jobs, from one connection; no queue logic at all."""
    claim = """
        WITH picked AS (
            SELECT id FROM tq_job
            WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()
            ORDER BY priority, scheduled_at, id
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        )
        UPDATE tq_job j SET state = 'running', attempt = j.attempt + 1,
            attempted_at = now(), attempted_by = array_append(j.attempted_by, 'ceiling')
        FROM picked WHERE j.id = picked.id
        RETURNING j.id
    """
    complete = """
        UPDATE tq_job SET state = 'completed', finalized_at = now()
        WHERE id = ANY(%(ids)s) AND state = 'running'
    """
    done = 0
    with psycopg.connect(spec["url"], autocommit=True) as conn:
        start = time.perf_counter()
        while True:
            rows = conn.execute(claim, {"queue": spec["queue"], "limit": 1000}).fetchall()
            if not rows:
                break
            conn.execute(complete, {"ids": [r[0] for r in rows]})
            done += len(rows)
        seconds = time.perf_counter() - start
    return {"jobs": done, "seconds": seconds}


COMMANDS = {
    "install": install,
    "enqueue": enqueue,
    "single": single,
    "process": process,
    "latency": latency,
}


def main() -> None:
    spec: Spec = json.loads(sys.argv[1])
    spec.setdefault("queue", "default")
    if spec["command"] == "ceiling":
        result = ceiling(spec)
    else:
        result = trio.run(COMMANDS[spec["command"]], spec)
    result["versions"] = {
        name: importlib.metadata.version(name) for name in ("trioqueue", "trio", "psycopg")
    }
    result["trioqueue_path"] = str(Path(trioqueue.__file__).parent)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
