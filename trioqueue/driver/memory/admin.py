"""Everything but the jobs themselves: counting jobs, the queues, notifications and
listeners, leadership, and the periodic jobs' schedule state (`_Admin`, one of the parts
of `MemoryDriver`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final

import attrs
import trio

from ...job import FINALIZED_STATES, JobState
from ...limits import QueueLimits
from ..protocol import CONTROL_CHANNEL, LEADERSHIP_CHANNEL, LeaderRow, PeriodicJobState, QueueRow
from .errors import MemoryDataError
from .limits import with_partitions
from .listener import MemoryListener
from .rows import _Leader, _Periodic, _Queue
from .statement import _Stmt
from .store import _Store
from .values import _check_length, _json_text, _opt_ts, _ts

_NAMEDATALEN: Final = 64
_NOTIFY_PAYLOAD_MAX: Final = 8000


class _Admin(_Store):
    """Counts, queues, notifications, leadership and periodic job state."""

    # ---- counts

    async def job_count_live(self) -> list[tuple[str, str, int]]:
        """Exact ``(queue, state, count)`` of every queue and unfinalized state with jobs."""

        def op(st: _Stmt) -> list[tuple[str, str, int]]:
            counts: dict[tuple[str, str], int] = {}
            for job in st.visible_jobs():
                if job.state not in FINALIZED_STATES:
                    key = (job.queue, job.state.value)
                    counts[key] = counts.get(key, 0) + 1
            return [(q, s, n) for (q, s), n in sorted(counts.items())]

        return await self._run("counting live jobs", None, op)

    async def job_count_finalized(
        self, exact_up_to: int
    ) -> list[tuple[str, int | None, int | None]]:
        """``(state, count, estimate)`` per finalized state; the memory store counts
        exactly, so the estimate is the exact count."""

        def op(st: _Stmt) -> list[tuple[str, int | None, int | None]]:
            counts = dict.fromkeys(sorted(FINALIZED_STATES), 0)
            for job in st.visible_jobs():
                if job.state in counts:
                    counts[job.state] += 1
            return [(s.value, min(n, exact_up_to), n) for s, n in counts.items()]

        return await self._run("counting finalized jobs", None, op)

    async def job_count_finalized_since(self, since: datetime, limit: int) -> dict[str, int]:
        """Per finalized state, jobs finalized at or after ``since`` (at most ``limit``)."""
        start = _ts(since)

        def op(st: _Stmt) -> dict[str, int]:
            counts = dict.fromkeys(sorted(s.value for s in FINALIZED_STATES), 0)
            for job in st.visible_jobs():
                if job.finalized_at is not None and job.finalized_at >= start:
                    counts[job.state.value] += 1
            return {s: min(n, limit) for s, n in counts.items()}

        return await self._run("counting recently finalized jobs", None, op)

    # ---- queues

    async def queue_upsert(
        self, name: str, now: datetime, limits: QueueLimits | None = None, *, rekey: bool = False
    ) -> bool:
        """Create the queue's row or touch its updated_at, storing ``limits``; return
        whether it is paused. (``rekey`` is PostgreSQL's: partitions are computed here as
        each fetch reads them, so there are no stored keys to refresh.)"""
        at = _ts(now)

        def op(st: _Stmt) -> bool:
            _check_length("tq_queue", "tq_queue_name_length", name)
            st.lock(("queue", name))
            old = st.queue(name)
            new = (
                _Queue(name, at, None, at, limits)
                if old is None
                else attrs.evolve(old, updated_at=at, limits=limits)
            )
            st.queues[name] = new
            return new.paused_at is not None

        return await self._run(f"registering queue {name!r}", None, op)

    def _queue_change(self, action: str, name: str, at: datetime) -> Callable[[_Stmt], list[str]]:
        pause = action == "pause"

        def op(st: _Stmt) -> list[str]:
            changed: list[_Queue] = []
            if name == "*":
                for row in st.visible_queues():
                    if (row.paused_at is None) == pause:
                        st.lock(("queue", row.name))
                        changed.append(
                            attrs.evolve(row, paused_at=at if pause else None, updated_at=at)
                        )
            else:
                old = st.queue(name)
                if pause:
                    _check_length("tq_queue", "tq_queue_name_length", name)
                    st.lock(("queue", name))
                    changed.append(
                        _Queue(name, at, at, at)
                        if old is None
                        else attrs.evolve(old, paused_at=old.paused_at or at, updated_at=at)
                    )
                elif old is not None:
                    st.lock(("queue", name))
                    changed.append(attrs.evolve(old, paused_at=None, updated_at=at))
            for queue in changed:
                st.queues[queue.name] = queue
                st.notify(CONTROL_CHANNEL, json.dumps({"action": action, "queue": queue.name}))
            return [q.name for q in changed]

        return op

    async def queue_pause(self, name: str, now: datetime, *, ex: Any = None) -> list[str]:
        """Pause a queue, creating its row if need be, and return ``[name]`` (even when it
        was paused already); ``"*"`` pauses every known unpaused queue and returns those.
        Sends a ``pause`` control message per name returned (at commit, inside a
        transaction)."""
        op = self._queue_change("pause", name, _ts(now))
        return await self._run(f"pausing queue {name!r}", ex, op)

    async def queue_resume(self, name: str, now: datetime, *, ex: Any = None) -> list[str]:
        """Resume a queue and return ``[name]`` if it has a row (paused or not); ``"*"``
        resumes every paused queue and returns those. Sends a ``resume`` control message per
        name returned."""
        op = self._queue_change("resume", name, _ts(now))
        return await self._run(f"resuming queue {name!r}", ex, op)

    async def queue_paused(self, names: Sequence[str]) -> set[str]:
        """Which of these queues are paused (committed state)."""

        def op(st: _Stmt) -> set[str]:
            return {
                n
                for n in names
                if (q := self._queues.get(n)) is not None and q.paused_at is not None
            }

        return await self._run("reading queue state", None, op)

    async def queue_list(self) -> list[QueueRow]:
        """Every queue row (committed state), ordered by name, with its available and
        running job counts, as `QueueRow` ``(name, paused_at, created_at, updated_at,
        available, running)``, and for a limited queue its limits and partitions."""

        def op(st: _Stmt) -> list[QueueRow]:
            counts: dict[tuple[str, JobState], int] = {}
            for job in st.visible_jobs():
                if job.state in (JobState.AVAILABLE, JobState.RUNNING):
                    key = (job.queue, job.state)
                    counts[key] = counts.get(key, 0) + 1
            rows = [
                QueueRow(
                    q.name,
                    q.paused_at,
                    q.created_at,
                    q.updated_at,
                    counts.get((q.name, JobState.AVAILABLE), 0),
                    counts.get((q.name, JobState.RUNNING), 0),
                )
                for q in sorted(st.visible_queues(), key=lambda q: q.name)
            ]
            limited = {q.name: q.limits for q in st.visible_queues() if q.limits is not None}
            if not limited:
                return rows
            jobs = list(st.visible_jobs())
            now = self.clock()
            return [
                with_partitions(
                    row, limited[row.name], jobs, self._rate_starts.get(row.name, []), now
                )
                if row.name in limited
                else row
                for row in rows
            ]

        return await self._run("listing queues", None, op)

    # ---- notifications

    async def notify_many(self, channel: str, payloads: Sequence[str]) -> None:
        """Send each payload on ``channel`` to every open listener of it (identical
        payloads once). Raises DatabaseError for an empty or too long channel name or a
        payload of 8000 bytes or more, sending nothing."""

        def op(st: _Stmt) -> None:
            if not payloads:
                return
            if not channel:
                raise MemoryDataError("channel name cannot be empty")
            if len(channel.encode()) >= _NAMEDATALEN:
                raise MemoryDataError("channel name too long")
            for payload in payloads:
                if len(payload.encode()) >= _NOTIFY_PAYLOAD_MAX:
                    raise MemoryDataError("payload string too long")
                st.notify(channel, payload)

        await self._run("sending notifications", None, op)

    @asynccontextmanager
    async def open_listener(self, channels: Sequence[str]) -> AsyncIterator[MemoryListener]:
        """A listener for ``channels`` for the block: it receives what is committed on them
        from now on (see :class:`MemoryListener` about overflow)."""
        await trio.lowlevel.checkpoint()
        listener = MemoryListener(channels, self._listener_buffer)
        self._listeners[listener] = None
        try:
            yield listener
        finally:
            self._listeners.pop(listener, None)

    # ---- leadership

    async def leader_attempt_elect(
        self, leader_id: str, now: datetime, expires_at: datetime
    ) -> bool:
        """Become leader (nobody leads, or the term has expired before ``now``) or extend
        our own term (keeping elected_at); return whether ``leader_id`` leads afterwards."""
        at, until = _ts(now), _ts(expires_at)

        def op(st: _Stmt) -> bool:
            _check_length("tq_leader", "tq_leader_id_length", leader_id)
            current = self._leader
            if current is None:
                st.leader = (_Leader(leader_id, at, until),)
                return True
            if current.expires_at < at or current.leader_id == leader_id:
                same = current.leader_id == leader_id
                st.leader = (_Leader(leader_id, current.elected_at if same else at, until),)
                return True
            return False

        return await self._run("electing a leader", None, op)

    async def leader_resign(self, leader_id: str) -> bool:
        """Give up leadership if ``leader_id`` holds it (announced on the leadership
        channel); return whether it did."""

        def op(st: _Stmt) -> bool:
            current = self._leader
            if current is None or current.leader_id != leader_id:
                return False
            st.leader = (None,)
            payload = '{"action" : "resigned", "leader_id" : ' + _json_text(leader_id) + "}"
            st.notify(LEADERSHIP_CHANNEL, payload)
            return True

        return await self._run("resigning leadership", None, op)

    async def leader_get(self) -> LeaderRow | None:
        """`LeaderRow` ``(leader_id, elected_at, expires_at)``, or None when nobody leads."""

        def op(st: _Stmt) -> LeaderRow | None:
            current = self._leader
            if current is None:
                return None
            return LeaderRow(current.leader_id, current.elected_at, current.expires_at)

        return await self._run("reading the leader", None, op)

    # ---- periodic jobs

    async def periodic_job_get_many(
        self, ids: Sequence[str], *, ex: Any = None
    ) -> dict[str, PeriodicJobState]:
        """The stored state of each of these periodic jobs that has a row."""

        def op(st: _Stmt) -> dict[str, PeriodicJobState]:
            found = {}
            for pid in ids:
                row = st.periodic_row(pid)
                if row is not None:
                    found[pid] = row.state()
            return found

        return await self._run("reading periodic job state", ex, op)

    async def periodic_job_save(
        self,
        state: PeriodicJobState,
        expected: PeriodicJobState | None,
        now: datetime,
        *,
        ex: Any = None,
    ) -> bool:
        """Write ``state`` if there is no row yet, or if the row still has ``expected``'s
        next_run_at, schedule and last_run_at (None: matches no row); last_run_at never
        moves back.
        Returns whether it wrote. The row stays locked until ``ex`` ends either way."""
        at = _ts(now)
        next_run = _ts(state.next_run_at)
        last_run = _opt_ts(state.last_run_at)
        want_next = None if expected is None else _ts(expected.next_run_at)
        want_schedule = None if expected is None else expected.schedule
        want_last = None if expected is None else _opt_ts(expected.last_run_at)

        def op(st: _Stmt) -> bool:
            _check_length("tq_periodic_job", "tq_periodic_job_id_length", state.id)
            st.lock(("periodic", state.id))
            old = st.periodic_row(state.id)
            if old is None:
                st.periodic[state.id] = _Periodic(state.id, state.schedule, next_run, last_run, at)
                return True
            if (old.next_run_at, old.schedule, old.last_run_at) != (
                want_next,
                want_schedule,
                want_last,
            ):
                return False
            if old.last_run_at is None:
                latest = last_run
            elif last_run is None:
                latest = old.last_run_at
            else:
                latest = max(old.last_run_at, last_run)
            st.periodic[state.id] = _Periodic(state.id, state.schedule, next_run, latest, at)
            return True

        return await self._run(f"saving periodic job state of {state.id!r}", ex, op)
