"""Hostile workers: plans, the harness that runs them, and the invariants checked
(issue 13). ``test_hostile_workers.py`` drives it with hypothesis; this module knows nothing
about hypothesis except the strategies at the end.

A :class:`Plan` is data: job specs and a timeline of client starts, stops and inserts.
A job is *good* (it returns some value, maybe an odd one, after a short sleep), *hostile*
(every run raises a :class:`Boom` after a short sleep: text PostgreSQL cannot store, a
message of megabytes, a ``__str__`` that raises, a ``BaseException``, a hand-made
``trio.Cancelled``, a snooze made impossible after construction, groups of these, now and
then a ``KeyboardInterrupt`` or ``SystemExit``) or has *bad args* (its stored args are
replaced by JSON of the wrong shape before any client sees it). Durations are in units:
one second of trio's virtual clock on the memory driver (``MockClock(autojump_threshold=0)``),
``scale`` seconds of real time on PostgreSQL.

After the timeline, clients are started again and again (a job raising
``KeyboardInterrupt`` stops each client that runs it) until every job is final. The
invariants (checked after every client life, and at the end) are listed in
:meth:`Harness.check_row` and :meth:`Harness.check`.
"""

from __future__ import annotations

import gc
import math
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq
from trioqueue._failure import MAX_ERROR_MESSAGE, MAX_ERROR_TRACE

# --------------------------------------------------------------------------------- plans

FATAL_KINDS = ("keyboard_interrupt", "system_exit")
STORED_LIMITS = {"error": MAX_ERROR_MESSAGE + 100, "trace": MAX_ERROR_TRACE + 100}
"""The most characters an error entry's message and trace may hold, escaped as stored: the
runtime's caps, and room for the marker saying how much was cut."""


@attrs.frozen
class OddCode:
    """In a plan: a ``SystemExit`` code that is a `HostileObject`."""


@attrs.frozen
class Boom:
    """An exception a job raises, built afresh for every run (see `build`).

    ``value``: ``ValueError(text * repeat)``; ``chain``: a ValueError at the end of
    ``repeat`` ``__cause__`` links of a kilobyte each; ``str_raises`` / ``str_repr_raise``:
    an exception whose ``__str__`` (and ``__repr__``) raise ``raiser``; ``generator_exit``,
    ``base`` (a bare ``BaseException``), ``cancelled`` (``trio.Cancelled._create()``),
    ``stop_iteration`` (Python turns it into a RuntimeError as it leaves the coroutine);
    ``snooze``: ``JobSnooze(1)`` whose ``seconds`` is then set to ``seconds``;
    ``keyboard_interrupt``, ``system_exit`` (with ``code``: an `OddCode` stands for an
    object whose ``repr()`` raises, as ``sys.exit(obj)`` may pass); ``group``: a
    ``BaseExceptionGroup(text, children)``."""

    kind: str
    text: str = ""
    repeat: int = 1
    raiser: str = "RuntimeError"
    seconds: float | int | str | None = None
    code: int | str | OddCode | None = None
    children: tuple[Boom, ...] = ()


@attrs.frozen
class JobSpec:
    """One job: ``boom`` None and ``stored_args`` None is a good job; ``stored_args``
    (JSON text) makes a bad-args job, whose worker never runs."""

    sleep: float = 0.0
    """Units each run sleeps before it returns or raises."""
    boom: Boom | None = None
    returns: str = "none"
    """What a good job returns (see `odd_value`)."""
    stored_args: str | None = None
    max_attempts: int = 2

    @property
    def category(self) -> str:
        if self.stored_args is not None:
            return "bad args"
        if self.boom is not None:
            return "hostile"
        return "good" if self.returns in STORABLE_RETURNS else "bad output"


@attrs.frozen
class Step:
    """Wait ``wait`` units, then ``do`` to client slot ``client``: ``start``,
    ``soft_stop`` (``client.stop()``), ``hard_stop`` (``client.stop(cancel=True)``),
    ``outside_cancel`` (cancel the scope around ``open_client``); or ``insert`` the job
    specs ``jobs`` again. ``busy``: a stop first waits (a little) for a job to run on
    that client, so it often hits work in progress."""

    wait: float
    do: str
    client: int = 0
    busy: bool = False
    jobs: tuple[int, ...] = ()


@attrs.frozen
class Plan:
    jobs: tuple[JobSpec, ...]
    clients: tuple[int, ...] = (2,)
    """Worker slots of each client slot; every slot starts at time 0."""
    steps: tuple[Step, ...] = ()


# ------------------------------------------------------------------ what jobs do


@attrs.frozen
class HostileArgs:
    kind: ClassVar[str] = "hostile"
    spec: int


class StrRaises(Exception):
    """``str()`` raises what it was built with."""

    def __init__(self, text: str, raiser: type[BaseException]) -> None:
        super().__init__(text)
        self.raiser = raiser

    def __str__(self) -> str:
        raise self.raiser("no str for you")


class StrAndReprRaise(StrRaises):
    def __repr__(self) -> str:
        raise self.raiser("no repr either")


class HostileObject:
    """A return value that refuses everything."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    __str__ = __repr__

    def __bool__(self) -> bool:
        raise RuntimeError("no bool")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no attribute {name}")


RAISERS: dict[str, type[BaseException]] = {
    "RuntimeError": RuntimeError,
    "KeyboardInterrupt": KeyboardInterrupt,
    "SystemExit": SystemExit,
    "GeneratorExit": GeneratorExit,
}


def build(boom: Boom) -> BaseException:
    """A fresh exception as ``boom`` describes."""
    kind, text = boom.kind, boom.text
    if kind == "value":
        return ValueError(text * boom.repeat)
    if kind == "chain":
        error: BaseException | None = None
        for i in range(boom.repeat):
            try:
                raise ValueError(f"{text} link {i} " + "y" * 1000) from error
            except ValueError as exc:
                error = exc
        assert error is not None
        return error
    if kind in ("str_raises", "str_repr_raise"):
        cls = StrRaises if kind == "str_raises" else StrAndReprRaise
        return cls(text, RAISERS[boom.raiser])
    if kind == "generator_exit":
        return GeneratorExit(text)
    if kind == "base":
        return BaseException(text)
    if kind == "cancelled":
        return trio.Cancelled._create()
    if kind == "stop_iteration":
        return StopIteration(text)
    if kind == "snooze":
        snooze = tq.JobSnooze(1)
        snooze.seconds = boom.seconds  # type: ignore[assignment]
        return snooze
    if kind == "keyboard_interrupt":
        return KeyboardInterrupt()
    if kind == "system_exit":
        return SystemExit(HostileObject() if isinstance(boom.code, OddCode) else boom.code)
    if kind == "group":
        return BaseExceptionGroup(text, [build(child) for child in boom.children])
    raise ValueError(f"unknown boom {kind!r}")


def leaves(boom: Boom) -> Iterator[Boom]:
    if boom.kind == "group":
        for child in boom.children:
            yield from leaves(child)
    else:
        yield boom


def fatal_leaves(boom: Boom | None) -> list[Boom]:
    """The KeyboardInterrupts and SystemExits ``boom`` holds, at any depth."""
    return [b for b in leaves(boom) if b.kind in FATAL_KINDS] if boom is not None else []


def recorded_name(boom: Boom) -> str:
    """The class name a run raising ``boom`` must have recorded."""
    if boom.kind == "snooze":
        return "InvalidSnoozeError"
    if boom.kind == "stop_iteration":
        return "RuntimeError"
    return type(build(boom)).__name__


def storable(text: str) -> str:
    """``text`` escaped as the contract says an error is stored: NUL as ``\\x00``, a lone
    surrogate as its backslash escape."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def expected_message(boom: Boom) -> str | None:
    """The exact message recorded for ``boom``, when it is short enough to be kept whole
    and simple enough to predict."""
    if boom.kind not in ("value", "base", "generator_exit"):
        return None
    text = boom.text * boom.repeat
    name = recorded_name(boom)
    whole = f"{name}: {text}" if text else name
    # The cap holds for the stored (escaped) text: kept whole only if that fits.
    stored = storable(whole)
    return stored if len(stored) <= MAX_ERROR_MESSAGE else None


async def _never_awaited() -> None:
    await trio.lowlevel.checkpoint()


RETURNS = tuple("none int huge_str object hostile_object coroutine exception cancelled nan".split())
STORABLE_RETURNS = frozenset({"none", "int", "huge_str", "cancelled"})
"""What a job may return and complete: its output is stored (trio's Cancelled is an attrs
class: returned, not raised, it is stored as an object of its fields). Any other return
value fails the attempt (an OutputError recorded), as if the worker had raised."""


# --------------------------------------------------------------------------- records


@attrs.define
class Run:
    """One run of a job's worker."""

    job_id: int
    attempt: int
    life: str
    boom: Boom | None
    result: str = "running"
    """returned, raised, or cancelled (trio's Cancelled left the worker)."""
    ambiguous: bool = False
    """It raised a boom holding a ``Cancelled`` while trio really was cancelling it: the
    runtime rightly takes that for an interrupt (no error, attempt given back)."""


@attrs.define
class Life:
    """One run of a client slot, from ``open_client`` to the end of its block."""

    name: str
    slot: int
    client: tq.Client | None = None
    scope: trio.CancelScope | None = None
    ready: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    stopping: bool = False
    died: BaseException | None = None
    """What ``open_client`` raised, if anything."""

    @property
    def alive(self) -> bool:
        return self.client is not None and not self.stopping and not self.done.is_set()


class Abort(Exception):
    """Going on is pointless (a stop that never returned)."""


# --------------------------------------------------------------------------- the harness


def _now() -> str:
    try:
        return f"[t={trio.current_time():.3f}] "
    except RuntimeError:  # the checks after the run
        return ""


class Harness:
    """Runs one plan; ``violations`` lists every broken invariant.

    ``driver``: a shared ``MemoryDriver`` (every client and the admin use it); else
    ``url``, a PostgreSQL database each client connects to."""

    def __init__(
        self,
        plan: Plan,
        *,
        driver: Any = None,
        url: str | None = None,
        scale: float = 1.0,
        bound: float = 60.0,
        finish_within: float = 10_000.0,
    ) -> None:
        self.plan = plan
        self.driver = driver
        self.url = url
        self.scale = scale
        self.bound = bound
        """Seconds (of this clock) any stop may take: generous, it catches hangs."""
        self.finish_within = finish_within
        self.violations: list[str] = []
        self.log: list[str] = []
        self.features: Counter[str] = Counter()
        self.spec_of: dict[int, int] = {}
        self.runs: list[Run] = []
        self.lives: list[Life] = []
        self.slots: list[list[Life]] = [[] for _ in plan.clients]
        self.coroutines: list[Any] = []
        self.final_jobs: list[tq.Job[Any]] = []
        self.admin: tq.Client | None = None
        self._lives: trio.Nursery | None = None
        self._run_started = trio.Event()
        self._everything = trio.CancelScope()
        """Cancelled when going on is pointless (a job that runs forever)."""
        self.workers = tq.Workers()
        # The worker returns odd values on purpose: the API's type says it returns None.
        self.workers.add(HostileArgs, self._work)  # type: ignore[arg-type]

    # -------------------------------------------------------------- recording

    def violation(self, text: str) -> None:
        self.violations.append(f"{_now()}{text}")

    def note(self, text: str) -> None:
        self.log.append(f"{_now()}{text}")

    def report(self) -> str:
        return "\n".join(["violations:", *self.violations, "", "log:", *self.log[-150:]])

    # -------------------------------------------------------------- the worker

    async def _work(self, job: tq.Job[HostileArgs]) -> object:
        spec = self.plan.jobs[job.args.spec]
        run = Run(job.id, job.attempt, job.attempted_by[-1], spec.boom)
        self.runs.append(run)
        raised = sum(
            1 for r in self.runs if r.job_id == job.id and r.result == "raised" and not r.ambiguous
        )
        if spec.boom is not None and raised >= spec.max_attempts:
            # Each raise must have used up an attempt: this run should never have come.
            self.violation(
                f"hostile job {job.id} runs again after raising {raised} times, its "
                f"max_attempts: a failed attempt was not counted (a poison job)"
            )
            self._everything.cancel()
        if len(self.runs) > 50 * len(self.spec_of):
            self.violation(f"{len(self.runs)} runs of {len(self.spec_of)} jobs: runaway")
            self._everything.cancel()
        self._run_started.set()
        self._run_started = trio.Event()
        try:
            await trio.sleep(spec.sleep * self.scale)
        except trio.Cancelled:
            run.result = "cancelled"
            raise
        if spec.boom is None:
            run.result = "returned"
            return self._odd_value(spec.returns)
        error = build(spec.boom)
        run.result = "raised"
        holds_cancelled = isinstance(error, trio.Cancelled) or (
            isinstance(error, BaseExceptionGroup) and error.subgroup(trio.Cancelled) is not None
        )
        run.ambiguous = holds_cancelled and trio.current_effective_deadline() == -math.inf
        raise error

    def _odd_value(self, kind: str) -> object:
        if kind == "int":
            return 10**100
        if kind == "huge_str":
            return "z" * 1_000_000
        if kind == "object":
            return object()
        if kind == "hostile_object":
            return HostileObject()
        if kind == "coroutine":
            coroutine = _never_awaited()
            self.coroutines.append(coroutine)  # closed after the run: no warning
            return coroutine
        if kind == "exception":
            return ValueError("returned, not raised")
        if kind == "cancelled":
            return trio.Cancelled._create()
        if kind == "nan":
            return math.nan
        return None

    # -------------------------------------------------------------- client lives

    def client_config(self, name: str) -> dict[str, Any]:
        s = self.scale
        return {
            "id": name,
            "job_timeout": 600.0 * s,
            "retry_policy": lambda job: 0.0,
            "fetch_cooldown": 0.01,
            "fetch_poll_interval": max(0.5 * s, 0.1),
            "scheduler_interval": max(0.5 * s, 0.1),
            "leader_interval": max(1.0 * s, 0.5),
            "shutdown_timeout": 5.0,
        }

    async def _life(self, life: Life) -> None:
        workers = self.plan.clients[life.slot]
        try:
            with trio.CancelScope() as life.scope:
                async with tq.open_client(
                    self.url,
                    driver=self.driver,
                    workers=self.workers,
                    queues={"default": tq.QueueConfig(max_workers=workers)},
                    **self.client_config(life.name),
                ) as client:
                    life.client = client
                    life.ready.set()
                    await life.release.wait()
        except trio.Cancelled:
            raise  # the whole run is being cancelled: not the client's doing
        except BaseException as exc:
            life.died = exc
            self.note(f"{life.name} ended with {exc!r}")
            self.features[f"client ended with {type(exc).__name__}"] += 1
        finally:
            life.ready.set()
        await self.check_rows(f"after {life.name} ended", life)
        life.done.set()

    async def start(self, slot: int) -> Life:
        lives = self.slots[slot]
        if lives and not lives[-1].done.is_set():
            return lives[-1]
        life = Life(f"c{slot}-{len(lives) + 1}", slot)
        lives.append(life)
        self.lives.append(life)
        self.note(f"starting {life.name}")
        assert self._lives is not None
        self._lives.start_soon(self._life, life)
        await self._within(life.ready.wait, f"{life.name} did not start")
        return life

    async def _within(self, wait: Any, failure: str) -> None:
        try:
            with trio.fail_after(self.bound):
                await wait()
        except trio.TooSlowError:
            self.violation(f"{failure} within {self.bound} s")
            raise Abort from None

    def _running_on(self, life: Life) -> int:
        return sum(1 for r in self.runs if r.life == life.name and r.result == "running")

    async def _stop(self, life: Life, how: str) -> None:
        assert life.client is not None
        client = life.client
        life.stopping = True
        if self._running_on(life):
            self.features[f"{how} stop with jobs running"] += 1
        self.note(f"{how} stop of {life.name}")
        await self._within(
            lambda: client.stop(cancel=how == "hard"), f"{how} stop of {life.name} did not return"
        )
        await self.check_rows(f"after the {how} stop of {life.name} returned", life)
        life.release.set()
        await self._within(life.done.wait, f"{life.name}'s block did not end after its stop")

    async def _outside_cancel(self, life: Life) -> None:
        assert life.scope is not None
        life.stopping = True
        if self._running_on(life):
            self.features["outside cancel with jobs running"] += 1
        self.note(f"outside cancel of {life.name}")
        life.scope.cancel()
        await self._within(life.done.wait, f"outside cancel of {life.name} did not end")

    async def _until_busy(self, life: Life) -> None:
        with trio.move_on_after(3.0 * self.scale):
            while not self._running_on(life) and life.alive:
                await self._run_started.wait()

    async def _step(self, step: Step, stops: trio.Nursery) -> None:
        if step.do == "insert":
            await self.insert(step.jobs)
            return
        if step.do == "start":
            await self.start(step.client)
            return
        lives = self.slots[step.client]
        life = lives[-1] if lives else None
        if life is None or not life.alive:
            return
        if step.busy:
            await self._until_busy(life)
            if not life.alive:
                return
        if step.do == "outside_cancel":
            stops.start_soon(self._outside_cancel, life)
        else:
            stops.start_soon(self._stop, life, step.do.removesuffix("_stop"))

    # -------------------------------------------------------------- running a plan

    def _item(self, index: int) -> tuple[HostileArgs, tq.InsertOpts]:
        return HostileArgs(index), tq.InsertOpts(max_attempts=self.plan.jobs[index].max_attempts)

    async def insert(self, indexes: tuple[int, ...]) -> None:
        """Insert the specs ``indexes``; a bad-args spec through the driver, its stored
        args replaced."""
        admin = self.admin
        assert admin is not None
        plain = [i for i in indexes if self.plan.jobs[i].stored_args is None]
        if plain:
            results = await admin.insert_many([self._item(i) for i in plain])
            for index, result in zip(plain, results, strict=True):
                self.spec_of[result.job.id] = index
        for index in indexes:
            stored = self.plan.jobs[index].stored_args
            if stored is None:
                continue
            now = admin.driver.clock()
            params = admin._inserts.params(self._item(index), now)._replace(args_json=stored)
            [(row, _)] = await admin.driver.job_insert_many([params], ["default"], now)
            self.spec_of[row[0]] = index

    async def run(self) -> None:
        """Insert every job, play the timeline, then restart clients until every job is
        final; read the final rows."""
        try:
            with self._everything:
                await self._run()
        except* Abort:
            pass
        finally:
            for coroutine in self.coroutines:
                coroutine.close()

    async def _run(self) -> None:
        async with tq.open_client(self.url, driver=self.driver) as admin:
            self.admin = admin
            await self.insert(tuple(range(len(self.plan.jobs))))
            async with trio.open_nursery() as lives:
                self._lives = lives
                async with trio.open_nursery() as stops:
                    for slot in range(len(self.plan.clients)):
                        await self.start(slot)
                    for step in self.plan.steps:
                        await trio.sleep(step.wait * self.scale)
                        await self._step(step, stops)
                await self._finish()
            self.final_jobs = await self._jobs()

    async def _stop_all(self) -> None:
        async with trio.open_nursery() as stops:
            for life in self.lives:
                if life.alive:
                    stops.start_soon(self._stop, life, "soft")

    async def _finish(self) -> None:
        """Stop what runs, softly; then run one client at a time until every job is
        final (a client a job's KeyboardInterrupt stopped is started again)."""
        await self._stop_all()
        with trio.move_on_after(self.finish_within) as waited:
            while not await self._all_final():
                life = await self.start(0)
                while life.alive:
                    if await self._all_final():
                        break
                    await trio.sleep(0.2 * self.scale)
                await self._stop_all()
                await life.done.wait()
        if waited.cancelled_caught:
            left = [(j.id, j.state.value) for j in await self._jobs() if j.state not in FINAL]
            self.violation(f"jobs not final after {self.finish_within} s of restarts: {left}")

    async def _jobs(self) -> list[tq.Job[Any]]:
        assert self.admin is not None
        return (await self.admin.job_list(tq.JobListParams(limit=10_000))).jobs

    async def _all_final(self) -> bool:
        return all(j.state in FINAL for j in await self._jobs())

    # -------------------------------------------------------------- the invariants

    def _raised(self) -> tuple[Counter[int], Counter[int]]:
        """Per job: runs that raised for sure, and runs whose raise was also a real cancel."""
        sure: Counter[int] = Counter()
        maybe: Counter[int] = Counter()
        for r in self.runs:
            if r.result == "raised":
                (maybe if r.ambiguous else sure)[r.job_id] += 1
        return sure, maybe

    async def check_rows(self, when: str, life: Life | None = None) -> None:
        """Read every row and check each (see `check_row`); nothing ``life`` fetched may
        still be running."""
        before, _ = self._raised()
        jobs = await self._jobs()
        after, maybe = self._raised()
        for job in jobs:
            if job.id not in self.spec_of:
                # Inserted by a step whose insert call has not returned yet (so its id is
                # not recorded): checked next time.
                continue
            if job.state is tq.JobState.RUNNING:
                if life is not None and job.attempted_by[-1] == life.name:
                    self.violation(f"{when}: job {job.id} is still running, fetched by it")
                continue
            self.check_row(job, when, before[job.id], after[job.id] + maybe[job.id])

    def check_row(self, job: tq.Job[Any], when: str, least: int, most: int) -> None:
        """The invariants of one row that is not running: its errors are storable and
        capped, one per attempt in order; its attempt counts exactly its errors (plus one
        once completed: an interrupt gives its attempt back, nothing else does); a good
        job has no error; a hostile job has an error for every run that raised
        (``least``..``most``: see `Run.ambiguous`) — else an outcome was lost and the job
        is poison — each naming what it raised; a bad-args job's errors say why."""
        v = self.violation
        spec = self.plan.jobs[self.spec_of[job.id]]
        tag = f"{when}: {spec.category} job {job.id} ({job.state.value}, attempt {job.attempt})"
        errors = job.errors
        for i, e in enumerate(errors):
            for name, text in (("error", e.error), ("trace", e.trace)):
                if "\x00" in text or storable(text) != text:
                    v(f"{tag}: error {i + 1}'s {name} cannot be stored: {text[:200]!r}")
                if len(text) > STORED_LIMITS[name]:
                    v(f"{tag}: error {i + 1}'s {name} is {len(text)} characters long")
            if e.attempt != i + 1:
                v(f"{tag}: error {i + 1} is recorded for attempt {e.attempt}")
        done = job.state is tq.JobState.COMPLETED
        if job.attempt != len(errors) + done:
            v(f"{tag}: attempt {job.attempt}, but {len(errors)} errors recorded")
        exhausted = len(errors) >= spec.max_attempts
        if spec.category == "good":
            if errors or job.state not in (tq.JobState.AVAILABLE, tq.JobState.COMPLETED):
                v(f"{tag}: a good job with errors {[e.error for e in errors]}")
            return
        expected = tq.JobState.DISCARDED if exhausted else tq.JobState.AVAILABLE
        if job.state is not expected:
            v(f"{tag}: {len(errors)} of {spec.max_attempts} attempts failed, so {expected.value}")
        if spec.category == "bad args":
            for e in errors:
                if not e.error.startswith(("ArgsDecodeError: the stored args are", "TypeError:")):
                    v(f"{tag}: stored args {spec.stored_args} failed with {e.error[:200]!r}")
            return
        if spec.category == "bad output":
            for e in errors:
                if not e.error.startswith("OutputError: the return value cannot be stored"):
                    v(f"{tag}: returning {spec.returns} failed with {e.error[:200]!r}")
            return
        assert spec.boom is not None
        if not least <= len(errors) <= most:
            v(f"{tag}: {len(errors)} errors recorded, but its worker raised {least}..{most} times")
        name, message = recorded_name(spec.boom), expected_message(spec.boom)
        for e in errors:
            if message is not None and e.error != message:
                v(f"{tag}: recorded {e.error[:200]!r}, expected {message[:200]!r}")
            elif e.error != name and not e.error.startswith(f"{name}: "):
                v(f"{tag}: recorded {e.error[:200]!r} for a {name}")

    def check(self) -> None:
        """After :meth:`run`: every row (as above), every good job completed, every other
        job discarded after its last attempt; and a client ended with an exception only
        when a job it ran raised KeyboardInterrupt or SystemExit, and then exactly that,
        bare (a SystemExit with its code) — and always when one did."""
        self.summarize()
        if self.violations:
            return  # the run aborted: later checks would only repeat it
        sure, maybe = self._raised()
        for job in self.final_jobs:
            self.check_row(job, "at the end", sure[job.id], sure[job.id] + maybe[job.id])
            spec = self.plan.jobs[self.spec_of[job.id]]
            final = tq.JobState.COMPLETED if spec.category == "good" else tq.JobState.DISCARDED
            if job.state is not final:
                self.violation(f"{spec.category} job {job.id} ended {job.state.value}")
        for life in self.lives:
            self._check_life(life)

    def _check_life(self, life: Life) -> None:
        fatal = [
            leaf
            for r in self.runs
            if r.life == life.name and r.result == "raised"
            for leaf in fatal_leaves(r.boom)
        ]
        surely = any(
            fatal_leaves(r.boom) and not r.ambiguous
            for r in self.runs
            if r.life == life.name and r.result == "raised"
        )
        exc = life.died
        if exc is None:
            if surely:
                self.violation(f"{life.name}: a job raised {fatal}, yet the client went on")
            return
        if type(exc) is KeyboardInterrupt:
            ok = any(leaf.kind == "keyboard_interrupt" for leaf in fatal)
        elif type(exc) is SystemExit:
            ok = any(leaf.kind == "system_exit" and _same_code(leaf, exc) for leaf in fatal)
        else:
            ok = False
        if not ok:
            trace = "".join(traceback.format_exception(exc))[-3000:]
            self.violation(
                f"{life.name} ended with {exc!r}, but its jobs raised only {fatal}:\n{trace}"
            )

    def summarize(self) -> None:
        f = self.features
        for r in self.runs:
            what = r.boom.kind if r.boom is not None else "good"
            f[f"run {what} -> {r.result}"] += 1
            if r.result == "raised" and r.boom is not None:
                for leaf in leaves(r.boom):
                    f[f"raised a {leaf.kind}"] += 1
            if r.ambiguous:
                f["raised a Cancelled while really cancelled"] += 1
        f["client lives"] += len(self.lives)
        for job in self.final_jobs:
            spec = self.plan.jobs[self.spec_of[job.id]]
            f[f"final: {spec.category} job {job.state.value}"] += 1
            if spec.category == "good":
                f[f"returned {spec.returns}"] += 1
            elif spec.stored_args is not None and job.errors:
                f[f"stored args {spec.stored_args}: {job.errors[0].error.split(':')[0]}"] += 1


def _same_code(leaf: Boom, exc: SystemExit) -> bool:
    if isinstance(leaf.code, OddCode) or isinstance(exc.code, HostileObject):
        return isinstance(leaf.code, OddCode) and isinstance(exc.code, HostileObject)
    return bool(leaf.code == exc.code)


FINAL = frozenset({tq.JobState.COMPLETED, tq.JobState.CANCELLED, tq.JobState.DISCARDED})


# ---------------------------------------------------------------------- running helpers


def _run_trio(harness: Harness, main: Any, **kwargs: Any) -> None:
    """``trio.run(main)``; trio itself failing (a ``TrioInternalError``, or its run loop
    torn down by a stray GeneratorExit) is a violation: something a job raised reached
    trio's core."""
    try:
        trio.run(main, **kwargs)
    except Exception as exc:
        trace = "".join(traceback.format_exception(exc))[-4000:]
        harness.violation(f"trio.run itself failed: {exc!r}\n{trace}")
    else:
        return
    # The tasks of the crashed run were abandoned: finalize them now, not whenever the
    # collector next runs (in pytest's report, their finalizers broke ast.parse).
    gc.collect()


def run_on_memory(plan: Plan, *, max_steps: int = 50_000) -> Harness:
    """Run ``plan`` on a fresh memory driver under a MockClock; return the checked harness."""
    from simulation_plan import Watchdog
    from trio.testing import MockClock

    harness = Harness(plan, driver=tq.MemoryDriver(), scale=1.0, bound=600.0)

    async def main() -> None:
        with trio.move_on_after(1_000_000) as everything:
            watchdog = Watchdog(harness, everything, max_steps)  # type: ignore[arg-type]
            trio.lowlevel.add_instrument(watchdog)
            await harness.run()
        if everything.cancelled_caught and not watchdog.fired:
            harness.violation("the run hung")

    _run_trio(harness, main, clock=MockClock(autojump_threshold=0))
    harness.check()
    return harness


def run_on_postgres(plan: Plan, url: str, *, scale: float) -> Harness:
    """Run ``plan`` on the PostgreSQL database at ``url`` in real time, every duration
    multiplied by ``scale``."""
    harness = Harness(plan, url=url, scale=scale, bound=60.0, finish_within=60.0)

    async def main() -> None:
        with trio.move_on_after(180) as everything:
            await harness.run()
        if everything.cancelled_caught:
            harness.violation("the run hung")

    _run_trio(harness, main)
    harness.check()
    return harness


def assert_holds(harness: Harness) -> None:
    if harness.violations:
        raise AssertionError(harness.report())


# -------------------------------------------------------------------------- strategies

TRICKY = ("\x00", "\ud800", "\udc80", "\udfff", "\\", '"', "\n", "\u2028", "\ufeff", "é", "😀")
BAD_ARGS = ("[1, 2]", "[]", "1", '"text"', "null", "true", '{"spec": 0, "unexpected": 1}')
SNOOZE_VALUES: tuple[float | int | str | None, ...] = (
    *(math.nan, math.inf, -math.inf, -1.0, 1e300, 10**30),
    *(True, "5", None),
)


LEAF_KINDS = (
    *("value", "chain", "str_raises", "str_repr_raise", "generator_exit", "base"),
    *("cancelled", "stop_iteration", "snooze"),
)


def plans(*, postgres: bool = False) -> Any:
    """A hypothesis strategy of plans (smaller on PostgreSQL, where every second is real).

    Every choice shrinks towards the plain case: a job towards a good one, an exception
    towards a lone ``ValueError``, a group towards a leaf, a fatal one towards none."""
    from hypothesis import strategies as st

    chars = st.one_of(st.sampled_from(TRICKY), st.characters(exclude_categories=()))
    texts = st.text(chars, max_size=12)

    @st.composite
    def leaf(draw: Any) -> Boom:
        kind = draw(st.sampled_from(LEAF_KINDS))
        if kind == "snooze":
            return Boom(kind, seconds=draw(st.sampled_from(SNOOZE_VALUES)))
        repeat = 1
        if kind == "value":
            repeat = draw(st.sampled_from([1, 1, 1, 700, 100_000]))
        elif kind == "chain":
            repeat = draw(st.sampled_from([2, 30]))
        raiser = "RuntimeError"
        if kind in ("str_raises", "str_repr_raise"):
            raiser = draw(st.sampled_from(sorted(RAISERS)))
        return Boom(kind, draw(texts), repeat, raiser)

    @st.composite
    def harmless(draw: Any, depth: int = 0) -> Boom:
        if depth < 2 and draw(st.integers(0, 3)) == 3:  # a group one time in four
            children = draw(st.lists(harmless(depth + 1), min_size=1, max_size=3))
            return Boom("group", draw(texts), children=tuple(children))
        single: Boom = draw(leaf())
        return single

    @st.composite
    def fatal(draw: Any, depth: int = 0) -> Boom:
        if depth < 2 and draw(st.integers(0, 2)) == 2:  # inside a group one time in three
            others = draw(st.lists(harmless(depth + 1), max_size=2))
            children = draw(st.permutations([draw(fatal(depth + 1)), *others]))
            return Boom("group", draw(texts), children=tuple(children))
        if draw(st.booleans()):
            code = draw(st.one_of(st.none(), st.integers(-3, 300), texts, st.just(OddCode())))
            return Boom("system_exit", code=code)
        return Boom("keyboard_interrupt")

    @st.composite
    def job(draw: Any) -> JobSpec:
        category = draw(st.integers(0, 3))  # good, hostile (twice as often), bad args
        attempts = draw(st.integers(2, 3))
        if category == 3:
            return JobSpec(stored_args=draw(st.sampled_from(BAD_ARGS)), max_attempts=attempts)
        sleep = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0, 3.0]))
        if category == 0:
            return JobSpec(sleep, returns=draw(st.sampled_from(RETURNS)), max_attempts=attempts)
        boom = draw(fatal() if draw(st.integers(0, 11)) == 11 else harmless())
        return JobSpec(sleep, boom, max_attempts=attempts)

    @st.composite
    def plan(draw: Any) -> Plan:
        jobs = tuple(draw(st.lists(job(), min_size=1, max_size=6 if postgres else 8)))
        clients = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
        slot = st.integers(0, len(clients) - 1)
        waits = st.sampled_from([0.0, 0.05, 0.5, 2.0])
        step = st.one_of(
            st.builds(
                Step,
                waits,
                st.sampled_from(["start", "soft_stop", "hard_stop", "outside_cancel"]),
                slot,
                st.booleans(),
            ),
            st.builds(
                Step,
                waits,
                st.just("insert"),
                jobs=st.lists(st.integers(0, len(jobs) - 1), min_size=1, max_size=3).map(tuple),
            ),
        )
        steps = tuple(draw(st.lists(step, max_size=6 if postgres else 10)))
        return Plan(jobs, clients, steps)

    return plan()
