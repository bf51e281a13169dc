"""Workflows under chaos (issue 17): plans, the harness that runs them, and the invariants.
``test_workflow_plans.py`` drives it with hypothesis; this module knows nothing about
hypothesis except the strategy at the end.

A :class:`Plan` is data: one workflow of 1-50 tasks (deps name earlier tasks only; some
tasks ignore failed deps; each run of a task completes, raises, raises JobCancel or
snoozes, as scripted), one or two client slots, and a timeline of interventions: cancel,
retry or delete a task (picked among those in a state where that makes sense), soft or
hard stops and restarts, pausing and resuming the queue. Durations are units: one second
of trio's virtual clock on the memory driver (``MockClock(autojump_threshold=0)``),
``scale`` seconds of real time on PostgreSQL. After the timeline a client works until
every task is final.

Every worker run records, at its start, the workflow as the database shows it
(``workflow_get``, one statement: a consistent snapshot); each intervention records the
workflow before and after it. Checked (assert by recording, after the run):

1. **Deps before a start.** At each start, every dep is ``completed`` (with
   ``ignore_failed_deps``: final or deleted), retried by hand or not (a retried task with
   deps waits for them again). Exempt: a start the plan made legitimately early — a dep
   retried, deleted or brought back (by a retry) after the task was promoted
   (``loosened``), or while the start's fetch and view were under way — counted, never
   accused.
2. **Every snapshot is settled** (the workflow is advanced in the statement that decides
   it): no task pending with all its deps completed, nor (not ignoring) with a dep failed
   or deleted, nor (ignoring) with every dep final; a task cancelled with
   ``workflow_cancelled_by`` names one of its deps that is failed or deleted (so a dep that
   is retried brings back what its failure cancelled); no row missing that the plan did
   not delete.
3. **Nothing stuck or lost.** After the timeline every task ends final; every task that
   never ran ended ``cancelled``, by the plan or by a failed dep (its metadata says
   which); deleting a dep cancels its waiting dependents; a task its own run or the plan
   cancelled never runs again without a retry of its own.
4. **No job runs twice at once**, and each run (fetch) starts once.
5. **Outputs.** Each completed task's ``output`` is what its last run returned.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq
from trioqueue.driver.protocol import JobRow

FINAL = frozenset({"completed", "cancelled", "discarded"})
FAILED = frozenset({"cancelled", "discarded", "deleted"})
PROMOTED = frozenset({"available", "scheduled", "retryable", "running"})
OUTCOMES = ("complete", "raise", "cancel", "snooze")
SNOOZE = 0.5
"""Units a scripted snooze lasts."""

# --------------------------------------------------------------------------------- plans


@attrs.frozen
class TaskSpec:
    """One task: run ``n`` (1-based, one per fetch) does ``outcomes[n - 1]``, later runs
    complete; every run first sleeps ``sleep`` units."""

    deps: tuple[int, ...] = ()
    ignore_failed_deps: bool = False
    outcomes: tuple[str, ...] = ()
    max_attempts: int = 3
    sleep: float = 0.0
    delay: float | None = None
    """Scheduled this many units after the insert."""
    priority: int = 1


@attrs.frozen
class Step:
    """Wait ``wait`` units, then ``do``: ``cancel``, ``retry``, ``delete`` of a task that
    can be (not final; final, or pending for odd indexes; not running); ``index // 2``
    picks it among them all (odd ``index``) or (even) among those with a dependent that
    waits or that their failure cancelled, if any (and, for a retry, that no failed dep
    cancelled: retrying those cancels them again); hand-written plans may name the
    ``task`` instead. Or ``start``, ``soft_stop``, ``hard_stop`` of slot ``index``
    modulo the slots; or ``pause``, ``resume`` the queue; or ``held_retry``: pause the
    queue, retry, wait a unit, resume (the retried task is held back while the other deps
    of its dependents finish: when a dependent must wait for it again)."""

    wait: float
    do: str
    index: int = 0
    task: int | None = None


@attrs.frozen
class Plan:
    tasks: tuple[TaskSpec, ...]
    clients: tuple[int, ...] = (2,)
    """Each slot's max_workers."""
    steps: tuple[Step, ...] = ()
    poll_only: bool = False


@attrs.frozen
class WfArgs:
    kind: ClassVar[str] = "wf_task"
    task: int


class Boom(Exception):
    """A scripted failure."""


# ------------------------------------------------------------------------- records


@attrs.frozen
class Row:
    """One task as a snapshot shows it (``state`` ``deleted``: no row)."""

    id: int
    state: str
    deps: tuple[int, ...] = ()
    cause: int | None = None
    """``metadata["workflow_cancelled_by"]``."""
    output: Any = None
    runs: int = 0
    """``len(attempted_by)``."""


Snapshot = dict[int, Row]


@attrs.define
class Start:
    """One run as its worker saw it (its times come from `Harness.tick`)."""

    task: int
    job_id: int
    run: int
    attempt: int
    max_attempts: int
    life: str
    fetched: int
    """When the fetch that claimed the run was sent (0: unknown)."""
    began: int
    viewed: int | None = None
    view: Snapshot | None = None
    result: str = "running"
    """``returned``, ``raised``, ``cancel`` (JobCancel), ``snooze``, ``cancelled``."""
    output: Any = None
    ended: int | None = None

    @property
    def finalizing(self) -> bool:
        """Whether the run's outcome surely makes the job final."""
        return self.result in ("returned", "cancel") or (
            self.result == "raised" and self.attempt >= self.max_attempts
        )


@attrs.frozen
class Act:
    """An intervention on a task by the plan: the state read before it, and the state
    the call returned (None: it raised)."""

    do: str
    task: int
    begun: int
    ended: int
    before: str
    after: str | None
    cause: bool = False


@attrs.define
class Life:
    name: str
    slot: int
    client: tq.Client | None = None
    ready: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    stopping: bool = False

    @property
    def alive(self) -> bool:
        return self.client is not None and not self.stopping and not self.done.is_set()


class Abort(Exception):
    """Going on is pointless (a stop that never returned, a runaway)."""


class Recorder:
    """The driver as is, but every fetch tells the harness when it was sent."""

    def __init__(self, inner: Any, harness: Harness) -> None:
        self.inner = inner
        self.harness = harness

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def clock(self) -> Any:
        return self.inner.clock()

    def transaction(self) -> Any:
        return self.inner.transaction()

    def open_listener(self, channels: Any) -> Any:
        return self.inner.open_listener(channels)

    async def job_get_available(self, *args: Any, **kwargs: Any) -> list[JobRow]:
        sent = self.harness.tick()
        rows: list[JobRow] = await self.inner.job_get_available(*args, **kwargs)
        for row in rows:
            self.harness.fetched[(row.id, len(row.attempted_by or ()))] = sent
        return rows


# --------------------------------------------------------------------------- the harness


def _now() -> str:
    try:
        return f"[t={trio.current_time():.3f}] "
    except RuntimeError:
        return ""


class Harness:
    """Runs one plan against one store; ``violations`` lists every broken invariant.

    ``store()`` opens the driver a client uses (the shared memory driver, or a pool of
    its own on PostgreSQL)."""

    def __init__(
        self,
        plan: Plan,
        store: Callable[[], AbstractAsyncContextManager[Any]],
        *,
        scale: float,
        bound: float,
        finish_within: float,
    ) -> None:
        self.plan = plan
        self.store = store
        self.scale = scale
        self.bound = bound
        self.finish_within = finish_within
        self.violations: list[str] = []
        self.log: list[str] = []
        self.features: Counter[str] = Counter()
        self.ids: dict[int, int] = {}
        """Task index -> job id."""
        self.task_of: dict[int, int] = {}
        self.workflow_id = ""
        self.starts: list[Start] = []
        self.active: dict[int, Start] = {}
        self.fetched: dict[tuple[int, int], int] = {}
        """When the fetch of each run (job id, len(attempted_by)) was sent."""
        self._ticks = 0
        self.acts: list[Act] = []
        self.deleting: set[int] = set()
        """Tasks the plan deletes or deleted (from just before the call)."""
        self.loosened: dict[int, list[tuple[int, int, str]]] = {}
        """Per task, spans in which the plan made an early start legitimate."""
        self.dep_cancelled: dict[int, int] = {}
        """When each task was first seen cancelled by a failed dep."""
        self.final_snapshot: Snapshot = {}
        self.admin: tq.Client | None = None
        self.slots: list[list[Life]] = [[] for _ in plan.clients]
        self._lives: trio.Nursery | None = None
        self._everything = trio.CancelScope()
        """Cancelled when going on is pointless (a runaway)."""
        self.workers = tq.Workers()
        self.workers.add(WfArgs, self._work)

    def tick(self) -> int:
        """The time of an event the harness observes: a counter, so that events at one
        instant of a MockClock still have an order (that of this one process)."""
        self._ticks += 1
        return self._ticks

    def violation(self, text: str) -> None:
        self.violations.append(f"{_now()}{text}")

    def note(self, text: str) -> None:
        self.log.append(f"{_now()}{text}")

    def report(self) -> str:
        return "\n".join(["violations:", *self.violations, "", "log:", *self.log[-120:]])

    # -------------------------------------------------------------- the worker

    async def _work(self, job: tq.Job[WfArgs]) -> dict[str, Any]:
        task = job.args.task
        spec = self.plan.tasks[task]
        run = len(job.attempted_by)
        now = self.tick()
        start = Start(
            task,
            job.id,
            run,
            job.attempt,
            job.max_attempts,
            job.attempted_by[-1],
            self.fetched.get((job.id, run), 0),
            now,
        )
        if job.id in self.active:
            self.violation(
                f"t{task} (job {job.id}) run {run} began while run "
                f"{self.active[job.id].run} still ran"
            )
        if any(s.job_id == job.id and s.run == run for s in self.starts):
            self.violation(f"t{task} run {run} started twice")
        if not start.fetched:
            self.violation(f"harness: t{task} run {run} came from a fetch the Recorder missed")
        expected = tuple(self.ids[d] for d in spec.deps)
        if (job.workflow_id, job.workflow_task, job.workflow_deps) != (
            self.workflow_id,
            f"t{task}",
            expected,
        ):
            self.violation(
                f"t{task} runs as {job.workflow_id}/{job.workflow_task} "
                f"deps {job.workflow_deps}, not deps {expected}"
            )
        self.starts.append(start)
        self.active[job.id] = start
        if len(self.starts) == 30 * len(self.plan.tasks) + 100:
            self.violation(f"{len(self.starts)} runs of {len(self.plan.tasks)} tasks: runaway")
            self._everything.cancel()
        try:
            found = await tq.current_client().workflow_get(self.workflow_id)
            start.viewed = self.tick()
            start.view = self.snapshot_of(found, f"t{task} run {run}'s view")
            await trio.sleep(spec.sleep * self.scale)
        except trio.Cancelled:
            start.result = "cancelled"
            raise
        finally:
            start.ended = self.tick()
            if self.active.get(job.id) is start:
                del self.active[job.id]
        outcome = spec.outcomes[run - 1] if run <= len(spec.outcomes) else "complete"
        if outcome == "raise":
            start.result = "raised"
            raise Boom(f"t{task} run {run}")
        if outcome == "cancel":
            start.result = "cancel"
            raise tq.JobCancel(f"t{task} run {run}")
        if outcome == "snooze":
            start.result = "snooze"
            raise tq.JobSnooze(SNOOZE * self.scale)
        output: dict[str, Any] = {"task": f"t{task}", "attempt": job.attempt, "run": run}
        start.result = "returned"
        start.output = output
        return output

    # -------------------------------------------------------------- snapshots

    def snapshot_of(self, found: dict[str, tq.Job[Any]], where: str) -> Snapshot:
        """``workflow_get``'s answer as a Snapshot (every task; missing: ``deleted``),
        checked (invariant 2)."""
        snap: Snapshot = {}
        for index in range(len(self.plan.tasks)):
            job = found.get(f"t{index}")
            if job is None:
                snap[index] = Row(self.ids[index], "deleted")
                if index not in self.deleting:
                    self.violation(f"{where}: t{index} is gone, and the plan never deleted it")
                continue
            cause = job.metadata.get("workflow_cancelled_by")
            if cause is not None and job.state is tq.JobState.CANCELLED:
                self.dep_cancelled.setdefault(index, self.tick())
            snap[index] = Row(
                job.id,
                job.state.value,
                tuple(job.workflow_deps),
                None if cause is None else int(cause),
                job.output,
                len(job.attempted_by),
            )
        self.check_snapshot(snap, where)
        return snap

    def check_snapshot(self, snap: Snapshot, where: str) -> None:
        for index, row in snap.items():
            spec = self.plan.tasks[index]
            deps = [snap[d].state for d in spec.deps]
            shown = {f"t{d}": snap[d].state for d in spec.deps}
            name = f"{where}: t{index} ({row.state}, deps {shown})"
            if row.state == "pending":
                if not spec.deps:
                    self.violation(f"{name} is pending without deps")
                elif spec.ignore_failed_deps:
                    if all(s in FINAL or s == "deleted" for s in deps):
                        self.violation(f"{name} waits though every dep is final")
                elif all(s == "completed" for s in deps):
                    self.violation(f"{name} waits though every dep completed")
                elif any(s in FAILED for s in deps):
                    self.violation(f"{name} waits though a dep failed: not cancelled")
            if row.cause is not None and row.state == "cancelled":
                by = self.task_of.get(row.cause)
                if by is None or by not in spec.deps:
                    self.violation(f"{name} was cancelled by job {row.cause}, not a dep of it")
                elif spec.ignore_failed_deps:
                    self.violation(f"{name} was cancelled by t{by}, but ignores failed deps")
                elif snap[by].state not in FAILED:
                    self.violation(f"{name} stays cancelled by t{by}, which is {snap[by].state}")

    async def snapshot(self, where: str) -> Snapshot:
        assert self.admin is not None
        return self.snapshot_of(await self.admin.workflow_get(self.workflow_id), where)

    # -------------------------------------------------------------- client lives

    def client_config(self, name: str) -> dict[str, Any]:
        s = self.scale
        retention: dict[str, Any] = {
            f"{state}_job_retention": None for state in ("completed", "cancelled", "discarded")
        }
        return {
            "id": name,
            "job_timeout": None,
            "retry_policy": lambda job: 0.0,
            "fetch_cooldown": 0.01,
            "fetch_poll_interval": max(0.5 * s, 0.1),
            "scheduler_interval": max(0.5 * s, 0.1),
            "leader_interval": max(1.0 * s, 0.5),
            "shutdown_timeout": 5.0,
            "poll_only": self.plan.poll_only,
            **retention,
        }

    async def _life(self, life: Life) -> None:
        try:
            async with (
                self.store() as base,
                tq.open_client(
                    driver=Recorder(base, self),
                    workers=self.workers,
                    queues={"default": tq.QueueConfig(max_workers=self.plan.clients[life.slot])},
                    **self.client_config(life.name),
                ) as client,
            ):
                life.client = client
                life.ready.set()
                await life.release.wait()
        except Exception as exc:
            self.violation(f"{life.name} ended with {exc!r}")
        finally:
            life.ready.set()
            life.done.set()

    async def start(self, slot: int) -> None:
        lives = self.slots[slot]
        if lives and not lives[-1].done.is_set():
            return
        life = Life(f"c{slot}-{len(lives) + 1}", slot)
        lives.append(life)
        self.note(f"starting {life.name}")
        assert self._lives is not None
        self._lives.start_soon(self._life, life)
        await self._within(life.ready.wait, f"{life.name} did not start")

    async def _within(self, wait: Callable[[], Any], failure: str) -> None:
        with trio.move_on_after(self.bound) as waited:
            await wait()
        if waited.cancelled_caught:
            self.violation(f"{failure} within {self.bound} s")
            raise Abort

    async def stop(self, life: Life, how: str) -> None:
        client = life.client
        assert client is not None
        life.stopping = True
        busy = sum(1 for s in self.active.values() if s.life == life.name)
        self.features[f"{how} stop" + (" with jobs running" if busy else "")] += 1
        self.note(f"{how} stop of {life.name}")
        await self._within(lambda: client.stop(cancel=how == "hard"), f"{how} stop of {life.name}")
        life.release.set()
        await self._within(life.done.wait, f"{life.name}'s block did not end after its stop")

    # -------------------------------------------------------------- the plan

    def _options(self, spec: TaskSpec, now: Any) -> tq.InsertOpts:
        scheduled = None
        if spec.delay is not None:
            scheduled = now + timedelta(seconds=spec.delay * self.scale)
        return tq.InsertOpts(
            max_attempts=spec.max_attempts, priority=spec.priority, scheduled_at=scheduled
        )

    async def insert(self) -> None:
        assert self.admin is not None
        wf = tq.Workflow("generated")
        now = self.admin.driver.clock()
        for index, spec in enumerate(self.plan.tasks):
            wf.add(
                f"t{index}",
                WfArgs(index),
                deps=[f"t{d}" for d in spec.deps],
                opts=self._options(spec, now),
                ignore_failed_deps=spec.ignore_failed_deps,
            )
        jobs = await self.admin.insert_workflow(wf)
        for index in range(len(self.plan.tasks)):
            job = jobs[f"t{index}"]
            self.ids[index] = job.id
            self.task_of[job.id] = index
            self.workflow_id = job.workflow_id or ""

    async def step(self, number: int, step: Step) -> None:
        if step.do == "held_retry":
            assert self.admin is not None
            await self.admin.queue_pause("default")
            await self.manage(number, attrs.evolve(step, do="retry"))
            await trio.sleep(1.0 * self.scale)
            await self.admin.queue_resume("default")
            return
        if step.do in ("cancel", "retry", "delete"):
            await self.manage(number, step)
            return
        if step.do in ("pause", "resume"):
            assert self.admin is not None
            self.note(f"step {number}: {step.do}")
            await (self.admin.queue_pause if step.do == "pause" else self.admin.queue_resume)(
                "default"
            )
            return
        slot = step.index % len(self.slots)
        lives = self.slots[slot]
        if step.do == "start":
            await self.start(slot)
        elif lives and lives[-1].alive:
            await self.stop(lives[-1], step.do.removesuffix("_stop"))

    async def manage(self, number: int, step: Step) -> None:
        assert self.admin is not None
        where = f"step {number} ({step.do})"
        before = await self.snapshot(f"before {where}")
        fits: Callable[[str], bool] = {
            "cancel": lambda s: s not in FINAL and s != "deleted",
            # (A waiting task too, for odd indexes: retried, it must wait for its deps again.)
            "retry": lambda s: s in FINAL or (s == "pending" and step.index % 2 == 1),
            "delete": lambda s: s not in ("running", "deleted"),
        }[step.do]
        candidates = [i for i, row in before.items() if fits(row.state)]
        if step.task is not None:
            candidates = [step.task] if step.task in candidates else []
        elif step.index % 2 == 0:  # a task whose change the rules must carry to a dependent
            candidates = [
                i
                for i in candidates
                if self._telling(i, before) and not (step.do == "retry" and before[i].cause)
            ] or candidates
        if not candidates:
            self.note(f"{where}: no task to pick")
            self.features[f"{step.do}: no task to pick"] += 1
            return
        task = candidates[step.index // 2 % len(candidates)]
        job_id = self.ids[task]
        state = before[task].state
        self.note(f"{where}: t{task} ({state})")
        begun = self.tick()
        job: tq.Job[Any] | None = None
        try:
            if step.do == "cancel":
                job = await self.admin.job_cancel(job_id)
            elif step.do == "retry":
                job = await self.admin.job_retry(job_id)
            else:
                self.deleting.add(task)
                job = await self.admin.job_delete(job_id)
        except (tq.JobNotFoundError, tq.JobRunningError) as exc:
            self.note(f"{where}: {exc!r}")
            if step.do == "delete":
                self.deleting.discard(task)
        ended = self.tick()
        after = None if job is None else job.state.value
        cause = job is not None and "workflow_cancelled_by" in job.metadata
        self.acts.append(Act(step.do, task, begun, ended, state, after, cause))
        self.features[f"{step.do} of a {state} task -> {after}"] += 1
        post = await self.snapshot(f"after {where}")
        done = self.tick()
        if step.do == "retry":
            for dependent, spec in enumerate(self.plan.tasks):
                if task in spec.deps and before[dependent].state == post[dependent].state:
                    if state == "completed" and post[dependent].state == "pending":
                        self.features["a waiting dependent waits again for a retried dep"] += 1
        if step.do == "delete" and job is not None:
            self._check_delete(task, job.state.value, before, post, where)
        if job is None or step.do == "cancel":
            return
        # A task promoted already is not sent back to wait when a dep is retried, or
        # deleted, or brought back (transitively) by a retry: it may start early.
        for dependent, spec in enumerate(self.plan.tasks):
            if post[dependent].state not in PROMOTED:
                continue
            for dep in spec.deps:
                if dep == task or (before[dep].state in FINAL and post[dep].state not in FINAL):
                    why = "retried" if dep == task else "brought back"
                    why = "deleted" if step.do == "delete" else why
                    self.loosened.setdefault(dependent, []).append(
                        (begun, done, f"a dep {why} after its promotion")
                    )
                    break

    def _telling(self, task: int, snap: Snapshot) -> bool:
        """Whether ``task`` has a dependent that its failure cancelled, or that waits (for
        a completed task: on another dep that runs, the moment to make it wait again)."""
        job_id = self.ids[task]
        for i, spec in enumerate(self.plan.tasks):
            if task not in spec.deps:
                continue
            if snap[i].state == "cancelled" and snap[i].cause == job_id:
                return True
            if snap[i].state == "pending" and (
                snap[task].state != "completed"
                or any(snap[d].state == "running" for d in spec.deps if d != task)
            ):
                return True
        return False

    def _check_delete(
        self, task: int, was: str, before: Snapshot, after: Snapshot, where: str
    ) -> None:
        """Deleting a dep cancels its waiting dependents that do not ignore failed deps
        (unless the others completed meanwhile, which may have promoted them just before)."""
        for dependent, spec in enumerate(self.plan.tasks):
            if task not in spec.deps or before[dependent].state != "pending":
                continue
            now = after[dependent].state
            if spec.ignore_failed_deps:
                if now == "cancelled":
                    self.violation(
                        f"{where}: deleting t{task} cancelled t{dependent}, "
                        "which ignores failed deps"
                    )
                continue
            others = all(after[d].state == "completed" for d in spec.deps if d != task)
            if now in PROMOTED or now in ("completed", "discarded"):
                if not (was == "completed" and others):
                    self.violation(
                        f"{where}: deleting t{task} ({was}) promoted t{dependent} "
                        f"({now}) instead of cancelling it"
                    )
                else:
                    self.features["a dependent promoted just before its dep's delete"] += 1
            elif now == "cancelled":
                self.features["deleting a dep cancelled a waiting dependent"] += 1

    # -------------------------------------------------------------- running a plan

    async def run(self) -> None:
        try:
            with self._everything:
                await self._run()
        except* Abort:
            pass

    async def _run(self) -> None:
        async with self.store() as base, tq.open_client(driver=base) as admin:
            self.admin = admin
            await self.insert()
            await self.snapshot("after the insert")
            async with trio.open_nursery() as lives:
                self._lives = lives
                for slot in range(len(self.slots)):
                    await self.start(slot)
                for number, step in enumerate(self.plan.steps):
                    await trio.sleep(step.wait * self.scale)
                    await self.step(number, step)
                await self._finish()
            self.final_snapshot = await self.snapshot("at the end")

    def _lives_alive(self) -> Iterable[Life]:
        return [lives[-1] for lives in self.slots if lives and lives[-1].alive]

    async def _finish(self) -> None:
        """Let a client work until every task is final; then stop every client, softly."""
        assert self.admin is not None
        await self.admin.queue_resume("default")
        await self.start(0)
        pause = 0.5
        with trio.move_on_after(self.finish_within) as waited:
            while True:
                snap = await self.snapshot("while finishing")
                if all(row.state in FINAL or row.state == "deleted" for row in snap.values()):
                    break
                await trio.sleep(pause * self.scale)
                pause = min(pause * 1.5, 20.0)
        if waited.cancelled_caught:
            snap = await self.snapshot("after finishing")
            left = {f"t{i}": row.state for i, row in snap.items() if row.state not in FINAL}
            self.violation(f"tasks not final {self.finish_within} s after the plan: {left}")
        for life in self._lives_alive():
            await self.stop(life, "soft")

    # -------------------------------------------------------------- the invariants

    def check(self) -> None:
        """Append a violation for every broken invariant (after :meth:`run`)."""
        snap = self.final_snapshot
        if not snap:
            return
        self._summarize(snap)
        for start in self.starts:
            self._check_start(start)
        for index, row in snap.items():
            self._check_task(index, row)

    def _summarize(self, snap: Snapshot) -> None:
        f = self.features
        for row in snap.values():
            f[f"final {row.state}"] += 1
            if row.cause is not None and row.state == "cancelled":
                f["cancelled by a failed dep"] += 1
        for start in self.starts:
            f[f"run -> {start.result}"] += 1
        for index, at in self.dep_cancelled.items():
            if any(s.task == index and s.began > at for s in self.starts):
                f["a task a failed dep cancelled came back and ran"] += 1
        if len(self.plan.clients) > 1:
            f["two client slots"] += 1
        depth: dict[int, int] = {}
        for index, spec in enumerate(self.plan.tasks):
            depth[index] = 1 + max((depth[d] for d in spec.deps), default=0)
        deepest = max(depth.values())
        f["a chain of 10 tasks or more" if deepest >= 10 else f"{deepest} tasks deep"] += 1

    def _reset_before(self, task: int, moment: int) -> int:
        """When, last before ``moment`` (0: never), task surely went back to waiting for
        its deps (retried: a task with deps waits again) or became final (a run or a plan
        cancel that made it so): an early start needs a reason given after that."""
        times = [s.ended for s in self.starts if s.task == task and s.finalizing and s.ended]
        times += [
            a.begun
            for a in self.acts
            if a.task == task
            and (self._cancelled_it(a) or (a.do == "retry" and a.after not in (None, "running")))
        ]
        return max((t for t in times if t < moment), default=0)

    @staticmethod
    def _cancelled_it(act: Act) -> bool:
        """Whether ``act`` is the plan's cancel that made the task final (a pending task
        may have been cancelled by a failed dep just before: then it says so)."""
        return (
            act.do == "cancel"
            and act.after == "cancelled"
            and act.before in ("available", "scheduled", "retryable", "pending")
            and not (act.before == "pending" and act.cause)
        )

    def _check_start(self, start: Start) -> None:
        """Invariant 1 for one start (see the module docstring)."""
        if start.view is None or start.viewed is None:
            return
        spec = self.plan.tasks[start.task]
        wrong = {}
        for dep in spec.deps:
            state = start.view[dep].state
            ok = (
                state in FINAL or state == "deleted"
                if spec.ignore_failed_deps
                else (state == "completed")
            )
            if not ok:
                wrong[dep] = state
        if not wrong:
            return
        since = self._reset_before(start.task, start.fetched)
        for begun, ended, why in self.loosened.get(start.task, []):
            if begun < start.viewed and ended > since:
                self.features[f"an early start explained: {why}"] += 1
                return
        racing = [
            a
            for a in self.acts
            if a.task in wrong
            and a.do in ("retry", "delete")
            and a.after is not None
            and a.begun < start.viewed
            and a.ended > start.fetched
        ]
        if racing and all(any(a.task == dep for a in racing) for dep in wrong):
            self.features["a dep retried or deleted while its dependent started"] += 1
            return
        deps = {f"t{d}": start.view[d].state for d in spec.deps}
        self.violation(
            f"t{start.task} run {start.run} started with deps {deps} "
            f"(ignore_failed_deps={spec.ignore_failed_deps})"
        )

    def _check_task(self, index: int, row: Row) -> None:
        """Invariants 3 to 5 for one task at the end."""
        name = f"t{index} ({row.state})"
        if row.state == "deleted":
            return
        if row.state not in FINAL:
            return  # reported by _finish
        runs = [s for s in self.starts if s.task == index]
        if not runs:
            cancelled = any(a.task == index and a.do == "cancel" and a.after for a in self.acts)
            if row.state != "cancelled":
                self.violation(f"{name} never ran")
            elif row.cause is None and not cancelled:
                self.violation(f"{name} was cancelled, by neither the plan nor a failed dep")
        if row.state == "completed":
            last = [s for s in runs if s.job_id == row.id and s.run == row.runs]
            if not last or last[0].result != "returned":
                self.violation(f"{name}: its run {row.runs} did not return, yet it completed")
            elif row.output != last[0].output:
                self.violation(
                    f"{name}: output {row.output!r}, its run returned {last[0].output!r}"
                )
        self._check_not_revived(index, runs)

    def _check_not_revived(self, index: int, runs: list[Start]) -> None:
        """A task cancelled by its own run (JobCancel) or by the plan runs again only
        after the plan retried it."""
        ends = [
            (s.ended, f"its run {s.run} raised JobCancel")
            for s in runs
            if s.result == "cancel" and s.ended is not None
        ]
        ends += [
            (a.ended, "the plan cancelled it")
            for a in self.acts
            if a.task == index and self._cancelled_it(a)
        ]
        retries = [a for a in self.acts if a.task == index and a.do == "retry"]
        for at, why in ends:
            later = [s for s in runs if s.began > at]
            if later and not any(r.ended > at and r.begun < later[0].began for r in retries):
                self.violation(
                    f"t{index} ran again (run {later[0].run}) after {why}, "
                    "though the plan never retried it"
                )


# ---------------------------------------------------------------------- running helpers


def run_on_memory(plan: Plan, *, max_steps: int = 50_000) -> Harness:
    """Run ``plan`` on a fresh memory driver under a MockClock; return the checked harness."""
    from simulation_plan import Watchdog
    from trio.testing import MockClock

    memory = tq.MemoryDriver()

    @asynccontextmanager
    async def shared() -> AsyncIterator[Any]:
        yield memory

    harness = Harness(plan, shared, scale=1.0, bound=600.0, finish_within=2_000.0)

    async def main() -> None:
        with trio.move_on_after(1_000_000) as everything:
            watchdog = Watchdog(harness, everything, max_steps)  # type: ignore[arg-type]
            trio.lowlevel.add_instrument(watchdog)
            await harness.run()
        if everything.cancelled_caught and not watchdog.fired:
            harness.violation("the run hung")

    trio.run(main, clock=MockClock(autojump_threshold=0))
    harness.check()
    return harness


def run_on_postgres(plan: Plan, url: str, *, scale: float) -> Harness:
    """Run ``plan`` on the PostgreSQL database at ``url`` in real time, every duration
    multiplied by ``scale``."""
    from trioqueue.driver.postgres.driver import open_postgres_driver

    def pool() -> AbstractAsyncContextManager[Any]:
        return open_postgres_driver(url, max_size=4)

    harness = Harness(plan, pool, scale=scale, bound=30.0, finish_within=30.0)

    async def main() -> None:
        with trio.move_on_after(150) as everything:
            await harness.run()
        if everything.cancelled_caught:
            harness.violation("the run hung")

    trio.run(main)
    harness.check()
    return harness


def assert_holds(harness: Harness) -> None:
    if harness.violations:
        raise AssertionError(harness.report())


# -------------------------------------------------------------------------- strategies


def plans(*, postgres: bool = False) -> Any:
    """A hypothesis strategy of plans (fewer steps on PostgreSQL, where time is real).
    Every choice shrinks towards the plain case: a chain of tasks that complete, no step."""
    from hypothesis import strategies as st

    @st.composite
    def task(draw: Any, index: int) -> TaskSpec:
        deps: tuple[int, ...] = ()
        if index and draw(st.sampled_from([False, True, True, True])):
            # Shrinks towards t(index-1): a chain.
            near = st.integers(0, index - 1).map(lambda k: index - 1 - k)
            deps = tuple(draw(st.lists(near, min_size=1, max_size=min(index, 3), unique=True)))
        scripted = draw(st.sampled_from([False, False, True]))
        outcomes: tuple[str, ...] = ()
        if scripted:
            outcomes = tuple(draw(st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=3)))
        return TaskSpec(
            deps=deps,
            ignore_failed_deps=bool(deps) and draw(st.sampled_from([False, False, False, True])),
            outcomes=outcomes,
            max_attempts=draw(st.integers(1, 3)),
            sleep=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0, 3.0])),
            delay=draw(st.sampled_from([None, None, None, None, 0.5, 2.0])),
            priority=draw(st.integers(1, 3)),
        )

    @st.composite
    def plan(draw: Any) -> Plan:
        n = draw(st.integers(1, 50))
        tasks = tuple(draw(task(i)) for i in range(n))
        clients = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        step = st.builds(
            Step,
            st.sampled_from([0.0, 0.05, 0.3, 1.0, 3.0]),
            st.sampled_from(
                [
                    *("retry", "retry", "held_retry", "cancel", "delete"),
                    *("soft_stop", "hard_stop", "start", "pause", "resume"),
                ]
            ),
            st.integers(0, 49),
        )
        steps = tuple(draw(st.lists(step, max_size=8 if postgres else 14)))
        poll_only = draw(st.sampled_from([False, False, False, True]))
        return Plan(tasks, clients, steps, poll_only)

    return plan()
