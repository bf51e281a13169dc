"""The configurations measured (a system with its settings, e.g. pgqueuer at batch size
100), each run as a subprocess that prints one JSON result line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import HERE, ROOT


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
