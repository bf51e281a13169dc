"""The machine the benchmarks run on: what it is, and how busy other work keeps it."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

from .common import log


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
