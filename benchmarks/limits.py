"""Flow control benchmark: trioqueue with global and rate limits, next to the same work
with no limit, in interleaved rounds.

    python -m benchmarks.limits                  # full: all scenarios, 3 rounds (5-8 min)
    python -m benchmarks.limits --quick          # small sizes, 1 round
    python -m benchmarks.limits --scenario rate --database-url postgresql://...

Scenarios (issue 16's performance targets):

- processing: the same queued no-op jobs (spread over ``--customers`` customers) worked
  with no limit, with a global limit that never binds (``GlobalLimit(--nobind-limit)``),
  and with a limit per customer (``GlobalLimit(--partition-limit, by_args=("customer",))``).
  Targets: never-binding limit within 10 % of no limit; partitions at least 70 % of it.
- rate: a backlog larger than the rate lets start, worked under ``RateLimit(--rate-limit,
  per=--rate-per)`` for ``--rate-seconds``; the achieved rate is read from the jobs'
  ``attempted_at``. Target: within 5 % of the configured rate (and never over the limit
  in any window).
- fairness: one customer's bulk backlog is queued, the worker starts, and once it has
  started a twentieth of it every other customer inserts a few jobs; each job's wait
  (insert to start), per customer, with no limit and with a limit per customer; and the
  bulk's backlog at that moment, and how fast it went on.

Every measurement is a subprocess (``benchmarks/limits_runner.py``) on a fresh database of
one server: ``--database-url``, else ``$TRIOQUEUE_BENCH_DATABASE_URL``, else a temporary
embedded one. Within a round the variants of a scenario run in an order rotated from round
to round. Results: ``<out>/<timestamp>-limits.json`` (every record, medians, same-round
ratios, targets) and ``.md``; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .common import HERE, URL_ENV, log
from .limits_report import console_table, evaluate, markdown, summarize
from .machine import machine_info, wait_quiet
from .server import Server, open_server
from .snapshot import snapshot_trioqueue
from .variants import RunnerError, Variant

SCENARIOS = ("processing", "fairness", "rate")

# Sizes: (--quick, full). The full ones are meant to make one run of every scenario take
# 5-8 minutes on 2 cores (the rate scenario alone is rounds x --rate-seconds, 3 minutes).
SIZES = {
    "rounds": (1, 3),
    "jobs": (5_000, 50_000),
    "rate_seconds": (5.0, 60.0),
    "fair_bulk": (2_000, 10_000),
    "fair_drain_seconds": (5.0, 20.0),
}


@dataclass(frozen=True)
class Case:
    """One configuration of one scenario: a name, a label for the tables, the limits."""

    scenario: str
    name: str
    label: str
    limits: dict[str, Any] | None


def make_cases(cfg: argparse.Namespace) -> dict[str, list[Case]]:
    per_customer = {"global": {"limit": cfg.partition_limit, "by_args": ["customer"]}}
    fair = {"global": {"limit": cfg.fair_limit, "by_args": ["customer"]}}
    return {
        "processing": [
            Case("processing", "unlimited", "no limit", None),
            Case(
                "processing",
                "nobind",
                f"GlobalLimit({cfg.nobind_limit:,})",
                {"global": {"limit": cfg.nobind_limit}},
            ),
            Case(
                "processing",
                "partitioned",
                f"{cfg.customers} partitions x GlobalLimit({cfg.partition_limit})",
                per_customer,
            ),
        ],
        "fairness": [
            Case("fairness", "unlimited", "no limit", None),
            Case(
                "fairness",
                "partitioned",
                f"GlobalLimit({cfg.fair_limit}, by_args=('customer',))",
                fair,
            ),
        ],
        "rate": [
            Case(
                "rate",
                "rate",
                f"RateLimit({cfg.rate_limit:,}, per={cfg.rate_per:g})",
                {"rate": {"limit": cfg.rate_limit, "per": cfg.rate_per}},
            )
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.limits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); default: all",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and 1 round (5,000 jobs, a 5 s rate run, a 2,000-job bulk "
        "drained for at most 5 s)",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help=f"a server to create databases on (default: ${URL_ENV}, else a temporary "
        "embedded server)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3)")
    p.add_argument("--jobs", type=int, default=None, help="jobs per processing run (50000)")
    p.add_argument("--customers", type=int, default=100, help="processing: customers (100)")
    p.add_argument(
        "--partition-limit", type=int, default=5, help="processing: limit per customer (5)"
    )
    p.add_argument(
        "--nobind-limit", type=int, default=10_000, help="processing: the limit that never binds"
    )
    p.add_argument("--rate-limit", type=int, default=1000, help="rate: starts per window (1000)")
    p.add_argument("--rate-per", type=float, default=1.0, help="rate: window in seconds (1)")
    p.add_argument("--rate-seconds", type=float, default=None, help="rate: measured for (60)")
    p.add_argument(
        "--rate-backlog",
        type=int,
        default=None,
        help="rate: jobs queued (default: 1.15 x what the rate lets start, plus 3 windows)",
    )
    p.add_argument("--fair-bulk", type=int, default=None, help="fairness: bulk jobs (10000)")
    p.add_argument(
        "--fair-customers", type=int, default=50, help="fairness: customers, the bulk's included"
    )
    p.add_argument(
        "--fair-jobs", type=int, default=20, help="fairness: jobs of each other customer (20)"
    )
    p.add_argument("--fair-limit", type=int, default=5, help="fairness: limit per customer (5)")
    p.add_argument(
        "--fair-arrive-after",
        type=int,
        default=None,
        help="fairness: bulk jobs started before the others insert (default: a twentieth)",
    )
    p.add_argument(
        "--fair-drain-seconds",
        type=float,
        default=None,
        help="fairness: once the others' jobs have started, wait at most this long from "
        "their arrival for the bulk's backlog to drain (20)",
    )
    p.add_argument(
        "--job-ms", type=float, default=0.0, help="milliseconds each job sleeps (0: no-op)"
    )
    p.add_argument("--max-workers", type=int, default=1000, help="worker slots (1000)")
    p.add_argument("--fetch-cooldown", type=float, default=0.002, help="(0.002)")
    p.add_argument("--fetch-poll-interval", type=float, default=0.05, help="(0.05)")
    p.add_argument("--enqueue-batch", type=int, default=1000, help="jobs per insert_many_fast")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="give up on one run after this long (300)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each round, wait up to this long until other work keeps less than "
        "15%% of the CPU busy (default 0: do not wait)",
    )
    p.add_argument(
        "--ref",
        default=None,
        help="measure trioqueue as of this git commit instead of the working tree",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    cfg = p.parse_args(argv)
    for name, (small, full) in SIZES.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, small if cfg.quick else full)
    cfg.scenario = tuple(s for s in SCENARIOS if s in (cfg.scenario or SCENARIOS))
    if cfg.rate_backlog is None:
        lets_start = cfg.rate_limit / cfg.rate_per * cfg.rate_seconds
        cfg.rate_backlog = int(lets_start * 1.15) + 3 * cfg.rate_limit
    if cfg.fair_arrive_after is None:
        cfg.fair_arrive_after = max(1, cfg.fair_bulk // 20)
    for name in ("rounds", "jobs", "customers", "rate_backlog", "fair_bulk", "fair_jobs"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.fair_customers < 2:
        p.error("--fair-customers must be at least 2 (the bulk customer and another)")
    if cfg.rate_seconds < 1:
        p.error("--rate-seconds must be at least 1")
    return cfg


@dataclass
class LimitsBench:
    cfg: argparse.Namespace
    server: Server
    runner: Variant
    cases: dict[str, list[Case]]
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    background: list[float] = field(default_factory=list)

    def record(self, rnd: int, case: Case, **values: Any) -> None:
        self.records.append(
            {"round": rnd, "scenario": case.scenario, "variant": case.name, **values}
        )

    def _run(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.runner.run(spec, timeout=self.cfg.max_seconds + 120)

    def processing(self, rnd: int, case: Case) -> None:
        n = self.cfg.jobs
        with self.server.database(f"lim_{case.name}") as (dbname, url):
            enq = self._run(
                {
                    "command": "enqueue",
                    "url": url,
                    "install": True,
                    "jobs": n,
                    "customers": self.cfg.customers,
                    "batch": self.cfg.enqueue_batch,
                    "limits": case.limits,
                }
            )
            before = self.server.transactions(dbname)
            out = self._run(
                {
                    "command": "process",
                    "url": url,
                    "jobs": n,
                    "limits": case.limits,
                    "max_seconds": self.cfg.max_seconds,
                }
            )
            transactions = self.server.transactions(dbname) - before - out["own_transactions"]
        values = {
            "processing_jobs_per_s": out["jobs"] / out["seconds"],
            "batch_enqueue_jobs_per_s": enq["jobs"] / enq["seconds"],
            "xact_per_job": transactions / out["jobs"],
            "cpu_us_per_job": out["cpu_seconds"] / out["jobs"] * 1e6,
            "startup_s": out["startup_seconds"],
            "jobs": out["jobs"],
            "failed": out["failed"],
            "seconds": out["seconds"],
        }
        self.record(rnd, case, **values, versions=out.get("versions"))
        log(
            f"  processing {case.label:<36} {values['processing_jobs_per_s']:>9,.0f} jobs/s"
            f"   {values['xact_per_job']:.4f} xact/job"
        )

    def rate(self, rnd: int, case: Case) -> None:
        with self.server.database("lim_rate") as (_, url):
            self._run(
                {
                    "command": "enqueue",
                    "url": url,
                    "install": True,
                    "jobs": self.cfg.rate_backlog,
                    "batch": self.cfg.enqueue_batch,
                    "limits": case.limits,
                }
            )
            out = self._run(
                {
                    "command": "rate",
                    "url": url,
                    "seconds": self.cfg.rate_seconds,
                    "limits": case.limits,
                }
            )
        configured = self.cfg.rate_limit / self.cfg.rate_per
        self.record(
            rnd,
            case,
            achieved_per_s=out["achieved_per_s"],
            achieved_ratio=out["achieved_per_s"] / configured,
            max_in_any_window=out["max_in_any_window"],
            starts_in_window=out["starts_in_window"],
            backlog_left=out["backlog_left"],
            per_second=out["per_second"],
            versions=out.get("versions"),
        )
        log(
            f"  rate {case.label:<42} {out['achieved_per_s']:>9,.1f} starts/s over"
            f" {self.cfg.rate_seconds:g} s (configured {configured:,.1f});"
            f" most in any {self.cfg.rate_per:g} s window {out['max_in_any_window']:,}"
            + ("" if out["backlog_left"] else "   ! the backlog ran out")
        )

    def fairness(self, rnd: int, case: Case) -> None:
        with self.server.database(f"lim_fair_{case.name}") as (_, url):
            out = self._run(
                {
                    "command": "fairness",
                    "url": url,
                    "install": True,
                    "bulk_jobs": self.cfg.fair_bulk,
                    "customers": self.cfg.fair_customers,
                    "jobs_per_customer": self.cfg.fair_jobs,
                    "arrive_after": self.cfg.fair_arrive_after,
                    "drain_seconds": self.cfg.fair_drain_seconds,
                    "batch": self.cfg.enqueue_batch,
                    "limits": case.limits,
                    "max_seconds": self.cfg.max_seconds,
                }
            )
        keys = (
            "others_worst_wait_ms",
            "others_median_worst_wait_ms",
            "bulk_worst_wait_ms",
            "bulk_backlog_at_arrival",
            "bulk_started_after_arrival",
            "bulk_left_at_end",
            "bulk_drain_after_arrival_ms",
            "bulk_jobs_per_s_after_arrival",
            "worst_wait_ms_by_customer",
        )
        values = {k: out[k] for k in keys}
        worst = out["others_worst_wait_ms"]
        drain = out["bulk_drain_after_arrival_ms"]
        rate = out["bulk_jobs_per_s_after_arrival"]
        # How long the bulk's backlog took to start: measured when it drained in the run,
        # else estimated from its rate since the others came.
        values["bulk_backlog_estimated"] = drain is None
        if drain is None and rate:
            drain = out["bulk_backlog_at_arrival"] / rate * 1000
        values["bulk_backlog_ms"] = drain
        values["others_wait_share_of_backlog"] = worst / drain if worst and drain else None
        self.record(rnd, case, **values, versions=out.get("versions"))
        log(
            f"  fairness {case.label:<38} other customers' worst wait {worst or 0:,.1f} ms;"
            f" bulk backlog at their arrival {out['bulk_backlog_at_arrival']:,} jobs"
            + (f", started within {drain:,.1f} ms" if drain is not None else "")
            + (" (estimated)" if values["bulk_backlog_estimated"] and drain else "")
            + (f", {rate:,.0f} jobs/s" if rate else "")
            + (f", {out['bulk_left_at_end']:,} left" if out["bulk_left_at_end"] else "")
        )

    def attempt(self, rnd: int, case: Case) -> None:
        start = time.perf_counter()
        try:
            getattr(self, case.scenario)(rnd, case)
        except (RunnerError, subprocess.TimeoutExpired, psycopg.Error) as exc:
            log(f"  ! {case.scenario} {case.label} failed: {exc}")
            self.errors.append(
                {
                    "round": rnd,
                    "scenario": case.scenario,
                    "variant": case.name,
                    "error": str(exc),
                }
            )
        else:
            log(f"    ({time.perf_counter() - start:.1f} s)")

    def run(self) -> None:
        for rnd in range(1, self.cfg.rounds + 1):
            busy = wait_quiet(self.cfg.wait_quiet, 0.15)
            if busy is not None:
                self.background.append(busy)
            shown = "?" if busy is None else f"{busy:.0%}"
            log(f"round {rnd}/{self.cfg.rounds} (CPU busy with other work: {shown})")
            for scenario in self.cfg.scenario:
                chosen = self.cases[scenario]
                shift = (rnd - 1) % len(chosen)
                for case in chosen[shift:] + chosen[:shift]:
                    self.attempt(rnd, case)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    command = "python -m benchmarks.limits " + " ".join(sys.argv[1:] if argv is None else argv)
    cases = make_cases(cfg)
    settings = {
        "max_workers": cfg.max_workers,
        "fetch_cooldown": cfg.fetch_cooldown,
        "fetch_poll_interval": cfg.fetch_poll_interval,
        "job_seconds": cfg.job_ms / 1000,
    }
    with (
        tempfile.TemporaryDirectory(prefix="tqbench-src-") as src,
        open_server(cfg.database_url) as server,
    ):
        code = snapshot_trioqueue(cfg.ref, Path(src))
        log(
            f"measuring trioqueue from {code['source']} at {code['commit'][:12]}"
            + (" plus uncommitted changes" if code["trioqueue_uncommitted_changes"] else "")
        )
        runner = Variant(
            "trioqueue",
            "trioqueue",
            "trioqueue",
            [sys.executable, "-m", "benchmarks.limits_runner"],
            settings,
            SCENARIOS,
            cwd=Path(src),
        )
        bench = LimitsBench(cfg, server, runner, cases)
        server_settings = server.settings()
        bench.run()
    stats = summarize(bench.records)
    report: dict[str, Any] = {
        "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command.strip(),
        "duration_s": time.monotonic() - started,
        "git": code,
        "machine": machine_info(),
        "server": {**server_settings, "where": server.where},
        "config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items() if k != "out"
        },
        "settings": settings,
        "cases": {
            s: [{"name": c.name, "label": c.label, "limits": c.limits} for c in cs]
            for s, cs in cases.items()
            if s in cfg.scenario
        },
        "versions": next((r["versions"] for r in bench.records if r.get("versions")), {}),
        "stats": stats,
        "records": bench.records,
        "errors": bench.errors,
        "background_cpu_busy": bench.background,
    }
    report["targets"] = evaluate(bench.records, stats, report["config"])
    cfg.out.mkdir(parents=True, exist_ok=True)
    stem = started_at.strftime("%Y%m%dT%H%M%SZ") + "-limits" + ("-quick" if cfg.quick else "")
    json_path = cfg.out / f"{stem}.json"
    md_path = cfg.out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    log("")
    log(console_table(report))
    log(f"\nwrote {json_path} and {md_path} in {report['duration_s'] / 60:.1f} min")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
