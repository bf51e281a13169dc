"""Flow control in memory: the limited fetch and the partitions of `queue_list`, with the
semantics of the PostgreSQL statements (migration 004) — `_Limits`, one of the parts of
`MemoryDriver`.

A statement runs whole, with nothing interleaved, so the running counts it reads are
exact without the advisory lock PostgreSQL needs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from ...job import JobState
from ...limits import LimitedFetch, PartitionInfo, QueueLimits, partition_of
from ..protocol import PARTITIONS_SHOWN, JobRow, QueueRow
from .errors import MemoryDataError
from .jobs import _claimed
from .rows import _Job
from .statement import _Stmt
from .store import _Store
from .values import _ts

__all__ = ["RATE_KEEP", "_Limits", "with_partitions"]

RATE_KEEP = 10.0
"""Seconds a start is kept at least after it left the window (as in PostgreSQL's fetch)."""


def _global_key(limits: QueueLimits, job: _Job) -> str:
    g = limits.global_limit
    return partition_of(g.by_kind, g.by_args, job.kind, job.args) if g else "{}"


def _rate_key(limits: QueueLimits, job: _Job) -> str:
    r = limits.rate_limit
    return partition_of(r.by_kind, r.by_args, job.kind, job.args) if r else "{}"


def _running_by_partition(jobs: Iterable[_Job], limits: QueueLimits) -> Counter[str]:
    """Running ``jobs`` per global partition."""
    return Counter(_global_key(limits, j) for j in jobs)


def _in_window(starts: Iterable[tuple[str, datetime]], per: float, at: datetime) -> Counter[str]:
    """Starts per rate partition from the beginning of the window of ``per`` seconds
    that ends at ``at`` on (later ones too)."""
    since = at - timedelta(seconds=per)
    return Counter(p for p, t in starts if t > since)


class _Limits(_Store):
    def _rate_window(self, queue: str, limits: QueueLimits, at: datetime) -> Counter[str]:
        """Starts per rate partition from the beginning of the window that ends at ``at``
        on (later ones too); starts older than the window by more than its length, or
        `RATE_KEEP`, are forgotten (another client's window may still hold the others)."""
        r = limits.rate_limit
        if r is None:
            return Counter()
        keep = at - timedelta(seconds=r.per + max(r.per, RATE_KEEP))
        kept = [(p, t) for p, t in self._rate_starts.get(queue, ()) if t > keep]
        self._rate_starts[queue] = kept
        return _in_window(kept, r.per, at)

    async def job_get_available_limited(
        self, queue: str, now: datetime, limit: int, client_id: str, limits: QueueLimits
    ) -> LimitedFetch:
        """`job_get_available` within ``limits``, as the PostgreSQL driver does it: full
        partitions are skipped, the rest taken in priority order and, within a priority,
        round robin across partitions (the first of each, then the second, ...).

        On cancellation: nothing was claimed.
        """
        at = _ts(now)
        g = limits.global_limit
        r = limits.rate_limit

        def op(st: _Stmt) -> LimitedFetch:
            if limit < 0:
                raise MemoryDataError("LIMIT must not be negative")
            paused = self._queues.get(queue)
            if paused is not None and paused.paused_at is not None:
                return LimitedFetch([], False, None)
            running = _running_by_partition(
                (j for j in self._jobs_in(JobState.RUNNING) if j.queue == queue), limits
            )
            started = self._rate_window(queue, limits, at)
            due = sorted(
                (
                    self._jobs[i]
                    for i in self._available.get(queue, ())
                    if self._jobs[i].scheduled_at <= at
                ),
                key=lambda j: (j.priority, j.scheduled_at, j.id),
            )

            # As the statement does: walk the first due jobs in fetch order; if too few of
            # them fit and more lie beyond, add each roomy partition's first jobs;
            # rank each candidate within its partitions, and take those that fit, round
            # robin within each priority.
            def room(job: _Job) -> int:
                return min(
                    limit,
                    limit if g is None else g.limit - running[_global_key(limits, job)],
                    limit if r is None else r.limit - started[_rate_key(limits, job)],
                )

            def fitting(jobs: list[_Job]) -> list[tuple[int, int, _Job]]:
                """Those of ``jobs`` (in fetch order) that fit, with their fair rank:
                partitions with room at all, then the first of each global partition up
                to its room, then of those the first of each rate partition up to its
                room, in the fair order (priority, then round robin)."""
                rank_g: Counter[str] = Counter()
                rank_t: Counter[str] = Counter()
                fit_g: list[tuple[int, int, _Job]] = []
                for job in jobs:
                    if room(job) <= 0:
                        continue
                    gp = _global_key(limits, job)
                    rank_g[gp] += 1
                    rank_t[_rate_key(limits, job)] += 1
                    if g is None or rank_g[gp] <= g.limit - running[gp]:
                        fair = rank_g[gp] if g is not None else rank_t[_rate_key(limits, job)]
                        fit_g.append((job.priority, fair, job))
                fit_g.sort(key=lambda c: (c[0], c[1], c[2].scheduled_at, c[2].id))
                rank_r: Counter[str] = Counter()
                out = []
                for c in fit_g:
                    rp = _rate_key(limits, c[2])
                    rank_r[rp] += 1
                    if r is None or rank_r[rp] <= r.limit - started[rp]:
                        out.append(c)
                return out

            busiest_g = max(running.values(), default=0)
            busiest_r = max(started.values(), default=0)
            if (g is None or busiest_g + limit <= g.limit) and (
                r is None or busiest_r + limit <= r.limit
            ):
                # As the statement does: no limit can bind, claim in fetch order.
                fast = [job for job in due if not st.skip_locked(("job", job.id))][:limit]
                return self._claim(queue, limits, st, fast, at, client_id, limit, len(due))

            walk_size = 2 * limit + 16
            walked = due[:walk_size]
            candidates = [c[2] for c in fitting(walked)]
            if len(candidates) < limit and len(walked) == walk_size:
                taken = {job.id for job in candidates}
                by_key: dict[str, list[_Job]] = {}
                by_kind, by_args = limits.key_by
                for job in due:
                    key = partition_of(by_kind, by_args, job.kind, job.args)
                    by_key.setdefault(key, []).append(job)
                for jobs in by_key.values():
                    first = [job for job in jobs if job.id not in taken]
                    candidates.extend(first[: max(room(jobs[0]), 0)])
            candidates.sort(key=lambda j: (j.priority, j.scheduled_at, j.id))
            fits = fitting(candidates)
            claimed = sorted(
                (c[2] for c in fits[:limit] if not st.skip_locked(("job", c[2].id))),
                key=lambda j: (j.priority, j.scheduled_at, j.id),
            )
            return self._claim(queue, limits, st, claimed, at, client_id, limit, len(due))

        return await self._run(f"fetching jobs of queue {queue!r}", None, op)

    def _claim(
        self,
        queue: str,
        limits: QueueLimits,
        st: _Stmt,
        jobs: list[_Job],
        at: datetime,
        client_id: str,
        limit: int,
        due: int,
    ) -> LimitedFetch:
        """Claim ``jobs`` (in fetch order), record their starts, and say whether any of
        the ``due`` jobs were held back."""
        out: list[JobRow] = []
        for job in jobs:
            running_job = _claimed(job, at, client_id)
            st.put_job(running_job, job)
            out.append(running_job.row())
        r = limits.rate_limit
        if r is not None:
            starts = self._rate_starts.setdefault(queue, [])
            starts.extend((_rate_key(limits, job), at) for job in jobs)
        held = len(out) < limit and due > len(out)
        next_open = None
        if held and r is not None:
            next_open = self._next_open(queue, r.limit, r.per, at)
        return LimitedFetch(out, held, next_open)

    def _next_open(self, queue: str, limit: int, per: float, at: datetime) -> datetime | None:
        """When the oldest start of a full rate partition leaves its window."""
        oldest: dict[str, datetime] = {}
        count: Counter[str] = Counter()
        since = at - timedelta(seconds=per)
        for p, t in self._rate_starts.get(queue, ()):
            if t <= since:
                continue
            count[p] += 1
            oldest[p] = min(oldest.get(p, t), t)
        opens = [oldest[p] for p, n in count.items() if n >= limit]
        return min(opens) + timedelta(seconds=per) if opens else None


def with_partitions(
    row: QueueRow,
    limits: QueueLimits,
    jobs: list[_Job],
    starts: list[tuple[str, datetime]],
    at: datetime,
) -> QueueRow:
    """``row`` with the partitions of its limited queue at ``at``, as `queue_list`
    reports them (``starts``: the queue's recent starts)."""
    g = limits.global_limit
    r = limits.rate_limit
    mine = [j for j in jobs if j.queue == row.name]
    running_jobs = [j for j in mine if j.state is JobState.RUNNING]
    running = _running_by_partition(running_jobs, limits)
    started = _in_window(starts, r.per, at) if r is not None else Counter()
    shown = _global_key if g is not None else _rate_key
    run_by: Counter[str] = Counter(shown(limits, j) for j in running_jobs)
    held_by: Counter[str] = Counter()
    for j in mine:
        if j.state is not JobState.AVAILABLE or j.scheduled_at > at:
            continue
        if (g is not None and running[_global_key(limits, j)] >= g.limit) or (
            r is not None and started[_rate_key(limits, j)] >= r.limit
        ):
            held_by[shown(limits, j)] += 1
    keys = sorted(set(run_by) | set(held_by), key=lambda k: (-run_by[k], -held_by[k], k))[
        :PARTITIONS_SHOWN
    ]
    partitions = tuple(PartitionInfo(json.loads(k), run_by[k], held_by[k]) for k in keys)
    return row._replace(limits=limits, held_back=sum(held_by.values()), partitions=partitions)
