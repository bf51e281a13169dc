"""A differential test: the memory driver against PostgreSQL, step by step.

Hypothesis generates a plan: a list of storage operations (inserts by every path, with
unique keys, priorities, schedules, queues, tags and odd JSON; claims by queue and by id;
outcome batches, read back or not; cancel, retry, delete; the scheduler; queue upsert
(storing the queue's limits, or none), pause and resume; fetches within limits (each
queue is worked with limits the plan draws: ``limits_plan``); job_list with every filter;
the counts; queue_list with limits, held-back jobs and partitions; the rescuer's two
calls; deleting finalized jobs and stale queues; leadership; periodic state; transactions
committed or rolled back) on a fixed fake clock that only the plan moves (every
operation is given ``now``; queue_list, which reads the driver's clock, is given the
plan's). The plan runs against a fresh ``MemoryDriver`` and a migrated PostgreSQL database
(the test's own ``database_url``, emptied before each plan) at once, and after every step
the two must have answered alike: the same rows, an error where the other raised one, and
the same notifications on the job, control and leadership channels.

What is compared, and how it is normalised:

- Job ids through the order the jobs were made: each driver's ids are mapped to handles
  (0, 1, 2…) in the order they first appear, and a plan names jobs by handle. Raw ids may
  differ: a statement that fails may use up an id on one driver and not on the other.
- Timestamps as given: both drivers store the ``now`` of the call, so they must be equal.
- JSON as decoded (key order aside, which ``dict`` equality ignores).
- Errors by class only (the messages are the database's own words).

The differences the drivers are allowed (each normalised where it is made, with a comment):
empty ``errors``/``metadata`` come back as None or empty from a claim; rows of outcome and
rescue batches, ``queue_pause("*")`` (and its notifications) and the live counts come in
no particular order from PostgreSQL; its finalized counts use the planner's estimate (and
may skip the exact count); it deletes finalized jobs whose ``finalized_at`` ties in no
particular order (the limit is lowered to the tie); it applies an arbitrary one of several
outcomes for one job in a batch (a batch names each job once); ``within_newest`` counts
raw ids, so it is left out once the ids diverged; its fast insert gives the jobs of
limited queues their ids after the others' (the plan hands them over in that order). A
unique key names the job's kind, as the client's do. (This test found PostgreSQL's
single-job insert notifying only the first of several queues named; fixed.)

``test_limits_plans.py`` runs this harness on plans made mostly of flow control.

Profiles (``$TRIOQUEUE_SOAK``, as in ``test_simulation.py``): 200 plans by default (under
a minute), 3,000 in the soak.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import trio
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from limits_plan import DIFF_ARGS, FetchLimited, Reconfigure, UseLimits, diff_limits, queue_rows
from support import GENERATED, LONG, SOAK

from trioqueue._codec import unique_states_bits
from trioqueue.driver.memory import MemoryDriver
from trioqueue.driver.protocol import (
    CONTROL_CHANNEL,
    INSERT_CHANNEL,
    LEADERSHIP_CHANNEL,
    PARTITIONS_SHOWN,
    JobInsertParams,
    JobOutcome,
    JobRescue,
    PeriodicJobState,
)
from trioqueue.errors import DatabaseError
from trioqueue.job import DEFAULT_UNIQUE_STATES, JobListParams, JobState
from trioqueue.limits import GlobalLimit, QueueLimits, RateLimit

settings.register_profile(
    "trioqueue-differential",
    max_examples=200,
    **{
        **GENERATED,
        # No explain phase: it replays a failure hundreds of times, each on a database.
        "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        "suppress_health_check": [
            *GENERATED["suppress_health_check"],
            HealthCheck.function_scoped_fixture,
        ],
    },
)
settings.register_profile(
    "trioqueue-differential-soak",
    parent=settings.get_profile("trioqueue-differential"),
    max_examples=3_000,
)
PROFILE = settings.get_profile("trioqueue-differential-soak" if SOAK else "trioqueue-differential")

START = datetime(2026, 1, 1, tzinfo=UTC)
QUEUES = ("q1", "q2")
KINDS = ("a", "b")
TAGS = ("x", "y")
MARKER_CHANNEL = "tq_differential"
CHANNELS = [INSERT_CHANNEL, CONTROL_CHANNEL, LEADERSHIP_CHANNEL, MARKER_CHANNEL]
MISSING = 1_000_000_000
"""The raw id a plan uses for "a job that does not exist"."""
S = JobState

# Unique state masks: the default, one without the final states but `running`, one that
# leaves `running` out (so a running job does not hold its key, and going back to
# `available` may collide), one with every state (a discarded job keeps the key).
MASKS = (
    DEFAULT_UNIQUE_STATES,
    frozenset({S.AVAILABLE, S.PENDING, S.SCHEDULED, S.RETRYABLE, S.RUNNING}),
    frozenset({S.AVAILABLE, S.SCHEDULED}),
    frozenset(JobState),
)

# ------------------------------------------------------------------------------ the plan


@attrs.frozen
class NewJob:
    kind: str = "a"
    queue: str = "q1"
    priority: int = 1
    max_attempts: int = 3
    due: float = 0.0
    """scheduled_at, in seconds after now."""
    state: str = "available"
    tags: tuple[str, ...] = ()
    key: int | None = None
    """Unique key number (None: not unique)."""
    mask: int = 0
    args_json: str = "{}"
    metadata_json: str = "{}"


@attrs.frozen
class Tick:
    seconds: float


@attrs.frozen
class Insert:
    jobs: tuple[NewJob, ...]
    path: str = "many"
    """``many`` (job_insert_many; one job takes its single-row statements) or ``fast``."""
    notify: tuple[str, ...] = ()


@attrs.frozen
class Fetch:
    queue: str
    limit: int
    client: str = "c1"


@attrs.frozen
class Claim:
    job: int
    client: str = "c1"


@attrs.frozen
class Out:
    job: int
    state: str
    running: bool = True
    """Pick the job among the running ones (else among all)."""
    final: bool = True
    """finalized_at = now for a final state (else None; the other way round for a state
    that is not final, both of which break a constraint)."""
    due: float | None = None
    give_back: bool = False
    error: str | None = None
    metadata: str | None = None
    run: str = "current"
    """attempted_at: the job's ``current`` one, a ``stale`` one, or ``any`` (None)."""


@attrs.frozen
class Outcomes:
    outs: tuple[Out, ...]
    rows: bool = True


@attrs.frozen
class Manage:
    do: str
    """cancel, retry, delete, get, state."""
    job: int


@attrs.frozen
class CancelRequested:
    jobs: tuple[int, ...]


@attrs.frozen
class Schedule:
    ahead: float
    limit: int


@attrs.frozen
class QueueOp:
    do: str
    """upsert, pause, resume, paused, list, delete_stale."""
    name: str = "q1"
    ago: float = 0.0
    limited: bool = False
    """For upsert: store the queue's limits (`UseLimits`), else none."""


@attrs.frozen
class List:
    ids: tuple[int, ...] | None = None
    kinds: tuple[str, ...] | None = None
    queues: tuple[str, ...] | None = None
    states: tuple[str, ...] | None = None
    priorities: tuple[int, ...] | None = None
    tags: tuple[str, ...] | None = None
    limit: int = 100
    after: int | None = None
    descending: bool = False
    within_newest: int | None = None


@attrs.frozen
class Count:
    do: str
    """live, finalized, since."""
    n: int = 100
    ago: float = 0.0


@attrs.frozen
class Decision:
    state: str = "retryable"
    due: float | None = 0.0
    stale: bool = False


@attrs.frozen
class Rescue:
    ago: float
    limit: int = 10
    after: int | None = None
    decisions: tuple[Decision, ...] = ()


@attrs.frozen
class DeleteFinalized:
    state: str
    ago: float
    limit: int


@attrs.frozen
class Leader:
    do: str
    """elect, resign, get."""
    who: str = "l1"
    term: float = 10.0


@attrs.frozen
class Periodic:
    do: str
    """get, save."""
    pid: str = "p1"
    next_in: float = 60.0
    last_ago: float | None = None
    schedule: str | None = "every=60"
    expected: str = "current"
    """The state it expects: ``current`` (what is stored), ``none``, or ``wrong``."""


@attrs.frozen
class Tx:
    ops: tuple[Any, ...]
    commit: bool = True


# ------------------------------------------------------------------------- the harness


class Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


class Side:
    """One driver under test, with its own id mapping and listener."""

    def __init__(self, name: str, driver: Any, listener: Any) -> None:
        self.name = name
        self.driver = driver
        self.listener = listener
        self.ids: list[int] = []
        """Raw id of each handle."""
        self.handles: dict[int, int] = {}

    def handle(self, raw: int) -> int:
        """The handle of a raw id, given in the order ids first appear."""
        if raw not in self.handles:
            self.handles[raw] = len(self.ids)
            self.ids.append(raw)
        return self.handles[raw]

    def raw(self, handle: int) -> int:
        return self.ids[handle] if 0 <= handle < len(self.ids) else MISSING

    def row(self, r: Any) -> Any:
        if r is None:
            return None
        r = tuple(r)
        # A claim may return empty errors and metadata as None (PostgreSQL does; the
        # protocol allows it): compare them as empty.
        errors = [] if r[13] is None else r[13]
        metadata = {} if r[14] is None else r[14]
        return (self.handle(r[0]), *r[1:13], errors, metadata, list(r[15] or ()))

    def rows(self, rs: Sequence[Any]) -> list[Any]:
        return [self.row(r) for r in rs]

    async def notifications(self, marker: str) -> list[tuple[str, Any]]:
        """What the listener got since the last step, up to ``marker`` (sent now)."""
        await self.driver.notify_many(MARKER_CHANNEL, [marker])
        got: list[tuple[str, Any]] = []
        with trio.fail_after(10):
            while True:
                for n in await self.listener.wait():
                    if n.channel == MARKER_CHANNEL:
                        if n.payload == marker:
                            return got
                        continue
                    try:
                        payload = json.loads(n.payload)
                    except ValueError:
                        payload = n.payload
                    if isinstance(payload, dict) and "job_id" in payload:
                        payload = {**payload, "job_id": self.handle(payload["job_id"])}
                    got.append((n.channel, payload))


class Mismatch(AssertionError):
    pass


def _params(job: NewJob, now: datetime) -> JobInsertParams:
    # A unique key names the kind, as the client's do (_codec.unique_key): a collision
    # returns the live job after setting its kind to the one inserted, which changes
    # nothing then. (With keys shared across kinds the kind would change, and PostgreSQL
    # keeps the job's partition key, tq_job.limit_key, of the kind it had.)
    key = None if job.key is None else f"kind={job.kind}&key{job.key}".encode()
    return JobInsertParams(
        args_json=job.args_json,
        kind=job.kind,
        max_attempts=job.max_attempts,
        metadata_json=job.metadata_json,
        priority=job.priority,
        queue=job.queue,
        scheduled_at=now + timedelta(seconds=job.due),
        state=JobState(job.state),
        tags=job.tags,
        unique_key=key,
        unique_states=None if key is None else unique_states_bits(MASKS[job.mask]),
    )


class Harness:
    def __init__(self, memory: Side, postgres: Side) -> None:
        self.memory = memory
        self.postgres = postgres
        self.now = START
        self.step = 0
        self.known = 0
        self.features: set[str] = set()
        self.limits: dict[str, QueueLimits] = {
            QUEUES[0]: QueueLimits(GlobalLimit(1, by_args=("c",)), RateLimit(2, 1.0)),
            QUEUES[1]: QueueLimits(None, RateLimit(1, 5.0, by_kind=True)),
        }
        """The limits each queue is worked with (a plan's first step, `UseLimits`, sets
        them): its limited fetches take them, and its upserts store them or none. They
        never change within a plan, as a queue's clients are configured alike (see
        ``test_limits_plans.py`` for limits that change: `Reconfigure`)."""
        self.spare = self.limits[QUEUES[0]]
        """The limits a `Reconfigure` step switches a queue to."""
        # queue_list reads the driver's clock (for the due jobs and the rate windows it
        # counts): on both sides, the plan's clock stands in for it.
        for side in (memory, postgres):
            side.driver.clock = lambda: self.now

    async def run(self, plan: Sequence[Any]) -> None:
        for op in plan:
            self.step += 1
            await self.one(op)

    async def one(self, op: Any) -> None:
        if isinstance(op, Tick):
            self.now += timedelta(seconds=op.seconds)
            return
        if isinstance(op, UseLimits):
            self.limits = dict(zip(QUEUES, op.limits[: len(QUEUES)], strict=True))
            self.spare = op.limits[-1]
            return
        if isinstance(op, Reconfigure):
            # The queue's clients are now configured with other limits: one announces
            # them (and the limited fetches take them from here on).
            self.limits[op.queue], self.spare = self.spare, self.limits[op.queue]
            op = QueueOp("upsert", op.queue, limited=True)
        # The jobs a step can name: those made before it (the same on both sides, even
        # while the first side's step makes more).
        self.known = len(self.memory.ids)
        # The memory driver is the reference for what the plan picks (running jobs,
        # stored attempted_at...): both drivers agreed so far, so either would do.
        resolved = await self.resolve(op)
        a = await self.call(self.memory, resolved)
        b = await self.call(self.postgres, resolved)
        if isinstance(op, Count) and op.do == "finalized" and a[0] == b[0] == "ok":
            # PostgreSQL skips the exact count (None) of a state whose estimate is at
            # least twice ``n`` (once autovacuum has analyzed the table).
            skipped = {state for state, count in b[1] if count is None}
            a = ("ok", [(s, None if s in skipped else c) for s, c in a[1]])
        self.compare(op, "result", a, b)
        marker = f"step-{self.step}"
        # As multisets: one statement's notifications follow the order it changed rows
        # in, which PostgreSQL does not define (queue_pause("*") and resume).
        a_notes = sorted(await self.memory.notifications(marker), key=_note_key)
        b_notes = sorted(await self.postgres.notifications(marker), key=_note_key)
        self.compare(op, "notifications", a_notes, b_notes)
        if self.memory.ids != self.postgres.ids:
            self.features.add("raw ids diverged")
        self.features.update(_features(op, a))

    def compare(self, op: Any, what: str, a: Any, b: Any) -> None:
        if a != b:
            raise Mismatch(
                f"step {self.step} {op!r}: {what} differ\n  memory:   {a!r}\n  postgres: {b!r}"
            )

    # ---- resolving what the plan picks, on the reference driver

    async def _running(self) -> list[Any]:
        params = JobListParams(states=[S.RUNNING], limit=1000)
        return list(await self.memory.driver.job_list(params))

    async def resolve(self, op: Any) -> Any:
        """``op`` with everything it picks from the current state fixed (as handles and
        times), so both drivers are given the same call."""
        if isinstance(op, Outcomes):
            running = await self._running()
            outs = []
            for o in op.outs:
                if o.running and running:
                    row = running[o.job % len(running)]
                    handle = self.memory.handle(row[0])
                else:
                    handle = self.pick(o.job)
                    row = await self.memory.driver.job_get(self.memory.raw(handle))
                attempted = None if row is None else row[8]
                if o.run == "stale" or (o.run == "current" and attempted is None):
                    attempted = self.now - timedelta(seconds=3600)
                elif o.run == "any":
                    attempted = None
                if all(h != handle for h, _, _ in outs):
                    # Several outcomes for one job in a batch: PostgreSQL applies one of
                    # them, which is not defined (the memory driver the first). The
                    # completer never sends one job twice.
                    outs.append((handle, o, attempted))
            return ("outcomes", tuple(outs), op.rows)
        if isinstance(op, Insert) and op.path == "fast":
            # PostgreSQL's COPY takes the jobs of queues without limits, and the jobs of
            # limited queues follow by INSERT (to compute their partition key): their ids
            # come after the others'. Ids are opaque and a fast insert returns a count, so
            # the plan hands the jobs over in that order to both drivers.
            limited = set(await self._stored_limits())
            if any(job.queue in limited for job in op.jobs):
                jobs = sorted(op.jobs, key=lambda job: job.queue in limited)
                if jobs != list(op.jobs):
                    self.features.add("fast insert: limited queues' jobs put last")
                return attrs.evolve(op, jobs=tuple(jobs))
            return op
        if isinstance(op, Rescue):
            return op
        if isinstance(op, DeleteFinalized):
            return ("delete_finalized", op, await self._tie_free_limit(op))
        if isinstance(op, Periodic) and op.do == "save":
            stored = await self.memory.driver.periodic_job_get_many([op.pid])
            return ("periodic_save", op, stored.get(op.pid))
        if isinstance(op, Tx):
            return Tx(tuple([await self.resolve(sub) for sub in op.ops]), op.commit)
        if isinstance(op, List) and op.within_newest is not None:
            if self.memory.ids != self.postgres.ids:
                # within_newest counts raw ids (above the highest id minus N), and the
                # drivers' ids may have diverged: a failed insert uses up an id on one and
                # not the other (PostgreSQL's sequence is consumed, or not, depending on
                # where the statement failed). Ids are opaque; from then on the filter is
                # left out.
                self.features.add("within_newest left out: ids diverged")
                return attrs.evolve(op, within_newest=None)
        return op

    async def _stored_limits(self) -> dict[str, QueueLimits]:
        """The limits stored in each queue row (on the reference driver)."""
        return {r.name: r.limits for r in await self.memory.driver.queue_list() if r.limits}

    def pick(self, ref: int) -> int:
        """A handle from a plan's job reference: modulo the jobs made so far; references
        from 40 up name a job that does not exist."""
        n = self.known
        return MISSING if ref >= 40 or n == 0 else ref % n

    async def _tie_free_limit(self, op: DeleteFinalized) -> int:
        # PostgreSQL deletes the oldest finalized jobs by finalized_at alone, so among jobs
        # finalized at the same instant the ones a limit cuts are not defined there (the
        # memory driver takes the lowest ids). Lower the limit to the start of such a tie.
        before = self.now - timedelta(seconds=op.ago)
        rows = await self.memory.driver.job_list(
            JobListParams(states=[JobState(op.state)], limit=1000)
        )
        times = sorted(r[11] for r in rows if r[11] is not None and r[11] < before)
        limit = op.limit
        while 0 < limit < len(times) and times[limit - 1] == times[limit]:
            limit -= 1
        if limit != op.limit:
            self.features.add("delete_finalized limit lowered at a tie")
        return limit

    # ---- calling one driver

    async def call(self, side: Side, op: Any, ex: Any = None) -> Any:
        try:
            return ("ok", await self.dispatch(side, op, ex))
        except Rollback:
            raise
        except DatabaseError:
            return ("error", "DatabaseError")
        except Exception as exc:  # compared by class: both must raise the same
            return ("error", type(exc).__name__)

    async def dispatch(self, side: Side, op: Any, ex: Any) -> Any:
        d = side.driver
        now = self.now
        if isinstance(op, Insert):
            params = [_params(j, now) for j in op.jobs]
            if op.path == "fast":
                count = await d.job_insert_fast(iter(params), list(op.notify), now, ex=ex)
                # COPY returns a count: learn the new jobs' ids (in id order) from a list.
                after = max(side.ids, default=0)
                found = await d.job_list(JobListParams(after=after, limit=1000), ex=ex)
                return count, side.rows(found)
            out = await d.job_insert_many(params, list(op.notify), now, ex=ex)
            return [(side.row(r), bool(skipped)) for r, skipped in out]
        if isinstance(op, Fetch):
            return side.rows(await d.job_get_available(op.queue, now, op.limit, op.client))
        if isinstance(op, FetchLimited):
            limits = self.limits[op.queue]
            found = await d.job_get_available_limited(op.queue, now, op.limit, op.client, limits)
            return side.rows(found.rows), found.held_back, found.next_open
        if isinstance(op, Claim):
            return side.row(await d.job_claim(side.raw(self.pick(op.job)), now, op.client))
        if isinstance(op, tuple) and op[0] == "outcomes":
            return await self._outcomes(side, op[1], op[2])
        if isinstance(op, Manage):
            raw = side.raw(self.pick(op.job))
            if op.do == "cancel":
                return side.row(await d.job_cancel(raw, now, ex=ex))
            if op.do == "retry":
                return side.row(await d.job_retry(raw, now, ex=ex))
            if op.do == "delete":
                return side.row(await d.job_delete(raw, ex=ex))
            if op.do == "get":
                return side.row(await d.job_get(raw, ex=ex))
            return await d.job_state(raw, ex=ex)
        if isinstance(op, CancelRequested):
            found = await d.job_cancel_requested([side.raw(self.pick(j)) for j in op.jobs])
            return [side.handle(i) for i in found]
        if isinstance(op, Schedule):
            horizon = now + timedelta(seconds=op.ahead)
            return await d.job_schedule(horizon, now, op.limit)
        if isinstance(op, QueueOp):
            return await self._queue(side, op, ex)
        if isinstance(op, List):
            return side.rows(await d.job_list(self._list_params(side, op), ex=ex))
        if isinstance(op, Count):
            return await self._count(side, op)
        if isinstance(op, Rescue):
            return await self._rescue(side, op)
        if isinstance(op, tuple) and op[0] == "delete_finalized":
            before = now - timedelta(seconds=op[1].ago)
            return await d.job_delete_finalized(JobState(op[1].state), before, op[2])
        if isinstance(op, Leader):
            if op.do == "elect":
                until = now + timedelta(seconds=op.term)
                return await d.leader_attempt_elect(op.who, now, until)
            if op.do == "resign":
                return await d.leader_resign(op.who)
            got = await d.leader_get()
            return None if got is None else tuple(got)
        if isinstance(op, Periodic):
            found = await d.periodic_job_get_many([op.pid, "p-none"], ex=ex)
            return {k: attrs.astuple(v) for k, v in found.items()}
        if isinstance(op, tuple) and op[0] == "periodic_save":
            return await self._periodic_save(side, op[1], op[2], ex)
        if isinstance(op, Tx):
            return await self._tx(side, op)
        raise AssertionError(f"unknown op {op!r}")

    async def _outcomes(self, side: Side, outs: Any, rows: bool) -> Any:
        now = self.now
        outcomes = []
        for handle, o, attempted in outs:
            state = JobState(o.state)
            final = state in (S.COMPLETED, S.CANCELLED, S.DISCARDED)
            outcomes.append(
                JobOutcome(
                    id=side.raw(handle),
                    state=state,
                    finalized_at=now if final == o.final else None,
                    scheduled_at=None if o.due is None else now + timedelta(seconds=o.due),
                    give_back_attempt=o.give_back,
                    error_json=o.error,
                    metadata_json=o.metadata,
                    attempted_at=attempted,
                )
            )
        written = await side.driver.job_set_state_if_running_many(outcomes, now, rows=rows)
        if not rows:
            # Only the ids come back, as one-column rows (PostgreSQL takes its short
            # statement when every outcome is a plain completion).
            return sorted((side.handle(r[0]), len(tuple(r))) for r in written)
        # The rows of a batch come back in no particular order from PostgreSQL (the memory
        # driver keeps input order): compare them by id.
        return sorted(side.rows(written), key=lambda r: r[0])

    async def _queue(self, side: Side, op: QueueOp, ex: Any) -> Any:
        d, now = side.driver, self.now
        if op.do == "upsert":
            limits = self.limits.get(op.name) if op.limited else None
            return await d.queue_upsert(op.name, now, limits)
        if op.do in ("pause", "resume"):
            change = d.queue_pause if op.do == "pause" else d.queue_resume
            # "*" changes every queue, in no particular order on PostgreSQL.
            return sorted(await change(op.name, now, ex=ex))
        if op.do == "paused":
            return sorted(await d.queue_paused([*QUEUES, "q-none"]))
        if op.do == "delete_stale":
            return sorted(await d.queue_delete_stale(now - timedelta(seconds=op.ago)))
        return queue_rows(await d.queue_list())

    def _list_params(self, side: Side, op: List) -> JobListParams:
        return JobListParams(
            ids=None if op.ids is None else [side.raw(self.pick(j)) for j in op.ids],
            kinds=op.kinds,
            queues=op.queues,
            states=op.states,
            priorities=op.priorities,
            tags=op.tags,
            limit=op.limit,
            after=None if op.after is None else side.raw(self.pick(op.after)),
            descending=op.descending,
            within_newest=op.within_newest,
        )

    async def _count(self, side: Side, op: Count) -> Any:
        d = side.driver
        if op.do == "live":
            # GROUP BY without ORDER BY on PostgreSQL: compare sorted.
            return sorted(tuple(r) for r in await d.job_count_live())
        if op.do == "since":
            return await d.job_count_finalized_since(self.now - timedelta(seconds=op.ago), op.n)
        counts = []
        for state, count, _estimate in await d.job_count_finalized(op.n):
            # The estimate is the planner's on PostgreSQL (None until the table is
            # analyzed), exact in memory: left out. (For a skipped count see `one`.)
            counts.append((state, count))
        return counts

    async def _rescue(self, side: Side, op: Rescue) -> Any:
        d, now = side.driver, self.now
        after = 0 if op.after is None else side.raw(self.pick(op.after))
        if after == MISSING:
            after = 0
        stuck = await d.job_get_stuck(now - timedelta(seconds=op.ago), op.limit, after)
        rescues = []
        for row, decision in zip(stuck, op.decisions, strict=False):
            state = JobState(decision.state)
            final = state in (S.COMPLETED, S.CANCELLED, S.DISCARDED)
            due = None if decision.due is None else now + timedelta(seconds=decision.due)
            attempted = row[8] - timedelta(seconds=1) if decision.stale else row[8]
            error = json.dumps({"error": "stuck", "at": now.isoformat()})
            rescues.append(JobRescue(row[0], state, now if final else None, due, error, attempted))
        written = await d.job_rescue_many(rescues)
        # Written rows come back in no particular order from PostgreSQL.
        return side.rows(stuck), sorted((side.handle(i), q, s) for i, q, s in written)

    async def _periodic_save(
        self, side: Side, op: Periodic, stored: PeriodicJobState | None, ex: Any
    ) -> Any:
        now = self.now
        last = None if op.last_ago is None else now - timedelta(seconds=op.last_ago)
        state = PeriodicJobState(op.pid, op.schedule, now + timedelta(seconds=op.next_in), last)
        expected: PeriodicJobState | None = stored
        if op.expected == "none":
            expected = None
        elif op.expected == "wrong":
            expected = PeriodicJobState(op.pid, "every=1", START, None)
        return await side.driver.periodic_job_save(state, expected, now, ex=ex)

    async def _tx(self, side: Side, op: Tx) -> Any:
        results: list[Any] = []
        try:
            async with side.driver.transaction() as ex:
                for sub in op.ops:
                    results.append(await self.call(side, sub, ex))
                if not op.commit:
                    raise Rollback
            results.append("committed")
        except Rollback:
            results.append("rolled back")
        except DatabaseError:
            results.append(("error", "DatabaseError"))
        return results


def _note_key(note: tuple[str, Any]) -> str:
    return json.dumps(note, sort_keys=True)


def _features(op: Any, result: Any) -> list[str]:
    """What a step exercised, for coverage statistics (``--hypothesis-show-statistics``)."""
    name = type(op).__name__
    if isinstance(op, Tx):
        found = [f"transaction {'committed' if op.commit else 'rolled back'}"]
        for sub, got in zip(op.ops, result[1], strict=False):
            found += [f"in a transaction: {f}" for f in _features(sub, got)]
        return found
    status, value = result
    if status == "error":
        return [f"{name} raised {value}"]
    if isinstance(op, Insert):
        skipped = isinstance(value, list) and any(s for _, s in value)
        return [f"insert ({op.path})"] + (["unique insert skipped"] if skipped else [])
    if isinstance(op, Outcomes):
        return [f"outcomes written ({'rows' if op.rows else 'ids'})"] if value else []
    if isinstance(op, Manage) and value is not None:
        return [f"{op.do} of a job that is {value if op.do == 'state' else value[4]}"]
    if isinstance(op, Rescue):
        return (["stuck jobs found"] if value[0] else []) + (["rescued"] if value[1] else [])
    if isinstance(op, FetchLimited):
        rows, held_back, next_open = value
        found = [f"{name} found jobs"] if rows else []
        found += ["FetchLimited held jobs back"] if held_back else []
        return found + (["FetchLimited said when a rate window opens"] if next_open else [])
    if isinstance(op, QueueOp) and op.do == "list":
        found = ["queue_list of a limited queue"] if any(r[6] for r in value) else []
        found += ["queue_list: jobs held back"] if any(r[7] for r in value) else []
        cut = any(len(r[8]) == PARTITIONS_SHOWN for r in value)
        return found + ([f"queue_list: {PARTITIONS_SHOWN} partitions shown"] if cut else [])
    if isinstance(op, Fetch | Claim | Schedule | DeleteFinalized | CancelRequested) and value:
        return [f"{name} found jobs"]
    if isinstance(op, Leader | Periodic) and value:
        return [f"{name} {op.do} succeeded"]
    return []


@asynccontextmanager
async def sides(url: str) -> AsyncIterator[tuple[Side, Side]]:
    from trioqueue.driver.postgres.driver import open_postgres_driver

    memory = MemoryDriver()
    async with (
        open_postgres_driver(url, max_size=2) as postgres,
        memory.open_listener(CHANNELS) as memory_listener,
        postgres.open_listener(CHANNELS) as postgres_listener,
    ):
        yield Side("memory", memory, memory_listener), Side("postgres", postgres, postgres_listener)


EMPTY = "TRUNCATE tq_job, tq_queue, tq_leader, tq_periodic_job, tq_rate_start RESTART IDENTITY"
"""Every table a plan writes, emptied before each plan; its ids start again at 1."""


def run_plan(plan: Sequence[Any], url: str) -> set[str]:
    """Run ``plan`` on a fresh memory driver and on the migrated database at ``url``
    (emptied first); raise ``Mismatch`` at the first step they disagree. Returns the
    features the run exercised."""

    async def main() -> set[str]:
        from trioqueue.driver.postgres.connection import PgConnection

        conn = await PgConnection.connect(url)
        try:
            await conn.execute(EMPTY)
        finally:
            await conn.aclose()
        async with sides(url) as (memory, postgres):
            harness = Harness(memory, postgres)
            await harness.run(plan)
            return harness.features

    return trio.run(main)


# -------------------------------------------------------------------------- strategies

_seconds = st.sampled_from([0.0, 0.0, 0.000001, 0.5, 1.0, 5.0, 60.0, 3600.0])
_offset = st.sampled_from([-60.0, -1.0, 0.0, 0.0, 0.0, 0.000001, 5.0, 60.0])
_ref = st.integers(0, 44)
_json_object = st.sampled_from(['{"n": 1}', '{"b": [1, 2.5, "x"], "a": {"z": null}}', "{}"])
_odd_json = st.sampled_from(
    ["[]", "[1]", '"cancel_attempted_at"', '["cancel_attempted_at"]', "1.50", "1e3", "{"]
)


def _mostly(common: Any, rare: Any, odds: int = 30) -> Any:
    """``common``, and ``rare`` about once in ``odds + 1`` draws (values a constraint or
    the JSON parser refuses: rare, so that most batches go in)."""
    # (st.one_of would not do: it draws each distinct strategy alike, however often
    # it is given.)
    return st.sampled_from([False] * odds + [True]).flatmap(lambda r: rare if r else common)


_metadata = _mostly(_json_object, _odd_json, 8)
_args = _mostly(st.sampled_from(DIFF_ARGS), _odd_json, 10)
"""Args with fields to partition by (``c``, ``d``), few distinct values."""
_tags = st.lists(st.sampled_from(TAGS), max_size=2, unique=True).map(tuple)

new_jobs = st.builds(
    NewJob,
    kind=st.sampled_from(KINDS),
    queue=st.sampled_from(QUEUES),
    priority=_mostly(st.integers(1, 4), st.just(5)),
    max_attempts=_mostly(st.integers(1, 3), st.just(0)),
    due=_offset,
    state=_mostly(
        st.sampled_from(["available"] * 4 + ["scheduled", "pending", "retryable"]),
        st.just("completed"),
    ),
    tags=_tags,
    key=st.one_of(st.none(), st.integers(0, 2)),
    mask=st.integers(0, len(MASKS) - 1),
    args_json=_args,
    metadata_json=_metadata,
)
first_insert = st.builds(
    Insert,
    st.lists(
        st.builds(
            NewJob,
            kind=st.sampled_from(KINDS),
            queue=st.sampled_from(QUEUES),
            priority=st.integers(1, 4),
            due=st.sampled_from([-1.0, 0.0, 5.0]),
            tags=_tags,
            args_json=st.sampled_from(DIFF_ARGS),
        ),
        min_size=1,
        max_size=4,
    ).map(tuple),
)
"""Every plan starts with jobs that go in, so the steps after it have jobs to work on."""


@st.composite
def inserts(draw: Any, paths: Sequence[str] = ("many", "many", "many", "fast")) -> Insert:
    jobs = tuple(draw(st.lists(new_jobs, min_size=1, max_size=3)))
    path = draw(st.sampled_from(paths))
    notify = tuple(draw(st.lists(st.sampled_from(QUEUES), max_size=2, unique=True)))
    return Insert(jobs, path, notify)


outs = st.builds(
    Out,
    job=_ref,
    state=st.sampled_from(
        ["completed"] * 4
        + ["retryable", "retryable", "available", "scheduled", "discarded", "cancelled"]
    ),
    running=st.sampled_from([True, True, True, False]),
    final=st.sampled_from([True] * 9 + [False]),
    due=st.one_of(st.none(), _offset),
    give_back=st.sampled_from([False, False, False, True]),
    error=st.one_of(st.none(), st.none(), st.just('{"error": "boom", "attempt": 1}'), _odd_json),
    metadata=st.one_of(st.none(), st.none(), _metadata),
    run=st.sampled_from(["current"] * 6 + ["stale", "any"]),
)

list_ops = st.builds(
    List,
    ids=st.one_of(st.none(), st.lists(_ref, max_size=3).map(tuple)),
    kinds=st.one_of(st.none(), st.lists(st.sampled_from(KINDS), max_size=2).map(tuple)),
    queues=st.one_of(st.none(), st.lists(st.sampled_from(QUEUES), max_size=2).map(tuple)),
    states=st.one_of(
        st.none(), st.lists(st.sampled_from([s.value for s in S]), max_size=3).map(tuple)
    ),
    priorities=st.one_of(st.none(), st.lists(st.integers(1, 4), max_size=2).map(tuple)),
    tags=st.one_of(st.none(), st.lists(st.sampled_from(TAGS), max_size=2).map(tuple)),
    limit=st.sampled_from([1, 2, 5, 100]),
    after=st.one_of(st.none(), _ref),
    descending=st.booleans(),
    within_newest=st.one_of(st.none(), st.none(), st.integers(1, 6)),
)

_tx_ops = st.one_of(
    inserts(paths=["many"]),
    inserts(),
    st.builds(Manage, st.sampled_from(["cancel", "retry", "delete", "get", "state"]), _ref),
    list_ops,
    st.builds(QueueOp, st.sampled_from(["pause", "resume"]), st.sampled_from([*QUEUES, "*"])),
    st.builds(Periodic, st.sampled_from(["get", "save"]), st.sampled_from(["p1", "p2"])),
)

_rescue_ops = st.builds(
    Rescue,
    st.sampled_from([0.0, 1.0, 60.0]),
    st.sampled_from([1, 10]),
    st.one_of(st.none(), _ref),
    st.lists(
        st.builds(
            Decision,
            st.sampled_from(["retryable", "available", "discarded", "scheduled"]),
            st.one_of(st.none(), _offset),
            st.sampled_from([False, False, True]),
        ),
        max_size=3,
    ).map(tuple),
)
_outcome_ops = st.builds(Outcomes, st.lists(outs, min_size=1, max_size=3).map(tuple), st.booleans())
_limited_fetches = st.builds(
    FetchLimited, st.sampled_from(QUEUES), st.integers(0, 3), st.sampled_from(["c1", "c2"])
)


def _again(strategy: Any) -> Any:
    """``strategy`` as another object: st.one_of draws each distinct strategy alike and
    takes one given twice as one, so a strategy listed again must be another object to be
    drawn more often."""
    return strategy.map(lambda value: value)


# A strategy listed twice (as another object: `_again`) is drawn about twice as often.
operations = st.one_of(
    st.builds(Tick, _seconds),
    st.builds(Tick, _seconds),
    inserts(),
    inserts(),
    st.builds(Fetch, st.sampled_from(QUEUES), st.integers(0, 3), st.sampled_from(["c1", "c2"])),
    st.builds(Fetch, st.sampled_from(QUEUES), st.integers(1, 3)),
    st.builds(Fetch, st.sampled_from(QUEUES), st.integers(1, 3)),
    _limited_fetches,
    _again(_limited_fetches),
    _again(_limited_fetches),
    st.builds(QueueOp, st.just("upsert"), st.sampled_from(QUEUES), limited=st.just(True)),
    st.builds(Claim, _ref, st.sampled_from(["c1", "c2"])),
    _outcome_ops,
    _again(_outcome_ops),
    _again(_outcome_ops),
    st.builds(Manage, st.sampled_from(["cancel", "cancel", "retry", "delete", "get"]), _ref),
    st.builds(CancelRequested, st.lists(_ref, max_size=4).map(tuple)),
    st.builds(Schedule, _offset, st.sampled_from([1, 2, 100])),
    st.builds(
        QueueOp,
        st.sampled_from(["upsert", "pause", "resume", "paused", "list", "delete_stale"]),
        st.sampled_from([*QUEUES, QUEUES[0], "*"]),
        st.sampled_from([0.0, 1.0, 60.0]),
    ),
    list_ops,
    st.builds(Count, st.sampled_from(["live", "finalized", "since"]), st.sampled_from([1, 2, 100])),
    _rescue_ops,
    _again(_rescue_ops),
    st.builds(
        DeleteFinalized,
        st.sampled_from(["completed", "cancelled", "discarded"]),
        st.sampled_from([-1.0, 0.0, 1.0, 60.0]),
        st.sampled_from([1, 2, 100]),
    ),
    st.builds(
        Leader,
        st.sampled_from(["elect", "elect", "resign", "get"]),
        st.sampled_from(["l1", "l2"]),
        st.sampled_from([-1.0, 0.0, 5.0, 60.0]),
    ),
    st.builds(
        Periodic,
        st.sampled_from(["get", "save", "save"]),
        st.sampled_from(["p1", "p2"]),
        st.sampled_from([-5.0, 0.0, 60.0]),
        st.one_of(st.none(), st.sampled_from([0.0, 30.0, 3600.0])),
        st.sampled_from(["every=60", "cron=* * * * *", None]),
        st.sampled_from(["current", "current", "none", "wrong"]),
    ),
    st.builds(Tx, st.lists(_tx_ops, min_size=1, max_size=4).map(tuple), st.booleans()),
)

plans = st.tuples(
    st.builds(UseLimits, st.tuples(diff_limits(), diff_limits())),
    first_insert,
    st.lists(operations, min_size=12, max_size=50),
).map(lambda p: [p[0], p[1], *p[2]])


# ------------------------------------------------------------------------------- tests


@LONG
@PROFILE
@given(plan=plans)
def test_memory_driver_answers_as_postgres_does(plan: list[Any], database_url: str) -> None:
    # One database for every example, emptied before each (TRUNCATE ... RESTART IDENTITY):
    # a copy of the template per example costs up to half a second on a busy server.
    note(f"{len(plan)} steps")
    features = run_plan(plan, database_url)
    event(f"a plan of {len(plan) // 10 * 10}+ steps")
    for feature in sorted(features):  # see --hypothesis-show-statistics
        event(feature)


def test_a_worked_plan(database_url: str) -> None:
    """One hand-written plan through every kind of step, so a broken harness shows here
    rather than as a generated failure."""
    plan: list[Any] = [
        Insert((NewJob(key=0), NewJob(queue="q2", priority=2, tags=("x",)), NewJob(key=0))),
        Insert((NewJob(due=5.0, state="scheduled"), NewJob(state="pending")), path="fast"),
        Insert((NewJob(kind="b", metadata_json='{"m": 1}'),), notify=("q1",)),
        Fetch("q1", 2),
        Outcomes((Out(0, "completed"), Out(1, "retryable", due=1.0, error='{"e": 1}'))),
        Manage("cancel", 5),
        Fetch("q2", 1, "c2"),
        Manage("cancel", 1),
        CancelRequested((0, 1, 2)),
        Outcomes((Out(0, "retryable"),), rows=False),
        Tick(10.0),
        Schedule(0.0, 100),
        QueueOp("pause", "q1"),
        Fetch("q1", 3),
        QueueOp("resume", "*"),
        Claim(3),
        Tick(120.0),
        Rescue(60.0, decisions=(Decision("discarded"),)),
        Manage("retry", 3),
        Outcomes((Out(0, "completed"),), rows=False),
        List(states=("completed", "available"), descending=True, limit=2),
        List(kinds=("a",), tags=("x",), within_newest=3),
        Count("live"),
        Count("finalized"),
        Count("since", ago=1000.0),
        DeleteFinalized("completed", -1.0, 1),
        Leader("elect"),
        Leader("elect", "l2"),
        Leader("resign"),
        Leader("get"),
        Periodic("save", expected="none"),
        Periodic("save", next_in=120.0, last_ago=0.0),
        Periodic("get"),
        Tx((Insert((NewJob(key=1),)), Manage("delete", 0)), commit=False),
        Tx((Insert((NewJob(key=1),)), QueueOp("pause", "q2"))),
        QueueOp("list"),
        QueueOp("delete_stale", "q1", 0.0),
        List(),
    ]
    run_plan(plan, database_url)
