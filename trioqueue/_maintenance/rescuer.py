"""The rescuer: jobs left ``running`` by a client that died go back to work.

A job is stuck when it has been running longer than ``rescue_stuck_jobs_after`` (or than
its worker's own timeout, when that is longer). A job whose worker has no timeout is never
rescued: nothing says how long it may take. Each stuck job is retried per the retry
policy, ``discarded`` when its attempts are spent, or ``cancelled`` when a cancellation was
requested while it ran; an error saying it was rescued is appended either way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, final

import attrs

from .._codec import dumps, row_to_job
from .._outcome import retry_delay
from ..config import RetryPolicy
from ..driver.protocol import INSERT_CHANNEL, Driver, JobRescue
from ..errors import ValidationError
from ..job import Job, JobState
from ..workers import DEFAULT_TIMEOUT, Workers
from .loop import run_every

__all__ = ["Rescuer", "RescuerConfig", "RescuerResult"]

log = logging.getLogger("trioqueue.rescuer")


@final
@attrs.frozen
class RescuerConfig:
    interval: float = 30.0
    """Seconds between runs."""
    rescue_after: float = 3600.0
    """A job running longer than this (and than its worker's timeout) is stuck."""
    scheduler_interval: float = 5.0
    """Retries due within this go straight to ``available``."""
    batch_size: int = 1000
    """Stuck jobs handled per statement."""

    def __attrs_post_init__(self) -> None:
        for name in ("interval", "rescue_after", "scheduler_interval"):
            if getattr(self, name) <= 0:
                raise ValidationError(f"RescuerConfig.{name}", "must be greater than 0")
        if self.batch_size < 1:
            raise ValidationError("RescuerConfig.batch_size", "must be at least 1")


@final
@attrs.frozen
class RescuerResult:
    rescued: dict[str, int]
    """Jobs rescued, by the state they were put in."""
    skipped: int
    """Stuck-looking jobs left alone (no timeout, or a longer worker timeout not yet past)."""


@final
@attrs.define(eq=False)
class Rescuer:
    driver: Driver
    now: Callable[[], datetime]
    workers: Workers
    retry_policy: RetryPolicy | None
    """The client's retry policy (a worker's own ``next_retry`` comes first)."""
    config: RescuerConfig = RescuerConfig()

    def _threshold(self, kind: str) -> float | None:
        """Seconds after which a job of ``kind`` counts as stuck; None: never."""
        entry = self.workers.get(kind)
        if entry is None or entry.timeout is DEFAULT_TIMEOUT:
            return self.config.rescue_after
        if entry.timeout is None:
            return None
        assert isinstance(entry.timeout, int | float)
        return max(self.config.rescue_after, float(entry.timeout))

    def _decide(self, job: Job[Any], now: datetime) -> JobRescue:
        error = dumps(
            {
                "at": now.isoformat(),
                "attempt": job.attempt,
                "error": "stuck job rescued by the rescuer: its client stopped reporting on it",
                "trace": "",
            }
        )
        assert job.attempted_at is not None
        cancelled = "cancel_attempted_at" in job.metadata
        if cancelled or job.attempt >= job.max_attempts:
            return JobRescue(
                id=job.id,
                state=JobState.CANCELLED if cancelled else JobState.DISCARDED,
                finalized_at=now,
                scheduled_at=None,
                error_json=error,
                attempted_at=job.attempted_at,
            )
        delay = retry_delay(job, self.workers, self.retry_policy)
        soon = delay <= self.config.scheduler_interval
        return JobRescue(
            id=job.id,
            state=JobState.AVAILABLE if soon else JobState.RETRYABLE,
            finalized_at=None,
            scheduled_at=now + timedelta(seconds=delay),
            error_json=error,
            attempted_at=job.attempted_at,
        )

    async def run_once(self) -> RescuerResult:
        """Rescue every stuck job, in batches.

        On cancellation: batches already written stay written; the rest wait for the next
        run (each batch is one statement, applied only to jobs still on the same attempt).
        """
        rescued: dict[str, int] = {}
        skipped = 0
        after = 0
        while True:
            now = self.now()
            cutoff = now - timedelta(seconds=self.config.rescue_after)
            rows = await self.driver.job_get_stuck(cutoff, self.config.batch_size, after)
            if not rows:
                break
            decisions = []
            for row in rows:
                job = row_to_job(row, None)
                threshold = self._threshold(job.kind)
                assert job.attempted_at is not None
                if threshold is None or job.attempted_at >= now - timedelta(seconds=threshold):
                    skipped += 1
                    continue
                decisions.append(self._decide(job, now))
            after = rows[-1].id
            if decisions:
                written = await self.driver.job_rescue_many(decisions)
                queues = sorted({q for _, q, s in written if s == JobState.AVAILABLE})
                for _, _, state in written:
                    rescued[state] = rescued.get(state, 0) + 1
                if queues:
                    await self.driver.notify_many(
                        INSERT_CHANNEL, [json.dumps({"queue": q}) for q in queues]
                    )
            if len(rows) < self.config.batch_size:
                break
        if rescued:
            log.warning("rescued stuck jobs: %s", rescued)
        return RescuerResult(rescued, skipped)

    async def run(self) -> None:
        """Run every ``interval`` (after a 0-1 s jitter) until cancelled."""
        await run_every(self.config.interval, self.run_once, "rescuer")
