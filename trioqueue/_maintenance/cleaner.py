"""The cleaners: finalized jobs past their retention, and stale queue rows, are deleted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import final

import attrs

from ..driver.protocol import Driver
from ..errors import ValidationError
from ..job import JobState
from .loop import run_every

__all__ = ["Cleaner", "CleanerConfig", "QueueCleaner", "QueueCleanerConfig"]

log = logging.getLogger("trioqueue.cleaner")


def _check_positive(owner: str, name: str, value: float | None, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValidationError(f"{owner}.{name}", "must be greater than 0")


@final
@attrs.frozen
class CleanerConfig:
    interval: float = 30.0
    """Seconds between runs."""
    completed_retention: float | None = 86400.0
    """Seconds a completed job is kept; None keeps it forever."""
    cancelled_retention: float | None = 86400.0
    discarded_retention: float | None = 604800.0
    batch_size: int = 10_000
    """Rows deleted per statement, so no run holds locks on a huge set at once."""

    def __attrs_post_init__(self) -> None:
        _check_positive("CleanerConfig", "interval", self.interval, False)
        for name in ("completed_retention", "cancelled_retention", "discarded_retention"):
            _check_positive("CleanerConfig", name, getattr(self, name), True)
        if self.batch_size < 1:
            raise ValidationError("CleanerConfig.batch_size", "must be at least 1")

    def retentions(self) -> dict[JobState, float | None]:
        return {
            JobState.COMPLETED: self.completed_retention,
            JobState.CANCELLED: self.cancelled_retention,
            JobState.DISCARDED: self.discarded_retention,
        }


@final
@attrs.define(eq=False)
class Cleaner:
    driver: Driver
    now: Callable[[], datetime]
    config: CleanerConfig = CleanerConfig()

    async def run_once(self) -> dict[JobState, int]:
        """Delete every finalized job past its retention, in batches; return counts.

        On cancellation: batches already deleted stay deleted.
        """
        deleted: dict[JobState, int] = {}
        for state, retention in self.config.retentions().items():
            if retention is None:
                continue
            before = self.now() - timedelta(seconds=retention)
            while True:
                count = await self.driver.job_delete_finalized(
                    state, before, self.config.batch_size
                )
                if count:
                    deleted[state] = deleted.get(state, 0) + count
                if count < self.config.batch_size:
                    break
        if deleted:
            log.info("cleaner deleted old jobs: %s", {s.value: n for s, n in deleted.items()})
        return deleted

    async def run(self) -> None:
        """Run every ``interval`` (after a 0-1 s jitter) until cancelled."""
        await run_every(self.config.interval, self.run_once, "cleaner")


@final
@attrs.frozen
class QueueCleanerConfig:
    interval: float = 3600.0
    """Seconds between runs."""
    retention: float = 86400.0
    """A queue row no client has announced for this long is deleted (unless paused)."""

    def __attrs_post_init__(self) -> None:
        _check_positive("QueueCleanerConfig", "interval", self.interval, False)
        _check_positive("QueueCleanerConfig", "retention", self.retention, False)


@final
@attrs.define(eq=False)
class QueueCleaner:
    driver: Driver
    now: Callable[[], datetime]
    config: QueueCleanerConfig = QueueCleanerConfig()

    async def run_once(self) -> list[str]:
        """Delete stale, unpaused queue rows; return their names."""
        before = self.now() - timedelta(seconds=self.config.retention)
        names = await self.driver.queue_delete_stale(before)
        if names:
            log.info("queue cleaner deleted stale queues: %s", names)
        return names

    async def run(self) -> None:
        """Run every ``interval`` (after a 0-1 s jitter) until cancelled."""
        await run_every(self.config.interval, self.run_once, "queue cleaner")
