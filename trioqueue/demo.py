"""``trioqueue demo``: a few thousand sample jobs worked live, then a summary.

Some jobs fail once and succeed on retry, some always fail and end discarded, some snooze,
some are scheduled a little in the future. The demo's jobs carry a tag of their own, so
running it against a database with other jobs counts only its own.

Logging: the runtime logs every failed attempt (WARNING, ERROR for a discard; see
docs/observability.md), and the demo's failures are there by design: a few hundred of
them. Left to Python's last-resort handler they bury the progress line. So the
``trioqueue demo`` command (``run_demo(..., manage_logging=True)``) counts them instead and
reports the count in the summary; see ``run_demo``. Called as a library function,
``run_demo`` leaves logging alone.
"""

from __future__ import annotations

import logging
import random
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TextIO

import attrs
import trio

from .client import open_client
from .config import QueueConfig
from .errors import JobSnooze
from .events import EventKind
from .job import FINALIZED_STATES, InsertOpts, Job, JobListParams, JobState
from .workers import Workers

__all__ = ["run_demo"]

QUEUE = "demo"
"""The queue the demo's jobs go to (and the only one its client works)."""

SIMULATED_FAILURE = "simulated failure on attempt"
"""How the demo's flaky jobs' errors begin: what tells a by-design failure apart."""

_JOB_LOGGER = "trioqueue.executor"
"""The logger of the one line per failed attempt (trioqueue/_runtime/executor.py)."""


@attrs.frozen
class GreetArgs:
    kind: ClassVar[str] = "demo_greet"
    name: str


@attrs.frozen
class FlakyArgs:
    kind: ClassVar[str] = "demo_flaky"
    always_fail: bool


@attrs.frozen
class SnoozeArgs:
    kind: ClassVar[str] = "demo_snooze"
    seconds: float


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class _Console:
    """The demo's stderr: plain lines, and on a terminal one progress line rewritten in
    place. A line said while the progress line shows goes above it: the progress line is
    blanked, the line written, the progress line drawn again. Thread-safe (log records can
    come from any thread)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._shown = ""  # the progress line now on screen (terminal only)
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        """``text`` on lines of its own, above the progress line if one shows."""
        with self._lock:
            if self._shown:
                self.out.write("\r" + " " * len(self._shown) + "\r")
            self.out.write(text + "\n")
            self.out.write(self._shown)
            self.out.flush()

    def progress(self, line: str) -> None:
        """The progress line: rewritten in place on a terminal, else a line of its own."""
        with self._lock:
            if self.tty:
                self.out.write("\r" + line.ljust(len(self._shown)))
                self._shown = line
            else:
                self.out.write(line + "\n")
            self.out.flush()

    def end_progress(self) -> None:
        """Leave the progress line where it is and go on below it."""
        with self._lock:
            if self._shown:
                self.out.write("\n")
                self.out.flush()
                self._shown = ""


def is_expected_failure(record: logging.LogRecord) -> bool:
    """Whether ``record`` is the runtime's line for one of the demo's by-design failures:
    a failed attempt (retried: WARNING, discarded: ERROR) of a demo job kind on the demo's
    queue whose error is the simulated one. A demo job failing any other way is not."""
    return (
        record.name == _JOB_LOGGER
        and getattr(record, "queue", None) == QUEUE
        and getattr(record, "kind", None) == FlakyArgs.kind
        and getattr(record, "outcome", None) == "failed"
        and f"RuntimeError: {SIMULATED_FAILURE}" in record.getMessage()
    )


class _ExpectedFailures(logging.Filter):
    """On the job logger: withholds and counts the demo's by-design failure lines."""

    def __init__(self) -> None:
        super().__init__()
        self.retried = 0
        self.discarded = 0
        self.first: str | None = None

    @property
    def count(self) -> int:
        return self.retried + self.discarded

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_expected_failure(record):
            return True
        if record.levelno >= logging.ERROR:
            self.discarded += 1
        else:
            self.retried += 1
        if self.first is None:
            self.first = record.getMessage()
        return False


class _ConsoleHandler(logging.Handler):
    """What Python's last-resort handler would print (WARNING and up), but through the
    console, so that it lands above the progress line, with level and logger named."""

    def __init__(self, console: _Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console
        self.shown = 0
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.shown += 1
            self.console.say(text)
        except Exception:
            self.handleError(record)


@attrs.define
class _LogReport:
    """What the demo's logging set-up saw, for the summary."""

    failures: _ExpectedFailures
    handler: _ConsoleHandler | None


@contextmanager
def _demo_logging(console: _Console) -> Iterator[_LogReport]:
    """Logging for the ``trioqueue demo`` command, undone on exit.

    The demo's by-design failure lines (`is_expected_failure`) are withheld and counted,
    by a filter on the job logger. Everything else is logged as before. When the root
    logger has no handlers (logging not configured: Python's last-resort handler would
    print WARNING and up bare on stderr), a handler on the root logger prints WARNING and
    up through ``console``, above the progress line. When it has handlers, the user's
    configuration is respected: no handler is added and no level changed, so all but the
    withheld lines go where the user sends them (and on a terminal may then interleave
    with the progress line).
    """
    failures = _ExpectedFailures()
    job_logger = logging.getLogger(_JOB_LOGGER)
    root = logging.getLogger()
    handler = None if root.handlers else _ConsoleHandler(console)
    job_logger.addFilter(failures)
    if handler is not None:
        root.addHandler(handler)
    try:
        yield _LogReport(failures, handler)
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        job_logger.removeFilter(failures)


def _log_summary(report: _LogReport) -> list[str]:
    failures = report.failures
    lines = []
    if failures.count:
        lines.append(
            f"  failures logged  {failures.count} by design ({failures.retried} retried, "
            f"{failures.discarded} discarded), counted here instead of printed one per line"
        )
        lines.append(f"                   first: {failures.first}")
    else:
        lines.append("  failures logged  none")
    shown = report.handler.shown if report.handler is not None else 0
    if shown:
        what = "warning or error" if shown == 1 else "warnings or errors"
        lines.append(f"  other log lines  {shown} {what}, printed above")
    return lines


async def run_demo(
    database_url: str | None,
    total: int = 3000,
    max_workers: int = 200,
    *,
    manage_logging: bool = False,
) -> int:
    """Insert ``total`` sample jobs, work them, print progress (stderr) and a summary
    (stdout); return 0 when every job ended completed or discarded, else 1.

    ``manage_logging`` (what the ``trioqueue demo`` command passes; off by default, so an
    application calling this keeps its logging as it is) sets logging up for the demo's
    duration and undoes it on return:

    - the runtime's line for each of the demo's by-design failures (a flaky job's
      simulated error, retried or discarded) is withheld, and the summary reports how many
      there were and the first one;
    - if logging is not configured (the root logger has no handlers), any other WARNING or
      worse, which Python's last-resort handler would have printed, is printed on stderr
      above the progress line, with its level and logger;
    - if logging is configured (the root logger has handlers), the configuration is
      respected: nothing is added and no level changed, only the by-design failure lines
      are withheld.
    """
    console = _Console(sys.stderr)
    with ExitStack() as stack:
        report = stack.enter_context(_demo_logging(console)) if manage_logging else None
        result = await _work(database_url, total, max_workers, console)
    elapsed, latencies, states = result
    print()
    print("trioqueue demo summary")
    print(f"  jobs worked      {total} in {elapsed:.2f} s = {total / elapsed:,.0f} jobs/s")
    print(
        f"  start latency    p50 {_percentile(latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {_percentile(latencies, 0.99) * 1000:.1f} ms "
        "(due time → first start; all jobs were queued at once, so this includes the wait)"
    )
    print("  final states     " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    if report is not None:
        for line in _log_summary(report):
            print(line)
    ok = states.get(JobState.COMPLETED, 0) + states.get(JobState.DISCARDED, 0) == total
    return 0 if ok else 1


async def _work(
    database_url: str | None, total: int, max_workers: int, console: _Console
) -> tuple[float, list[float], dict[str, int]]:
    """The demo itself: seconds from insert to the last job finalized, each job's start
    latency, and how many of the demo's jobs ended in each state."""
    rng = random.Random(7)
    tag = f"demo-{int(time.time())}-{secrets.token_hex(3)}"  # two runs in a second: two tags
    latencies: list[float] = []
    workers = Workers()

    def started(job: Job[Any]) -> None:
        if job.attempt == 1:
            delay = (datetime.now(UTC) - job.scheduled_at).total_seconds()
            latencies.append(max(delay, 0.0))

    async def greet(job: Job[GreetArgs]) -> None:
        started(job)
        await trio.sleep(rng.uniform(0, 0.005))

    async def flaky(job: Job[FlakyArgs]) -> None:
        started(job)
        if job.args.always_fail or job.attempt == 1:
            raise RuntimeError(f"{SIMULATED_FAILURE} {job.attempt}")

    async def snooze(job: Job[SnoozeArgs]) -> None:
        started(job)
        if not job.metadata.get("snoozes"):
            raise JobSnooze(job.args.seconds)

    workers.add(GreetArgs, greet)
    workers.add(FlakyArgs, flaky)
    workers.add(SnoozeArgs, snooze)

    def quick_retry(job: Job[Any]) -> float:
        return 0.2 * (len(job.errors) + 1)

    console.say("trioqueue demo: starting (a private PostgreSQL server if no URL is set)")
    async with open_client(
        database_url,
        workers=workers,
        queues={QUEUE: QueueConfig(max_workers=max_workers)},
        fetch_cooldown=0.005,
        fetch_poll_interval=0.2,
        scheduler_interval=0.5,
        retry_policy=quick_retry,
    ) as client:
        now = datetime.now(UTC)
        opts = InsertOpts(queue=QUEUE, tags=(tag,))
        items: list[Any] = []
        counts = {
            "greet": 0,
            "retry then succeed": 0,
            "always fail": 0,
            "snooze": 0,
            "scheduled": 0,
        }
        for i in range(total):
            roll = rng.random()
            if roll < 0.08:
                items.append((FlakyArgs(False), opts))
                counts["retry then succeed"] += 1
            elif roll < 0.10:
                items.append(
                    (FlakyArgs(True), InsertOpts(queue=QUEUE, tags=(tag,), max_attempts=2))
                )
                counts["always fail"] += 1
            elif roll < 0.15:
                items.append((SnoozeArgs(0.3), opts))
                counts["snooze"] += 1
            elif roll < 0.20:
                at = now + timedelta(seconds=rng.uniform(0.5, 2.0))
                items.append(
                    (
                        GreetArgs(f"later-{i}"),
                        InsertOpts(queue=QUEUE, tags=(tag,), scheduled_at=at),
                    )
                )
                counts["scheduled"] += 1
            else:
                items.append((GreetArgs(f"job-{i}"), opts))
                counts["greet"] += 1
        async with client.subscribe(
            EventKind.JOB_COMPLETED, EventKind.JOB_FAILED, EventKind.JOB_CANCELLED, buffer=total * 3
        ) as events:
            start = trio.current_time()
            inserted = await client.insert_many_fast(items)
            console.say(
                f"inserted {inserted} jobs in {trio.current_time() - start:.3f} s: "
                + ", ".join(f"{v} {k}" for k, v in counts.items())
            )
            finalized = 0
            last_print = 0.0
            tty = console.tty
            with trio.fail_after(120):
                async for event in events:
                    if event.job is not None and event.job.state in FINALIZED_STATES:
                        finalized += 1
                    now_t = trio.current_time()
                    if now_t - last_print >= (0.1 if tty else 1.0) or finalized == total:
                        last_print = now_t
                        rate = finalized / max(now_t - start, 1e-9)
                        line = f"worked {finalized}/{total} jobs  {rate:,.0f} jobs/s"
                        console.progress(line)
                    if finalized >= total:
                        break
            elapsed = trio.current_time() - start
            console.end_progress()
        states: dict[str, int] = {}
        after = None
        while True:
            page = await client.job_list(JobListParams(tags=[tag], limit=10_000, after=after))
            for job in page.jobs:
                states[job.state] = states.get(job.state, 0) + 1
            if page.last_cursor is None:
                break
            after = page.last_cursor
    return elapsed, latencies, states
