"""The scheduler: due ``scheduled`` and ``retryable`` jobs become ``available``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import final

import attrs

from ..driver.protocol import INSERT_CHANNEL, Driver
from ..errors import ValidationError
from .loop import run_every

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerResult"]

log = logging.getLogger("trioqueue.scheduler")


@final
@attrs.frozen
class SchedulerConfig:
    interval: float = 5.0
    """Seconds between runs; jobs due within one interval are moved ahead of time (the
    fetch query still waits for their scheduled_at)."""
    batch_size: int = 10_000
    """Rows moved per statement."""

    def __attrs_post_init__(self) -> None:
        if self.interval <= 0:
            raise ValidationError("SchedulerConfig.interval", "must be greater than 0")
        if self.batch_size < 1:
            raise ValidationError("SchedulerConfig.batch_size", "must be at least 1")


@final
@attrs.frozen
class SchedulerResult:
    made_available: dict[str, int]
    """Jobs made available, per queue."""


@final
@attrs.define(eq=False)
class Scheduler:
    driver: Driver
    now: Callable[[], datetime]
    config: SchedulerConfig = SchedulerConfig()

    async def run_once(self) -> SchedulerResult:
        """Move every due job (in batches), notifying the queues that got work.

        On cancellation: batches already moved stay moved; the rest wait for the next run.
        """
        total: dict[str, int] = {}
        while True:
            now = self.now()
            horizon = now + timedelta(seconds=self.config.interval)
            moved = await self.driver.job_schedule(horizon, now, self.config.batch_size)
            for queue, count in moved.items():
                total[queue] = total.get(queue, 0) + count
            if moved:
                payloads = [json.dumps({"queue": q}) for q in sorted(moved)]
                await self.driver.notify_many(INSERT_CHANNEL, payloads)
            if sum(moved.values()) < self.config.batch_size:
                if total:
                    log.debug("scheduler made jobs available: %s", total)
                return SchedulerResult(total)

    async def run(self) -> None:
        """Run every ``interval`` (after a 0-1 s jitter) until cancelled."""
        await run_every(self.config.interval, self.run_once, "scheduler")
