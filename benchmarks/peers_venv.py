"""The peers' own virtual environment, ``benchmarks/.venv-peers``: created and filled from
``requirements-peers.txt`` on first use, refreshed when that file changes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from .common import REQUIREMENTS, ROOT, VENV, log


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
