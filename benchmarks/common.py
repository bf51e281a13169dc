"""What every part of the benchmark harness shares: where things are, the systems it
compares, and how it reports progress (on stderr)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
VENV = HERE / ".venv-peers"
REQUIREMENTS = HERE / "requirements-peers.txt"
PLOTS_DIR = ROOT / "docs" / "benchmarks"
URL_ENV = "TRIOQUEUE_BENCH_DATABASE_URL"
SYSTEMS = ("trioqueue", "pgqueuer", "procrastinate")
SWEEP = (10, 100, 500, 1000, 2000)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
