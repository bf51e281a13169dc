"""``job_wait`` latency: from the moment a job's completion is committed to the moment
``client.job_wait`` returns it, on an insert-only client (issue 17: p50 ≤ 5 ms).

    python -m benchmarks.job_wait                       # 500 jobs a round, 3 rounds
    python -m benchmarks.job_wait --quick               # 100 jobs, 1 round
    python -m benchmarks.job_wait --database-url postgresql://... --rounds 5 --jobs 1000

Two OS processes, as in an application: a worker process (this module with
``--serve-worker``) runs the jobs, and a waiting process (``--serve-round``), an insert-only
client, inserts them and waits. Each job's worker function waits on a gate that the waiting
process opens (a line on the worker's stdin) once the wait is registered, its first read
done and its LISTEN connection listening, after a random pause (``--gap-ms``). The worker
returns, its completer writes the outcome, and the worker process reports when that write
was sent and when it returned (``time.perf_counter``: CLOCK_MONOTONIC, one clock for every
process of the machine). The commit lies between the two, so each sample is given as both:

- *write returned → job_wait returns*: a lower bound of the latency after the commit;
- *write sent → job_wait returns*: an upper bound (it includes the write itself).

Both are judged against the target: the commit is acknowledged when the write returns,
and the upper bound adds the write's own work (on a server with fsync, mostly the flush
of the commit record). Also reported: from the gate opening to ``job_wait`` returning,
which adds the completer's batching (it lingers 50 ms for more outcomes) and the pipe to
the worker.

A burst follows each round's samples (``--burst`` jobs, 0: none): that many waiters on as
many running jobs, every gate opened at once; the same latencies per job, and how many
reads the waiting client made for all of them (its waiters share one listener and one read
per wake-up).

Each round runs on a fresh database of one server: ``--database-url``, else
``$TRIOQUEUE_BENCH_DATABASE_URL``, else a temporary embedded one. The code measured is a copy
of the working tree taken at the start (as in ``benchmarks.limits``): each round's waiting
process, and the worker process it starts, run from that copy. Results:
``<out>/<timestamp>-job_wait.json`` (every sample, per-round percentiles, machine, server,
commit) and ``.md``; ``--quick`` runs are named ``…-job_wait-quick.*`` and git-ignored.
Exit status 1 if a round failed.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq
from trioqueue.driver.postgres.driver import open_postgres_driver
from trioqueue.driver.protocol import JobOutcome

from .common import HERE, ROOT, log
from .machine import busy_cpu, machine_info
from .server import Server, open_server
from .snapshot import snapshot_trioqueue
from .stats import quantile

TARGET_P50_MS = 5.0
WORKER_COMMAND = (sys.executable, "-m", "benchmarks.job_wait", "--serve-worker")
SNAPSHOT_FILES = ("job_wait.py", "common.py", "machine.py", "server.py", "snapshot.py", "stats.py")
"""Copied beside the measured trioqueue: this module and what it imports."""
QUEUE = "bench_wait"

# Sizes: (--quick, full).
SIZES = {"rounds": (1, 3), "jobs": (100, 500), "burst": (50, 200)}


@attrs.frozen
class Held:
    """A job whose worker function waits until the benchmark opens its gate."""

    kind: ClassVar[str] = "bench_wait_held"
    i: int


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.job_wait",
        description="job_wait latency: completion committed → job_wait returns (issue 17)",
    )
    p.add_argument("--database-url", help="server to use (needs CREATE DATABASE)")
    p.add_argument("--quick", action="store_true", help="small sizes, 1 round")
    p.add_argument("--rounds", type=int, help="rounds, each on a fresh database (3)")
    p.add_argument("--jobs", type=int, help="samples per round, one job at a time (500)")
    p.add_argument("--warmup", type=int, default=20, help="samples dropped first each round")
    p.add_argument("--burst", type=int, help="waiters released at once after the samples (200)")
    p.add_argument(
        "--gap-ms",
        type=float,
        nargs=2,
        default=(5.0, 15.0),
        metavar=("MIN", "MAX"),
        help="random pause before each gate opens (ms)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--serve-worker", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--max-workers", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--serve-round", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    for name, (small, full) in SIZES.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, small if cfg.quick else full)
    return cfg


# ------------------------------------------------------------------ the worker process


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = bytearray()
    while True:
        chunk = await stream.receive_some()
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, _, rest = buffer.partition(b"\n")
            buffer = bytearray(rest)
            yield line.decode()


async def serve_worker(url: str, max_workers: int) -> None:
    """Work the benchmark's queue; print ``ready``, ``r I`` when job I runs, and ``w SENT
    RETURNED ID...`` for each outcome write; ``o I...`` on stdin opens those gates, ``q``
    (or the end of stdin) stops."""
    gates: collections.defaultdict[int, trio.Event] = collections.defaultdict(trio.Event)
    workers = tq.Workers()

    @workers.worker(Held)
    async def held(job: tq.Job[Held]) -> None:
        _say(f"r {job.args.i}")
        await gates[job.args.i].wait()

    async with open_postgres_driver(url, max_size=8) as driver:
        write = driver.job_set_state_if_running_many

        async def timed_write(
            outcomes: Sequence[JobOutcome], now: datetime, *, rows: bool = True
        ) -> Any:
            sent = time.perf_counter()
            result = await write(outcomes, now, rows=rows)
            returned = time.perf_counter()
            _say(f"w {sent!r} {returned!r} " + " ".join(str(o.id) for o in outcomes))
            return result

        driver.job_set_state_if_running_many = timed_write  # type: ignore[method-assign]
        async with tq.open_client(
            driver=driver,
            workers=workers,
            queues={QUEUE: tq.QueueConfig(max_workers=max_workers)},
            fetch_cooldown=0.002,
            fetch_poll_interval=0.05,
        ):
            _say("ready")
            async for line in _lines(trio.lowlevel.FdStream(os.dup(0))):
                command, _, rest = line.partition(" ")
                if command == "q":
                    break
                if command == "o":
                    for i in rest.split():
                        gates[int(i)].set()


# ------------------------------------------------------------------ the waiting process


class WorkerProcess:
    """The worker process as this process sees it: what it reported, as events."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.ready = trio.Event()
        self.running: collections.defaultdict[int, trio.Event] = collections.defaultdict(trio.Event)
        self.written: collections.defaultdict[int, trio.Event] = collections.defaultdict(trio.Event)
        self.writes: dict[int, tuple[float, float]] = {}
        """Job id → (write sent, write returned)."""
        self.write_count = 0
        self.stopping = False

    async def read(self) -> None:
        """Follow the worker's lines; raise if it ends before it was told to stop."""
        assert self.proc.stdout is not None
        async for line in _lines(self.proc.stdout):
            kind, _, rest = line.partition(" ")
            if kind == "ready":
                self.ready.set()
            elif kind == "r":
                self.running[int(rest)].set()
            elif kind == "w":
                sent, returned, *ids = rest.split()
                self.write_count += 1
                for job_id in map(int, ids):
                    self.writes[job_id] = (float(sent), float(returned))
                    self.written[job_id].set()
        if not self.stopping:
            raise RuntimeError(
                f"the worker process ended early (exit status {await self.proc.wait()})"
            )

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")


async def measure(url: str, cfg: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One round on the migrated database at ``url``: the samples, then the burst."""
    rng = random.Random(seed)
    max_workers = max(cfg.burst, 1) + 10
    proc = await trio.lowlevel.open_process(
        [*WORKER_COMMAND, url, "--max-workers", str(max_workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    worker = WorkerProcess(proc)
    try:
        async with tq.open_client(url) as waiter, trio.open_nursery() as nursery:
            nursery.start_soon(worker.read)
            with trio.fail_after(60):
                await worker.ready.wait()
            assert waiter._waits is not None
            service = waiter._waits
            returned: dict[int, float] = {}
            opts = tq.InsertOpts(queue=QUEUE)

            async def wait(job_id: int, done: trio.Event) -> None:
                job = await waiter.job_wait(job_id)
                returned[job_id] = time.perf_counter()
                if job.state is not tq.JobState.COMPLETED:
                    raise RuntimeError(f"job {job_id} ended {job.state}")
                done.set()

            async def registered(count: int) -> None:
                while True:
                    stats = service.statistics()
                    if (
                        stats["waiters"] == count
                        and stats["listening"]
                        and not stats["reading"]
                        and not service._due
                    ):
                        return
                    await trio.sleep(0.0005)

            samples: dict[str, list[float]] = {"sent": [], "returned": [], "opened": []}

            def sample(into: dict[str, list[float]], job_id: int, opened: float) -> None:
                sent, written = worker.writes[job_id]
                into["sent"].append(returned[job_id] - sent)
                into["returned"].append(returned[job_id] - written)
                into["opened"].append(returned[job_id] - opened)

            for i in range(cfg.warmup + cfg.jobs):
                done = trio.Event()
                job_id = (await waiter.insert(Held(i), opts)).job.id
                with trio.fail_after(30):
                    await worker.running[i].wait()
                    nursery.start_soon(wait, job_id, done)
                    await registered(1)
                    await trio.sleep(rng.uniform(*cfg.gap_ms) / 1000)
                    opened = time.perf_counter()
                    await worker.send(f"o {i}")
                    await done.wait()
                    await worker.written[job_id].wait()
                if i >= cfg.warmup:
                    sample(samples, job_id, opened)

            burst: dict[str, Any] = {}
            if cfg.burst:
                base = cfg.warmup + cfg.jobs
                indexes = range(base, base + cfg.burst)
                results = await waiter.insert_many([(Held(i), opts) for i in indexes])
                ids = [r.job.id for r in results]
                all_done = [trio.Event() for _ in ids]
                burst_samples: dict[str, list[float]] = {"sent": [], "returned": [], "opened": []}
                with trio.fail_after(60):
                    for i in indexes:
                        await worker.running[i].wait()
                    for job_id, done in zip(ids, all_done, strict=True):
                        nursery.start_soon(wait, job_id, done)
                    await registered(len(ids))
                    reads_before = service.reads
                    writes_before = worker.write_count
                    opened = time.perf_counter()
                    await worker.send("o " + " ".join(map(str, indexes)))
                    for job_id, done in zip(ids, all_done, strict=True):
                        await done.wait()
                        await worker.written[job_id].wait()
                for job_id in ids:
                    sample(burst_samples, job_id, opened)
                burst = {
                    "waiters": len(ids),
                    "samples": burst_samples,
                    "reads": service.reads - reads_before,
                    "completer_writes": worker.write_count - writes_before,
                }
            worker.stopping = True
            await worker.send("q")
            with trio.fail_after(30):
                await proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()
    return {"samples": samples, "burst": burst}


# ------------------------------------------------------------------ rounds and report


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(x * 1000 for x in seconds)
    return {
        "p50_ms": quantile(ordered, 0.5),
        "p90_ms": quantile(ordered, 0.9),
        "p99_ms": quantile(ordered, 0.99),
        "max_ms": ordered[-1] if ordered else float("nan"),
        "n": len(ordered),
    }


MEASURES = {
    "sent": "outcome write sent → job_wait returns (upper bound)",
    "returned": "outcome write returned → job_wait returns (lower bound)",
    "opened": "gate opened → job_wait returns",
}


def run_round(server: Server, cfg: argparse.Namespace, rnd: int, src: Path) -> dict[str, Any]:
    """Round ``rnd`` on a fresh database: the waiting process runs the code copied to
    ``src`` (and starts the worker process from there too), and prints its samples."""
    with server.database(f"wait{rnd}") as (_name, url):
        trio.run(tq.migrate, url)
        args = [
            *("--serve-round", url, "--seed", str(rnd), "--jobs", str(cfg.jobs)),
            *("--warmup", str(cfg.warmup), "--burst", str(cfg.burst)),
            *("--gap-ms", *(repr(x) for x in cfg.gap_ms)),
        ]
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.job_wait", *args],
            cwd=src,
            stdout=subprocess.PIPE,
            text=True,
            timeout=max(600.0, cfg.jobs * 2.0),
            check=True,
        )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    record: dict[str, Any] = {"round": rnd}
    for key, values in out["samples"].items():
        record[key] = percentiles(values)
    record["samples_s"] = out["samples"]
    if out["burst"]:
        b = out["burst"]
        record["burst"] = {
            "waiters": b["waiters"],
            "reads": b["reads"],
            "completer_writes": b["completer_writes"],
            **{key: percentiles(values) for key, values in b["samples"].items()},
            "samples_s": b["samples"],
        }
    return record


def _values(records: list[dict[str, Any]], path: Sequence[str]) -> list[float]:
    values = []
    for rec in records:
        node: Any = rec
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            values.append(float(node))
    return values


def _cell(records: list[dict[str, Any]], *path: str) -> str:
    values = _values(records, path)
    if not values:
        return ""
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:.2f}"
    return f"{mid:.2f} ({min(values):.2f}-{max(values):.2f})"


def markdown(report: dict[str, Any]) -> str:
    records = report["records"]
    cfg = report["config"]
    busy = ", ".join("?" if b is None else f"{b:.0%}" for b in report["background_cpu_busy"])
    lines = [
        f"# trioqueue job_wait latency, {report['started_at']}",
        "",
        f"Command: `{report['command']}`  ",
        f"trioqueue measured: commit `{report['git']['commit'][:12]}`"
        + (" plus uncommitted changes" if report["git"]["trioqueue_uncommitted_changes"] else "")
        + "  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"Python {report['machine']['python']}  ",
        f"PostgreSQL {report['server'].get('server_version', '?')} ({report['server']['where']};"
        f" fsync {report['server'].get('fsync', '?')}, synchronous_commit "
        f"{report['server'].get('synchronous_commit', '?')})  ",
        f"Rounds: {len(records)}, each on a fresh database; {cfg['jobs']} samples a round "
        f"(after {cfg['warmup']} dropped), one job at a time, its gate opened "
        f"{cfg['gap_ms'][0]:g}-{cfg['gap_ms'][1]:g} ms after the wait registered; then a "
        f"burst of {cfg['burst']} waiters, every gate opened at once  ",
        "Waiter: an insert-only client in a process of its own; jobs worked by a client in "
        "another process  ",
        f"CPU busy with other work before each round: {busy}",
        "",
        "Cells: median over rounds of each round's percentile (min-max over rounds).",
        "",
        "| measure | p50 (ms) | p90 (ms) | p99 (ms) | goal | met |",
        "|---|---:|---:|---:|---|:---:|",
    ]
    for prefix, label in (((), ""), (("burst",), "burst: ")):
        for key, what in MEASURES.items():
            path = (*prefix, key)
            goal = ok = ""
            if path in (("sent",), ("returned",)):
                p50s = _values(records, (*path, "p50_ms"))
                goal = f"p50 ≤ {TARGET_P50_MS:g}"
                ok = "yes" if p50s and statistics.median(p50s) <= TARGET_P50_MS else "NO"
            lines.append(
                f"| {label}{what} | {_cell(records, *path, 'p50_ms')} | "
                f"{_cell(records, *path, 'p90_ms')} | {_cell(records, *path, 'p99_ms')} | "
                f"{goal} | {ok} |"
            )
    bursts = [r["burst"] for r in records if "burst" in r]
    if bursts:
        lines += [
            "",
            "Bursts: "
            + "; ".join(
                f"{b['waiters']} waiters woken by {b['reads']} reads, after "
                f"{b['completer_writes']} outcome writes"
                for b in bursts
            )
            + ".",
        ]
    if report["errors"]:
        lines += ["", "Errors:", *(f"- round {e['round']}: {e['error']}" for e in report["errors"])]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.serve_worker is not None:
        trio.run(serve_worker, cfg.serve_worker, cfg.max_workers)
        return 0
    if cfg.serve_round is not None:
        out = trio.run(measure, cfg.serve_round, cfg, cfg.seed)
        _say(json.dumps(out))
        return 0
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    command = "python -m benchmarks.job_wait " + " ".join(sys.argv[1:] if argv is None else argv)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    background: list[float | None] = []
    with (
        tempfile.TemporaryDirectory(prefix="tqbench-src-") as src,
        open_server(cfg.database_url) as server,
    ):
        code = snapshot_trioqueue(None, Path(src))
        for name in SNAPSHOT_FILES:
            shutil.copy2(HERE / name, Path(src) / "benchmarks" / name)
        log(
            f"measuring trioqueue from the working tree at {code['commit'][:12]}"
            + (" plus uncommitted changes" if code["trioqueue_uncommitted_changes"] else "")
        )
        server_settings = server.settings()
        for rnd in range(1, cfg.rounds + 1):
            background.append(busy_cpu())
            log(f"round {rnd}/{cfg.rounds} (CPU busy with other work: {background[-1]})")
            try:
                rec = run_round(server, cfg, rnd, Path(src))
            except Exception as exc:
                log(traceback.format_exc())
                errors.append({"round": rnd, "error": repr(exc)})
                continue
            records.append(rec)
            for prefix, node in (("", rec), ("burst: ", rec.get("burst"))):
                if node is None:
                    continue
                for key, what in MEASURES.items():
                    c = node[key]
                    log(
                        f"  {prefix}{what}: p50 {c['p50_ms']:.2f}, p90 {c['p90_ms']:.2f},"
                        f" p99 {c['p99_ms']:.2f} ms ({c['n']} jobs)"
                    )
    report: dict[str, Any] = {
        "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "duration_s": time.monotonic() - started,
        "git": code,
        "machine": machine_info(),
        "server": {**server_settings, "where": server.where},
        "config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(cfg).items()
            if k not in ("out", "serve_worker", "max_workers", "serve_round", "seed")
        },
        "target_p50_ms": TARGET_P50_MS,
        "records": records,
        "errors": errors,
        "background_cpu_busy": background,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = started_at.strftime("%Y%m%dT%H%M%SZ") + "-job_wait" + ("-quick" if cfg.quick else "")
    json_path = cfg.out / f"{stem}.json"
    md_path = cfg.out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    md_path.write_text(text)
    log("")
    log(text)
    log(f"wrote {json_path} and {md_path} in {report['duration_s'] / 60:.1f} min")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
