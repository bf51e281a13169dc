"""Start-up against generated faults (issue 14), on both drivers.

Hypothesis generates plans: one to three queues, a ``startup_timeout``, and up to four
fault rules on the operations start-up runs (the schema check, registering each queue,
the notifier's LISTEN): an error before or after the operation ran, on every call or only
the Nth, once, a few times or for ever, transient (a lost connection) or not (a failed
login). The plan is played through `FaultyDriver` over the memory driver (under
``MockClock(autojump_threshold=0)``, so the backoff costs no real time) and over
PostgreSQL (real time, a database per example).

The calls start-up makes are deterministic (the schema check until it passes, then each
queue in order), so the test replays the rules on them and predicts what must happen.
Invariants:

1. **Only a DatabaseError, bare**: start-up either succeeds or raises one DatabaseError,
   never an exception group or another type.
2. **Not transient: at once**: when the first fault a step cannot get past is not
   transient, start-up fails with exactly that error, having called each operation as
   often as predicted (the failing one is never tried again) and logged one WARNING per
   transient failure before it.
3. **Transient for ever: gives up on time**: when a step's faults never end, start-up
   fails with a transient DatabaseError naming the step, "gave up after" and the
   ``startup_timeout``, no sooner than the timeout and not long after it.
4. **Transient and few: starts**: when every fault a step meets is transient and their
   longest possible backoff fits in the timeout, the client starts, having called each
   operation exactly as predicted and logged one WARNING per failure, with every queue
   registered once; then a job on each queue completes. A failing LISTEN never stops a
   start.
5. **In between**: when the backoff may or may not fit, either outcome is allowed, but
   each as above.

Profiles: 150 memory examples and 10 PostgreSQL ones by default; ``TRIOQUEUE_SOAK=1``
runs 3,000 and 150.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import ClassVar, Literal, cast

import attrs
import trio
import trio.testing
from conftest import fresh_database
from hypothesis import given, settings
from hypothesis import strategies as st
from support import GENERATED, GENERATED_POSTGRES, LONG, SOAK, eventually

import trioqueue as tq
from trioqueue._runtime.startup import FIRST_DELAY, MAX_DELAY
from trioqueue.driver.faults import Fault, FaultyDriver
from trioqueue.driver.postgres.driver import open_postgres_driver
from trioqueue.driver.protocol import Driver

settings.register_profile("trioqueue-startup-memory", max_examples=150, **GENERATED)
settings.register_profile("trioqueue-startup-memory-soak", max_examples=3_000, **GENERATED)
settings.register_profile("trioqueue-startup-postgres", max_examples=10, **GENERATED_POSTGRES)
settings.register_profile("trioqueue-startup-postgres-soak", max_examples=150, **GENERATED_POSTGRES)
MEMORY = settings.get_profile(
    "trioqueue-startup-memory-soak" if SOAK else "trioqueue-startup-memory"
)
POSTGRES = settings.get_profile(
    "trioqueue-startup-postgres-soak" if SOAK else "trioqueue-startup-postgres"
)

STEP_OPS = ("schema_version", "queue_upsert")
"""The operations start-up retries; ``open_listener`` is the notifier's, retried apart."""
ENDLESS = 50
"""A step failing this many times in the replay is taken to fail for ever."""
SLACK = {"memory": 0.05, "postgres": 2.0}
"""Seconds start-up may take beyond its backoff: none under the MockClock; the
statements' own time on PostgreSQL (a loaded CI machine included)."""


@attrs.frozen
class Ping:
    kind: ClassVar[str] = "ping"


@attrs.frozen
class Rule:
    op: str
    kind: Literal["error", "error_after"]
    call: int | None
    times: int | None
    transient: bool

    def fault(self) -> Fault:
        kind = "error" if self.op == "open_listener" else self.kind
        return Fault(self.op, kind, call=self.call, times=self.times, transient=self.transient)


@attrs.frozen
class Plan:
    queues: tuple[str, ...]
    rules: tuple[Rule, ...]
    startup_timeout: float


@attrs.frozen
class Prediction:
    outcome: Literal["starts", "fails", "gives up", "either"]
    calls: Counter[str]
    """Each step operation's calls up to the outcome (for "starts" and "fails")."""
    failures: int
    """Transient failures retried before the outcome."""
    failed: Rule | None = None
    """For "fails": the rule whose error is raised."""


def _sleep_bounds(failures_per_step: list[int]) -> tuple[float, float]:
    """The least and the most the backoff after these failures can sleep (jitter scales
    each wait by 0.5 to 1; try numbers start again at 1 for each step)."""
    most = sum(
        min(FIRST_DELAY * 2.0 ** (k - 1), MAX_DELAY)
        for failures in failures_per_step
        for k in range(1, failures + 1)
    )
    return most / 2, most


def predict(plan: Plan, slack: float) -> Prediction:
    """Replay the rules on the calls start-up makes, as FaultyDriver applies them: the
    first rule that matches the operation and its call number applies and counts."""
    applied = [0] * len(plan.rules)
    calls: Counter[str] = Counter()
    per_step: list[int] = []
    for op in ["schema_version", *["queue_upsert"] * len(plan.queues)]:
        failures = 0
        while True:
            calls[op] += 1
            hit = next(
                (
                    i
                    for i, rule in enumerate(plan.rules)
                    if rule.op == op
                    and (rule.call is None or rule.call == calls[op])
                    and (rule.times is None or applied[i] < rule.times)
                ),
                None,
            )
            if hit is None:
                break
            applied[hit] += 1
            rule = plan.rules[hit]
            if not rule.transient:
                least, _ = _sleep_bounds([*per_step, failures])
                if least >= plan.startup_timeout:
                    return Prediction("either", calls, sum(per_step) + failures)
                _, most = _sleep_bounds([*per_step, failures])
                outcome: Literal["fails", "either"] = (
                    "fails" if most + slack < plan.startup_timeout else "either"
                )
                return Prediction(outcome, calls, sum(per_step) + failures, rule)
            failures += 1
            if failures >= ENDLESS:
                return Prediction("gives up", calls, 0)
        per_step.append(failures)
    _, most = _sleep_bounds(per_step)
    outcome2: Literal["starts", "either"] = (
        "starts" if most + slack < plan.startup_timeout else "either"
    )
    return Prediction(outcome2, calls, sum(per_step))


def rules() -> st.SearchStrategy[Rule]:
    return st.builds(
        Rule,
        op=st.sampled_from(["schema_version", "queue_upsert", "queue_upsert", "open_listener"]),
        kind=st.sampled_from(["error", "error_after"]),
        call=st.none() | st.integers(1, 4),
        times=st.integers(1, 3) | st.none(),
        transient=st.sampled_from([True, True, True, False]),
    )


def plans(timeouts: list[float]) -> st.SearchStrategy[Plan]:
    return st.builds(
        Plan,
        queues=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True).map(
            tuple
        ),
        rules=st.lists(rules(), max_size=4).map(tuple),
        startup_timeout=st.sampled_from(timeouts),
    )


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _play(
    plan: Plan, storage: str, open_inner: Callable[[], AbstractAsyncContextManager[Driver]]
) -> None:
    prediction = predict(plan, SLACK[storage])
    where = f"{plan} -> {prediction.outcome}"
    handler = _Warnings()
    startup_log = logging.getLogger("trioqueue.startup")
    startup_log.addHandler(handler)
    workers = tq.Workers()
    done: list[int] = []

    async def ping(job: tq.Job[Ping]) -> None:
        done.append(job.id)

    workers.add(Ping, ping)
    try:
        async with open_inner() as inner:
            driver = FaultyDriver(inner, [rule.fault() for rule in plan.rules])
            began = trio.current_time()
            started_calls: Counter[str] | None = None
            error: BaseException | None = None
            try:
                async with tq.open_client(
                    driver=cast(Driver, driver),
                    workers=workers,
                    queues={name: tq.QueueConfig() for name in plan.queues},
                    startup_timeout=plan.startup_timeout,
                    fetch_poll_interval=0.1,
                    fetch_cooldown=0.01,
                ) as client:
                    started_calls = Counter({op: driver.calls[op] for op in STEP_OPS})
                    retried = list(handler.lines)
                    # 4: the client works a job on each of its queues.
                    ids = [
                        (await client.insert(Ping(), tq.InsertOpts(queue=name))).job.id
                        for name in plan.queues
                    ]
                    await eventually(lambda: set(ids) <= set(done), 30)
                    registered = {q.name for q in await client.queue_list()}
                    assert set(plan.queues) <= registered, where
            except BaseException as exc:  # checked below
                error = exc
            took = trio.current_time() - began
    finally:
        startup_log.removeHandler(handler)

    if started_calls is not None:
        assert error is None, f"{where}: failed after starting: {error!r}"
        assert prediction.outcome in ("starts", "either"), f"{where}: started"
        if prediction.outcome == "starts":
            assert started_calls == prediction.calls, f"{where}: {started_calls}"
            assert len(retried) == prediction.failures, f"{where}: {retried}"
        return
    # 1: a bare DatabaseError.
    assert isinstance(error, tq.DatabaseError), f"{where}: {error!r}"
    assert prediction.outcome != "starts", f"{where}: did not start: {error!r}"
    calls = Counter({op: driver.calls[op] for op in STEP_OPS})
    if not error.transient:
        # 2: the first error that is not transient, at once.
        assert prediction.failed is not None and prediction.outcome in ("fails", "either"), (
            f"{where}: {error!r}"
        )
        op, kind = prediction.failed.op, prediction.failed.kind
        assert str(error) == f"while running {op}: injected {kind} fault in {op}", where
        assert calls == prediction.calls, f"{where}: {calls}"
        assert len(handler.lines) == prediction.failures, f"{where}: {handler.lines}"
        return
    # 3: gave up once the timeout had passed.
    assert prediction.outcome in ("gives up", "either"), f"{where}: {error!r}"
    message = str(error)
    assert " (gave up after " in message, where
    assert f"startup_timeout is {plan.startup_timeout:g} s)" in message, where
    assert message.startswith(("while checking the schema version", "while registering queue")), (
        where
    )
    assert took >= plan.startup_timeout, f"{where}: gave up after {took} s"
    assert took <= plan.startup_timeout + SLACK[storage] + 0.5, f"{where}: took {took} s"


@asynccontextmanager
async def _memory() -> AsyncIterator[Driver]:
    yield tq.MemoryDriver()
    await trio.lowlevel.checkpoint()


@LONG
@MEMORY
@given(plan=plans([0.5, 3.0, 30.0]))
def test_startup_plans_on_memory(plan: Plan) -> None:
    trio.run(_play, plan, "memory", _memory, clock=trio.testing.MockClock(autojump_threshold=0))


@LONG
@POSTGRES
@given(plan=plans([0.5, 3.0]))
def test_startup_plans_on_postgres(plan: Plan, pg_server_url: str, template_database: str) -> None:
    with fresh_database(pg_server_url, template_database, "tq_startup") as url:
        trio.run(_play, plan, "postgres", lambda: open_postgres_driver(url))


def test_the_replay_predicts_the_simple_cases() -> None:
    """The oracle itself, on plans whose answer is known by hand."""
    once = Rule("queue_upsert", "error", None, 2, True)
    plan = Plan(("a", "b"), (once,), 30.0)
    assert predict(plan, 0.0) == Prediction("starts", Counter(schema_version=1, queue_upsert=4), 2)
    login = Rule("schema_version", "error", 2, 1, False)
    plan = Plan(("a",), (Rule("schema_version", "error", 1, 1, True), login), 30.0)
    assert predict(plan, 0.0) == Prediction("fails", Counter(schema_version=2), 1, login)
    forever = Rule("queue_upsert", "error_after", None, None, True)
    assert predict(Plan(("a",), (forever,), 0.5), 0.0).outcome == "gives up"
    listen = Rule("open_listener", "error", None, None, False)
    assert predict(Plan(("a",), (listen,), 0.5), 0.0).outcome == "starts"
    many = Rule("schema_version", "error", None, 3, True)  # sleeps up to 0.7 s
    assert predict(Plan(("a",), (many,), 0.5), 0.0).outcome == "either"
