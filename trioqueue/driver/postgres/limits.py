"""Reading what the flow-control statements return (queries/limits.sql)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ...limits import LimitedFetch, PartitionInfo, QueueLimits, canonical
from ..protocol import PARTITIONS_SHOWN, JobRow, QueueRow

__all__ = ["limited_fetch", "with_partitions"]


def limited_fetch(rows: Sequence[Sequence[Any]]) -> LimitedFetch:
    """The claimed jobs of ``tq_job_get_available_limited`` and its closing status row
    (the one whose id is NULL)."""
    jobs: list[JobRow] = []
    held_back = False
    next_open = None
    for row in rows:
        if row[0] is None:
            held_back = bool(row[16])
            next_open = row[17]
        else:
            jobs.append(JobRow._make(row[:16]))
    return LimitedFetch(jobs, held_back, next_open)


def with_partitions(row: QueueRow, limits: QueueLimits, found: Sequence[Sequence[Any]]) -> QueueRow:
    """``row`` with its limits, the due jobs they hold back and its busiest partitions
    (rows of ``queue_limit_partitions``)."""
    partitions = [
        PartitionInfo(json.loads(key), int(running), int(held)) for key, running, held, _ in found
    ]
    # Ties broken as the memory driver breaks them: by the partition's canonical text.
    partitions.sort(key=lambda p: (-p.running, -p.held_back, canonical(p.partition)))
    held_back = int(found[0][3]) if found else 0
    return row._replace(
        limits=limits, held_back=held_back, partitions=tuple(partitions[:PARTITIONS_SHOWN])
    )
