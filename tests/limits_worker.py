"""A worker in an OS process of its own, for the flow control process tests
(tests/test_limits_processes.py).

    python tests/limits_worker.py DATABASE_URL --limit N [--by-args FIELD ...]
        [--max-workers N] [--rescue-after SECONDS]

Works the ``default`` queue under ``GlobalLimit(N, by_args=FIELDS)`` until SIGTERM (or
SIGINT), then stops softly and exits 0. Prints ``ready <pid>`` (flushed) once it works,
``stopped <pid>`` after a clean stop.

It exits at once when its standard input closes (the test that started it is gone), so
that no worker outlives an aborted test.

Its one kind, ``span``, records its run in the ``spans`` table (which the test creates),
with the database's clock, so that every process's runs are on one clock: a row with
``started`` when the run begins (after the claim), then ``ended`` set when it has slept
``seconds`` (before its outcome is written). Each is committed at once, so a killed
process leaves its runs with ``ended`` NULL. The kind has a timeout (2 s), so that the
rescuer returns a killed process's jobs after ``--rescue-after`` seconds (a kind without
one is never rescued).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, ClassVar

import attrs
import trio
from support import FAST

import trioqueue as tq


@attrs.frozen
class Span:
    kind: ClassVar[str] = "span"
    customer: Any = None
    seconds: float = 0.0


async def exit_when_orphaned() -> None:
    """Exit the process, at once, when stdin reaches its end: the test has gone."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some():
        pass
    os._exit(3)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str, limit: int, by_args: list[str], max_workers: int, rescue: float) -> None:
    workers = tq.Workers()
    holder: list[tq.Client] = []

    @workers.worker(Span, timeout=2.0)
    async def span(job: tq.Job[Span]) -> None:
        client = holder[0]
        partition = json.dumps({f: getattr(job.args, f) for f in by_args}, sort_keys=True)
        async with client.transaction() as tx:
            row = await tx.fetchval(
                "INSERT INTO spans (job_id, attempt, pid, partition, started)"
                " VALUES ($1, $2, $3, $4, clock_timestamp()) RETURNING id",
                job.id,
                job.attempt,
                os.getpid(),
                partition,
            )
        await trio.sleep(job.args.seconds)
        async with client.transaction() as tx:
            await tx.execute("UPDATE spans SET ended = clock_timestamp() WHERE id = $1", row)

    config: dict[str, Any] = {
        **FAST,
        "rescue_stuck_jobs_after": rescue,
        "rescuer_interval": 0.2,
        "retry_policy": lambda job: 0.0,
    }
    queue = tq.QueueConfig(
        max_workers=max_workers, global_limit=tq.GlobalLimit(limit, by_args=tuple(by_args))
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(exit_when_orphaned)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with tq.open_client(
                url, workers=workers, queues={"default": queue}, **config
            ) as client:
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
    parser.add_argument("--limit", type=int, required=True)
    parser.add_argument("--by-args", nargs="*", default=[])
    parser.add_argument("--max-workers", type=int, default=6)
    parser.add_argument("--rescue-after", type=float, default=3600.0)
    ns = parser.parse_args()
    trio.run(main, ns.database_url, ns.limit, ns.by_args, ns.max_workers, ns.rescue_after)
