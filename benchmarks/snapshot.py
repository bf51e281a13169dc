"""The trioqueue code measured: one copy taken at the start (the working tree, or a commit
with ``--ref``), so the whole run measures one version."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from .common import HERE, ROOT


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
    for name in ("__init__.py", "trioqueue_runner.py", "limits_runner.py"):
        shutil.copy2(HERE / name, into / "benchmarks" / name)
    return info
