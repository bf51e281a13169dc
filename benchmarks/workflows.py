"""Workflow benchmark: diamonds next to the same jobs without deps, and a wide fan-in, in
interleaved rounds.

    python -m benchmarks.workflows                       # 3 rounds on a temporary embedded server
    python -m benchmarks.workflows --database-url postgresql://root@127.0.0.1:5432/postgres
    python -m benchmarks.workflows --quick               # small sizes, 1 round

Issue 17's targets:

- ``--diamonds`` diamond workflows (4 tasks: a; b and c after a; d after both): jobs per
  second at least 70 % of the same number of jobs without deps, worked by the same client
  settings (the ratio is taken within each round, then the median).
- a fan-out of ``--deps`` tasks with one fan-in task depending on all: the fan-in starts
  within 1 s of the last dep's completion.

Each measurement is a process of its own (``benchmarks/workflows_runner.py``) on a fresh
database. Within a round the diamonds and the plain jobs run in an order that alternates
from round to round. Results: ``<out>/<timestamp>-workflows.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import HERE, log
from .machine import busy_cpu, machine_info
from .server import Server, open_server

ROOT = HERE.parent


def _run(server: Server, label: str, spec: dict[str, Any]) -> dict[str, Any]:
    with server.database(label) as (_, url):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.workflows_runner", json.dumps({**spec, "url": url})],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# Workflow benchmark, {report['at']}",
        "",
        f"Server: {report['server']['where']}; fsync={report['server']['settings']['fsync']}, "
        f"synchronous_commit={report['server']['settings']['synchronous_commit']}. "
        f"Machine: {report['machine']['cores']} cores. Rounds: {report['rounds']}. "
        f"CPU busy with other work before the run: {report['busy_before']}.",
        "",
        "| measurement | median | per round |",
        "|---|---|---|",
        f"| {report['diamonds']} diamonds, jobs/s | {s['diamonds_jps']:.0f} | "
        + ", ".join(f"{r['diamonds']['jobs_per_second']:.0f}" for r in report["records"])
        + " |",
        f"| same {4 * report['diamonds']} jobs without deps, jobs/s | {s['plain_jps']:.0f} | "
        + ", ".join(f"{r['plain']['jobs_per_second']:.0f}" for r in report["records"])
        + " |",
        f"| ratio (same round) | {s['ratio']:.2f} (target ≥ 0.70) | "
        + ", ".join(f"{x:.2f}" for x in s["ratios"])
        + " |",
        f"| fan-in of {report['deps']} deps: start after the last dep, ms | "
        f"{1000 * s['fan_in_delay']:.0f} (target ≤ 1000) | "
        + ", ".join(f"{1000 * r['fanin']['fan_in_delay_seconds']:.0f}" for r in report["records"])
        + " |",
        f"| fan-in workflow: insert s / work s | {s['fanin_insert']:.2f} / "
        f"{s['fanin_work']:.2f} | |",
        f"| diamonds: insert s (one insert_workflow each) | {s['diamonds_insert']:.2f} | |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--diamonds", type=int, default=1000)
    parser.add_argument("--deps", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.diamonds, args.deps = 1, 100, 500
    busy = busy_cpu()
    records = []
    with open_server(args.database_url) as server:
        for r in range(args.rounds):
            record: dict[str, Any] = {}
            order = ["diamonds", "plain"] if r % 2 == 0 else ["plain", "diamonds"]
            for name in order:
                log(f"round {r + 1}: {name}")
                record[name] = _run(server, name, {"command": name, "diamonds": args.diamonds})
            log(f"round {r + 1}: fanin")
            record["fanin"] = _run(server, "fanin", {"command": "fanin", "deps": args.deps})
            records.append(record)
            log(f"  {json.dumps(record)}")
        settings = server.settings()
        where = server.where
    ratios = [r["diamonds"]["jobs_per_second"] / r["plain"]["jobs_per_second"] for r in records]
    med = statistics.median
    report = {
        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "server": {"where": where, "settings": settings},
        "machine": machine_info(),
        "busy_before": busy,
        "rounds": args.rounds,
        "diamonds": args.diamonds,
        "deps": args.deps,
        "records": records,
        "summary": {
            "diamonds_jps": med(r["diamonds"]["jobs_per_second"] for r in records),
            "plain_jps": med(r["plain"]["jobs_per_second"] for r in records),
            "ratios": ratios,
            "ratio": med(ratios),
            "fan_in_delay": med(r["fanin"]["fan_in_delay_seconds"] for r in records),
            "fanin_insert": med(r["fanin"]["insert_seconds"] for r in records),
            "fanin_work": med(r["fanin"]["seconds"] for r in records),
            "diamonds_insert": med(r["diamonds"]["insert_seconds"] for r in records),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-workflows")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    text = _markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
