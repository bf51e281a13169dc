"""The comparison harness: trioqueue against pgqueuer and procrastinate, in one run.

    python -m benchmarks.run            # full: 20,000 jobs, 3 interleaved rounds
    python -m benchmarks.run --quick    # small N, 1 round
    python -m benchmarks.run --only trioqueue --plots

Every measurement runs in a subprocess of its own (trioqueue in this interpreter, the peers
in ``benchmarks/.venv-peers``, which this script creates and fills from
``requirements-peers.txt``) against a fresh database on one PostgreSQL server:
``--database-url``, else ``$TRIOQUEUE_BENCH_DATABASE_URL``, else a temporary embedded
server. Rounds are interleaved (each round runs every system once per measure, in a
rotated order). Results go to ``benchmarks/results/<timestamp>.json`` and ``.md``; see
benchmarks/README.md and docs/benchmarks.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
VENV = HERE / ".venv-peers"
REQUIREMENTS = HERE / "requirements-peers.txt"
PLOTS_DIR = ROOT / "docs" / "benchmarks"
URL_ENV = "TRIOQUEUE_BENCH_DATABASE_URL"
SYSTEMS = ("trioqueue", "pgqueuer", "procrastinate")
SWEEP = (10, 100, 500, 1000, 2000)

# Every target of the issue: (key, what, ratio to a peer or a plain value, goal, operator).
TARGETS = (
    ("processing", "processing no-op jobs vs pgqueuer batch 100", "ratio", 2.0, ">="),
    ("batch_enqueue", "batch enqueue (insert_many_fast) vs pgqueuer", "ratio", 2.0, ">="),
    ("single_enqueue", "single insert vs pgqueuer", "ratio", 1.3, ">="),
    ("latency_p50", "idle latency insert → start, p50 (ms)", "value", 1.5, "<="),
    ("latency_p99", "idle latency insert → start, p99 (ms)", "value", 5.0, "<="),
    ("xact_per_job", "database transactions per processed job", "value", 0.05, "<="),
    ("rss", "peak RSS working {rss_jobs:,} queued jobs (MB)", "value", 150.0, "<="),
    ("finalized", "throughput with {finalized_rows:,} finalized rows / empty", "value", 0.8, ">="),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the server


def with_dbname(url: str, dbname: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


class Server:
    """Admin operations on the benchmark's server, through ``url``'s own database."""

    def __init__(self, url: str, where: str) -> None:
        self.url = url
        self.where = where
        self._names = itertools.count(1)
        self._tag = f"{os.getpid()}"

    def _admin(self, statement: sql.Composable | str, params: Any = None) -> list[Any]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def settings(self) -> dict[str, str]:
        names = (
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "shared_buffers",
            "max_connections",
        )
        out = {}
        for name in names:
            out[name] = str(self._admin(f"SHOW {name}")[0][0])
        return out

    @contextlib.contextmanager
    def database(self, label: str) -> Iterator[tuple[str, str]]:
        """A fresh, empty database for one measurement; dropped afterwards."""
        name = f"tqbench_{self._tag}_{next(self._names)}_{label}"[:63]
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name, with_dbname(self.url, name)
        finally:
            self._admin(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def transactions(self, dbname: str) -> int:
        """Committed + rolled back transactions of ``dbname`` so far, read once no session
        is connected to it (a backend flushes its counters when it exits) and the count
        holds still."""
        deadline = time.monotonic() + 10
        last: int | None = None
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = %(d)s),"
                    " (SELECT xact_commit + xact_rollback FROM pg_stat_database"
                    "  WHERE datname = %(d)s)",
                    {"d": dbname},
                ).fetchone()
                assert row is not None
                busy, value = int(row[0]), int(row[1])
                if busy == 0 and value == last:
                    return value
                if time.monotonic() > deadline:
                    return value
                last = value if busy == 0 else None
                time.sleep(0.1)

    def fill_finalized(self, url: str, rows: int) -> float:
        """Insert ``rows`` completed jobs (finalized within the last hour, so the cleaner
        leaves them alone) into the default queue, then VACUUM ANALYZE; returns seconds."""
        start = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                """
                INSERT INTO tq_job (state, attempt, max_attempts, attempted_at, attempted_by,
                                    created_at, finalized_at, scheduled_at, args, kind, queue)
                SELECT 'completed', 1, 25, t, '{filler}', t, t, t,
                       jsonb_build_object('i', g), 'bench_noop', 'default'
                FROM generate_series(1, %(rows)s) AS g,
                     LATERAL (SELECT now() - (g %% 3600) * interval '1 second' AS t) AS x
                """,
                {"rows": rows},
            )
            conn.execute("VACUUM ANALYZE tq_job")
        return time.perf_counter() - start


@contextlib.contextmanager
def open_server(url: str | None) -> Iterator[Server]:
    url = url or os.environ.get(URL_ENV) or None
    if url is not None:
        yield Server(url, "given URL")
        return
    from trioqueue.embedded import EmbeddedServer

    log("starting a temporary embedded PostgreSQL server")
    with EmbeddedServer(temporary=True) as server:
        yield Server(server.url, "embedded (trioqueue.embedded, temporary, tmpfs if available)")


# ----------------------------------------------------------------------------- peers' venv


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv() -> Path:
    """Create ``benchmarks/.venv-peers`` and install the pinned peers into it (once per
    change of requirements-peers.txt)."""
    python = venv_python()
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = VENV / ".requirements-sha256"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        log(f"creating {VENV.relative_to(ROOT)}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log(f"installing {REQUIREMENTS.relative_to(ROOT)} into {VENV.relative_to(ROOT)}")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(REQUIREMENTS),
        ],
        check=True,
    )
    stamp.write_text(digest + "\n")
    return python


# ----------------------------------------------------------------------------- runners


class RunnerError(RuntimeError):
    pass


@dataclass
class Variant:
    """One configuration of one system, e.g. pgqueuer at batch size 100."""

    name: str
    system: str
    label: str
    command: list[str]
    settings: dict[str, Any]
    measures: tuple[str, ...]
    cwd: Path = ROOT

    def run(self, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
        full = {**self.settings, **spec}
        proc = subprocess.run(
            [*self.command, json.dumps(full)],
            capture_output=True,
            text=True,
            cwd=self.cwd,
            timeout=timeout,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RunnerError(f"{self.label} {spec['command']} exited {proc.returncode}:\n{tail}")
        result: dict[str, Any] = json.loads(lines[-1])
        where = result.get("trioqueue_path")
        if where is not None and not Path(where).is_relative_to(self.cwd):
            raise RunnerError(f"trioqueue was imported from {where}, not from {self.cwd}")
        return result


def make_variants(
    cfg: argparse.Namespace, peers_python: Path | None, trioqueue_src: Path
) -> list[Variant]:
    tq_settings = {
        "max_workers": cfg.max_workers,
        "fetch_cooldown": cfg.fetch_cooldown,
        "fetch_poll_interval": cfg.fetch_poll_interval,
    }
    variants = []
    if "trioqueue" in cfg.only:
        variants.append(
            Variant(
                "trioqueue",
                "trioqueue",
                "trioqueue",
                [sys.executable, "-m", "benchmarks.trioqueue_runner"],
                tq_settings,
                ("process", "single", "latency"),
                cwd=trioqueue_src,
            )
        )
    if peers_python is not None and "pgqueuer" in cfg.only:
        runner = [str(peers_python), str(HERE / "peers" / "pgqueuer_runner.py")]
        base = {"consumers": cfg.pgqueuer_consumers, "loop": cfg.peer_loop}
        variants.append(
            Variant(
                "pgqueuer_b10",
                "pgqueuer",
                "pgqueuer (batch 10)",
                runner,
                {**base, "batch_size": 10},
                ("process", "single", "latency"),
            )
        )
        variants.append(
            Variant(
                "pgqueuer_b100",
                "pgqueuer",
                "pgqueuer (batch 100)",
                runner,
                {**base, "batch_size": 100},
                ("process",),
            )
        )
    if peers_python is not None and "procrastinate" in cfg.only:
        variants.append(
            Variant(
                "procrastinate",
                "procrastinate",
                "procrastinate",
                [str(peers_python), str(HERE / "peers" / "procrastinate_runner.py")],
                {"concurrency": cfg.procrastinate_concurrency, "loop": cfg.peer_loop},
                ("process", "single", "latency"),
            )
        )
    return variants


# ----------------------------------------------------------------------------- measures


@dataclass
class Harness:
    cfg: argparse.Namespace
    server: Server
    variants: list[Variant]
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    background: list[float] = field(default_factory=list)

    def record(self, rnd: int, variant: Variant, measure: str, **values: Any) -> None:
        self.records.append(
            {
                "round": rnd,
                "variant": variant.name,
                "system": variant.system,
                "measure": measure,
                **values,
            }
        )

    def attempt(self, rnd: int, variant: Variant, measure: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except (RunnerError, subprocess.TimeoutExpired, psycopg.Error) as exc:
            log(f"  ! {variant.label} {measure} failed: {exc}")
            self.errors.append(
                {"round": rnd, "variant": variant.name, "measure": measure, "error": str(exc)}
            )
        else:
            log(f"    ({time.perf_counter() - start:.1f} s)")

    def _process_run(
        self, variant: Variant, dbname: str, url: str, jobs: int, **extra: Any
    ) -> dict[str, Any]:
        before = self.server.transactions(dbname)
        out = variant.run({"command": "process", "url": url, "jobs": jobs, **extra})
        after = self.server.transactions(dbname)
        own = out.get("own_transactions", 0)
        out["transactions"] = after - before - own
        return out

    def _enqueue(self, variant: Variant, url: str, jobs: int) -> dict[str, Any]:
        variant.run({"command": "install", "url": url})
        return variant.run(
            {"command": "enqueue", "url": url, "jobs": jobs, "batch": self.cfg.enqueue_batch}
        )

    @staticmethod
    def _process_values(out: dict[str, Any]) -> dict[str, Any]:
        jobs = out["jobs"]
        return {
            "processing_jobs_per_s": jobs / out["seconds"],
            "xact_per_job": out["transactions"] / jobs,
            "transactions": out["transactions"],
            "cpu_us_per_job": out["cpu_seconds"] / jobs * 1e6,
            "worker_rss_peak_mb": out["rss_peak_mb"],
            "startup_s": out["startup_seconds"],
            "jobs": jobs,
            "seconds": out["seconds"],
        }

    def process(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        with self.server.database(variant.name) as (dbname, url):
            enq = self._enqueue(variant, url, n)
            out = self._process_run(variant, dbname, url, n)
        values = self._process_values(out)
        values["batch_enqueue_jobs_per_s"] = enq["jobs"] / enq["seconds"]
        self.record(rnd, variant, "process", **values, versions=out.get("versions"))
        log(
            f"  {variant.label:<22} process {values['processing_jobs_per_s']:>9,.0f} jobs/s"
            f"   batch enqueue {values['batch_enqueue_jobs_per_s']:>9,.0f} jobs/s"
            f"   {values['xact_per_job']:.4f} xact/job"
        )

    def single(self, rnd: int, variant: Variant) -> None:
        with self.server.database(variant.name) as (_, url):
            variant.run({"command": "install", "url": url})
            out = variant.run({"command": "single", "url": url, "jobs": self.cfg.single_inserts})
        rate = out["jobs"] / out["seconds"]
        self.record(rnd, variant, "single", single_enqueue_jobs_per_s=rate)
        log(f"  {variant.label:<22} single insert {rate:>9,.0f} jobs/s")

    def latency(self, rnd: int, variant: Variant) -> None:
        with self.server.database(variant.name) as (_, url):
            variant.run({"command": "install", "url": url})
            out = variant.run(
                {"command": "latency", "url": url, "samples": self.cfg.latency_samples, "seed": rnd}
            )
        ms = sorted(x * 1000 for x in out["samples"])
        values = {
            "latency_p50_ms": quantile(ms, 0.5),
            "latency_p99_ms": quantile(ms, 0.99),
            "latency_max_ms": ms[-1],
            "latency_mean_ms": statistics.fmean(ms),
            "latency_insert_p50_ms": quantile(
                sorted(x * 1000 for x in out.get("insert_samples", [])), 0.5
            ),
        }
        self.record(rnd, variant, "latency", **values, samples_ms=ms)
        log(
            f"  {variant.label:<22} idle latency p50 {values['latency_p50_ms']:.2f} ms,"
            f" p99 {values['latency_p99_ms']:.2f} ms"
        )

    def finalized(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        with self.server.database("finalized") as (dbname, url):
            variant.run({"command": "install", "url": url})
            fill = self.server.fill_finalized(url, self.cfg.finalized_rows)
            variant.run(
                {"command": "enqueue", "url": url, "jobs": n, "batch": self.cfg.enqueue_batch}
            )
            out = self._process_run(variant, dbname, url, n)
        values = self._process_values(out)
        self.record(
            rnd,
            variant,
            "finalized",
            finalized_processing_jobs_per_s=values["processing_jobs_per_s"],
            finalized_xact_per_job=values["xact_per_job"],
            finalized_rows=self.cfg.finalized_rows,
            fill_seconds=fill,
        )
        log(
            f"  {variant.label:<22} with {self.cfg.finalized_rows:,} finalized rows"
            f" {values['processing_jobs_per_s']:>9,.0f} jobs/s (fill {fill:.1f} s)"
        )

    def rss(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.rss_jobs
        with self.server.database("rss") as (dbname, url):
            self._enqueue(variant, url, n)
            out = self._process_run(variant, dbname, url, n)
        values = self._process_values(out)
        self.record(
            rnd,
            variant,
            "rss",
            rss_peak_mb=out["rss_peak_mb"],
            rss_before_mb=out["rss_before_mb"],
            rss_jobs=n,
            rss_processing_jobs_per_s=values["processing_jobs_per_s"],
            rss_xact_per_job=values["xact_per_job"],
        )
        log(
            f"  {variant.label:<22} {n:,} jobs: peak RSS {out['rss_peak_mb']:.0f} MB,"
            f" {values['processing_jobs_per_s']:,.0f} jobs/s"
        )

    def ceiling(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        with self.server.database("ceiling") as (_, url):
            self._enqueue(variant, url, n)
            out = variant.run({"command": "ceiling", "url": url})
        rate = out["jobs"] / out["seconds"]
        self.record(rnd, variant, "ceiling", ceiling_jobs_per_s=rate)
        log(f"  {'database ceiling':<22} {rate:>9,.0f} jobs/s (1000-row claim + update)")

    def sweep(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        for workers in self.cfg.sweep:
            with self.server.database(f"sweep{workers}") as (dbname, url):
                self._enqueue(variant, url, n)
                out = self._process_run(variant, dbname, url, n, max_workers=workers)
            rate = out["jobs"] / out["seconds"]
            self.record(rnd, variant, "sweep", max_workers=workers, sweep_jobs_per_s=rate)
            log(f"  {variant.label:<22} max_workers {workers:>5}: {rate:>9,.0f} jobs/s")

    def run(self) -> None:
        trioqueue = [v for v in self.variants if v.system == "trioqueue"]
        for rnd in range(1, self.cfg.rounds + 1):
            busy = wait_quiet(self.cfg.wait_quiet, self.cfg.quiet_below)
            if busy is not None:
                self.background.append(busy)
            shown = "?" if busy is None else f"{busy:.0%}"
            log(f"round {rnd}/{self.cfg.rounds} (CPU busy with other work: {shown})")
            for measure in ("process", "single", "latency"):
                chosen = [v for v in self.variants if measure in v.measures]
                shift = (rnd - 1) % max(len(chosen), 1)
                for variant in chosen[shift:] + chosen[:shift]:
                    fn = getattr(self, measure)
                    self.attempt(rnd, variant, measure, lambda f=fn, v=variant, r=rnd: f(r, v))
                if measure == "process":
                    for variant in trioqueue:
                        self.attempt(
                            rnd, variant, "finalized", lambda v=variant, r=rnd: self.finalized(r, v)
                        )
            for variant in trioqueue:
                self.attempt(rnd, variant, "ceiling", lambda v=variant, r=rnd: self.ceiling(r, v))
                self.attempt(rnd, variant, "rss", lambda v=variant, r=rnd: self.rss(r, v))
                if self.cfg.plots:
                    self.attempt(rnd, variant, "sweep", lambda v=variant, r=rnd: self.sweep(r, v))


# ----------------------------------------------------------------------------- statistics


def quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list (NaN when empty)."""
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{variant: {metric: summary}} over rounds, for every numeric metric."""
    skip = {"round", "jobs", "seconds", "transactions", "finalized_rows", "rss_jobs"}
    values: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        metrics = values.setdefault(rec["variant"], {})
        for key, value in rec.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key == "sweep_jobs_per_s":
                key = f"sweep_{rec['max_workers']}_jobs_per_s"
            elif key == "max_workers":
                continue
            metrics.setdefault(key, []).append(float(value))
    return {v: {k: summary(xs) for k, xs in m.items()} for v, m in values.items()}


def per_round(records: list[dict[str, Any]], variant: str, metric: str) -> dict[int, float]:
    return {r["round"]: r[metric] for r in records if r["variant"] == variant and metric in r}


def ratio(
    records: list[dict[str, Any]],
    stats: dict[str, dict[str, Any]],
    a: tuple[str, str],
    b: tuple[str, str],
) -> dict[str, Any] | None:
    """Median of ``a`` over median of ``b``, and the range of same-round ratios."""
    try:
        med = stats[a[0]][a[1]]["median"] / stats[b[0]][b[1]]["median"]
    except (KeyError, ZeroDivisionError):
        return None
    ra, rb = per_round(records, *a), per_round(records, *b)
    rounds = [ra[k] / rb[k] for k in sorted(ra) if rb.get(k)]
    return {"median": med, "min": min(rounds, default=med), "max": max(rounds, default=med)}


def evaluate(
    records: list[dict[str, Any]], stats: dict[str, dict[str, Any]], cfg: argparse.Namespace
) -> list[dict[str, Any]]:
    def med(variant: str, metric: str) -> float | None:
        return stats.get(variant, {}).get(metric, {}).get("median")

    out = []
    pairs = {
        "processing": (
            ("trioqueue", "processing_jobs_per_s"),
            ("pgqueuer_b100", "processing_jobs_per_s"),
        ),
        "batch_enqueue": (
            ("trioqueue", "batch_enqueue_jobs_per_s"),
            ("pgqueuer_b10", "batch_enqueue_jobs_per_s"),
        ),
        "single_enqueue": (
            ("trioqueue", "single_enqueue_jobs_per_s"),
            ("pgqueuer_b10", "single_enqueue_jobs_per_s"),
        ),
    }
    values = {
        "latency_p50": med("trioqueue", "latency_p50_ms"),
        "latency_p99": med("trioqueue", "latency_p99_ms"),
        "xact_per_job": med("trioqueue", "xact_per_job"),
        "rss": med("trioqueue", "rss_peak_mb"),
    }
    fin = ratio(
        records,
        stats,
        ("trioqueue", "finalized_processing_jobs_per_s"),
        ("trioqueue", "processing_jobs_per_s"),
    )
    values["finalized"] = fin["median"] if fin else None
    for key, what, kind, goal, op in TARGETS:
        what = what.format(rss_jobs=cfg.rss_jobs, finalized_rows=cfg.finalized_rows)
        entry: dict[str, Any] = {"key": key, "what": what, "goal": goal, "op": op}
        if kind == "ratio":
            a, b = pairs[key]
            entry["trioqueue"] = med(*a)
            entry["peer"] = med(*b)
            r = ratio(records, stats, a, b)
            entry["value"] = r["median"] if r else None
            entry["range"] = [r["min"], r["max"]] if r else None
        else:
            entry["value"] = values[key]
            if key == "finalized" and fin:
                entry["range"] = [fin["min"], fin["max"]]
        v = entry["value"]
        entry["met"] = None if v is None else (v >= goal if op == ">=" else v <= goal)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- reports


def busy_cpu(seconds: float = 1.0) -> float | None:
    """Fraction of the machine's CPU time (all cores) spent busy over ``seconds`` while the
    harness itself is idle: other work on the machine, which skews every number."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1 - (idle1 - idle0) / total, 3) if total > 0 else None


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def snapshot_trioqueue(ref: str | None, into: Path) -> dict[str, Any]:
    """Copy the trioqueue package to measure into ``into`` (with trioqueue's runner), so
    the whole run measures one version even if the working tree changes meanwhile:
    ``git archive REF`` when ``ref`` is given, else the working tree as it is now.
    Returns what was measured: the commit, and the uncommitted changes if any."""
    if ref is not None:
        commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
        if not commit:
            raise SystemExit(f"--ref {ref}: not a commit")
        tar = subprocess.run(
            ["git", "archive", "--format=tar", commit, "trioqueue"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(into, filter="data")
        info: dict[str, Any] = {"commit": commit, "source": f"git archive {ref}"}
        info["trioqueue_uncommitted_changes"] = False
    else:
        shutil.copytree(
            ROOT / "trioqueue",
            into / "trioqueue",
            ignore=shutil.ignore_patterns("__pycache__", ".mypy_cache", "*.pyc"),
        )
        status = git("status", "--porcelain", "--", "trioqueue")
        diff = git("diff", "HEAD", "--", "trioqueue")
        info = {
            "commit": git("rev-parse", "HEAD"),
            "source": "working tree",
            "trioqueue_uncommitted_changes": bool(status),
            "uncommitted_files": [line[3:] for line in status.splitlines()],
            "uncommitted_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16]
            if status
            else None,
        }
    (into / "benchmarks").mkdir()
    for name in ("__init__.py", "trioqueue_runner.py"):
        shutil.copy2(HERE / name, into / "benchmarks" / name)
    return info


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem = round(int(first.split()[1]) / (1 << 20), 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric.endswith("jobs_per_s"):
        return f"{value:,.0f}"
    if metric.endswith("_ms"):
        return f"{value:.2f}"
    if "xact" in metric:
        return f"{value:.4f}"
    if metric.endswith("_mb") or metric.endswith("us_per_job"):
        return f"{value:,.0f}"
    return f"{value:.3g}"


def cell(stats: dict[str, Any] | None, metric: str) -> str:
    if not stats:
        return "-"
    if stats["n"] == 1:
        return fmt(stats["median"], metric)
    return (
        f"{fmt(stats['median'], metric)} ({fmt(stats['min'], metric)}-{fmt(stats['max'], metric)})"
    )


MAIN_ROWS = (
    ("processing_jobs_per_s", "processing no-op jobs (jobs/s)"),
    ("batch_enqueue_jobs_per_s", "batch enqueue (jobs/s)"),
    ("single_enqueue_jobs_per_s", "single enqueue (jobs/s)"),
    ("latency_p50_ms", "idle latency p50 (ms)"),
    ("latency_p99_ms", "idle latency p99 (ms)"),
    ("latency_max_ms", "idle latency max (ms)"),
    ("latency_insert_p50_ms", "of which the insert call, p50 (ms)"),
    ("xact_per_job", "transactions per processed job"),
    ("cpu_us_per_job", "worker CPU per job (µs)"),
    ("worker_rss_peak_mb", "worker peak RSS (MB)"),
)

TRIOQUEUE_ROWS = (
    ("finalized_processing_jobs_per_s", "processing with {finalized_rows} finalized rows (jobs/s)"),
    ("rss_peak_mb", "peak RSS working {rss_jobs} queued jobs (MB)"),
    ("rss_before_mb", "RSS before the client opened (MB)"),
    ("rss_processing_jobs_per_s", "processing {rss_jobs} jobs (jobs/s)"),
    ("ceiling_jobs_per_s", "database ceiling: 1000-row claim + update, raw SQL (jobs/s)"),
)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    stats = report["stats"]
    variants = report["variants"]
    lines = [
        f"# trioqueue benchmark, {report['started_at']}",
        "",
        f"Command: `{report['command']}`  ",
        f"trioqueue measured: commit `{report['git']['commit'][:12]}`"
        f" ({report['git'].get('source', 'working tree')})"
        + (
            " plus uncommitted changes to "
            + ", ".join(report["git"].get("uncommitted_files", []))
            + f" (diff sha256 {report['git'].get('uncommitted_diff_sha256')})"
            if report["git"]["trioqueue_uncommitted_changes"]
            else ""
        )
        + "  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB, {report['machine']['os']}, "
        f"Python {report['machine']['python']}  ",
        f"PostgreSQL {report['server']['server_version']} ({report['server']['where']}; "
        f"fsync {report['server']['fsync']}, synchronous_commit "
        f"{report['server']['synchronous_commit']}, shared_buffers "
        f"{report['server']['shared_buffers']})  ",
        f"Rounds: {cfg['rounds']} (interleaved); jobs per run: {cfg['jobs']:,}; "
        f"single inserts: {cfg['single_inserts']:,}; latency samples: {cfg['latency_samples']}"
        f" per round; duration {report['duration_s'] / 60:.1f} min",
        "",
        f"CPU busy with other work, measured for 1 s before each round: "
        f"{background_line(report['background_cpu_busy'])}",
        "",
        "Cells: median over rounds (min-max).",
        "",
        "## Targets",
        "",
        "| target | trioqueue | peer | result | goal | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for t in report["targets"]:
        value = t["value"]
        if t["key"] in ("processing", "batch_enqueue", "single_enqueue"):
            result = "-" if value is None else f"{value:.2f}x"
            if t.get("range") and cfg["rounds"] > 1:
                result += f" ({t['range'][0]:.2f}-{t['range'][1]:.2f})"
            tq = fmt(t.get("trioqueue"), "jobs_per_s")
            peer = fmt(t.get("peer"), "jobs_per_s")
            goal = f"≥ {t['goal']}x"
        else:
            tq = peer = ""
            if value is None:
                result = "-"
            elif t["key"] == "finalized":
                result = f"{value:.2f}"
                if t.get("range") and cfg["rounds"] > 1:
                    result += f" ({t['range'][0]:.2f}-{t['range'][1]:.2f})"
            elif t["key"] == "xact_per_job":
                result = f"{value:.4f}"
            else:
                result = f"{value:.2f}"
            goal = f"{'≥' if t['op'] == '>=' else '≤'} {t['goal']}"
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['what']} | {tq} | {peer} | {result} | {goal} | {met} |")
    lines += ["", "## All systems", ""]
    header = "| measure | " + " | ".join(v["label"] for v in variants) + " |"
    lines += [header, "|---|" + "---:|" * len(variants)]
    for metric, title in MAIN_ROWS:
        row = [cell(stats.get(v["name"], {}).get(metric), metric) for v in variants]
        if all(c == "-" for c in row):
            continue
        lines.append(f"| {title} | " + " | ".join(row) + " |")
    tq = stats.get("trioqueue", {})
    if tq:
        lines += ["", "## trioqueue only", "", "| measure | median (min-max) |", "|---|---:|"]
        for metric, title in TRIOQUEUE_ROWS:
            if metric in tq:
                name = title.format(
                    finalized_rows=f"{cfg['finalized_rows']:,}", rss_jobs=f"{cfg['rss_jobs']:,}"
                )
                lines.append(f"| {name} | {cell(tq[metric], metric)} |")
        sweep = sorted((int(k.split("_")[1]), k) for k in tq if k.startswith("sweep_"))
        for workers, key in sweep:
            lines.append(f"| processing at max_workers={workers} (jobs/s) | {cell(tq[key], key)} |")
    lines += ["", "## Settings", ""]
    for v in variants:
        shown = ", ".join(f"{k} {x}" for k, x in v["versions"].items())
        lines.append(f"- **{v['label']}** ({shown}): `{json.dumps(v['settings'])}`")
    if report["errors"]:
        lines += ["", "## Errors", ""]
        for e in report["errors"]:
            first = e["error"].splitlines()[0] if e["error"] else ""
            lines.append(f"- round {e['round']} {e['variant']} {e['measure']}: {first}")
    return "\n".join(lines) + "\n"


def wait_quiet(max_seconds: float, below: float) -> float | None:
    """Wait up to ``max_seconds`` until other work keeps less than ``below`` of the CPU
    busy; return the last reading (the harness is idle meanwhile)."""
    deadline = time.monotonic() + max_seconds
    busy = busy_cpu()
    while busy is not None and busy >= below and time.monotonic() < deadline:
        log(f"  waiting for a quieter machine: CPU {busy:.0%} busy with other work")
        time.sleep(4)
        busy = busy_cpu()
    return busy


def background_line(busy: list[float]) -> str:
    if not busy:
        return "unknown"
    return ", ".join(f"{b:.0%}" for b in busy) + " of all cores"


def console_table(report: dict[str, Any]) -> str:
    out = []
    for t in report["targets"]:
        value = t["value"]
        shown = "-" if value is None else (f"{value:.4f}" if value < 0.1 else f"{value:.2f}")
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        out.append(f"  {t['what']:<52} {shown:>10}  goal {t['op']} {t['goal']:<5} {met}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small N and 1 round (defaults below become 2000 jobs, 200 single "
        "inserts, 30 latency samples, 5000 RSS jobs, 20000 finalized rows)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=SYSTEMS,
        help="run only this system (repeatable); default: all three",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help=f"a server to create databases on (default: ${URL_ENV}, else a "
        "temporary embedded server)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--jobs", type=int, default=None, help="jobs per processing run (20000)")
    p.add_argument("--single-inserts", type=int, default=None, help="(default 2000)")
    p.add_argument("--latency-samples", type=int, default=None, help="per round (default 300)")
    p.add_argument("--rss-jobs", type=int, default=None, help="(default 100000)")
    p.add_argument("--finalized-rows", type=int, default=None, help="(default 1000000)")
    p.add_argument("--enqueue-batch", type=int, default=1000, help="jobs per batch enqueue call")
    p.add_argument("--max-workers", type=int, default=1000, help="trioqueue (default 1000)")
    p.add_argument("--fetch-cooldown", type=float, default=0.002, help="trioqueue (0.002)")
    p.add_argument("--fetch-poll-interval", type=float, default=0.05, help="trioqueue (0.05)")
    p.add_argument(
        "--pgqueuer-consumers",
        type=int,
        default=1,
        help="QueueManagers (one connection each) in pgqueuer's process (1)",
    )
    p.add_argument(
        "--procrastinate-concurrency",
        type=int,
        default=10,
        help="procrastinate worker concurrency (10)",
    )
    p.add_argument(
        "--peer-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the peers (default uvloop)",
    )
    p.add_argument(
        "--plots",
        action="store_true",
        help=f"also sweep trioqueue's max_workers and write PNGs to {PLOTS_DIR.relative_to(ROOT)}/",
    )
    p.add_argument(
        "--sweep",
        default=",".join(map(str, SWEEP)),
        help="max_workers values of the sweep (default %(default)s)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each round, wait up to this long until other work keeps less than "
        "--quiet-below of the CPU busy (default 0: do not wait)",
    )
    p.add_argument("--quiet-below", type=float, default=0.15, help=argparse.SUPPRESS)
    p.add_argument(
        "--ref",
        default=None,
        help="measure trioqueue as of this git commit (git archive) instead of the "
        "working tree; either way the code is copied once at the start",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--plots-dir", type=Path, default=PLOTS_DIR, help=argparse.SUPPRESS)
    cfg = p.parse_args(argv)
    quick = cfg.quick
    defaults = {
        "rounds": (1, 3),
        "jobs": (2000, 20_000),
        "single_inserts": (200, 2000),
        "latency_samples": (30, 300),
        "rss_jobs": (5000, 100_000),
        "finalized_rows": (20_000, 1_000_000),
    }
    for name, (small, full) in defaults.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, small if quick else full)
    cfg.only = tuple(cfg.only or SYSTEMS)
    cfg.sweep = tuple(int(x) for x in cfg.sweep.split(",") if x)
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # A SIGTERM unwinds like an exception, so the databases and the embedded server go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    needs_venv = any(s != "trioqueue" for s in cfg.only) or cfg.plots
    peers_python = ensure_venv() if needs_venv else None
    with (
        tempfile.TemporaryDirectory(prefix="tqbench-src-") as src,
        open_server(cfg.database_url) as server,
    ):
        code = snapshot_trioqueue(cfg.ref, Path(src))
        log(
            f"measuring trioqueue from {code['source']} at {code['commit'][:12]}"
            + (" plus uncommitted changes" if code["trioqueue_uncommitted_changes"] else "")
        )
        settings = server.settings()
        variants = make_variants(cfg, peers_python, Path(src))
        harness = Harness(cfg, server, variants)
        harness.run()
    stats = aggregate(harness.records)
    versions: dict[str, Any] = {}
    for rec in harness.records:
        if rec.get("versions"):
            versions.setdefault(rec["variant"], rec["versions"])
    report = {
        "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "duration_s": time.monotonic() - started,
        "git": code,
        "machine": machine_info(),
        "server": {**settings, "where": server.where},
        "config": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(cfg).items()
            if k not in ("out", "plots_dir")
        },
        "variants": [
            {
                "name": v.name,
                "system": v.system,
                "label": v.label,
                "settings": v.settings,
                "versions": versions.get(v.name, {}),
            }
            for v in variants
        ],
        "targets": evaluate(harness.records, stats, cfg),
        "stats": stats,
        "records": harness.records,
        "errors": harness.errors,
        "background_cpu_busy": harness.background,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = started_at.strftime("%Y%m%dT%H%M%SZ") + ("-quick" if cfg.quick else "")
    json_path = cfg.out / f"{stem}.json"
    md_path = cfg.out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    if cfg.plots:
        python = venv_python()
        cfg.plots_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(python), str(HERE / "plots.py"), str(json_path), str(cfg.plots_dir)],
            check=True,
        )
        log(f"plots written to {cfg.plots_dir}")
    log("")
    log(console_table(report))
    log(f"\nwrote {json_path} and {md_path} in {report['duration_s'] / 60:.1f} min")
    return 1 if harness.errors else 0


if __name__ == "__main__":
    sys.exit(main())
