"""``trioqueue demo``'s logging: the failures it makes on purpose are counted in the summary,
not printed one per line over the progress line; anything else still shows, above that line;
and ``run_demo`` called as a library function leaves logging alone."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from trioqueue import demo
from trioqueue.demo import QUEUE, SIMULATED_FAILURE, run_demo

JOB_LOGGER = "trioqueue.executor"


def _expected_counts(stderr: str) -> tuple[int, int]:
    """(retry then succeed, always fail) from the demo's "inserted ..." line."""
    found = re.search(r"(\d+) retry then succeed, (\d+) always fail", stderr)
    assert found is not None, stderr
    return int(found[1]), int(found[2])


def _failure_line(attempt: int, state: str, error: str) -> str:
    return f"job 1 (demo_flaky) failed on attempt {attempt}/2, now {state}: {error}"


def _log_failure(level: int, message: str, kind: str = "demo_flaky", queue: str = QUEUE) -> None:
    """A record like the executor's line for a failed attempt (structured fields included)."""
    extra = {"job_id": 1, "kind": kind, "queue": queue, "outcome": "failed", "attempt": 1}
    logging.getLogger(JOB_LOGGER).log(level, "%s", message, extra=extra)


def test_demo_command_counts_its_failures_instead_of_printing_them(database_url: str) -> None:
    env = dict(os.environ)
    env.pop("TRIOQUEUE_DATABASE_URL", None)
    command = ["demo", "--jobs", "200", "--database-url", database_url]
    result = subprocess.run(
        [sys.executable, "-m", "trioqueue.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    retry_then_succeed, always_fail = _expected_counts(result.stderr)
    assert retry_then_succeed > 0 and always_fail > 0
    # No per-job lines: before, Python's last-resort handler printed one per failed attempt.
    for line in result.stderr.splitlines():
        assert "demo_flaky" not in line and SIMULATED_FAILURE not in line, result.stderr
        assert not line.startswith(("WARNING", "ERROR")), result.stderr
    # Each flaky job fails once; each always-failing one twice (max_attempts=2), then is
    # discarded.
    retried = retry_then_succeed + always_fail
    total = retried + always_fail
    assert (
        f"failures logged  {total} by design ({retried} retried, {always_fail} discarded)"
        in result.stdout
    ), result.stdout
    assert "first: job " in result.stdout and SIMULATED_FAILURE in result.stdout
    assert "other log lines" not in result.stdout


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_unconfigured_logging_prints_other_warnings_above_the_progress_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in the command: logging not configured
    job_logger = logging.getLogger(JOB_LOGGER)
    filters_before = list(job_logger.filters)
    out = _Terminal()
    console = demo._Console(out)
    with demo._demo_logging(console) as report:
        assert len(root.handlers) == 1
        console.progress("worked 1/10 jobs  5 jobs/s")
        _log_failure(
            logging.WARNING, _failure_line(1, "available", f"RuntimeError: {SIMULATED_FAILURE} 1")
        )
        _log_failure(
            logging.ERROR, _failure_line(2, "discarded", f"RuntimeError: {SIMULATED_FAILURE} 2")
        )
        # Not by design: a demo job failing some other way, another kind, another queue,
        # another logger.
        _log_failure(logging.WARNING, _failure_line(1, "available", "TypeError: oops"))
        _log_failure(
            logging.WARNING,
            _failure_line(1, "available", f"RuntimeError: {SIMULATED_FAILURE} 1"),
            queue="elsewhere",
        )
        logging.getLogger("trioqueue.notifier").warning("LISTEN connection lost")
        logging.getLogger("trioqueue.notifier").info("not shown: below WARNING")
        console.progress("worked 10/10 jobs  9 jobs/s")
        console.end_progress()
    assert root.handlers == [] and job_logger.filters == filters_before

    text = out.getvalue()
    assert SIMULATED_FAILURE + " 2" not in text
    assert "not shown" not in text
    blank = "\r" + " " * len("worked 1/10 jobs  5 jobs/s") + "\r"
    # Each other line: the progress line blanked, the line, the progress line drawn again.
    assert (
        blank
        + "WARNING trioqueue.executor: "
        + _failure_line(1, "available", "TypeError: oops")
        + "\nworked 1/10 jobs  5 jobs/s"
    ) in text
    assert blank + "WARNING trioqueue.notifier: LISTEN connection lost\n" in text
    assert text.count("\n") == 4  # three log lines and the end of the progress line
    assert text.endswith("\rworked 10/10 jobs  9 jobs/s\n")

    assert (report.failures.retried, report.failures.discarded) == (1, 1)
    assert report.failures.first == _failure_line(
        1, "available", f"RuntimeError: {SIMULATED_FAILURE} 1"
    )
    summary = "\n".join(demo._log_summary(report))
    assert "failures logged  2 by design (1 retried, 1 discarded)" in summary
    assert "other log lines  3 warnings or errors, printed above" in summary


async def test_run_demo_leaves_logging_alone_unless_asked(
    database_url: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING)
    root = logging.getLogger()
    handlers_before = list(root.handlers)
    filters_before = list(logging.getLogger(JOB_LOGGER).filters)

    # A library call: every failure is logged as usual, nothing is counted.
    assert await run_demo(database_url, 100, 50) == 0
    library = [r for r in caplog.records if r.name == JOB_LOGGER]
    assert library and all(demo.is_expected_failure(r) for r in library)
    assert "failures logged" not in capsys.readouterr().out

    # As the command calls it, with logging configured (pytest's handlers on the root
    # logger): those handlers stay and see no by-design failure; the summary counts them.
    caplog.clear()
    assert await run_demo(database_url, 100, 50, manage_logging=True) == 0
    assert not [r for r in caplog.records if demo.is_expected_failure(r)]
    assert f"failures logged  {len(library)} by design" in capsys.readouterr().out
    assert root.handlers == handlers_before
    assert logging.getLogger(JOB_LOGGER).filters == filters_before
