"""Deterministic simulation of trioqueue: plans, the harness that runs them, and the
invariants checked after every run (docs/testing.md). ``test_simulation.py`` drives it with
hypothesis; this module knows nothing about hypothesis except the strategies at the end.

A :class:`Plan` is data: job specs (what each worker attempt does), client specs (queues,
slots, injected driver faults) and a timeline of steps (inserts, remote cancels, deletes,
pause/resume, starting clients, soft/hard stops, cancellation from outside). Durations are
in *units*: one unit is one second of trio's virtual clock on the memory driver
(``MockClock(autojump_threshold=0)``) and ``scale`` seconds of real time on PostgreSQL.

Every driver a client uses is ``Delivery(FaultyDriver(Ledger(base)))``:

- :class:`Ledger` (innermost) records what the storage really did: each fetch, outcome
  write, cancel, delete and rescue, with the job row it returned. A run of a job is
  identified by ``len(attempted_by)`` (one entry per fetch), so records can be matched to
  runs whatever order tasks resumed in.
- ``FaultyDriver`` injects the plan's faults (errors, lost replies, delays, a dropped
  listener).
- :class:`Delivery` (outermost) records which fetches and writes the client was told about:
  a committed write that was not delivered had its reply lost.

With limits (``Plan.limits``, on ``limits_plan.LIMITED_QUEUE``), every client works that
queue with them, and the ledger hands each claim, write and rescue to a
``limits_plan.LimitWatch``, which checks the limits at every claim.

Workers record every run (who ran it, what it did, how it ended) and the set of runs active
at each moment. After the chaos, one healthy client runs until every job is final (or still
pending), and :meth:`Simulation.check` compares the ledger, the worker records, the events
each client's subscriber received, each client's completer counts and the final rows.

A client's subscriber reads in a task outside the scope an outside cancel hits, so it
receives every event, cancelled or not. Some clients have no subscriber: their completer
writes with ``rows=False`` (ids back only), which the wrappers pass through, and the ledger
reads those writes' state back.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any, ClassVar, cast

import attrs
import trio
from limits_plan import LIMITED_QUEUE, LimitWatch, plan_limits, scaled

import trioqueue as tq
from trioqueue.driver.faults import Fault, FaultyDriver
from trioqueue.driver.protocol import Driver, JobOutcome, JobRescue, JobRow
from trioqueue.limits import LimitedFetch, QueueLimits

QUEUES = ("default", "other")
JOB_EVENT_KINDS = (
    tq.EventKind.JOB_COMPLETED,
    tq.EventKind.JOB_FAILED,
    tq.EventKind.JOB_CANCELLED,
    tq.EventKind.JOB_SNOOZED,
    tq.EventKind.JOB_INTERRUPTED,
)
FINAL = frozenset({tq.JobState.COMPLETED, tq.JobState.CANCELLED, tq.JobState.DISCARDED})
COMPLETER_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0)
"""Seconds the completer waits after each failed write (its real, unscaled backoff)."""


# --------------------------------------------------------------------------------- plans


@attrs.frozen
class Behaviour:
    """What one run of a job does.

    ``return`` / ``raise`` / ``cancel`` (raise JobCancel): sleep ``seconds``, then so;
    ``snooze``: raise ``JobSnooze(seconds)``; ``block``: sleep until cancelled (timeout,
    remote cancel, hard stop); ``shielded``: ignore cancellation for ``seconds`` (a
    shielded sleep), then reach a checkpoint and return.
    """

    kind: str
    seconds: float = 0.0


@attrs.frozen
class JobSpec:
    """One job: run ``n`` (1-based) does ``behaviours[n - 1]``; later runs return at once,
    so every job finishes once the chaos is over."""

    behaviours: tuple[Behaviour, ...] = ()
    queue: str = "default"
    priority: int = 1
    delay: float | None = None
    """Scheduled this many units after the insert."""
    pending: bool = False
    unique: bool = False
    """``UniqueOpts(by_args=True)``: inserting the spec again while it lives is a no-op."""
    max_attempts: int = 3
    kind: str = "sim"
    """``sim`` (`SimArgs`) or ``sim_b`` (`SimArgsB`): two kinds to partition by."""
    customer: int | None = None
    """The args' ``customer`` field, to partition by."""


@attrs.frozen
class FaultSpec:
    """A ``trioqueue.driver.faults.Fault`` rule; ``seconds`` (delays) in units."""

    op: str
    kind: str = "error"
    call: int | None = 1
    times: int = 1
    seconds: float = 0.0

    def fault(self, scale: float) -> Fault:
        return Fault(
            self.op,
            self.kind,  # type: ignore[arg-type]
            call=self.call,
            times=self.times,
            seconds=self.seconds * scale,
        )


@attrs.frozen
class ClientSpec:
    """A client slot. It starts at time 0 and again on each ``start`` step after it
    stopped; every life gets fresh copies of ``faults``."""

    queues: tuple[str, ...] = ("default",)
    max_workers: int = 2
    poll_only: bool = False
    faults: tuple[FaultSpec, ...] = ()
    subscribe: bool = True
    """Whether its lives subscribe to job events. Without a subscriber the completer does
    not read written jobs back (``rows=False``: PostgreSQL's short statements)."""


@attrs.frozen
class Step:
    """Wait ``wait`` units, then ``do``:

    ``insert`` (``jobs``: spec indexes), ``insert_many`` (one batch), ``cancel`` /
    ``delete`` (``jobs[0]``: index into the jobs inserted so far, modulo), ``pause`` /
    ``resume`` (``queue``), ``start``, ``soft_stop``, ``hard_stop``, ``outside_cancel``
    (of client ``client``). ``client`` -1 is an insert-only admin client; a management
    step through a client that is not running goes through the admin client.

    ``busy``: first wait (up to ``BUSY_WAIT`` units) until a job runs — on that client,
    for stops; anywhere, for cancel and delete, which then pick ``jobs[0]`` among the
    running jobs — so stops and remote cancels often hit work in progress.
    """

    wait: float
    do: str
    client: int = -1
    jobs: tuple[int, ...] = ()
    queue: str = "default"
    busy: bool = False


BUSY_WAIT = 10.0


@attrs.frozen
class Plan:
    jobs: tuple[JobSpec, ...]
    clients: tuple[ClientSpec, ...]
    steps: tuple[Step, ...]
    job_timeout: float = 5.0
    retry_delay: float = 0.0
    """The retry policy's answer, in units (``<= scheduler_interval``: straight back)."""
    scheduler_interval: float = 1.0
    fetch_poll_interval: float = 1.0
    soft_stop_timeout: float | None = None
    shutdown_timeout: float = 5.0
    limits: QueueLimits | None = None
    """The limits every client works `LIMITED_QUEUE` with (``per`` in units)."""

    # ----------------------------------------------------------------- derived bounds

    def run_bound(self) -> float:
        """Units the longest run can take."""
        longest = 0.0
        for spec in self.jobs:
            for b in spec.behaviours:
                if b.kind == "shielded":
                    longest = max(longest, b.seconds)
                elif b.kind == "block":
                    longest = max(longest, self.job_timeout)
                elif b.kind != "snooze":
                    longest = max(longest, min(b.seconds, self.job_timeout))
        return longest

    def shield_bound(self) -> float:
        """Units a run can ignore cancellation for."""
        return max(
            (b.seconds for s in self.jobs for b in s.behaviours if b.kind == "shielded"),
            default=0.0,
        )


def fault_cost(faults: Sequence[FaultSpec], scale: float) -> float:
    """Real seconds the faults of one client life can hold up its stop: delays, the
    completer's backoff after failed writes, the producer's after failed fetches."""
    cost = 0.0
    write_failures = 0
    for f in faults:
        n = f.times if f.call is None else 1
        if f.kind == "delay":
            cost += f.seconds * scale * n
        elif f.op == "job_set_state_if_running_many":
            write_failures += n
        elif f.op in ("job_get_available", "job_get_available_limited"):
            cost += 0.2 * n
    cost += sum(COMPLETER_BACKOFF[: min(write_failures, len(COMPLETER_BACKOFF))])
    cost += 10.0 * max(0, write_failures - len(COMPLETER_BACKOFF))
    return cost


# ----------------------------------------------------------------------------- records


@attrs.frozen
class SimArgs:
    kind: ClassVar[str] = "sim"
    spec: int
    customer: int | None = None


@attrs.frozen
class SimArgsB(SimArgs):
    """A job of the second kind (`JobSpec.kind`), worked alike."""

    kind: ClassVar[str] = "sim_b"


class SimError(Exception):
    """What a ``raise`` behaviour raises."""


@attrs.define
class WorkerRun:
    job_id: int
    run: int
    client_id: str
    attempt: int
    behaviour: Behaviour
    started: float
    ended: float | None = None
    result: str = "running"
    """returned, raised, jobcancel, snoozed, cancelled (trio.Cancelled left the worker)."""
    hard_possible: bool = False
    """A hard stop (or escalation, or outside cancel) of its client had begun by its end."""


@attrs.define
class Fetch:
    job_id: int
    run: int
    attempt: int
    client_id: str
    life: str


@attrs.define
class Write:
    seq: int
    job_id: int
    run: int
    life: str
    outcome: JobOutcome
    state: str
    """The state the write left (the outcome's, or ``cancelled``)."""
    delivered: bool = False
    rows: bool = True
    """Whether the write asked for the rows back. The completer asks only when its client
    has subscribers (to publish their events), and decides before the first attempt: a
    client works from the start of its block, so when nothing makes the completer linger
    (a limit holding jobs back asks it to write at once) a write may begin before the
    subscriber subscribed, and publish nothing."""


@attrs.define
class Rescue:
    job_id: int
    run: int
    state: str
    error: str


@attrs.define
class Life:
    """One run of a client slot, from ``open_client`` to the end of its block."""

    name: str
    slot: int
    spec: ClientSpec
    faults: tuple[FaultSpec, ...]
    faulty: FaultyDriver | None = None
    client: tq.Client | None = None
    scope: trio.CancelScope | None = None
    started: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    consumer_done: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    stopping: bool = False
    hard_possible: bool = False
    outside: bool = False
    outside_at: float | None = None
    """When it was cancelled from outside."""
    events: list[tq.Event] = attrs.field(factory=list)
    completer: Any = None
    """The completer's statistics once the client block ended (None: they were not read)."""
    confirmed: dict[tuple[int, Any], float] = attrs.field(factory=dict)
    """When a write of each outcome (job id, attempted_at) first came back to the client."""
    stops: list[str] = attrs.field(factory=list)
    stuck_received: int = 0
    stuck_dropped: int = 0
    stuck_ended: bool = False
    """What a subscriber with a 2-event buffer that never read during the life got."""
    subscribed: int = 0
    """`Simulation.write_calls` when its subscriber subscribed."""
    users: int = 0
    """Steps using this client for inserts or job management right now."""
    idle: trio.Event = attrs.field(factory=trio.Event)

    @property
    def alive(self) -> bool:
        return self.client is not None and not self.release.is_set() and not self.outside


# ------------------------------------------------------------------------- the wrappers


class _Forward:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def clock(self) -> Any:
        return self.inner.clock()

    def transaction(self) -> Any:
        return self.inner.transaction()

    def open_listener(self, channels: Sequence[str]) -> Any:
        return self.inner.open_listener(channels)


def _run_of(row: JobRow) -> int:
    return len(row[9] or ())


class Ledger(_Forward):
    """Records what the storage did (see the module docstring)."""

    def __init__(self, inner: Any, sim: Simulation, life: str) -> None:
        super().__init__(inner)
        self.sim = sim
        self.life = life

    async def job_get_available(self, queue: str, *args: Any, **kwargs: Any) -> list[JobRow]:
        begun = self.sim.watch.begins() if self.sim.watch else 0
        rows: list[JobRow] = await self.inner.job_get_available(queue, *args, **kwargs)
        for row in rows:
            self.sim.record_fetch(row, self.life)
        if self.sim.watch:
            self.sim.watch.fetched(rows, queue, begun, self.life, None)
        return rows

    async def job_get_available_limited(
        self, queue: str, *args: Any, **kwargs: Any
    ) -> LimitedFetch:
        begun = self.sim.watch.begins() if self.sim.watch else 0
        found: LimitedFetch = await self.inner.job_get_available_limited(queue, *args, **kwargs)
        for row in found.rows:
            self.sim.record_fetch(row, self.life)
        if self.sim.watch:
            self.sim.watch.fetched(found.rows, queue, begun, self.life, found.held_back)
        return found

    def _runs(self, ids: Iterable[int], by_id: dict[int, JobOutcome]) -> list[tuple[int, int]]:
        """The runs outcomes name (by their attempted_at)."""
        return [(i, self.sim.run_at.get((i, by_id[i].attempted_at), -1)) for i in ids]

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: Any, *, rows: bool = True
    ) -> list[Any]:
        # ``rows`` goes through as the client asked: without subscribers that is False,
        # and PostgreSQL then runs its short statements (ids only), the production path.
        by_id = {o.id: o for o in outcomes}
        if self.sim.watch:
            self.sim.watch.writing(self._runs(by_id, by_id))
        try:
            written: list[Any] = await self.inner.job_set_state_if_running_many(
                outcomes, now, rows=rows
            )
            # The runs written, at once: the ids-only path below reads rows back first,
            # and by then the job may run again, even with the same attempted_at (a
            # snooze of 0 written at once and fetched again at the same instant).
            runs = dict(self._runs((row[0] for row in written), by_id))
            if self.sim.watch:
                self.sim.watch.written(runs.items())
        except trio.Cancelled:
            # Cancelled mid-statement (an outside cancel): on PostgreSQL the statement may
            # have committed anyway. Read the rows back at once and record those that
            # carry the outcome of the same run, as a write whose reply was lost.
            with trio.CancelScope(shield=True):
                for row in await self.inner.job_list(
                    tq.JobListParams(ids=list(by_id), limit=len(by_id))
                ):
                    o = by_id[row[0]]
                    if row[8] == o.attempted_at and str(row[4]) in (o.state.value, "cancelled"):
                        self.sim.record_write(row[0], _run_of(row), str(row[4]), o, self.life, rows)
            raise
        if rows:
            for row in written:
                o = by_id[row[0]]
                self.sim.record_write(row[0], _run_of(row), str(row[4]), o, self.life, rows)
        else:
            with trio.CancelScope(shield=True):
                await self._record_ids(runs, by_id)
        return written

    async def _record_ids(self, runs: dict[int, int], by_id: dict[int, JobOutcome]) -> None:
        """Record writes that came back as ids only (``runs``: job id to the run written,
        as the ledger knew when the write returned): the state is the outcome's, or
        ``cancelled`` when a cancel was requested while the run ran
        (``cancel_attempted_at``, read back)."""
        ids = list(runs)
        if not ids:
            return
        self.sim.features["outcome writes without rows"] += 1
        found = {
            row[0]: row
            for row in await self.inner.job_list(tq.JobListParams(ids=ids, limit=len(ids)))
        }
        for job_id in ids:
            o = by_id[job_id]
            row = found.get(job_id)
            run = runs[job_id]
            if row is not None and run < 0 and row[8] == o.attempted_at:
                run = _run_of(row)  # a run the ledger did not know: the one read back
            if row is not None and _run_of(row) == run:
                # Still the run we wrote (nothing but a later fetch starts another).
                requested = "cancel_attempted_at" in (row[14] or {})
            else:
                # Fetched again or deleted since: the ledger knows the run's cancels.
                requested = self.sim._cancel_requested(job_id, run)
            state = o.state
            if requested and state in (
                tq.JobState.RETRYABLE,
                tq.JobState.SCHEDULED,
                tq.JobState.AVAILABLE,
            ):
                state = tq.JobState.CANCELLED
            self.sim.record_write(job_id, run, state.value, o, self.life, False)

    async def job_cancel(self, job_id: int, now: Any, **kwargs: Any) -> JobRow | None:
        row: JobRow | None = await self.inner.job_cancel(job_id, now, **kwargs)
        if row is not None:
            self.sim.record_cancel(row, self.life)
        return row

    async def queue_pause(self, name: str, now: Any, **kwargs: Any) -> list[str]:
        names: list[str] = await self.inner.queue_pause(name, now, **kwargs)
        self.sim.record_queues("pause", names)
        return names

    async def queue_resume(self, name: str, now: Any, **kwargs: Any) -> list[str]:
        names: list[str] = await self.inner.queue_resume(name, now, **kwargs)
        self.sim.record_queues("resume", names)
        return names

    async def job_delete(self, job_id: int, **kwargs: Any) -> JobRow | None:
        row: JobRow | None = await self.inner.job_delete(job_id, **kwargs)
        if row is not None:
            self.sim.deleted.add(job_id)
        return row

    async def job_get_stuck(self, *args: Any, **kwargs: Any) -> list[JobRow]:
        rows: list[JobRow] = await self.inner.job_get_stuck(*args, **kwargs)
        for row in rows:
            self.sim.stuck_rows[row[0]] = row
        return rows

    async def job_rescue_many(self, rescues: Sequence[JobRescue]) -> list[tuple[int, str, str]]:
        stuck = {
            r.id: _run_of(self.sim.stuck_rows[r.id]) for r in rescues if r.id in self.sim.stuck_rows
        }
        if self.sim.watch:
            self.sim.watch.writing(stuck.items())
        written: list[tuple[int, str, str]] = await self.inner.job_rescue_many(rescues)
        if self.sim.watch:
            self.sim.watch.written((i, stuck.get(i, -1)) for i, _, _ in written)
        by_id = {r.id: r for r in rescues}
        for job_id, _queue, state in written:
            self.sim.record_rescue(by_id[job_id], str(state))
        return written


class Delivery(_Forward):
    """Records which fetches and writes reached the client (see the module docstring)."""

    def __init__(self, inner: Any, sim: Simulation, life: str) -> None:
        super().__init__(inner)
        self.sim = sim
        self.life = life

    async def job_get_available(self, *args: Any, **kwargs: Any) -> list[JobRow]:
        rows: list[JobRow] = await self.inner.job_get_available(*args, **kwargs)
        for row in rows:
            self.sim.delivered_fetches.add((row[0], _run_of(row)))
        return rows

    async def job_get_available_limited(self, *args: Any, **kwargs: Any) -> LimitedFetch:
        if self.sim.watch:
            self.sim.watch.sent(self.life)
        found: LimitedFetch = await self.inner.job_get_available_limited(*args, **kwargs)
        for row in found.rows:
            self.sim.delivered_fetches.add((row[0], _run_of(row)))
        return found

    async def job_set_state_if_running_many(
        self, outcomes: Sequence[JobOutcome], now: Any, *, rows: bool = True
    ) -> list[Any]:
        by_id = {o.id: o for o in outcomes}
        self.sim.write_calls += 1
        for o in outcomes:
            self.sim.first_call.setdefault((o.id, o.attempted_at), self.sim.write_calls)
        written: list[Any] = await self.inner.job_set_state_if_running_many(
            outcomes, now, rows=rows
        )
        for row in written:
            run = _run_of(row) if rows else None
            self.sim.mark_delivered(row[0], run, by_id[row[0]].attempted_at)
        life = self.sim.lives.get(self.life)
        if life is not None:
            now_ = trio.current_time()
            for o in outcomes:
                life.confirmed.setdefault((o.id, o.attempted_at), now_)
        return written


# --------------------------------------------------------------------------- the harness

DriverFactory = Callable[[], AbstractAsyncContextManager[Any]]


class Abort(Exception):
    """Raised inside the run when a violation makes going on pointless (a hang)."""


class Simulation:
    """Runs one plan; ``violations`` lists every broken invariant."""

    def __init__(
        self,
        plan: Plan,
        driver_factory: DriverFactory,
        *,
        scale: float = 1.0,
        strict_order: bool = False,
        slack: float = 0.5,
    ) -> None:
        self.plan = plan
        self.driver_factory = driver_factory
        self.scale = scale
        self.violations: list[str] = []
        self.log: list[str] = []
        self.lives: dict[str, Life] = {}
        self.slots: list[list[Life]] = [[] for _ in plan.clients]
        self.inserted: list[int] = []
        """Job ids in insert order (duplicates of unique jobs included)."""
        self.spec_of: dict[int, int] = {}
        self.pending_ids: set[int] = set()
        self.deleted: set[int] = set()
        self.fetches: dict[tuple[int, int], Fetch] = {}
        self.run_at: dict[tuple[int, Any], int] = {}
        """The run of each (job id, attempted_at) fetched (the latest, should two runs
        start at one instant)."""
        self.written_run: dict[tuple[int, Any], int] = {}
        """The run the latest write of each outcome (job id, attempted_at) was for."""
        self.delivered_fetches: set[tuple[int, int]] = set()
        self.writes: dict[tuple[int, int], list[Write]] = defaultdict(list)
        self.cancels: dict[int, list[tuple[int, str]]] = defaultdict(list)
        """Per job: (run, state returned) of every job_cancel that changed it."""
        self.stuck_rows: dict[int, JobRow] = {}
        self.rescues: dict[tuple[int, int], list[Rescue]] = defaultdict(list)
        self.runs: dict[tuple[int, int], list[WorkerRun]] = defaultdict(list)
        self.active: dict[int, WorkerRun] = {}
        self.paused: set[str] = set()
        self.features: Counter[str] = Counter()
        self._run_started = trio.Event()
        self.stalled = 0.0
        """Seconds this process stood still, on a real clock (see ``_watch_stalls``)."""
        """What happened in the run, for coverage statistics (hypothesis ``event``)."""
        self.strict_order = strict_order
        self.slack = slack
        """Real seconds every stop may take beyond the work it must wait for."""
        """Ledger records are in commit order (true of the memory driver, which changes
        state right before returning), so order-sensitive checks apply."""
        self._seq = 0
        self.write_calls = 0
        """Outcome writes clients have begun (`Delivery`)."""
        self.first_call: dict[tuple[int, Any], int] = {}
        """The first write call (`write_calls`) of each outcome (job id, attempted_at)."""
        self.workers = tq.Workers()
        self.workers.add(SimArgs, self._work)
        self.workers.add(SimArgsB, self._work)
        self.limits = scaled(plan.limits, scale)
        """The plan's limits, in seconds of this clock."""
        self.watch = (
            None
            if self.limits is None
            else LimitWatch(
                self.limits, exact=strict_order, violation=self.violation, features=self.features
            )
        )
        """Checks the limits claim by claim (``limits_plan``)."""
        self.admin: tq.Client | None = None
        self._nursery: trio.Nursery | None = None
        self.final_jobs: list[tq.Job[Any]] = []
        self.stop_times: list[tuple[str, str, float, float]] = []
        """(life, how, seconds taken, bound) of every stop."""

    # -------------------------------------------------------------- recording

    def violation(self, text: str) -> None:
        self.violations.append(f"[t={trio.current_time():.3f}] {text}")

    def note(self, text: str) -> None:
        self.log.append(f"[t={trio.current_time():.3f}] {text}")

    def record_fetch(self, row: JobRow, life: str) -> None:
        key = (row[0], _run_of(row))
        if key in self.fetches:
            self.violation(f"job {row[0]} run {key[1]} fetched twice")
        if row[12] > row[8]:
            self.violation(f"job {row[0]} fetched at {row[8]}, before it was due ({row[12]})")
        if row[0] in self.pending_ids:
            self.violation(f"job {row[0]} was inserted pending, but {life} fetched it")
        if self.strict_order and row[3] in self.paused:
            self.violation(f"{life} fetched job {row[0]} from paused queue {row[3]!r}")
        self.fetches[key] = Fetch(row[0], key[1], row[6], str(row[9][-1]), life)
        self.run_at[(row[0], row[8])] = key[1]
        self.note(f"{life} fetched job {row[0]} run {key[1]} attempt {row[6]}")

    def record_write(
        self, job_id: int, run: int, state: str, outcome: JobOutcome, life: str, rows: bool
    ) -> None:
        key = (job_id, run)
        self._seq += 1
        active = self.active.get(job_id)
        if active is not None and active.run == run:
            self.violation(
                f"{life} wrote {outcome.state} for job {job_id} run {run} while that run's "
                f"worker was still running ({active.client_id})"
            )
        self.writes[key].append(Write(self._seq, job_id, run, life, outcome, state, rows=rows))
        self.written_run[(job_id, outcome.attempted_at)] = run
        self.note(f"{life} wrote job {job_id} run {run}: {outcome.state} -> {state}")

    def mark_delivered(self, job_id: int, run: int | None, attempted_at: Any) -> None:
        """A write's reply reached the client (``run`` None: only its id came back)."""
        if run is None:
            run = self.written_run.get((job_id, attempted_at), -1)
        writes = self.writes.get((job_id, run))
        if writes:
            writes[-1].delivered = True

    def record_queues(self, action: str, names: Sequence[str]) -> None:
        if action == "pause":
            self.paused.update(names)
        else:
            self.paused.difference_update(names)

    def record_cancel(self, row: JobRow, life: str) -> None:
        self.cancels[row[0]].append((_run_of(row), str(row[4])))
        self.note(f"{life} job_cancel({row[0]}) -> {row[4]}")

    def record_rescue(self, rescue: JobRescue, state: str) -> None:
        row = self.stuck_rows.get(rescue.id)
        run = _run_of(row) if row is not None else -1
        error = json.loads(rescue.error_json)["error"]
        self.rescues[(rescue.id, run)].append(Rescue(rescue.id, run, state, error))
        self.note(f"rescued job {rescue.id} run {run} -> {state}")

    # -------------------------------------------------------------- the worker

    def _life_of(self, client_id: str) -> Life | None:
        return self.lives.get(client_id)

    async def _work(self, job: tq.Job[SimArgs]) -> None:
        run = len(job.attempted_by)
        spec = self.plan.jobs[job.args.spec]
        behaviour = spec.behaviours[run - 1] if run <= len(spec.behaviours) else Behaviour("return")
        client_id = job.attempted_by[-1]
        record = WorkerRun(job.id, run, client_id, job.attempt, behaviour, trio.current_time())
        self.runs[(job.id, run)].append(record)
        other = self.active.get(job.id)
        if other is not None:
            self.violation(
                f"job {job.id} runs twice at once: run {run} on {client_id} while run "
                f"{other.run} on {other.client_id} has not ended"
            )
        self.active[job.id] = record
        self._run_started.set()
        self._run_started = trio.Event()
        tag = f"job {job.id} run {run}"
        s = self.scale
        try:
            kind = behaviour.kind
            if kind == "block":
                await trio.sleep_forever()
            elif kind == "shielded":
                with trio.CancelScope(shield=True):
                    await trio.sleep(behaviour.seconds * s)
                await trio.lowlevel.checkpoint()
            elif kind == "snooze":
                raise tq.JobSnooze(behaviour.seconds * s)
            else:
                await trio.sleep(behaviour.seconds * s)
                if kind == "raise":
                    raise SimError(tag)
                if kind == "cancel":
                    raise tq.JobCancel(tag)
            record.result = "returned"
        except SimError:
            record.result = "raised"
            raise
        except tq.JobCancel:
            record.result = "jobcancel"
            raise
        except tq.JobSnooze:
            record.result = "snoozed"
            raise
        except trio.Cancelled:
            record.result = "cancelled"
            raise
        finally:
            record.ended = trio.current_time()
            life = self._life_of(client_id)
            record.hard_possible = life is not None and life.hard_possible
            if self.active.get(job.id) is record:
                del self.active[job.id]

    # -------------------------------------------------------------- configuration

    def _rescue_after(self) -> float:
        p = self.plan
        worst_faults = max((fault_cost(c.faults, self.scale) for c in p.clients), default=0.0)
        return (p.run_bound() + p.shutdown_timeout + 10.0) * self.scale + worst_faults + 2.0

    def _margin(self, life: Life) -> float:
        """Real seconds of slack a stop gets on top of the work it must wait for."""
        return self.slack + self.scale + fault_cost(life.faults, self.scale)

    def client_config(self, name: str, spec: ClientSpec) -> dict[str, Any]:
        p, s = self.plan, self.scale
        delay = p.retry_delay * s
        return {
            "id": name,
            "job_timeout": p.job_timeout * s,
            "max_attempts": 3,
            "retry_policy": lambda job: delay,
            "fetch_cooldown": 0.1 * s,
            "fetch_poll_interval": max(p.fetch_poll_interval * s, 0.01),
            "poll_only": spec.poll_only,
            "scheduler_interval": p.scheduler_interval * s,
            "leader_interval": 2.0 * s,
            "rescuer_interval": 5.0 * s,
            "rescue_stuck_jobs_after": self._rescue_after(),
            "soft_stop_timeout": None if p.soft_stop_timeout is None else p.soft_stop_timeout * s,
            "shutdown_timeout": p.shutdown_timeout * s,
        }

    def soft_bound(self, life: Life) -> float:
        p, s = self.plan, self.scale
        bound = p.run_bound() * s + self._margin(life)
        if p.soft_stop_timeout is not None:
            bound = min(bound, p.soft_stop_timeout * s + self.hard_bound(life))
        return bound

    def hard_bound(self, life: Life) -> float:
        return self.plan.shield_bound() * self.scale + self._margin(life)

    def outside_bound(self, life: Life) -> float:
        return self.hard_bound(life) + self.plan.shutdown_timeout * self.scale

    # -------------------------------------------------------------- client lives

    def _wrap(self, base: Any, life: Life) -> Driver:
        faulty = FaultyDriver(
            cast(Driver, Ledger(base, self, life.name)),
            [f.fault(self.scale) for f in life.faults],
        )
        life.faulty = faulty
        return cast(Driver, Delivery(faulty, self, life.name))

    async def _subscriber(
        self,
        life: Life,
        client: tq.Client,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe (a reader, and one that never reads until the stream ends) and read
        every event until the client's stream ends. This task lives outside the life's
        cancel scope, so an outside cancel of the client does not reach it: it receives
        whatever the client publishes while it shuts down, to the last event."""
        try:
            async with (
                client.subscribe(*JOB_EVENT_KINDS, buffer=1_000_000) as sub,
                client.subscribe(*JOB_EVENT_KINDS, buffer=2) as stuck,
            ):
                life.subscribed = self.write_calls
                task_status.started()
                async for event in sub:
                    life.events.append(event)
                life.consumer_done.set()
                await self._drain(life, stuck)
        finally:
            life.consumer_done.set()

    async def _drain(self, life: Life, stuck: tq.Subscription) -> None:
        """Read what a subscriber that never read during the life has buffered; its
        stream must have ended with the other's."""
        with trio.move_on_after(self._margin(life)):
            try:
                while True:
                    await stuck.receive()
                    life.stuck_received += 1
            except trio.EndOfChannel:
                life.stuck_ended = True
        life.stuck_dropped = stuck.dropped

    async def _life(
        self,
        life: Life,
        queues: dict[str, tq.QueueConfig],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            async with self.driver_factory() as base, trio.open_nursery() as outside:
                try:
                    with trio.CancelScope() as life.scope:
                        async with tq.open_client(
                            driver=self._wrap(base, life),
                            workers=self.workers,
                            queues=queues,
                            **self.client_config(life.name, life.spec),
                        ) as client:
                            life.client = client
                            if life.spec.subscribe:
                                # In the nursery outside the scope an outside cancel hits.
                                await outside.start(self._subscriber, life, client)
                            else:
                                life.consumer_done.set()
                            life.started.set()
                            task_status.started()
                            await life.release.wait()
                finally:
                    if life.client is not None:
                        life.completer = life.client.statistics().get("completer")
                # The client has ended, and with it every event stream: the subscriber
                # has read the last event (or is about to).
                with trio.move_on_after(self._margin(life)):
                    await life.consumer_done.wait()
                if not life.consumer_done.is_set():
                    self.violation(f"{life.name}: the subscriber's stream did not end")
                    outside.cancel_scope.cancel()
                # A step may still be managing jobs through this client: keep its
                # driver open until that call returns.
                while life.users:
                    await life.idle.wait()
        finally:
            life.done.set()

    async def start(self, slot: int) -> None:
        lives = self.slots[slot]
        if lives and not lives[-1].done.is_set():
            return
        spec = self.plan.clients[slot]
        life = Life(f"c{slot}-{len(lives) + 1}", slot, spec, spec.faults)
        lives.append(life)
        self.lives[life.name] = life
        queues = {q: self.queue_config(q, spec.max_workers) for q in spec.queues}
        assert self._nursery is not None
        self.note(f"starting {life.name}")
        await self._nursery.start(self._life, life, queues)

    def queue_config(self, queue: str, max_workers: int) -> tq.QueueConfig:
        """How every client works ``queue``: the plan's limits on `LIMITED_QUEUE`."""
        if queue != LIMITED_QUEUE or self.limits is None:
            return tq.QueueConfig(max_workers=max_workers)
        return tq.QueueConfig(
            max_workers=max_workers,
            global_limit=self.limits.global_limit,
            rate_limit=self.limits.rate_limit,
        )

    def _current(self, slot: int) -> Life | None:
        if not 0 <= slot < len(self.slots) or not self.slots[slot]:
            return None
        life = self.slots[slot][-1]
        return life if life.alive else None

    async def _stop(self, life: Life, how: str) -> None:
        assert life.client is not None
        life.stopping = True
        life.stops.append(how)
        if how == "hard" or self.plan.soft_stop_timeout is not None:
            life.hard_possible = True
        bound = self.hard_bound(life) if how == "hard" else self.soft_bound(life)
        if self._running_on(life):
            self.features[f"{how} stop with jobs running"] += 1
        if self.watch and self.watch.held.get(life.name):
            self.features[f"{how} stop with jobs held back"] += 1
        started = trio.current_time()
        self.note(f"{how} stop of {life.name} (bound {bound:.3f} s)")
        client = life.client
        returned = await self._within(bound, lambda: client.stop(cancel=how == "hard"))
        took = trio.current_time() - started
        self.stop_times.append((life.name, how, took, bound))
        if not returned:
            self.violation(f"{how} stop of {life.name} did not return within {bound:.3f} s")
            raise Abort
        with trio.move_on_after(self._margin(life)) as waited:
            await life.consumer_done.wait()
        if waited.cancelled_caught:
            self.violation(f"{life.name}: the subscriber's stream did not end after the stop")
            raise Abort
        life.release.set()
        with trio.move_on_after(self._margin(life)) as waited:
            await life.done.wait()
        if waited.cancelled_caught:
            self.violation(f"{life.name}: the client block did not end after its stop")
            raise Abort

    async def _within(self, bound: float, wait: Callable[[], Awaitable[object]]) -> bool:
        """Whether ``wait()`` returns within ``bound`` seconds. On a real clock, time the
        whole process stood still (see :meth:`_watch_stalls`) does not count: the bound is
        about trioqueue, not about the machine pausing the test."""
        stalled = self.stalled
        budget = bound
        while True:
            with trio.move_on_after(budget) as waited:
                await wait()
            if not waited.cancelled_caught:
                return True
            budget, stalled = self.stalled - stalled, self.stalled
            if budget < 0.05:
                return False
            self.note(f"the process stalled for {budget:.3f} s: waiting that much longer")

    async def _watch_stalls(self) -> None:
        """On a real clock: add up the time this process did not run at all (a sleep of
        20 ms that took longer: the machine was busy or the VM paused)."""
        while True:
            before = trio.current_time()
            await trio.sleep(0.02)
            late = trio.current_time() - before - 0.02
            if late > 0.02:
                self.stalled += late

    def _running_on(self, life: Life) -> int:
        return sum(1 for r in self.active.values() if r.client_id == life.name)

    async def _outside_cancel(self, life: Life) -> None:
        assert life.scope is not None
        life.outside = True
        life.outside_at = trio.current_time()
        life.hard_possible = True
        life.stops.append("outside")
        bound = self.outside_bound(life)
        if self._running_on(life):
            self.features["outside cancel with jobs running"] += 1
        started = trio.current_time()
        self.note(f"outside cancel of {life.name} (bound {bound:.3f} s)")
        life.scope.cancel()
        ended = await self._within(bound, life.done.wait)
        self.stop_times.append((life.name, "outside", trio.current_time() - started, bound))
        if not ended:
            self.violation(f"outside cancel of {life.name} did not end within {bound:.3f} s")
            raise Abort

    @asynccontextmanager
    async def _via(self, index: int) -> AsyncIterator[tq.Client]:
        """The client of slot ``index`` if it runs, else the admin client, for a block."""
        life = self._current(index)
        if life is None or life.client is None:
            assert self.admin is not None
            yield self.admin
            return
        life.users += 1
        try:
            yield life.client
        finally:
            life.users -= 1
            if not life.users:
                life.idle.set()
                life.idle = trio.Event()

    async def _insert(self, step: Step) -> None:
        items = []
        for index in step.jobs:
            spec = self.plan.jobs[index % len(self.plan.jobs)]
            scheduled = None
            if spec.delay is not None:
                scheduled = self.admin_now() + timedelta(seconds=spec.delay * self.scale)
            opts = tq.InsertOpts(
                queue=spec.queue,
                priority=spec.priority,
                max_attempts=spec.max_attempts,
                scheduled_at=scheduled,
                pending=spec.pending,
                unique=tq.UniqueOpts(by_args=True) if spec.unique else None,
            )
            args_type = SimArgsB if spec.kind == "sim_b" else SimArgs
            items.append((args_type(index % len(self.plan.jobs), spec.customer), opts))
        if not items:
            return
        async with self._via(step.client) as client:
            if step.do == "insert_many" or len(items) == 1:
                results = await client.insert_many(items)
            else:
                results = [await client.insert(args, opts) for args, opts in items]
        for (args, opts), result in zip(items, results, strict=True):
            job_id = result.job.id
            self.inserted.append(job_id)
            if not result.unique_skipped_as_duplicate:
                self.spec_of[job_id] = args.spec
                if opts.pending:
                    self.pending_ids.add(job_id)
            self.note(f"inserted spec {args.spec} as job {job_id}")

    def admin_now(self) -> Any:
        assert self.admin is not None
        return self.admin.driver.clock()

    async def _manage(self, step: Step) -> None:
        async with self._via(step.client) as client:
            if step.do == "pause":
                await client.queue_pause(step.queue)
            elif step.do == "resume":
                await client.queue_resume(step.queue)
            elif self.inserted and step.jobs:
                job_id = self.inserted[step.jobs[0] % len(self.inserted)]
                if step.busy:
                    running = sorted(self.active)
                    if not running:
                        return
                    job_id = running[step.jobs[0] % len(running)]
                try:
                    if step.do == "cancel":
                        await client.job_cancel(job_id)
                    else:
                        await client.job_delete(job_id)
                        self.note(f"deleted job {job_id}")
                except (tq.JobNotFoundError, tq.JobRunningError):
                    pass

    async def _until_busy(self, life: Life | None) -> None:
        """Wait (at most BUSY_WAIT units) until a job runs on ``life`` (None: anywhere)."""
        with trio.move_on_after(BUSY_WAIT * self.scale):
            while not (self._running_on(life) if life is not None else self.active):
                await self._run_started.wait()

    async def _step(self, step: Step, nursery: trio.Nursery) -> None:
        if step.busy:
            if step.do in ("soft_stop", "hard_stop", "outside_cancel"):
                life = self._current(step.client)
                if life is not None:
                    await self._until_busy(life)
            else:
                await self._until_busy(None)
        if step.do in ("insert", "insert_many"):
            await self._insert(step)
        elif step.do in ("cancel", "delete", "pause", "resume"):
            await self._manage(step)
        elif step.do == "start":
            if 0 <= step.client < len(self.slots):
                await self.start(step.client)
        elif step.do in ("soft_stop", "hard_stop"):
            life = self._current(step.client)
            if life is not None:
                nursery.start_soon(self._stop, life, step.do.split("_")[0])
        elif step.do == "outside_cancel":
            life = self._current(step.client)
            if life is not None:
                nursery.start_soon(self._outside_cancel, life)
        else:
            raise ValueError(f"unknown step {step.do!r}")

    # -------------------------------------------------------------- running a plan

    async def run(self, *, healthy_within: float) -> None:
        """Run the plan, stop everything, then let one healthy client finish the work
        (for at most ``healthy_within`` seconds of this clock) and read the final rows."""
        try:
            async with trio.open_nursery() as watch, self.driver_factory() as base:
                if not self.strict_order:
                    watch.start_soon(self._watch_stalls)
                admin_driver = cast(Driver, Delivery(Ledger(base, self, "admin"), self, "admin"))
                async with tq.open_client(driver=admin_driver) as admin:
                    self.admin = admin
                    await self._chaos()
                    await self._healthy(healthy_within)
                    self.final_jobs = (await admin.job_list(tq.JobListParams(limit=10_000))).jobs
                watch.cancel_scope.cancel()
        except* Abort:
            pass

    async def _chaos(self) -> None:
        async with trio.open_nursery() as lives:
            self._nursery = lives
            async with trio.open_nursery() as stops:
                for slot in range(len(self.plan.clients)):
                    await self.start(slot)
                for step in self.plan.steps:
                    await trio.sleep(step.wait * self.scale)
                    await self._step(step, stops)
            # The plan is over: stop what still runs, softly.
            async with trio.open_nursery() as stops:
                for lives_of_slot in self.slots:
                    for life in lives_of_slot:
                        if life.alive and not life.stopping:
                            stops.start_soon(self._stop, life, "soft")
        self._nursery = None

    async def _healthy(self, within: float) -> None:
        assert self.admin is not None
        await self.admin.queue_resume("*")
        life = Life("healthy", -1, ClientSpec(queues=QUEUES, max_workers=4), ())
        self.lives[life.name] = life
        queues = {q: self.queue_config(q, 4) for q in QUEUES}
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._life, life, queues)
            self.note("healthy client started")
            with trio.move_on_after(within) as waited:
                while True:
                    if await self._quiescent():
                        break
                    await trio.sleep(1.0 * self.scale)
            if waited.cancelled_caught:
                left = [
                    (j.id, j.state.value)
                    for j in (await self.admin.job_list(tq.JobListParams(limit=10_000))).jobs
                    if j.state not in FINAL and j.state is not tq.JobState.PENDING
                ]
                self.violation(f"jobs lost: not finished by a healthy client: {left}")
            await self._stop(life, "soft")

    async def _quiescent(self) -> bool:
        assert self.admin is not None
        jobs = (await self.admin.job_list(tq.JobListParams(limit=10_000))).jobs
        return all(j.state in FINAL or j.state is tq.JobState.PENDING for j in jobs)

    # -------------------------------------------------------------- the invariants

    def summarize(self) -> None:
        """Count what the run exercised into ``features``."""
        f = self.features
        for records in self.runs.values():
            for r in records:
                f[f"run {r.behaviour.kind} -> {r.result}"] += 1
        for writes in self.writes.values():
            for w in writes:
                if not w.delivered:
                    f["outcome write whose reply was lost"] += 1
        for key in self.fetches:
            if key not in self.delivered_fetches and key not in self.runs:
                f["fetch whose reply was lost"] += 1
        f["rescue"] += sum(len(r) for r in self.rescues.values())
        for runs in self.cancels.values():
            for _, state in runs:
                f[f"job_cancel -> {state}"] += 1
        f["deleted"] += len(self.deleted)
        for life in self.lives.values():
            if life.faulty is not None:
                for op, n in life.faulty.injected.items():
                    f[f"fault in {op}"] += n
        for job in self.final_jobs:
            f[f"final {job.state.value}"] += 1
        for life in self.lives.values():
            if not life.spec.subscribe:
                f["a client life without subscribers"] += 1
            elif life.outside:
                f["outside cancel of a client with subscribers"] += 1

    def check(self) -> None:
        """Append a violation for every broken invariant (after :meth:`run`)."""
        self.summarize()
        if self.watch:
            self.watch.finish(self.violations.append)
        if self.violations:
            return  # the run aborted (or passed a limit): later checks would only repeat it
        jobs = {j.id: j for j in self.final_jobs}
        self._check_jobs(jobs)
        self._check_runs()
        self._check_events()
        self._check_counts()

    def _check_jobs(self, jobs: dict[int, tq.Job[Any]]) -> None:
        for job_id in self.spec_of:
            if job_id not in jobs and job_id not in self.deleted:
                self.violations.append(f"job {job_id} vanished without being deleted")
        for job in jobs.values():
            self._check_job(job)

    def _check_job(self, job: tq.Job[Any]) -> None:
        v = self.violations.append
        jid = job.id
        runs = len(job.attempted_by)
        fetched = sorted(r for (i, r) in self.fetches if i == jid)
        if fetched != list(range(1, runs + 1)):
            v(f"job {jid}: {runs} runs in attempted_by but fetches recorded for runs {fetched}")
        if job.state is tq.JobState.PENDING:
            if jid not in self.pending_ids or runs:
                v(f"job {jid} is pending but was not inserted pending, or it ran")
            return
        if job.state not in FINAL:
            v(f"job {jid} is lost: still {job.state.value} after the healthy client finished")
            return
        # Replay attempts and errors run by run.
        attempt = 0
        errors: list[str] = []
        last: str | None = None
        for run in range(1, runs + 1):
            attempt += 1
            fetch = self.fetches.get((jid, run))
            if fetch is not None and fetch.attempt != attempt:
                v(f"job {jid} run {run} fetched at attempt {fetch.attempt}, expected {attempt}")
            if last in {s.value for s in FINAL}:
                v(f"job {jid} was fetched again (run {run}) after it became {last}")
            writes = self.writes.get((jid, run), [])
            rescues = self.rescues.get((jid, run), [])
            if len(writes) + len(rescues) > 1:
                v(f"job {jid} run {run} has {len(writes)} outcome writes, {len(rescues)} rescues")
            for w in writes:
                if w.outcome.give_back_attempt:
                    attempt = max(attempt - 1, 0)
                if w.outcome.error_json is not None:
                    errors.append(json.loads(w.outcome.error_json)["error"])
                last = w.state
            for r in rescues:
                errors.append(r.error)
                last = r.state
        if job.attempt != attempt:
            v(f"job {jid}: attempt is {job.attempt}, the history gives {attempt}")
        recorded = [e.error for e in job.errors]
        if recorded != errors:
            v(f"job {jid}: errors {recorded} but the written outcomes gave {errors}")
        # The final state must be the one its history produced.
        state = job.state.value
        cancelled_queued = any(s == "cancelled" for _, s in self.cancels[jid])
        if state == "completed" and last != "completed":
            v(f"job {jid} is completed but its last outcome was {last}")
        elif state == "cancelled" and last != "cancelled" and not cancelled_queued:
            v(f"job {jid} is cancelled but nothing cancelled it (last outcome {last})")
        elif (
            state == "discarded"
            and last != "discarded"
            and "unique_key_conflict" not in job.metadata
        ):
            v(f"job {jid} is discarded but its last outcome was {last}")

    def _check_runs(self) -> None:
        v = self.violations.append
        timeout = self.plan.job_timeout * self.scale
        for key, records in self.runs.items():
            if len(records) > 1:
                v(f"job {key[0]} run {key[1]} was worked {len(records)} times")
            if key not in self.delivered_fetches:
                v(f"job {key[0]} run {key[1]} was worked but its fetch never reached a client")
        for key in self.delivered_fetches:
            if key not in self.runs:
                v(f"job {key[0]} run {key[1]} was fetched by a client but never worked")
        for key, records in self.runs.items():
            record = records[0]
            writes = self.writes.get(key, [])
            life = self.lives.get(record.client_id)
            if not writes:
                if not self._may_be_unwritten(record, life):
                    v(f"job {key[0]} run {key[1]} ended {record.result} but nothing was written")
                continue
            for w in writes:
                problem = self._outcome_problem(record, w, timeout)
                if problem:
                    v(f"job {key[0]} run {key[1]} ({record.behaviour}): {problem}")

    def _may_be_unwritten(self, run: WorkerRun, life: Life | None) -> bool:
        """Whether a run's outcome may be left unwritten (for the rescuer): only when its
        client was cancelled from outside and the final flush could not write it within
        ``shutdown_timeout`` (the run ended too late, or writes were failing or slow)."""
        if life is None or life.outside_at is None:
            return False
        write_faults = [f for f in life.faults if f.op == "job_set_state_if_running_many"]
        deadline = life.outside_at + self.plan.shutdown_timeout * self.scale
        return bool(write_faults) or run.ended is None or run.ended >= deadline - 1e-6

    def _cancel_requested(self, job_id: int, run: int) -> bool:
        """Whether a job_cancel found this run running (so it happened before its write)."""
        return any(r == run and s == "running" for r, s in self.cancels[job_id])

    def _outcome_problem(self, run: WorkerRun, w: Write, timeout: float) -> str | None:
        """What is wrong with write ``w`` as the outcome of worker run ``run``, if anything."""
        o = w.outcome
        error = json.loads(o.error_json)["error"] if o.error_json else None
        tag = f"job {run.job_id} run {run.run}"
        S = tq.JobState
        requested = self._cancel_requested(run.job_id, run.run)
        expected_row = o.state
        if requested and o.state in (S.RETRYABLE, S.SCHEDULED, S.AVAILABLE):
            expected_row = S.CANCELLED
        if w.state != expected_row.value:
            return f"outcome {o.state} with cancel requested={requested} left {w.state}"
        spec = self.plan.jobs[self.spec_of.get(run.job_id, 0)]
        exhausted = run.attempt >= spec.max_attempts
        retried = (S.DISCARDED,) if exhausted else (S.RETRYABLE, S.AVAILABLE)
        if requested:
            retried = (*retried, S.CANCELLED)
        if run.result == "returned":
            ok = o.state is S.COMPLETED and error is None and not o.give_back_attempt
        elif run.result == "raised":
            ok = error == f"SimError: {tag}" and not o.give_back_attempt and o.state in retried
        elif run.result == "jobcancel":
            ok = o.state is S.CANCELLED and error == f"JobCancel: {tag}"
        elif run.result == "snoozed":
            ok = o.give_back_attempt and error is None and o.state in (S.SCHEDULED, S.AVAILABLE)
        elif run.result == "cancelled":
            duration = (run.ended or 0.0) - run.started
            if error is None:
                if not run.hard_possible:
                    return f"interrupted, but its client was never hard-stopped: {o}"
                if not (o.give_back_attempt and o.state is S.AVAILABLE):
                    return f"an interrupt must go back available, attempt given back: {o}"
                return None
            if error.startswith("JobTimeoutError"):
                # The worker starts a little after the executor set the deadline: on a
                # real clock, allow for that.
                tolerance = 1e-6 if self.strict_order else 0.005 + 0.05 * timeout
                if duration < timeout - tolerance:
                    return f"timeout recorded after {duration:.4f} s (timeout {timeout})"
                ok = not o.give_back_attempt and o.state in retried
            elif error.startswith("JobCancelledRemotelyError"):
                if not requested:
                    return "cancelled remotely but no job_cancel found it running"
                ok = o.state is S.CANCELLED
            else:
                ok = False
        else:
            ok = False
        if not ok:
            return f"worker {run.result}, but the outcome written was {o} (error {error!r})"
        return None

    def _check_events(self) -> None:
        v = self.violations.append
        for life in self.lives.values():
            if life.client is None or not life.spec.subscribe:
                continue
            seen: Counter[tuple[int, int]] = Counter()
            for event in life.events:
                assert event.job is not None
                key = (event.job.id, len(event.job.attempted_by))
                seen[key] += 1
                mine = [w for w in self.writes.get(key, []) if w.life == life.name]
                if not mine:
                    v(
                        f"{life.name}: event {event.kind} for job {key[0]} run {key[1]}, "
                        "which it never wrote"
                    )
                    continue
                w = mine[-1]
                if event.job.state.value != w.state:
                    v(
                        f"{life.name}: event for job {key[0]} run {key[1]} says "
                        f"{event.job.state.value}, the write left {w.state}"
                    )
                expected = _event_kind(w)
                if event.kind is not expected:
                    v(
                        f"{life.name}: event {event.kind} for job {key[0]} run {key[1]}, "
                        f"expected {expected}"
                    )
            for key, n in seen.items():
                if n > 1:
                    v(f"{life.name}: {n} events for job {key[0]} run {key[1]}")
            # Lives cancelled from outside too: their subscriber's task lived outside the
            # cancelled scope and read until the client's stream ended.
            if not life.stuck_ended:
                v(f"{life.name}: a subscriber's stream (one that never read) did not end")
            if life.stuck_received + life.stuck_dropped != len(life.events):
                v(
                    f"{life.name}: a subscriber that never read got {life.stuck_received} "
                    f"events and had {life.stuck_dropped} dropped, but {len(life.events)} "
                    "were published"
                )
            for key, writes in self.writes.items():
                for w in writes:
                    if w.life != life.name or seen[key]:
                        continue
                    first = self.first_call.get((w.job_id, w.outcome.attempted_at), -1)
                    if not w.rows and 0 <= first <= life.subscribed:
                        # Its first attempt began before the subscriber subscribed, so
                        # it asked for no rows and published no event (`Write.rows`).
                        self.features["a write begun before its client's subscriber"] += 1
                        continue
                    final = w.state in {s.value for s in FINAL}
                    if life.outside and not self._confirmed_in_time(life, w):
                        # Cancelled from outside: the final flush gave up (shutdown_timeout)
                        # before a write of this outcome came back, so the completer could
                        # not know it had been written.
                        continue
                    if w.delivered or (final and key[0] not in self.deleted):
                        v(
                            f"{life.name}: no event for its write of job {key[0]} run {key[1]} "
                            f"({w.state}, reply {'delivered' if w.delivered else 'lost'})"
                        )

    def _confirmed_in_time(self, life: Life, w: Write) -> bool:
        """Whether a write of ``w``'s outcome came back to ``life``'s completer before
        its final flush's deadline (``shutdown_timeout`` after the outside cancel)."""
        at = life.confirmed.get((w.job_id, w.outcome.attempted_at))
        if at is None or life.outside_at is None:
            return at is not None
        deadline = life.outside_at + self.plan.shutdown_timeout * self.scale
        # On a real clock the completer's own deadline starts a little later than ours.
        tolerance = 0.0 if self.strict_order else 0.02
        return at < deadline - tolerance

    def _check_counts(self) -> None:
        """Each life's completer accounts for every run its workers ended: all written
        (none refused, none left), except under an outside cancel, where what was still
        unwritten when the final flush gave up stays pending (its jobs go to the rescuer)
        and a run that ended after that was never handed over. The storage never changed
        more rows for a life than its completer wrote or still holds (a write whose reply
        was lost counts as written only once a retry goes through)."""
        v = self.violations.append
        ended: Counter[str] = Counter()
        for records in self.runs.values():
            for r in records:
                if r.ended is not None:
                    ended[r.client_id] += 1
        stored: Counter[str] = Counter()
        for writes in self.writes.values():
            for w in writes:
                stored[w.life] += 1
        for life in self.lives.values():
            stats = life.completer
            if stats is None:
                continue
            runs = ended[life.name]
            if stats.refused or stats.dropped:
                v(f"{life.name}: the completer refused {stats.refused}, dropped {stats.dropped}")
            if life.outside:
                if stats.written + stats.pending > runs:
                    v(
                        f"{life.name}: the completer wrote {stats.written} and holds "
                        f"{stats.pending} outcomes, but its workers ended {runs} runs"
                    )
            elif stats.pending or stats.written != runs:
                v(
                    f"{life.name}: the completer wrote {stats.written} outcomes and holds "
                    f"{stats.pending}, but its workers ended {runs} runs"
                )
            # A write whose reply was lost is still pending if no retry went through.
            if stored[life.name] > stats.written + stats.pending:
                v(
                    f"{life.name}: the storage recorded {stored[life.name]} writes, the "
                    f"completer wrote {stats.written} and holds {stats.pending}"
                )

    def report(self) -> str:
        lines = ["violations:", *self.violations, "", "stops:"]
        lines += [f"  {n} {h}: {t:.3f} s (bound {b:.3f})" for n, h, t, b in self.stop_times]
        lines += ["", "log (last 200 lines):", *self.log[-200:]]
        return "\n".join(lines)


def _event_kind(w: Write) -> tq.EventKind:
    state = w.state
    o = w.outcome
    if state == "cancelled":
        return tq.EventKind.JOB_CANCELLED
    if state == "completed":
        return tq.EventKind.JOB_COMPLETED
    if o.give_back_attempt and o.error_json is None:
        return tq.EventKind.JOB_SNOOZED if o.metadata_json else tq.EventKind.JOB_INTERRUPTED
    return tq.EventKind.JOB_FAILED


# ---------------------------------------------------------------------- running helpers


class Watchdog(trio.abc.Instrument):
    """Catches a livelock under the MockClock: tasks that keep running without virtual
    time ever moving (a busy loop) would hang the run forever, since autojump only moves
    the clock when every task is blocked. After ``max_steps`` task steps at one instant
    it records a violation and cancels the run."""

    def __init__(self, sim: Simulation, scope: trio.CancelScope, max_steps: int) -> None:
        self.sim = sim
        self.scope = scope
        self.max_steps = max_steps
        self.at = -1.0
        self.steps = 0
        self.tasks: Counter[str] = Counter()
        self.fired = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self.at:
            self.at = now
            self.steps = 0
            self.tasks.clear()
            return
        self.steps += 1
        if self.steps > self.max_steps // 2:
            self.tasks[task.name] += 1
        if self.steps > self.max_steps and not self.fired:
            self.fired = True
            busiest = ", ".join(f"{n} ({c} steps)" for n, c in self.tasks.most_common(3))
            self.sim.violation(
                f"livelock: {self.steps} task steps without the clock moving; busiest: {busiest}"
            )
            self.scope.cancel()


def run_on_memory(
    plan: Plan, driver_factory: Callable[[], Any], *, max_steps: int = 50_000
) -> Simulation:
    """Run ``plan`` on a fresh memory driver under a MockClock; return the checked
    simulation (``violations`` empty when every invariant held)."""
    from trio.testing import MockClock

    memory = driver_factory()

    @asynccontextmanager
    async def shared() -> AsyncIterator[Any]:
        yield memory

    sim = Simulation(plan, shared, scale=1.0, strict_order=True)

    async def main() -> None:
        with trio.move_on_after(1_000_000) as everything:
            watchdog = Watchdog(sim, everything, max_steps)
            trio.lowlevel.add_instrument(watchdog)
            await sim.run(healthy_within=20_000.0)
        if everything.cancelled_caught and not watchdog.fired:
            sim.violation("the simulation hung")

    trio.run(main, clock=MockClock(autojump_threshold=0))
    sim.check()
    return sim


def run_on_postgres(plan: Plan, url: str, *, scale: float) -> Simulation:
    """Run ``plan`` against the PostgreSQL database at ``url`` in real time, every
    duration multiplied by ``scale``."""
    from trioqueue.driver.postgres.driver import open_postgres_driver

    def factory() -> AbstractAsyncContextManager[Any]:
        return open_postgres_driver(url, max_size=6)

    sim = Simulation(plan, factory, scale=scale, slack=1.5)

    async def main() -> None:
        with trio.move_on_after(120) as everything:
            await sim.run(healthy_within=30.0)
        if everything.cancelled_caught:
            sim.violation("the simulation hung")

    trio.run(main)
    sim.check()
    return sim


def assert_holds(sim: Simulation) -> None:
    if sim.violations:
        raise AssertionError(sim.report())


# -------------------------------------------------------------------------- strategies


def plans(*, postgres: bool = False, limited: bool = False) -> Any:
    """A hypothesis strategy of plans. ``postgres``: smaller plans with fewer and cheaper
    faults, since there every second is real. ``limited``: plans that press on limits
    (always some, most jobs in the limited queue, every spec inserted thrice at the start);
    otherwise a plan has limits three times in four."""
    from hypothesis import strategies as st

    seconds = st.sampled_from([0.0, 0.05, 0.3, 1.0, 3.0, 8.0])
    behaviour = st.one_of(
        st.builds(Behaviour, st.sampled_from(["return", "raise", "cancel"]), seconds),
        st.builds(Behaviour, st.just("snooze"), st.sampled_from([0.0, 0.5, 2.0, 10.0])),
        st.builds(Behaviour, st.just("block")),
        st.builds(Behaviour, st.just("shielded"), st.sampled_from([0.1, 1.0, 4.0])),
    )
    job = st.builds(
        JobSpec,
        behaviours=st.lists(behaviour, max_size=5).map(tuple),
        queue=st.sampled_from([LIMITED_QUEUE] * 3 + ["other"] if limited else QUEUES),
        priority=st.integers(1, 4),
        delay=st.one_of(st.none(), st.sampled_from([0.5, 3.0])),
        pending=st.sampled_from([False, False, False, True]),
        unique=st.sampled_from([False, False, True]),
        max_attempts=st.integers(1, 5),
        kind=st.sampled_from(["sim", "sim", "sim_b"]),
        customer=st.sampled_from([None, 0, 1, 1, 2]),
    )
    fault_ops: list[tuple[str, str]] = [
        ("job_get_available", "error"),
        ("job_get_available", "delay"),
        ("job_set_state_if_running_many", "error"),
        ("job_set_state_if_running_many", "error_after"),
        ("job_set_state_if_running_many", "delay"),
        ("notify_many", "error"),
        ("notify_many", "delay"),
        ("leader_attempt_elect", "error"),
        ("leader_attempt_elect", "delay"),
        ("listener_wait", "drop"),
        ("open_listener", "error"),
        ("job_cancel_requested", "error"),
        ("job_schedule", "error"),
    ]
    if not postgres:
        fault_ops.append(("job_get_available", "error_after"))
    # The fetch of a limited queue. A fetch that commits but reports a failure leaves its
    # jobs running until the rescuer: their partition stays full meanwhile.
    fault_ops += [("job_get_available_limited", "error"), ("job_get_available_limited", "delay")]
    if not postgres:
        fault_ops.append(("job_get_available_limited", "error_after"))

    @st.composite
    def fault(draw: Any) -> FaultSpec:
        op, kind = draw(st.sampled_from(fault_ops))
        call = draw(st.one_of(st.none(), st.integers(1, 4)))
        times = draw(st.integers(1, 1 if postgres else 3))
        secs = draw(st.sampled_from([0.2, 1.0, 3.0])) if kind == "delay" else 0.0
        return FaultSpec(op, kind, call, times, secs)

    def few_write_faults(faults: list[FaultSpec]) -> bool:
        writes = [f for f in faults if f.op == "job_set_state_if_running_many"]
        return len(writes) <= (1 if postgres else 3)

    client = st.builds(
        ClientSpec,
        queues=st.sampled_from([("default",), ("other",), QUEUES]),
        max_workers=st.integers(1, 3),
        poll_only=st.sampled_from([False, False, True]),
        faults=st.lists(fault(), max_size=2 if postgres else 4).filter(few_write_faults).map(tuple),
        subscribe=st.sampled_from([True, True, False]),
    )

    @st.composite
    def plan(draw: Any) -> Plan:
        jobs = tuple(draw(st.lists(job, min_size=1, max_size=6)))
        clients = tuple(draw(st.lists(client, min_size=1, max_size=3)))
        n = len(clients)
        waits = st.sampled_from(
            [0.0, 0.05, 0.3, 1.0, 3.0] if postgres else [0.0, 0.05, 0.3, 1.0, 3.0, 10.0]
        )
        index = st.integers(0, 11)
        via = st.integers(-1, n - 1)
        step = st.one_of(
            st.builds(
                Step,
                waits,
                st.sampled_from(["insert", "insert_many"]),
                via,
                st.lists(st.integers(0, len(jobs) - 1), min_size=1, max_size=4).map(tuple),
            ),
            st.builds(
                Step,
                waits,
                st.sampled_from(["cancel", "cancel", "delete"]),
                via,
                st.tuples(index),
                busy=st.booleans(),
            ),
            st.builds(
                Step,
                waits,
                st.sampled_from(["pause", "resume"]),
                via,
                st.just(()),
                st.sampled_from(QUEUES),
            ),
            st.builds(
                Step,
                waits,
                st.sampled_from(["start", "soft_stop", "hard_stop", "outside_cancel"]),
                st.integers(0, n - 1),
                busy=st.booleans(),
            ),
        )
        # Every spec is inserted once (or thrice) at the start; the steps add more chaos.
        first = Step(0.0, "insert_many", -1, tuple(range(len(jobs))) * (3 if limited else 1))
        steps = (first, *draw(st.lists(step, min_size=2, max_size=12 if postgres else 24)))
        return Plan(
            jobs=jobs,
            clients=clients,
            steps=steps,
            job_timeout=draw(st.sampled_from([0.5, 2.0, 5.0, 20.0])),
            retry_delay=draw(st.sampled_from([0.0, 0.5, 3.0])),
            scheduler_interval=draw(st.sampled_from([0.5, 1.0, 2.0])),
            fetch_poll_interval=draw(st.sampled_from([1.0, 3.0] if postgres else [0.5, 1.0, 5.0])),
            soft_stop_timeout=draw(st.one_of(st.none(), st.sampled_from([0.5, 3.0]))),
            shutdown_timeout=draw(st.sampled_from([0.5, 3.0, 10.0])),
            limits=draw(plan_limits(postgres=postgres, always=limited)),
        )

    return plan()
