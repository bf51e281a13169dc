"""What the peer runners share: the command protocol, timing and process statistics.

A runner is started as ``PYTHON runner.py '<json spec>'`` by the harness
(``benchmarks/variants.py``), runs one command on an asyncio event loop (uvloop unless the
spec says ``"loop": "asyncio"``) and prints one JSON object as the last line of stdout.
Nothing here imports trioqueue: the peers run in their own virtual environment.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

Spec = dict[str, Any]
Command = Callable[[Spec], Awaitable[dict[str, Any]]]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunks(n: int, size: int) -> list[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


class Counter:
    """Counts job starts in the job function; fires ``reached`` at the target."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.first: float | None = None
        self.reached = asyncio.Event()

    def hit(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    def process_result(
        self,
        *,
        opened: float,
        end: float,
        cpu: float,
        rss_before: float,
        rss_peak: float,
        polls: int,
    ) -> dict[str, Any]:
        """The ``process`` measure's record, timed from the first job's start."""
        assert self.first is not None
        return {
            "jobs": self.count,
            "seconds": end - self.first,
            "startup_seconds": self.first - opened,
            "cpu_seconds": cpu,
            "rss_before_mb": rss_before,
            "rss_peak_mb": rss_peak,
            "own_transactions": polls,
        }


async def wait_until_zero(fetch_count: Callable[[], Awaitable[int]], limit: float) -> int:
    """Poll ``fetch_count`` every 2 ms until it returns 0; returns how many polls ran."""
    polls = 0
    deadline = time.perf_counter() + limit
    while True:
        polls += 1
        if await fetch_count() == 0:
            return polls
        if time.perf_counter() > deadline:
            raise TimeoutError("jobs still unfinished")
        await asyncio.sleep(0.002)


async def latency_loop(
    spec: Spec,
    arrived: dict[int, asyncio.Event],
    started: dict[int, float],
    insert: Callable[[int], Awaitable[object]],
) -> dict[str, list[float]]:
    """One job at a time into an idle worker: seconds from just before the insert to the
    job function's start (and how long the insert call itself took). Same gaps, warm-up
    and seed as trioqueue's ``idle_latency``."""
    rng = random.Random(spec.get("seed", 1))
    low, high = spec.get("gap", (0.005, 0.015))
    warmup = spec.get("warmup", 10)
    samples: list[float] = []
    insert_samples: list[float] = []
    for i in range(warmup + spec["samples"]):
        await asyncio.sleep(rng.uniform(low, high))
        arrived[i] = waiter = asyncio.Event()
        before = time.perf_counter()
        await insert(i)
        returned = time.perf_counter()
        await asyncio.wait_for(waiter.wait(), 30)
        if i >= warmup:
            samples.append(started[i] - before)
            insert_samples.append(returned - before)
    return {"samples": samples, "insert_samples": insert_samples}


def main(commands: dict[str, Command], versions: dict[str, str]) -> None:
    spec: Spec = json.loads(sys.argv[1])
    command = commands[spec["command"]]
    loop = spec.get("loop", "uvloop")
    if loop == "uvloop":
        import uvloop

        result = uvloop.run(command(spec))
    else:
        result = asyncio.run(command(spec))
    result["loop"] = loop
    result["versions"] = versions
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
