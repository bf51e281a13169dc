"""The producer: one per queue. Fetches as many jobs as it has free slots and hands them
to its `ClaimedJobs`, whose worker tasks run them through `Executor.run` (each in a lane
shared with the jobs it ran before, until a cancel uses it up).

Fetches happen when woken (an insert notification, a freed slot after a full fetch, a
resume), at least every ``fetch_poll_interval``, and — while the queue is busy — at most
once per ``fetch_cooldown``; a wake-up after a fetch that found nothing fetches at once.
While the completer cannot write outcomes, nothing is fetched (backpressure: see
`Completer`).
A fetch is shielded (with a deadline) so a claimed job is never dropped on the floor by a
cancellation arriving mid-statement.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from datetime import datetime
from typing import final

import attrs
import trio

from .._codec import row_to_job
from ..driver.protocol import Driver, JobRow
from ..errors import DatabaseError
from ..limits import QueueLimits
from .claimed import ClaimedJobs, Wakeup
from .completer import Completer, OutcomeSender
from .executor import Executor

__all__ = ["Producer", "ProducerStatistics"]

log = logging.getLogger("trioqueue.producer")

FETCH_DEADLINE = 10.0
"""Seconds a shielded fetch may take before it is cancelled on the server."""


@final
@attrs.frozen
class ProducerStatistics:
    running: int
    """Jobs running now."""
    fetches: int
    """Fetch statements run."""
    fetched: int
    """Jobs fetched in total."""


@final
@attrs.define(eq=False)
class Producer:
    queue: str
    max_workers: int
    limits: QueueLimits | None
    """The queue's global and rate limits, enforced by the fetch; None for none."""
    driver: Driver
    client_id: str
    executor: Executor
    completer: Completer
    """Consulted for backpressure: nothing is fetched while it cannot write."""
    now: Callable[[], datetime]
    fetch_cooldown: float
    fetch_poll_interval: float
    check_cancels: bool
    """Poll for cancel requests of running jobs (when LISTEN is not available)."""
    _wake: Wakeup = attrs.field(factory=Wakeup, init=False)
    claimed: ClaimedJobs = attrs.field(init=False)
    """Every claimed job that has not handed its outcome over yet, and its workers."""
    _fetch_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    _jobs_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    """Cancelled by a hard stop: every running job is interrupted."""
    _fetches: int = attrs.field(default=0, init=False)
    _fetched: int = attrs.field(default=0, init=False)
    _held_back: bool = attrs.field(default=False, init=False)
    """The last fetch left due jobs behind because a limit was reached."""
    _next_open: datetime | None = attrs.field(default=None, init=False)
    """When a rate window next opens for the jobs held back (None: not known)."""
    _held_empty: int = attrs.field(default=0, init=False)
    """Fetches in a row that a limit held back and that claimed nothing."""

    def __attrs_post_init__(self) -> None:
        self.claimed = ClaimedJobs(self.queue, self._wake)

    def statistics(self) -> ProducerStatistics:
        return ProducerStatistics(len(self.claimed), self._fetches, self._fetched)

    def wake(self) -> None:
        """Ask for a fetch soon (respecting the cooldown). Not a checkpoint."""
        self._wake.set()

    def cancel_job(self, job_id: int) -> bool:
        """Cancel a claimed job; False if this producer did not claim it."""
        return self.claimed.cancel(job_id)

    def soft_stop(self) -> None:
        """Stop fetching; running jobs go on to the end. Not a checkpoint; before `run`,
        it runs no fetch at all."""
        self._fetch_scope.cancel()

    def hard_stop(self) -> None:
        """Stop fetching and cancel every running job. Not a checkpoint."""
        self._fetch_scope.cancel()
        self._jobs_scope.cancel()

    async def run(
        self,
        outcomes: OutcomeSender,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Fetch and run jobs until stopped; return when every job it claimed has handed
        its outcome to ``outcomes``, and close it (this producer's handle on the
        completer's input)."""
        with outcomes:
            try:
                with self._jobs_scope:
                    async with trio.open_nursery() as jobs:
                        self.claimed.serve(jobs, self.executor, outcomes)
                        task_status.started()
                        try:
                            with self._fetch_scope:
                                await self._fetch_loop()
                        finally:
                            self.claimed.stop_accepting()
            finally:
                self.claimed.hand_back(outcomes)

    async def _fetch_loop(self) -> None:
        last_fetch = -math.inf
        last_found_work = False
        again = False
        backoff = 0.1
        # At most half the slots per fetch, so that with a backlog the next fetch is on its
        # way while the jobs of the last one run: a job that never blocks runs to its end
        # in the scheduling batch after it starts, and a fetch for every free slot would
        # only be sent once the whole batch has run, leaving the process idle meanwhile.
        max_fetch = max(1, (self.max_workers + 1) // 2)
        while True:
            # The fetch itself is shielded, and a fetch right after a full one waits for
            # nothing: without this check a stopped producer would keep claiming jobs for
            # as long as each fetch comes back full.
            await trio.lowlevel.checkpoint_if_cancelled()
            free = self.max_workers - len(self.claimed)
            # The cooldown limits how often a busy queue is fetched from. After a fetch
            # that found nothing, a wake-up means new work: fetch at once (idle latency).
            # Right after a full fetch there is a backlog: fetch again at once while slots
            # last, so that this fetch is in flight while the jobs just started run.
            if free > 0 and last_found_work and not again:
                wait = last_fetch + self.fetch_cooldown - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    free = self.max_workers - len(self.claimed)
            again = False
            if free > 0 and not self.completer.writable:
                # Outcomes cannot be written now: fetch nothing until they can, so that
                # finished runs do not pile up unwritten (a crash would run them again).
                # Cancel requests of running jobs are still polled for meanwhile.
                with trio.move_on_after(self.fetch_poll_interval) as waited:
                    await self.completer.wait_writable()
                if waited.cancelled_caught and self.check_cancels and self.claimed:
                    await self._poll_cancels()
                continue
            if free > 0:
                self._wake.clear()
                if self._held_back:
                    # A write that ends while this fetch runs may free a slot it missed.
                    self.completer.call_after_write(self._wake.set)
                last_fetch = trio.current_time()
                limit = min(free, max_fetch)
                try:
                    rows = await self._fetch(limit)
                except DatabaseError as exc:
                    log.warning(
                        "fetching from queue %r failed, retrying in %.1f s: %s",
                        self.queue,
                        backoff,
                        exc,
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.fetch_poll_interval * 5)
                    continue
                backoff = 0.1
                self._fetches += 1
                self._fetched += len(rows)
                full = self.claimed.wake_when_free = len(rows) == limit
                if self._held_back:
                    # The database counts our jobs as running until their outcomes are
                    # written (those running, and those ended but not written yet): the
                    # write after them may free a slot.
                    self.completer.call_after_write(self._wake.set)
                last_found_work = bool(rows)
                # No checkpoint between the fetch and queuing the jobs: every claimed job
                # is run or, after a hard stop, handed back (see run), so it always
                # reports an outcome.
                args_type = self.executor.workers.args_type
                claimed = self.claimed
                for row in rows:  # in priority order
                    claimed.add(row_to_job(row, args_type(row.kind)))
                claimed.call_workers(1)
                if full and len(claimed) < self.max_workers:
                    again = True
                    continue
            # After finding work, look again one cooldown later: inserts made meanwhile may
            # not have notified (clients send at most one insert notification per queue per
            # cooldown), and this bounds their wait by the cooldown, not the poll interval.
            if last_found_work:
                poll = self.fetch_cooldown
            else:
                poll = self.fetch_poll_interval * random.uniform(1.0, 1.1)
            if self._held_back:
                poll = min(poll, self._held_back_poll())
            if len(self.claimed) >= self.max_workers:
                # Every slot is busy, so a wake-up (an insert notification, a resume) can
                # do nothing now; and the fetch that filled the last slot was full, so the
                # first job to end wakes this loop anyway. Forget the wake-up: waiting on a
                # set event returns at once, and the loop would spin until a slot frees.
                self._wake.clear()
            with trio.move_on_after(poll) as waited:
                await self._wake.wait()
            if waited.cancelled_caught and self.check_cancels and self.claimed:
                await self._poll_cancels()

    def _held_back_poll(self) -> float:
        """How long to wait before looking again for jobs a limit holds back: until the
        rate window opens, when known; else one cooldown, doubling with each fetch in a
        row that found nothing, up to the poll interval, since another client's job may
        end at any moment (this client's own wake it as their outcomes are written)."""
        if self._next_open is None:
            backoff: float = self.fetch_cooldown * 2.0 ** min(self._held_empty, 16)
            return min(backoff, self.fetch_poll_interval)
        opens_in = (self._next_open - self.now()).total_seconds()
        return min(max(opens_in, 0.001), self.fetch_poll_interval)

    async def _fetch(self, limit: int) -> list[JobRow]:
        """Claim up to ``limit`` jobs, within the queue's limits; notes whether they held
        jobs back. On cancellation (shielded, up to `FETCH_DEADLINE`): the fetch finishes
        first, so every claimed job is returned."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FETCH_DEADLINE
            if self.limits is None:
                return await self.driver.job_get_available(
                    self.queue, self.now(), limit, self.client_id
                )
            found = await self.driver.job_get_available_limited(
                self.queue, self.now(), limit, self.client_id, self.limits
            )
            self._held_back = found.held_back
            self._next_open = found.next_open
            self._held_empty = self._held_empty + 1 if found.held_back and not found.rows else 0
            return found.rows
        raise DatabaseError(
            f"fetching from queue {self.queue!r}",
            TimeoutError(f"no answer within {FETCH_DEADLINE} s"),
        )

    async def _poll_cancels(self) -> None:
        try:
            ids = await self.driver.job_cancel_requested(list(self.claimed.running))
        except DatabaseError as exc:
            log.warning("checking for cancel requests failed: %s", exc)
            return
        for job_id in ids:
            self.cancel_job(job_id)
