"""Tiny-N smoke runs of the benchmark harness and of ``trioqueue bench``, so both keep working.

Only trioqueue's side of the harness runs here (``--only trioqueue``: the peers' virtual
environment is never created), on the test server. Nothing about speed is asserted; only
that every measure ran and the JSON and markdown reports have their shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRIOQUEUE_DATABASE_URL", None)
    env.pop("TRIOQUEUE_BENCH_DATABASE_URL", None)
    return env


@pytest.mark.timeout(300)
def test_harness_trioqueue_only_tiny_run(pg_server_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--only",
            "trioqueue",
            "--rounds",
            "1",
            "--jobs",
            "200",
            "--single-inserts",
            "20",
            "--latency-samples",
            "20",
            "--rss-jobs",
            "300",
            "--finalized-rows",
            "1000",
            "--database-url",
            pg_server_url,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert ".venv-peers" not in result.stderr  # no peers were installed

    [json_path] = tmp_path.glob("*.json")
    [md_path] = tmp_path.glob("*.md")
    report = json.loads(json_path.read_text())
    assert report["errors"] == []
    assert [v["name"] for v in report["variants"]] == ["trioqueue"]
    assert {t["key"] for t in report["targets"]} == {
        "processing",
        "batch_enqueue",
        "single_enqueue",
        "latency_p50",
        "latency_p99",
        "xact_per_job",
        "rss",
        "finalized",
    }
    stats = report["stats"]["trioqueue"]
    for metric in (
        "processing_jobs_per_s",
        "batch_enqueue_jobs_per_s",
        "single_enqueue_jobs_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "xact_per_job",
        "rss_peak_mb",
        "finalized_processing_jobs_per_s",
        "ceiling_jobs_per_s",
    ):
        assert stats[metric]["n"] == 1, metric
        assert stats[metric]["median"] >= 0, metric
    measures = {r["measure"] for r in report["records"]}
    assert measures == {"process", "finalized", "single", "latency", "ceiling", "rss"}
    [latency] = [r for r in report["records"] if r["measure"] == "latency"]
    assert len(latency["samples_ms"]) == 20
    # Without peers the ratio targets have nothing to compare with.
    ratios = {t["key"]: t for t in report["targets"]}
    assert ratios["processing"]["value"] is None and ratios["processing"]["met"] is None
    assert isinstance(ratios["xact_per_job"]["met"], bool)

    markdown = md_path.read_text()
    assert markdown.startswith("# trioqueue benchmark")
    for heading in ("## Targets", "## All systems", "## trioqueue only", "## Settings"):
        assert heading in markdown
    assert "| processing no-op jobs (jobs/s) |" in markdown


@pytest.mark.timeout(300)
def test_trioqueue_bench_command(database_url: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trioqueue.cli",
            "bench",
            "--jobs",
            "200",
            "--latency-samples",
            "20",
            "--database-url",
            database_url,
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "trioqueue bench: 200 no-op jobs" in out
    for row in ("insert_many_fast", "insert (one at a time)", "processing no-op jobs"):
        assert row in out
    assert "idle latency" in out and "p50" in out and "p99" in out
    assert "processing" in result.stderr  # the progress line


def test_trioqueue_bench_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trioqueue.cli", "bench", "--jobs", "0"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Invalid value for '--jobs'" in result.stderr and "x>=1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(300)
def test_limits_benchmark_tiny_run(pg_server_url: str, tmp_path: Path) -> None:
    """``python -m benchmarks.limits``: every scenario once at tiny sizes."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.limits",
            "--rounds",
            "1",
            "--jobs",
            "300",
            "--customers",
            "10",
            "--rate-limit",
            "40",
            "--rate-seconds",
            "1",
            "--fair-bulk",
            "200",
            "--fair-customers",
            "4",
            "--fair-jobs",
            "3",
            "--fair-drain-seconds",
            "2",
            "--database-url",
            pg_server_url,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    [json_path] = tmp_path.glob("*-limits.json")
    [md_path] = tmp_path.glob("*-limits.md")
    report = json.loads(json_path.read_text())
    assert report["errors"] == []
    records = report["records"]
    assert sorted((r["scenario"], r["variant"]) for r in records) == [
        ("fairness", "partitioned"),
        ("fairness", "unlimited"),
        ("processing", "nobind"),
        ("processing", "partitioned"),
        ("processing", "unlimited"),
        ("rate", "rate"),
    ]
    for rec in records:
        if rec["scenario"] == "processing":
            assert rec["jobs"] == 300 and rec["failed"] == 0, rec
            assert rec["processing_jobs_per_s"] > 0
        elif rec["scenario"] == "rate":
            # Correctness, not speed: the limit held in every window.
            assert 0 < rec["max_in_any_window"] <= 40, rec
            assert rec["starts_in_window"] > 0 and rec["backlog_left"] > 0, rec
        else:
            assert set(rec["worst_wait_ms_by_customer"]) >= {"1", "2", "3"}, rec
            assert 0 <= rec["bulk_backlog_at_arrival"] <= 200, rec
    targets = {t["key"]: t for t in report["targets"]}
    assert set(targets) == {"nobind", "partitioned", "rate", "rate_window"}
    assert targets["rate_window"]["met"] is True
    assert all(isinstance(t["met"], bool) for t in targets.values())

    markdown = md_path.read_text()
    assert markdown.startswith("# trioqueue flow control benchmark")
    for row in ("| processing | no limit | processing (jobs/s) |", "| rate |", "| fairness |"):
        assert row in markdown, row
    assert "worst wait of the other customers" in result.stderr  # the table


def test_limits_benchmark_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.limits", "--jobs", "0"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--jobs must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(300)
def test_workflows_benchmark_tiny_run(pg_server_url: str, tmp_path: Path) -> None:
    """``python -m benchmarks.workflows``: diamonds, the same jobs without deps, and a
    fan-in, once at tiny sizes."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.workflows",
            "--rounds",
            "1",
            "--diamonds",
            "20",
            "--deps",
            "50",
            "--database-url",
            pg_server_url,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [json_path] = tmp_path.glob("*-workflows.json")
    [md_path] = tmp_path.glob("*-workflows.md")
    report = json.loads(json_path.read_text())
    [record] = report["records"]
    assert record["diamonds"]["jobs"] == record["plain"]["jobs"] == 80
    assert record["fanin"]["jobs"] == 51
    # Correctness, not speed: the fan-in started after its last dep finished.
    assert record["fanin"]["fan_in_delay_seconds"] >= 0
    assert report["summary"]["ratio"] > 0
    assert md_path.read_text().startswith("# Workflow benchmark")


@pytest.mark.timeout(300)
def test_job_wait_benchmark_tiny_run(pg_server_url: str, tmp_path: Path) -> None:
    """``python -m benchmarks.job_wait``: one small round, results written."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.job_wait",
            "--rounds",
            "1",
            "--jobs",
            "20",
            "--warmup",
            "2",
            "--burst",
            "10",
            "--database-url",
            pg_server_url,
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*-job_wait.json"))) == 1
    assert len(list(tmp_path.glob("*-job_wait.md"))) == 1
