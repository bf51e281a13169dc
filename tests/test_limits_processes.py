"""Flow control across OS processes on PostgreSQL (issue 16): worker processes
(``tests/limits_worker.py``) work one queue under a global limit per customer, and every
run records its start and end in the ``spans`` table with the database's clock. A run's
span lies inside the time the database counts its job as running (it starts after the
claim and ends before the outcome is written), so at no moment may more than ``limit``
spans of a partition overlap.

One process is also SIGKILLed mid-run: its jobs stay ``running`` (holding their
partitions' slots) until the rescuer of a surviving process returns them, and then every
job still completes. Every test is bounded by ``fail_after`` and kills the processes it
started, whatever happens; none asserts anything about speed.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq
from trioqueue.driver.postgres import PgConnection

WORKER = Path(__file__).with_name("limits_worker.py")

SPANS = """
CREATE TABLE spans (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    partition text NOT NULL,
    started timestamptz NOT NULL,
    ended timestamptz
)
"""


@attrs.frozen
class Span:
    """Worked by ``limits_worker.py``."""

    kind: ClassVar[str] = "span"
    customer: Any = None
    seconds: float = 0.0


@attrs.frozen
class Run:
    job_id: int
    attempt: int
    pid: int
    partition: str
    started: datetime
    ended: datetime | None


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[PgConnection]:
    conn = await PgConnection.connect(url)
    async with conn:
        yield conn


class Worker:
    """A running ``limits_worker.py``; reads the lines it prints."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buffer = bytearray()

    async def expect(self, word: str) -> str:
        """Skip lines until one starts with ``word``; return the rest of it."""
        assert self.proc.stdout is not None
        while True:
            while b"\n" not in self._buffer:
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    code = await self.proc.wait()
                    raise AssertionError(f"worker {self.proc.pid} exited with {code}")
                self._buffer += chunk
            line, _, rest = self._buffer.partition(b"\n")
            self._buffer = bytearray(rest)
            first, _, tail = line.decode().partition(" ")
            if first == word:
                return tail


@asynccontextmanager
async def workers(url: str, count: int, *args: str) -> AsyncIterator[list[Worker]]:
    """Start ``count`` worker processes and wait until each works; SIGKILL whichever is
    still alive when the block ends."""
    procs: list[Worker] = []
    try:
        for _ in range(count):
            proc = await trio.lowlevel.open_process(
                [sys.executable, str(WORKER), url, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            procs.append(Worker(proc))
        for p in procs:
            await p.expect("ready")
        yield procs
    finally:
        with trio.CancelScope(shield=True):
            for p in procs:
                if p.proc.returncode is None:
                    p.proc.kill()
            for p in procs:
                with trio.move_on_after(10):
                    await p.proc.wait()
                assert p.proc.stdout is not None and p.proc.stdin is not None
                await p.proc.stdout.aclose()
                await p.proc.stdin.aclose()


async def stop(procs: list[Worker]) -> None:
    """SIGTERM every live process and wait for its clean stop."""
    for p in procs:
        if p.proc.returncode is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in procs:
        if p.proc.returncode is None:
            await p.expect("stopped")
            assert await p.proc.wait() == 0


async def wait_all_completed(db: PgConnection, total: int, within: float) -> None:
    counts: dict[str, int] = {}
    with trio.move_on_after(within):
        while True:
            rows = await db.fetch("SELECT state::text, count(*) FROM tq_job GROUP BY 1")
            counts = {str(s): int(n) for s, n in rows}
            if counts == {"completed": total}:
                return
            await trio.sleep(0.1)
    running = await db.fetch(
        "SELECT id, attempt, attempted_at, attempted_by, args::text FROM tq_job"
        " WHERE state <> 'completed' ORDER BY id LIMIT 10"
    )
    raise AssertionError(
        f"after {within} s the jobs are {counts}, not {total} completed; others: {running}"
    )


async def runs(db: PgConnection) -> list[Run]:
    rows = await db.fetch(
        "SELECT job_id, attempt, pid, partition, started, ended FROM spans ORDER BY id"
    )
    return [Run(*row) for row in rows]


def most_at_once(found: list[Run], until: dict[int, datetime]) -> dict[str, int]:
    """Per partition, the most runs that overlapped at any moment (a run still open is
    taken to end at ``until[pid]``: when its process was seen dead). An end and a start at
    the same instant do not overlap."""
    events: dict[str, list[tuple[datetime, int]]] = collections.defaultdict(list)
    for run in found:
        ended = run.ended if run.ended is not None else until[run.pid]
        events[run.partition] += [(run.started, 1), (ended, -1)]
    most: dict[str, int] = {}
    for partition, changes in events.items():
        level = peak = 0
        for _, change in sorted(changes):  # -1 sorts before +1 at the same instant
            level += change
            peak = max(peak, level)
        most[partition] = peak
    return most


async def test_a_global_limit_holds_across_processes(database_url: str) -> None:
    limit = 2
    jobs = [Span(customer=c, seconds=0.02 + 0.02 * (n % 4)) for c in range(4) for n in range(15)]
    with trio.fail_after(100):
        async with connect(database_url) as db:
            await db.execute(SPANS)
            args = ("--limit", str(limit), "--by-args", "customer", "--max-workers", "6")
            async with workers(database_url, 3, *args) as procs:
                async with tq.open_client(database_url) as client:
                    await client.insert_many(jobs)
                await wait_all_completed(db, len(jobs), 80)
                await stop(procs)
            found = await runs(db)
    assert all(run.ended is not None for run in found)
    assert sorted(run.job_id for run in found) == sorted({run.job_id for run in found})
    assert len(found) == len(jobs)
    most = most_at_once(found, {})
    assert set(most) == {json.dumps({"customer": c}) for c in range(4)}
    assert max(most.values()) <= limit, most
    # The limit was reached, and the work was shared: the check checked something.
    assert max(most.values()) == limit
    assert len({run.pid for run in found}) > 1


async def test_a_killed_process_leaves_no_job_behind_and_the_limit_holds(
    database_url: str,
) -> None:
    limit = 2
    jobs = [Span(customer=c, seconds=0.4) for c in range(3) for _ in range(12)]
    dead: dict[int, datetime] = {}
    with trio.fail_after(100):
        async with connect(database_url) as db:
            await db.execute(SPANS)
            args = (
                *("--limit", str(limit), "--by-args", "customer", "--max-workers", "4"),
                *("--rescue-after", "3.0"),
            )
            async with workers(database_url, 3, *args) as procs:
                async with tq.open_client(database_url) as client:
                    await client.insert_many(jobs)
                # Kill a process while it runs jobs.
                by_pid = {p.proc.pid: p for p in procs}
                while True:
                    pid = await db.fetchval(
                        "SELECT pid FROM spans WHERE ended IS NULL ORDER BY id LIMIT 1"
                    )
                    if pid is not None:
                        break
                    await trio.sleep(0.01)
                victim = by_pid[int(pid)]
                victim.proc.send_signal(signal.SIGKILL)
                assert await victim.proc.wait() == -signal.SIGKILL
                dead[int(pid)] = await db.fetchval("SELECT clock_timestamp()")
                await wait_all_completed(db, len(jobs), 80)
                await stop([p for p in procs if p is not victim])
            found = await runs(db)
            interrupted = {r.job_id for r in found if r.ended is None}
            final = await db.fetch("SELECT id, attempt, errors::text FROM tq_job")
    # The killed process was caught running jobs, and only its runs were cut short.
    assert interrupted
    assert {r.pid for r in found if r.ended is None} == set(dead)
    # Every job finished a run; only the killed process's runs were ever run again (a run
    # it finished but had not written the outcome of yet is run again too).
    assert {r.job_id for r in found if r.ended is not None} == {job_id for job_id, *_ in final}
    last: dict[int, Run] = {}
    for run in found:
        if run.job_id in last:
            assert last[run.job_id].pid in dead, (last[run.job_id], run)
        last[run.job_id] = run
    for job_id, attempt, errors in final:
        if job_id in interrupted:
            assert attempt == 2 and "rescued" in errors, (job_id, attempt, errors)
    most = most_at_once(found, dead)
    assert max(most.values()) <= limit, most
