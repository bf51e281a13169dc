"""Periodic jobs on many clients, generated (issue 14): every client that has a periodic
job enqueues it, leader or not, so runs must be inserted once however the clients' passes
interleave, restart and race.

Hypothesis generates plans: one to three clients (enqueuers over one store, with a clock
the plan moves), all configured alike or one with another schedule for the same id (a
rolling deploy), with or without one client that cannot build the job (its ``args``
raises, as in a process whose workers lack the kind), and steps that move the clock
(seconds, or hours at once), let one client pass, let every client pass at once (their
transactions race), or restart a client (its ``run_on_start`` counts again). Invariants,
checked after every step:

1. **Once**: no run time of the job has two jobs, whatever raced.
2. **Up to date**: after a pass with no conflict and no failed build, the stored next run
   time is in the future.
3. **Fires** (clients alike): after a step in which the stored next run time had passed
   and a client that can build the job passed, the current slot has its job.
4. **Left for others**: a pass of only the client that cannot build, once it has a run to
   build, changes neither the stored state nor the jobs, so no run is lost to it.
5. **Missed runs counted** (clients alike, one pass): a catch-up job records how many run
   times passed without a job of their own.
6. **Both schedules fire** (clients that disagree, one pass with no conflict): the
   passing client's latest run time has its job if it is after the last run anyone
   inserted.
7. **``args`` only for claimed runs**: each client called ``args`` exactly once per run
   it reported or failed to build, and no run it claimed was already inserted; a client
   that lost the race for a run (``run_on_start`` ones included) never calls it.
8. **``run_on_start`` fires** (one pass, the client's first since it started): its latest
   run time has its job unless that run time, or a later one, already had its run.

Profiles: 200 memory examples and 20 PostgreSQL ones by default (about 20 s);
``TRIOQUEUE_SOAK=1`` runs 5,000 and 300.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import trio
from conftest import fresh_database
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support import GENERATED, GENERATED_POSTGRES, LONG, SOAK

import trioqueue as tq
from trioqueue._maintenance.periodic import PeriodicEnqueuer
from trioqueue.driver.protocol import PeriodicJobState
from trioqueue.periodic import PeriodicJobs

settings.register_profile("trioqueue-periodic-memory", max_examples=200, **GENERATED)
settings.register_profile("trioqueue-periodic-memory-soak", max_examples=5_000, **GENERATED)
settings.register_profile("trioqueue-periodic-postgres", max_examples=20, **GENERATED_POSTGRES)
settings.register_profile(
    "trioqueue-periodic-postgres-soak", max_examples=300, **GENERATED_POSTGRES
)
MEMORY = settings.get_profile(
    "trioqueue-periodic-memory-soak" if SOAK else "trioqueue-periodic-memory"
)
POSTGRES = settings.get_profile(
    "trioqueue-periodic-postgres-soak" if SOAK else "trioqueue-periodic-postgres"
)

JOB_ID = "generated"
START = datetime(2024, 5, 1, 10, 0, 7, tzinfo=UTC)


@attrs.frozen
class BeatArgs:
    kind: ClassVar[str] = "beat"


@attrs.frozen
class Step:
    action: str
    """``advance`` (the clock), ``pass`` (one client), ``together`` (every client at once),
    ``restart`` (one client)."""
    client: int = 0
    seconds: int = 0


@attrs.frozen
class Plan:
    clients: int
    alike: bool
    """False: client 0 has the job every 90 s, the others every 60 s."""
    run_on_start: tuple[bool, ...]
    """Per client (a rolling deploy may turn it on for some clients only)."""
    steps: tuple[Step, ...]
    failing: int | None = None
    """The client whose ``args`` raises, if any."""


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    clients = draw(st.integers(1, 3))
    step = st.one_of(
        st.builds(
            Step,
            st.just("advance"),
            st.just(0),
            st.one_of(st.integers(0, 200), st.sampled_from([3600, 7260, 86400])),
        ),
        st.builds(Step, st.just("pass"), st.integers(0, clients - 1)),
        st.builds(Step, st.just("together")),
        st.builds(Step, st.just("restart"), st.integers(0, clients - 1)),
    )
    return Plan(
        clients=clients,
        alike=clients == 1 or draw(st.booleans()),
        run_on_start=tuple(draw(st.lists(st.booleans(), min_size=clients, max_size=clients))),
        steps=tuple(draw(st.lists(step, min_size=1, max_size=25))),
        failing=draw(st.none() | st.integers(0, clients - 1)) if clients > 1 else None,
    )


class Run:
    """One plan against one store (the client's driver), with a clock the plan moves."""

    def __init__(self, plan: Plan, client: tq.Client) -> None:
        self.plan = plan
        self.client = client
        self.clock = [START]
        self.calls = [0] * plan.clients
        """``args`` calls, per client."""
        self.reported = [0] * plan.clients
        """Runs reported plus failed builds, per client (for invariant 7)."""
        self.jobs = [self._job(i) for i in range(plan.clients)]
        self.enqueuers = [self._enqueuer(i) for i in range(plan.clients)]

    def _job(self, index: int) -> tq.PeriodicJob:
        every = 90 if not self.plan.alike and index == 0 else 60

        def args() -> BeatArgs:
            self.calls[index] += 1
            if index == self.plan.failing:
                raise RuntimeError("this client cannot build the job")
            return BeatArgs()

        return tq.PeriodicJob(
            every=every, args=args, id=JOB_ID, run_on_start=self.plan.run_on_start[index]
        )

    def _enqueuer(self, index: int) -> PeriodicEnqueuer:
        return PeriodicEnqueuer(
            self.client.driver,
            lambda: self.clock[0],
            PeriodicJobs([self.jobs[index]]),
            self.client._inserts,
        )

    async def _stored(self) -> PeriodicJobState | None:
        return (await self.client.driver.periodic_job_get_many([JOB_ID])).get(JOB_ID)

    async def _runs(self) -> dict[str, list[tq.Job[Any]]]:
        jobs = (await self.client.job_list(tq.JobListParams(kinds=["beat"], limit=10_000))).jobs
        found: dict[str, list[tq.Job[Any]]] = {}
        for job in jobs:
            found.setdefault(job.metadata["periodic_run_at"], []).append(job)
        return found

    async def play(self) -> None:
        for number, step in enumerate(self.plan.steps):
            where = f"step {number} {step}"
            now = self.clock[0]
            if step.action == "advance":
                self.clock[0] = now + timedelta(seconds=step.seconds)
                continue
            if step.action == "restart":
                self.enqueuers[step.client] = self._enqueuer(step.client)
                continue
            before = await self._stored()
            runs_before = await self._runs()
            if step.action == "pass":
                passing = [step.client]
                first_sight = JOB_ID not in self.enqueuers[step.client]._seen
                results = [await self.enqueuers[step.client].run_once()]
                if first_sight:
                    await self._check_on_start(where, step.client, before, results[0], now)
            else:
                passing = list(range(self.plan.clients))
                results = await _together(self.enqueuers)
            for index, result in zip(passing, results, strict=True):
                self.reported[index] += len(result.runs) + result.failed
                duplicates = [r for r in result.runs if r.duplicate]
                assert not duplicates, f"{where}: a claimed run was already inserted: {duplicates}"
            assert self.calls == self.reported, f"{where}: args calls {self.calls}"
            if passing == [self.plan.failing] and results[0].failed:
                assert await self._stored() == before, f"{where}: a failed build moved state"
                assert await self._runs() == runs_before, f"{where}: a failed build inserted"
            await self._check(where, before, results, now, passing)

    async def _check_on_start(
        self, where: str, index: int, before: PeriodicJobState | None, result: Any, now: datetime
    ) -> None:
        """Invariant 8: a client's first pass with ``run_on_start`` (since it started)
        fires its latest run time unless that one, or a later one, already had its run."""
        if (
            not self.plan.run_on_start[index]
            or index == self.plan.failing
            or result.conflicts
            or before is None
        ):
            return
        latest = self.jobs[index].schedule.latest_at_or_before(now)
        if before.last_run_at is None or latest > before.last_run_at:
            runs = await self._runs()
            assert latest.isoformat() in runs, f"{where}: run_on_start did not fire {latest}"

    async def _check(
        self,
        where: str,
        before: PeriodicJobState | None,
        results: list[Any],
        now: datetime,
        passing: list[int],
    ) -> None:
        runs = await self._runs()
        doubled = {at: len(jobs) for at, jobs in runs.items() if len(jobs) > 1}
        assert not doubled, f"{where}: a run inserted twice: {doubled}"
        after = await self._stored()
        if any(r.conflicts == 0 and r.failed == 0 for r in results):
            assert after is not None and after.next_run_at > now, (
                f"{where}: stored state not up to date: {after} at {now}"
            )
        if not self.plan.alike:
            [index] = passing if len(passing) == 1 else [None]
            if index is None or index == self.plan.failing or results[0].conflicts:
                return
            schedule = self.jobs[index].schedule
            if before is None or before.last_run_at is None or before.schedule == schedule.key:
                return
            latest = schedule.latest_at_or_before(now)
            if latest > before.last_run_at:
                assert latest.isoformat() in runs, f"{where}: our run {latest} has no job"
            return
        if before is None or before.next_run_at > now or passing == [self.plan.failing]:
            return
        schedule = self.jobs[0].schedule
        slot = schedule.latest_at_or_before(now)
        assert slot.isoformat() in runs, f"{where}: the slot {slot} has no job: {sorted(runs)}"
        if len(results) == 1 and results[0].runs:
            [run] = results[0].runs
            if not run.duplicate and run.run_at == slot:
                missed = schedule.count_between(before.next_run_at, slot) - 1
                assert run.missed_runs == max(missed, 0), f"{where}: {run}"


async def _together(enqueuers: list[PeriodicEnqueuer]) -> list[Any]:
    """One pass of every enqueuer at once (their transactions race); their results in
    the enqueuers' order."""
    results: list[Any] = [None] * len(enqueuers)

    async def one(index: int, enqueuer: PeriodicEnqueuer) -> None:
        results[index] = await enqueuer.run_once()

    async with trio.open_nursery() as nursery:
        for index, enqueuer in enumerate(enqueuers):
            nursery.start_soon(one, index, enqueuer)
    return results


def _play(plan: Plan, open_store: Callable[[], Any]) -> None:
    async def main() -> None:
        with trio.fail_after(120):
            async with open_store() as client:
                await Run(plan, client).play()

    trio.run(main)


ON_START_AFTER_A_DISAGREEING_CLIENT = Plan(
    clients=2,
    alike=False,
    run_on_start=(True, False),
    steps=(
        Step("advance", 0, 29),
        Step("together"),
        Step("together"),
        Step("advance", 0, 24),
        Step("restart", 0),
        Step("pass", 0),
    ),
)
"""Found by this test: client 0 stored its own schedule with the other's sooner next run
time (off its grid) and, restarted with ``run_on_start``, claimed its latest run time
again although it had had its run (a duplicate insert, and a second ``args`` call)."""


@LONG
@MEMORY
@example(plan=ON_START_AFTER_A_DISAGREEING_CLIENT)
@given(plan=plans())
def test_periodic_plans_on_memory(plan: Plan) -> None:
    _play(plan, lambda: tq.open_client(driver=tq.MemoryDriver()))


@LONG
@POSTGRES
@example(plan=ON_START_AFTER_A_DISAGREEING_CLIENT)
@given(plan=plans())
def test_periodic_plans_on_postgres(plan: Plan, pg_server_url: str, template_database: str) -> None:
    with fresh_database(pg_server_url, template_database, "tq_periodic") as url:
        _play(plan, lambda: tq.open_client(url))
