"""A worker in an OS process of its own, for the fault tests (tests/test_faults.py).

    python tests/worker_process.py DATABASE_URL [--max-workers N] [--id CLIENT_ID]

Works the ``default`` queue until SIGTERM (or SIGINT), then stops softly (running jobs
finish, outcomes are written) and exits 0. Lines on stdout, flushed at once, let the test
follow along: ``ready <pid>`` once the client works, ``started <job id>`` when a
``sleep`` job starts, ``stopped <pid>`` after a clean stop.

Kinds (the test inserts them by kind, so it need not import this file):

``record``
    Sleeps ``seconds``, then writes ``(job_id, pid, started_at, finished_at)`` into the
    ``runs`` table (which the test creates) in its own transaction: a durable trace of
    every execution, whichever process ran it.
``sleep``
    Announces itself on stdout and sleeps ``seconds`` (a long sleep is a job to be caught
    running when the process is killed).

(The trioqueue CLI has no ``worker`` command yet; this is the loop it will have.)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs
import trio
from support import FAST

import trioqueue as tq


@attrs.frozen
class Record:
    kind: ClassVar[str] = "record"
    seconds: float = 0.0


@attrs.frozen
class Sleep:
    kind: ClassVar[str] = "sleep"
    seconds: float = 0.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str, max_workers: int, client_id: str | None) -> None:
    workers = tq.Workers()
    holder: list[tq.Client] = []

    @workers.worker(Record)
    async def record(job: tq.Job[Record]) -> None:
        started_at = datetime.now(UTC)
        await trio.sleep(job.args.seconds)
        finished_at = datetime.now(UTC)
        async with holder[0].transaction() as tx:
            await tx.execute(
                "INSERT INTO runs (job_id, pid, started_at, finished_at) VALUES ($1, $2, $3, $4)",
                job.id,
                os.getpid(),
                started_at,
                finished_at,
            )

    @workers.worker(Sleep, timeout=None)
    async def sleep(job: tq.Job[Sleep]) -> None:
        say(f"started {job.id}")
        await trio.sleep(job.args.seconds)

    # FAST's short terms matter here too: when a test kills this process while it leads,
    # its leadership expires (after 3 intervals) soon enough for another client to take over.
    config: dict[str, Any] = dict(FAST)
    if client_id is not None:
        config["id"] = client_id
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with tq.open_client(
            url,
            workers=workers,
            queues={"default": tq.QueueConfig(max_workers=max_workers)},
            **config,
        ) as client:
            holder.append(client)
            say(f"ready {os.getpid()}")
            async for _ in signals:
                break
            await client.stop()
    say(f"stopped {os.getpid()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("--max-workers", type=int, default=20)
    parser.add_argument("--id", default=None)
    ns = parser.parse_args()
    trio.run(main, ns.database_url, ns.max_workers, ns.id)
