"""Waiting for jobs to end: `JobWaits`, the service behind `Client.job_wait`.

One per client, run by ``open_client`` in a nursery the client owns:

```
JobWaits.run
└── nursery "waits"
    ├── reader      marks newly waited jobs in storage (job_mark_waited: the write
    │               that ends one announces it), re-reads the waited jobs that may
    │               have changed, all in one statement (a job_list by ids), and wakes
    │               the waiters of those it finds final or gone
    ├── re-check    every fetch_poll_interval while anything is waited for: every
    │               waited job is read again
    └── listener    LISTEN tq_final: notifications name the jobs to read again;
                    after each (re)connect every waited job is read again
```

The registry holds one entry per waited job id, shared by all its waiters; a waiter
sleeps on its entry's event. So a thousand waiters on one client cost one registry, one
LISTEN connection, and one read per wake-up, whatever their number.

Where notifications come from: while the client's runtime runs, its notifier (it LISTENs
to ``tq_final`` too, on its one connection); otherwise (an insert-only client, or a client
whose runtime stopped before its block ended) a LISTEN connection of this service's own,
opened at the first wait and kept until the client closes. In ``poll_only`` mode there is
no listener and the re-check alone finds the ends. With a listener the re-check is the
safety net for a notification lost (a pooler that swallows LISTEN).

The completer announces only the jobs marked as waited for, so that the clients whose
jobs nobody waits for send no NOTIFY (it takes a database-wide lock at each commit). A job
is marked before it is first read: if it ends after that read, the write that ends it
sees the mark and announces it.
"""

from __future__ import annotations

import logging
from typing import Any, Final, final

import attrs
import trio

from .._runtime.notifier import Notifier
from .._runtime.startup import backoff
from ..driver.protocol import FINAL_CHANNEL, Driver, JobRow
from ..errors import DatabaseError, JobNotFoundError, TrioqueueError
from ..job import FINALIZED_STATES, MAX_LIST_LIMIT, JobListParams

__all__ = ["JobWaits"]

log = logging.getLogger("trioqueue.wait")

_FINAL: Final = frozenset(state.value for state in FINALIZED_STATES)


@final
@attrs.define(eq=False)
class _Wait:
    """One waited job id: its waiters, and how the wait ended (set with ``done``)."""

    done: trio.Event = attrs.field(factory=trio.Event)
    waiters: int = 0
    row: JobRow | None = None
    """The job as read once final; None with ``done`` set: the job is gone, or the
    service closed (``closed``)."""
    closed: bool = False
    marked: bool = False
    """Whether the job is marked as waited for in storage (`Driver.job_mark_waited`):
    only then does the write that ends it announce it."""


@final
@attrs.define(eq=False)
class JobWaits:
    """The registry of waited jobs and the tasks that end their waits.

    Build it, optionally :meth:`share` the runtime's notifier, run :meth:`run` in the
    client's nursery, and :meth:`close` it when the client's block ends.
    """

    driver: Driver
    poll_interval: float
    """Seconds between re-checks of every waited job (``fetch_poll_interval``)."""
    poll_only: bool
    """No listener: the re-check alone finds the ends."""
    _entries: dict[int, _Wait] = attrs.field(factory=dict, init=False)
    _due: set[int] = attrs.field(factory=set, init=False)
    """Waited ids to read on the reader's next round."""
    _kicked: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set when ``_due`` gained ids; the reader replaces it as it takes them."""
    _wanted: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set at the first wait: the own listener and the re-check start then."""
    _shared: Notifier | None = attrs.field(default=None, init=False)
    _shared_until: trio.Event | None = attrs.field(default=None, init=False)
    _own: Notifier | None = attrs.field(default=None, init=False)
    _close_after: trio.Event | None = attrs.field(default=None, init=False)
    _close_asked: trio.Event = attrs.field(factory=trio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _reading: bool = attrs.field(default=False, init=False)
    reads: int = attrs.field(default=0, init=False)
    """Batch reads made (each one statement, for every waiter it wakes)."""
    listeners_opened: int = attrs.field(default=0, init=False)
    """Own LISTEN connections started (0 while the runtime's notifier serves)."""

    # ------------------------------------------------------------------ set-up

    def share(self, notifier: Notifier, until: trio.Event) -> None:
        """Take notifications from ``notifier`` (the runtime's) until ``until`` is set
        (the runtime stopped); then, if waited on, from a listener of its own. Call
        before ``notifier`` runs, so that its first LISTEN includes ``tq_final``."""
        notifier.subscribe(FINAL_CHANNEL, self._on_final)
        notifier.on_connect(self._recheck_all)
        self._shared = notifier
        self._shared_until = until

    def close(self, *, after: trio.Event | None = None) -> None:
        """End the service, at once or once ``after`` is set: :meth:`run` returns, and
        every pending and later wait raises TrioqueueError. Not a checkpoint."""
        self._close_after = after
        self._close_asked.set()

    # ------------------------------------------------------------------ waiting

    async def wait(self, job_id: int) -> JobRow:
        """The row of job ``job_id`` once it is final (completed, discarded or
        cancelled), read after it became so. ``job_id`` must already be validated.

        Raises JobNotFoundError when there is no such job, or it is deleted meanwhile;
        TrioqueueError when the client closes first (or has closed). Always a
        checkpoint. On cancellation the waiter's registration is removed, and nothing
        else happens: the job and the other waiters are untouched.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise _closed_error(job_id)
        entry = self._entries.get(job_id)
        if entry is None:
            entry = self._entries[job_id] = _Wait()
            self._mark([job_id])
        entry.waiters += 1
        self._wanted.set()
        try:
            await entry.done.wait()
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and self._entries.get(job_id) is entry:
                del self._entries[job_id]
                self._due.discard(job_id)
        if entry.row is not None:
            return entry.row
        if entry.closed:
            raise _closed_error(job_id)
        raise JobNotFoundError(job_id)

    def statistics(self) -> dict[str, Any]:
        """Counters for tests and dashboards: waited jobs, their waiters, batch reads
        (and whether one is under way), where notifications come from, whether that
        listener LISTENs now, own listeners started. Not a checkpoint."""
        if self.poll_only:
            source = "polling"
        elif self._shared is not None and not self._shared_until_set():
            source = "runtime notifier"
        elif self._own is not None:
            source = "own listener"
        else:
            source = "none yet"
        listener = {"runtime notifier": self._shared, "own listener": self._own}.get(source)
        return {
            "waited_jobs": len(self._entries),
            "waiters": sum(e.waiters for e in self._entries.values()),
            "reads": self.reads,
            "reading": self._reading,
            "source": source,
            "listening": listener is not None and listener.connected,
            "listeners_opened": self.listeners_opened,
            "closed": self._closed,
        }

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the waits until :meth:`close` takes effect (then return) or until
        cancelled. Either way every pending wait is woken and raises TrioqueueError, and
        later waits raise it at once. Database errors never end it: a failed read is
        retried with backoff (a WARNING each time), a lost listener reconnects."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._rechecker)
                if not self.poll_only:
                    nursery.start_soon(self._listener)
                task_status.started()
                await self._close_asked.wait()
                if self._close_after is not None:
                    await self._close_after.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._closed = True
            for entry in self._entries.values():
                entry.closed = True
                entry.done.set()
            self._entries.clear()
            self._due.clear()

    async def _reader(self) -> None:
        failures = 0
        while True:
            await self._kicked.wait()
            self._kicked = trio.Event()
            ids = sorted(i for i in self._due if i in self._entries)
            self._due.clear()
            for start in range(0, len(ids), MAX_LIST_LIMIT):
                chunk = ids[start : start + MAX_LIST_LIMIT]
                self._reading = True
                try:
                    # Marked before the read: a job that ends after the read is announced.
                    unmarked = [] if self.poll_only else self._unmarked(chunk)
                    if unmarked:
                        # A job a writer holds is skipped: left unmarked, it is marked by
                        # a later round (the re-check's at the latest), and its end seen
                        # by this read or a later one.
                        for job_id in await self.driver.job_mark_waited(unmarked):
                            if (entry := self._entries.get(job_id)) is not None:
                                entry.marked = True
                    rows = await self.driver.job_list(JobListParams(ids=chunk, limit=len(chunk)))
                except DatabaseError as exc:
                    failures += 1
                    delay = backoff(failures)
                    log.warning(
                        "reading waited jobs failed (attempt %d), retrying in %.2f s: %s",
                        failures,
                        delay,
                        exc,
                    )
                    self._mark(ids[start:])
                    self._reading = False
                    await trio.sleep(delay)
                    break
                finally:
                    self._reading = False
                failures = 0
                self.reads += 1
                self._settle(chunk, rows)

    def _settle(self, ids: list[int], rows: list[JobRow]) -> None:
        """Wake the waiters of every job of ``ids`` that ``rows`` (read after they were
        marked) shows final, or does not hold (gone)."""
        found = {row.id: row for row in rows}
        for job_id in ids:
            entry = self._entries.get(job_id)
            if entry is None:
                continue  # its waiters left meanwhile
            row = found.get(job_id)
            if row is not None and row.state not in _FINAL:
                continue
            entry.row = row
            del self._entries[job_id]
            entry.done.set()

    async def _rechecker(self) -> None:
        await self._wanted.wait()
        while True:
            await trio.sleep(self.poll_interval)
            self._recheck_all()

    async def _listener(self) -> None:
        """Run an own listener from the first wait on, unless (and until) the runtime's
        notifier serves."""
        if self._shared_until is not None:
            await self._shared_until.wait()
        await self._wanted.wait()
        own = Notifier(self.driver, [FINAL_CHANNEL])
        own.subscribe(FINAL_CHANNEL, self._on_final)
        own.on_connect(self._recheck_all)
        self._own = own
        self.listeners_opened += 1
        await own.run()

    # ------------------------------------------------------------------ callbacks

    def _unmarked(self, ids: list[int]) -> list[int]:
        return [i for i in ids if (entry := self._entries.get(i)) is not None and not entry.marked]

    def _mark(self, ids: list[int]) -> None:
        """Have the reader read ``ids`` on its next round. Not a checkpoint."""
        self._due.update(ids)
        self._kicked.set()

    def _on_final(self, payload: dict[str, Any]) -> None:
        ids = payload.get("ids")
        if not self._entries or not isinstance(ids, list):
            return
        waited = [i for i in ids if isinstance(i, int) and i in self._entries]
        if waited:
            self._mark(waited)

    def _recheck_all(self) -> None:
        if self._entries:
            self._mark(list(self._entries))

    def _shared_until_set(self) -> bool:
        return self._shared_until is not None and self._shared_until.is_set()


def _closed_error(job_id: int) -> TrioqueueError:
    return TrioqueueError(
        f"the client closed while job_wait waited for job {job_id} (its `async with` "
        "block ended): open a client for as long as you wait"
    )
