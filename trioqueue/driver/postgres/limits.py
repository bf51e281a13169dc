"""Reading what the flow-control statements return (queries/limits.sql)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from ...limits import LimitedFetch, PartitionInfo, QueueLimits, canonical
from ..protocol import PARTITIONS_SHOWN, JobRow, QueueRow

__all__ = ["limited_fetch", "queue_row", "with_partitions"]


def limited_fetch(rows: Sequence[Sequence[Any]]) -> LimitedFetch:
    """The claimed jobs of ``tq_job_get_available_limited`` and its closing status row
    (the one whose id is NULL)."""
    jobs: list[JobRow] = []
    held_back = False
    next_open = None
    for row in rows:
        if row[0] is None:
            held_back = bool(row[20])
            next_open = row[21]
        else:
            jobs.append(JobRow._make(row[:20]))
    return LimitedFetch(jobs, held_back, next_open)


def _values(key: str) -> dict[str, Any]:
    """A partition's values, without the entry that says what it is made of ("~")."""
    values = json.loads(key)
    values.pop("~", None)
    return values  # type: ignore[no-any-return]


def with_partitions(row: QueueRow, limits: QueueLimits, found: Sequence[Sequence[Any]]) -> QueueRow:
    """``row`` with its limits, the due jobs they hold back and its busiest partitions
    (rows of ``queue_limit_partitions``)."""
    partitions = [
        PartitionInfo(_values(key), int(running), int(held)) for key, running, held, _ in found
    ]
    # Ties broken as the memory driver breaks them: by the partition's canonical text.
    partitions.sort(key=lambda p: (-p.running, -p.held_back, canonical(p.partition)))
    held_back = int(found[0][3]) if found else 0
    return row._replace(
        limits=limits, held_back=held_back, partitions=tuple(partitions[:PARTITIONS_SHOWN])
    )


async def queue_row(
    values: Sequence[Any],
    now: datetime,
    fetch: Callable[[str, str, list[Any]], Awaitable[list[tuple[Any, ...]]]],
) -> QueueRow:
    """The `QueueRow` of a ``queue_list`` row; for a queue with limits, with its busiest
    partitions as ``queue_limit_partitions`` reads them through ``fetch(doing, query,
    params)`` at ``now``."""
    name, paused_at, created_at, updated_at, available, running, stored = values
    row = QueueRow(name, paused_at, created_at, updated_at, int(available), int(running))
    limits = QueueLimits.from_json(stored)
    if limits is None:
        return row
    found = await fetch(
        f"reading the partitions of queue {name!r}",
        "queue_limit_partitions",
        [name, limits.to_json(), now, PARTITIONS_SHOWN],
    )
    return with_partitions(row, limits, found)
