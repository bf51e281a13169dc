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
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import HERE, PLOTS_DIR, ROOT, SWEEP, SYSTEMS, URL_ENV, log
from .harness import Harness
from .machine import machine_info
from .peers_venv import ensure_venv, venv_python
from .report import console_table, markdown
from .server import open_server
from .snapshot import snapshot_trioqueue
from .stats import aggregate, evaluate
from .variants import make_variants

# The command line and the run's outline. The parts: common.py (paths, systems, logging),
# server.py (the server and its databases), peers_venv.py, variants.py (what is measured),
# harness.py (the measures and rounds), stats.py (statistics and targets), machine.py,
# snapshot.py (the code measured), report.py (markdown and console output).


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
