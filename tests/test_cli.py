"""The `trioqueue` command as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, env_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TRIOQUEUE_DATABASE_URL", None)
    if env_url is not None:
        env["TRIOQUEUE_DATABASE_URL"] = env_url
    return subprocess.run(
        [sys.executable, "-m", "trioqueue.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_migrate_up_list_down(empty_database_url: str) -> None:
    first = _run("migrate", "--database-url", empty_database_url)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    again = _run("migrate", "up", "--database-url", empty_database_url)
    assert again.returncode == 0 and "up to date" in again.stdout
    listed = _run("migrate", "list", env_url=empty_database_url)
    assert listed.returncode == 0
    assert "001 initial" in listed.stdout and "applied" in listed.stdout
    down = _run("migrate", "down", "--database-url", empty_database_url)
    assert down.returncode == 0 and "reverted" in down.stdout
    listed = _run("migrate", "list", "--database-url", empty_database_url)
    assert "pending" in listed.stdout


def test_unreachable_database_is_a_clean_error() -> None:
    result = _run("migrate", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 2
    assert "error" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_to_completion(database_url: str) -> None:
    result = _run("demo", "--jobs", "300", "--database-url", database_url)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "jobs worked      300" in result.stdout
    assert "start latency" in result.stdout
    assert "final states" in result.stdout
    assert "completed" in result.stdout
