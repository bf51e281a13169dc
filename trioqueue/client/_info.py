"""What the client reports about the queue: queues, job counts and the leader.

Plain frozen values made from what the driver read; `Client.job_counts` also follows the
two bounds defined here.
"""

from __future__ import annotations

from datetime import datetime
from typing import final

import attrs

from ..driver.protocol import LeaderRow, QueueRow
from ..job import JobState
from ..limits import GlobalLimit, PartitionInfo, RateLimit

__all__ = [
    "COUNT_EXACT_UP_TO",
    "RECENT_COUNT_LIMIT",
    "JobCounts",
    "LeaderInfo",
    "QueueInfo",
    "leader_info",
    "queue_info",
]


@final
@attrs.frozen
class QueueInfo:
    """One queue as stored, from :meth:`Client.queue_list`.

    A queue has a row once a client with that queue has run, or once it was paused.
    """

    name: str
    paused_at: datetime | None
    """When the queue was paused; None while it is not paused."""
    created_at: datetime
    updated_at: datetime
    """Bumped by every client working the queue; the queue cleaner deletes rows that
    stay untouched for a day (unless paused)."""
    available: int
    """Jobs of this queue waiting to run now."""
    running: int
    """Jobs of this queue that some client is running."""
    global_limit: GlobalLimit | None = None
    """The global limit the clients working the queue enforce (docs/flow-control.md)."""
    rate_limit: RateLimit | None = None
    """The rate limit the clients working the queue enforce."""
    held_back: int = 0
    """Due jobs that the limits hold back now (included in ``available``)."""
    partitions: tuple[PartitionInfo, ...] = ()
    """The busiest partitions of a limited queue (up to ten), by running jobs, then
    held-back ones; one partition, ``{}``, for limits that are not partitioned."""


@final
@attrs.frozen
class JobCounts:
    """How many jobs there are, from :meth:`Client.job_counts`: bounded work on any
    table size, so some numbers are estimates or floors (each says which)."""

    states: dict[JobState, int]
    """Jobs per state, every state present. Exact, except the states in ``estimated``."""
    estimated: frozenset[JobState]
    """Finalized states with more jobs than ``exact_up_to``: their count is the database's
    estimate (from its planner statistics), never below ``exact_up_to``."""
    exact_up_to: int
    """Finalized states are counted exactly up to this many jobs."""
    queues: dict[str, dict[JobState, int]]
    """Per queue, the exact count of each state that is not finalized (queues with such
    jobs only; states without jobs are left out)."""
    finalized_last_minute: dict[JobState, int]
    """Jobs that reached each finalized state in the last minute, up to ``recent_limit``."""
    finalized_last_hour: dict[JobState, int]
    """Jobs that reached each finalized state in the last hour, up to ``recent_limit``."""
    recent_limit: int
    """The recent counts stop here: a count equal to it means "at least"."""


@final
@attrs.frozen
class LeaderInfo:
    """The client that currently leads (runs maintenance), from :meth:`Client.leader_get`."""

    leader_id: str
    elected_at: datetime
    expires_at: datetime
    """Unless it renews its term before then, another client takes over."""


COUNT_EXACT_UP_TO = 10_000
"""Finalized states are counted exactly up to this many jobs, then estimated."""
RECENT_COUNT_LIMIT = 50_000
"""Recent throughput counts stop at this many jobs."""


def queue_info(row: QueueRow) -> QueueInfo:
    return QueueInfo(
        name=row.name,
        paused_at=row.paused_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        available=row.available,
        running=row.running,
        global_limit=row.limits.global_limit if row.limits else None,
        rate_limit=row.limits.rate_limit if row.limits else None,
        held_back=row.held_back,
        partitions=row.partitions,
    )


def leader_info(row: LeaderRow) -> LeaderInfo:
    return LeaderInfo(leader_id=row.leader_id, elected_at=row.elected_at, expires_at=row.expires_at)
