"""The periodic job enqueuer: every client that has a periodic job takes part, leader or
not, and each run is inserted once.

Each run time of a periodic job (see :mod:`trioqueue.periodic`) is inserted as a job whose
unique key is derived from the periodic job's id and that run time, unique over every job
state: a completed or cancelled run still blocks a second insert of the same run. Beside
it, ``tq_periodic_job`` keeps each periodic job's next run time, written in the same
transaction as the run's job with a compare-and-set, so any number of clients configured
alike insert each run once, and a restarted process carries on where the last one stopped.

Clients that disagree on a job's schedule (a rolling deploy that changes it, or a mistake)
each store their own in turn, and each inserts the latest run time of its own schedule
that is after the last run anyone inserted; nothing counts as missed. A warning says so,
once per job and client.

Missed runs. When a client finds that more than one run time of a job has passed since
its stored ``next_run_at`` (no client had the job, or the process was down for longer than
an interval), it inserts **one** catch-up job for the latest run time, with
``metadata.missed_runs`` = how many earlier run times got no job of their own (counted up
to 10,000) and ``metadata.missed_since`` = the first of them, then goes on with the normal
schedule. A run that is merely late (one run time passed) is inserted as a normal run.

The enqueuer sleeps until the earliest next run time, at most ``max_sleep`` seconds, and
wakes early when the client's list of periodic jobs changes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, final

import attrs
import trio

from .._codec import row_to_job
from .._insert import InsertBuilder
from ..driver.protocol import Driver, JobInsertParams, PeriodicJobState
from ..errors import DatabaseError, UnknownJobKindError, ValidationError
from ..job import InsertOpts, Job, JobState
from ..periodic import PeriodicJob, PeriodicJobs

__all__ = [
    "PeriodicEnqueuer",
    "PeriodicEnqueuerConfig",
    "PeriodicEnqueuerResult",
    "PeriodicRun",
    "run_unique_key",
]

log = logging.getLogger("trioqueue.periodic")

ALL_STATES = "11111111"
"""A run's unique key holds in every state: a finished run is never inserted again."""


def run_unique_key(periodic_job_id: str, run_at: datetime) -> bytes:
    """The unique key of one run of a periodic job."""
    text = f"periodic&id={periodic_job_id}&at={run_at.isoformat()}"
    return hashlib.sha256(text.encode()).digest()


class _StateMoved(Exception):
    """Another enqueuer changed a job's stored state since we read it."""


class _BuildFailed(Exception):
    """A run's ``args`` function raised, or its result cannot be inserted by this
    client (logged where it happened)."""


@final
@attrs.frozen
class PeriodicEnqueuerConfig:
    max_sleep: float = 5.0
    """Longest sleep between passes, even when no run is due sooner: bounds the effect of
    a wall-clock jump and of state changed by another client."""
    retry_delay: float = 1.0
    """Sleep after a failed pass (a database error, or a state another client moved)."""

    def __attrs_post_init__(self) -> None:
        for name in ("max_sleep", "retry_delay"):
            if getattr(self, name) <= 0:
                raise ValidationError(f"PeriodicEnqueuerConfig.{name}", "must be greater than 0")


@final
@attrs.frozen
class PeriodicRun:
    """One run the enqueuer handled."""

    periodic_job_id: str
    run_at: datetime
    job: Job[Any] | None
    """The inserted job (or the one already there); None when the run was skipped."""
    duplicate: bool = False
    """The run's job already existed (inserted earlier, by this or another client)."""
    missed_runs: int = 0


@final
@attrs.frozen
class PeriodicEnqueuerResult:
    runs: list[PeriodicRun]
    """Runs inserted, found already inserted, or skipped (``job`` None) in this pass."""
    conflicts: int
    """Jobs whose stored state another client moved meanwhile; retried next pass."""
    failed: int
    """Runs this client could not build (``args`` raised, or its result cannot be
    inserted here): left for another client, or for this one's next pass."""
    next_run_at: datetime | None
    """The earliest upcoming run time over all jobs; None when there are none."""
    errors: int = 0
    """Jobs whose claim or insert failed with a DatabaseError (logged); retried after
    ``retry_delay``."""


@attrs.frozen
class _Plan:
    run_at: datetime | None
    missed_runs: int
    missed_since: datetime | None
    state: PeriodicJobState | None
    """The state to write; None: nothing to write."""


def plan_job(
    job: PeriodicJob, stored: PeriodicJobState | None, now: datetime, first_seen: bool
) -> _Plan:
    """What to do for ``job`` at ``now``, given its stored state. Pure: no I/O."""
    schedule = job.schedule
    on_start = job.run_on_start and first_seen
    if stored is None:
        # Never seen: start afresh, nothing counts as missed.
        run_at = schedule.latest_at_or_before(now) if on_start else None
        state = PeriodicJobState(job.effective_id, schedule.key, schedule.next_after(now), run_at)
        return _Plan(run_at, 0, None, state)
    if stored.schedule not in (None, schedule.key):
        # Stored under another schedule (changed, or another client has it otherwise):
        # our latest run time is due if it is after the last run inserted by anyone
        # (never run: once the stored next run time has passed), and we wake at the
        # stored next run time or our own, whichever is first. Nothing counts as missed:
        # the stored times are not on our grid.
        latest = schedule.latest_at_or_before(now)
        passed = stored.next_run_at <= now
        if stored.last_run_at is None:
            ours = passed or on_start
        else:
            ours = latest > stored.last_run_at
        run_at = latest if ours else None
        upcoming = schedule.next_after(now)
        state = PeriodicJobState(
            job.effective_id,
            schedule.key,
            upcoming if passed else min(upcoming, stored.next_run_at),
            run_at if run_at is not None else stored.last_run_at,
        )
        return _Plan(run_at, 0, None, state)
    if stored.next_run_at <= now:
        latest = schedule.latest_at_or_before(now)
        due = schedule.count_between(stored.next_run_at, latest)
        # (The stored next run time may be off our grid, written by a client that
        # disagreed: then our latest run time may have had its run already.)
        fresh = stored.last_run_at is None or latest > stored.last_run_at
        run_at = latest if due >= 1 or (on_start and fresh) else None
        missed = max(due - 1, 0)
        state = PeriodicJobState(
            job.effective_id,
            schedule.key,
            schedule.next_after(now),
            run_at if run_at is not None else stored.last_run_at,
        )
        return _Plan(run_at, missed, stored.next_run_at if missed else None, state)
    if on_start:
        latest = schedule.latest_at_or_before(now)
        if stored.last_run_at is None or latest > stored.last_run_at:
            state = attrs.evolve(stored, schedule=schedule.key, last_run_at=latest)
            return _Plan(latest, 0, None, state)
    return _Plan(None, 0, None, None)


@final
@attrs.define(eq=False)
class PeriodicEnqueuer:
    driver: Driver
    now: Callable[[], datetime]
    jobs: PeriodicJobs
    inserts: InsertBuilder
    """The client's insert builder: a run's job is checked and encoded as the client's
    own inserts are (a kind without a worker here raises UnknownJobKindError)."""
    config: PeriodicEnqueuerConfig = PeriodicEnqueuerConfig()
    _seen: set[str] = attrs.field(factory=set, init=False)
    """Ids of jobs this client has handled since it started (for ``run_on_start``)."""
    _disagreed: set[str] = attrs.field(factory=set, init=False)
    """Ids of jobs whose stored schedule differed from ours (warned once)."""
    _failed: dict[str, datetime] = attrs.field(factory=dict, init=False)
    """The run time whose build last failed, by job id (logged in full once)."""
    _unknown_kind: set[str] = attrs.field(factory=set, init=False)
    """Ids of jobs whose kind this client has no worker for (warned once)."""

    def _build(self, job: PeriodicJob, plan: _Plan, now: datetime) -> JobInsertParams | None:
        """The insert params for a planned run, or None when ``args`` returned None (the
        run is skipped on purpose). Raises _BuildFailed (logged) when ``args`` raised or
        its result cannot be inserted by this client."""
        assert plan.run_at is not None
        jid = job.effective_id
        try:
            built = job.args()
            if built is None:
                log.debug("periodic job %r: args returned None, run skipped", jid)
                return None
            if isinstance(built, tuple) and len(built) == 2:
                args, opts = built
            else:
                args, opts = built, None
            if opts is None:
                own = getattr(args, "insert_opts", None)
                opts = own() if callable(own) else InsertOpts()
            if not isinstance(opts, InsertOpts):
                raise ValidationError("opts", "must be an InsertOpts")
            metadata: dict[str, Any] = dict(opts.metadata or {})
            metadata.update(
                periodic=True, periodic_job_id=jid, periodic_run_at=plan.run_at.isoformat()
            )
            if plan.missed_runs:
                assert plan.missed_since is not None
                metadata.update(
                    missed_runs=plan.missed_runs, missed_since=plan.missed_since.isoformat()
                )
            opts = attrs.evolve(opts, metadata=metadata, unique=None)
            params = self.inserts.params((args, opts), now)
        except UnknownJobKindError as exc:
            # A client without the worker (a web app, say): expected, so one WARNING per
            # job, and the runs are left to the clients that have it.
            first = jid not in self._unknown_kind
            self._unknown_kind.add(jid)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "periodic job %r: this client has no worker for kind %r, so it leaves the "
                "runs to clients that have one",
                jid,
                exc.kind,
            )
            raise _BuildFailed from exc
        except Exception as exc:
            # Logged in full once per run time; the next tries of the same run quietly.
            first = self._failed.get(jid) != plan.run_at
            self._failed[jid] = plan.run_at
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "periodic job %r: building the run for %s failed; not inserted by this "
                "client (another client with the job, or this one in a while, tries again)",
                jid,
                plan.run_at.isoformat(),
                exc_info=first,
            )
            raise _BuildFailed from exc
        self._failed.pop(jid, None)
        return params._replace(
            unique_key=run_unique_key(jid, plan.run_at), unique_states=ALL_STATES
        )

    async def _apply(
        self,
        job: PeriodicJob,
        stored: PeriodicJobState | None,
        plan: _Plan,
        now: datetime,
    ) -> PeriodicRun | None:
        """Claim the planned run, then build and insert it, in one transaction.

        The new state is written first, with a compare-and-set that holds the state's row
        until the transaction ends: of several clients due at once only the one that
        claims the run calls the job's ``args`` function; the others wait for it and find
        the state moved. Raises _StateMoved (nothing written) if another enqueuer got there
        first, and _BuildFailed (the claim rolled back, so another client may insert the
        run) if ``args`` raised or its result cannot be inserted here.
        """
        assert plan.state is not None
        jid = job.effective_id
        try:
            async with self.driver.transaction() as tx:
                if not await self.driver.periodic_job_save(plan.state, stored, now, ex=tx):
                    raise _StateMoved
                if plan.run_at is None:
                    return None
                params = self._build(job, plan, now)
                if params is None:
                    return PeriodicRun(jid, plan.run_at, None, False, plan.missed_runs)
                notify = [params.queue] if params.state is JobState.AVAILABLE else []
                [(row, duplicate)] = await self.driver.job_insert_many([params], notify, now, ex=tx)
        except DatabaseError as exc:
            # Values the database refused would be refused again on every pass, and
            # would hold back the jobs after this one: skip the run, as args returning
            # None does.
            if not exc.rejected_data or plan.run_at is None:
                raise
            log.error(
                "periodic job %r: the database refused the run for %s, run skipped: %s",
                jid,
                plan.run_at.isoformat(),
                exc,
            )
            async with self.driver.transaction() as tx:  # a bounded wait for the row
                if not await self.driver.periodic_job_save(plan.state, stored, now, ex=tx):
                    raise _StateMoved from None
            return PeriodicRun(jid, plan.run_at, None, False, plan.missed_runs)
        if plan.missed_runs and not duplicate:
            log.warning(
                "periodic job %r missed %d run(s) since %s; inserted one catch-up run",
                jid,
                plan.missed_runs,
                plan.missed_since.isoformat() if plan.missed_since else "?",
            )
        return PeriodicRun(jid, plan.run_at, row_to_job(row, None), duplicate, plan.missed_runs)

    async def run_once(self, jobs: Sequence[PeriodicJob] | None = None) -> PeriodicEnqueuerResult:
        """One pass over ``jobs`` (default: the client's list): insert every due run.

        On cancellation: each job's run and state are written in one transaction, so a
        job is either fully handled or not at all; the next pass picks up the rest.
        Raises DatabaseError when the states cannot be read; a job whose own claim or
        insert fails is counted in ``errors`` and logged, and the pass goes on.
        """
        if jobs is None:
            jobs, _ = self.jobs.watch()
        ids = [j.effective_id for j in jobs]
        self._seen &= set(ids)
        states = await self.driver.periodic_job_get_many(ids) if ids else {}
        runs: list[PeriodicRun] = []
        conflicts = failed = errors = 0
        upcoming: list[datetime] = []
        for job in jobs:
            jid = job.effective_id
            stored = states.get(jid)
            now = self.now()
            if stored is not None and stored.schedule not in (None, job.schedule.key):
                if jid not in self._disagreed:
                    self._disagreed.add(jid)
                    log.warning(
                        "periodic job %r: stored with schedule %r, this client has %r "
                        "(changed, or clients configured differently); runs fall due by "
                        "either until they agree",
                        jid,
                        stored.schedule,
                        job.schedule.key,
                    )
            plan = plan_job(job, stored, now, jid not in self._seen)
            if plan.state is None:
                assert stored is not None
                self._seen.add(jid)
                upcoming.append(stored.next_run_at)
                continue
            try:
                run = await self._apply(job, stored, plan, now)
            except _StateMoved:
                conflicts += 1
                log.info("periodic job %r: state moved by another client; will re-read", jid)
                continue
            except _BuildFailed:
                # Not this client's to insert now: try again at our next run time (or
                # within max_sleep), after any other client has had its turn.
                failed += 1
                upcoming.append(plan.state.next_run_at)
                continue
            except DatabaseError as exc:
                # This job's claim or insert failed (rolled back): the next jobs of the
                # pass still get theirs; this one is retried after retry_delay.
                errors += 1
                log.warning("periodic job %r: writing its run failed: %s", jid, exc)
                continue
            self._seen.add(jid)
            upcoming.append(plan.state.next_run_at)
            if run is not None:
                runs.append(run)
        return PeriodicEnqueuerResult(runs, conflicts, failed, min(upcoming, default=None), errors)

    async def run(self) -> None:
        """Insert runs as they fall due until cancelled (by every client that has
        periodic jobs; the stored state makes that safe).

        Sleeps until the earliest next run time (at most ``max_sleep``), waking early when
        the list of periodic jobs changes. A DatabaseError is logged and retried after
        ``retry_delay``.
        """
        self._seen = set()
        while True:
            jobs, changed = self.jobs.watch()
            delay = self.config.max_sleep
            try:
                result = await self.run_once(jobs)
            except DatabaseError as exc:
                log.warning("periodic job enqueuer pass failed: %s", exc)
                delay = self.config.retry_delay
            else:
                if result.conflicts or result.errors:
                    delay = self.config.retry_delay
                if result.next_run_at is not None:
                    until = (result.next_run_at - self.now()).total_seconds()
                    delay = min(delay, max(until, 0.0))
            with trio.move_on_after(delay):
                await changed.wait()
