"""Workflows through real clients (issue 17), on both drivers (``store_url``): what a
workflow refuses (and that a refusal writes nothing), the order its tasks run in, and how
tasks combine with scheduling, priorities, queues, limits and unique opts; reading a
workflow back. Failures, cancels, retries, deletes, stops and maintenance are in
``test_workflows_failures.py``, a killed process in ``test_workflows_processes.py``.

Tasks are ``wf_step`` jobs run by `workflow_worker.Steps`, which records every start and
end in order: "b ran after a" is checked on that record, never with timings. Every test is
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import attrs
import pytest
import trio
from support import wait_fetches
from workflow_worker import Step, Steps, count_jobs, read, wait_final, wait_until, working

import trioqueue as tq
from trioqueue.driver.postgres import PgConnection

S = tq.JobState


@attrs.frozen
class Unregistered:
    """A kind no worker in these tests runs."""

    kind: ClassVar[str] = "wf_unregistered"


def diamond(name: str | None = None) -> tq.Workflow:
    """a, then b and c, then d."""
    wf = tq.Workflow(name)
    wf.add("a", Step("a"))
    wf.add("b", Step("b"), deps=["a"])
    wf.add("c", Step("c"), deps=["a"])
    wf.add("d", Step("d"), deps=["b", "c"])
    return wf


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("task", "deps", "field"),
    [
        ("b", ["nope"], "Workflow.add.deps"),  # an unknown dep
        ("b", ["b"], "Workflow.add.deps"),  # itself: not added before
        ("b", ["a", "a"], "Workflow.add.deps"),  # a dep named twice
        ("b", "a", "Workflow.add.deps"),  # a str, not a list of names
        ("b", [1], "Workflow.add.deps"),
        ("a", [], "Workflow.add.task"),  # a duplicate task name
        ("", [], "Workflow.add.task"),
        ("x\x00y", [], "Workflow.add.task"),
        ("x\ud800", [], "Workflow.add.task"),
        ("x" * 256, [], "Workflow.add.task"),
        (7, [], "Workflow.add.task"),
    ],
)
def test_add_refuses_a_bad_task_and_adds_nothing(task: Any, deps: Any, field: str) -> None:
    wf = tq.Workflow()
    wf.add("a", Step("a"))
    with pytest.raises(tq.ValidationError) as caught:
        wf.add(task, Step("b"), deps=deps)
    assert caught.value.field == field
    assert list(wf.tasks) == ["a"]
    assert len(wf) == 1


def test_add_checks_opts_and_ignore_failed_deps() -> None:
    wf = tq.Workflow()
    with pytest.raises(tq.ValidationError, match=r"Workflow\.add\.opts"):
        wf.add("a", Step("a"), opts={"queue": "x"})  # type: ignore[arg-type]
    with pytest.raises(tq.ValidationError, match=r"Workflow\.add\.ignore_failed_deps"):
        wf.add("a", Step("a"), ignore_failed_deps=1)  # type: ignore[arg-type]
    assert len(wf) == 0
    wf.add("a" * 255, Step("a"))  # the longest name is fine
    assert list(wf.tasks) == ["a" * 255]


@pytest.mark.parametrize("name", ["", "x\x00y", "x\udc80", "x" * 256, 42])
def test_a_bad_workflow_name_is_refused(name: Any) -> None:
    with pytest.raises(tq.ValidationError, match=r"Workflow\.name"):
        tq.Workflow(name)


async def test_refused_workflows_write_nothing(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(30):
        async with working(store_url, steps, queues={}) as client:
            with pytest.raises(tq.ValidationError, match="no tasks"):
                await client.insert_workflow(tq.Workflow("empty"))
            with pytest.raises(tq.ValidationError, match="Workflow"):
                await client.insert_workflow("not a workflow")  # type: ignore[arg-type]

            # A kind without a worker, after tasks that are fine.
            wf = diamond("unregistered")
            wf.add("odd", Unregistered(), deps=["d"])
            with pytest.raises(tq.UnknownJobKindError):
                await client.insert_workflow(wf)

            # Args that cannot be stored, after tasks that are fine.
            wf = diamond("bad-args")
            wf.add("nul", Step("e\x00"), deps=["a"])
            with pytest.raises(tq.ValidationError):
                await client.insert_workflow(wf)

            # Two tasks with one unique key: one would stand in for the other.
            unique = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
            wf = tq.Workflow("same-key")
            wf.add("one", Step("same"), opts=unique)
            wf.add("two", Step("same"), deps=["one"], opts=unique)
            with pytest.raises(tq.ValidationError, match="same unique key"):
                await client.insert_workflow(wf)

            assert await count_jobs(client) == 0
            for name in ("empty", "unregistered", "bad-args", "same-key"):
                assert await client.workflow_get(name) == {}

            # A workflow name used before: refused, and the first one is left as it was.
            first = await client.insert_workflow(diamond("taken"))
            again = tq.Workflow("taken")
            again.add("other", Step("other"))
            with pytest.raises(tq.ValidationError, match="already"):
                await client.insert_workflow(again)
            with pytest.raises(tq.ValidationError, match="already"):
                await client.insert_workflow(diamond("taken"))
            assert await count_jobs(client) == 4
            got = await client.workflow_get("taken")
            assert {n: j.id for n, j in got.items()} == {n: j.id for n, j in first.items()}


async def test_insert_workflow_tx_writes_only_if_the_transaction_commits(
    store_url: str,
) -> None:
    class Abort(Exception):
        pass

    with trio.fail_after(30):
        async with tq.open_client(store_url) as client:
            with pytest.raises(Abort):
                async with client.transaction() as tx:
                    jobs = await client.insert_workflow_tx(tx, diamond("rolled-back"))
                    assert set(jobs) == {"a", "b", "c", "d"}
                    assert (await client.job_get_tx(tx, jobs["d"].id)).state is S.PENDING
                    raise Abort
            assert await count_jobs(client) == 0
            assert await client.workflow_get("rolled-back") == {}

            # The name was never taken: it can be used now.
            jobs = await client.insert_workflow(diamond("rolled-back"))
            assert await count_jobs(client) == 4

            # A ValidationError inside a transaction leaves it usable: what else it
            # writes commits.
            async with client.transaction() as tx:
                with pytest.raises(tq.ValidationError, match="already"):
                    await client.insert_workflow_tx(tx, diamond("rolled-back"))
                with pytest.raises(tq.ValidationError, match="no tasks"):
                    await client.insert_workflow_tx(tx, tq.Workflow())
                single = await client.insert_tx(tx, Step("single"))
                other = await client.insert_workflow_tx(tx, diamond("in-tx"))
            assert (await client.job_get(single.job.id)).state is S.AVAILABLE
            assert {n: j.id for n, j in (await client.workflow_get("in-tx")).items()} == {
                n: j.id for n, j in other.items()
            }
            assert await count_jobs(client) == 9


async def test_a_workflow_name_cannot_be_taken_twice_by_concurrent_inserts(
    database_url: str,
) -> None:
    """Two transactions insert workflows of one name: the one that checks while the other
    has not committed yet must still be refused once it has (else the two merge)."""
    first = tq.Workflow("contested")
    first.add("a", Step("a"))
    second = tq.Workflow("contested")
    second.add("b", Step("b"))
    outcome: list[BaseException | dict[str, tq.Job[Any]]] = []
    finished = trio.Event()

    async def insert_second(client: tq.Client) -> None:
        try:
            async with client.transaction() as tx:
                outcome.append(await client.insert_workflow_tx(tx, second))
        except tq.ValidationError as exc:
            outcome.append(exc)
        finished.set()

    async def waits_on_a_lock(db: PgConnection) -> bool:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool(waiting)

    with trio.fail_after(30):
        conn = await PgConnection.connect(database_url)
        async with conn, tq.open_client(database_url) as client:
            async with trio.open_nursery() as nursery:
                async with client.transaction() as tx:
                    await client.insert_workflow_tx(tx, first)
                    nursery.start_soon(insert_second, client)
                    # Commit once the second insert is done or waits for this one.
                    while True:
                        if finished.is_set() or await waits_on_a_lock(conn):
                            break
                        await trio.sleep(0.02)
            tasks = await client.workflow_get("contested")
    [result] = outcome
    assert isinstance(result, tq.ValidationError), result
    assert list(tasks) == ["a"]


# ------------------------------------------------------------------ order and reading back


async def test_a_diamond_runs_in_dep_order(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(30):
        async with tq.open_client(store_url) as inserter:
            jobs = await inserter.insert_workflow(diamond("diamond"))
        async with working(store_url, steps) as client:
            final = await wait_final(client, jobs)
            tasks = await client.workflow_get("diamond")

    a, b, c, d = (jobs[n] for n in "abcd")
    assert a.state is S.AVAILABLE
    assert {b.state, c.state, d.state} == {S.PENDING}
    for name, job in jobs.items():
        assert job.workflow_id == "diamond"
        assert job.workflow_task == name
    assert a.workflow_deps == ()
    assert b.workflow_deps == c.workflow_deps == (a.id,)
    assert d.workflow_deps == (b.id, c.id)

    assert list(tasks) == ["a", "b", "c", "d"]
    for name, job in tasks.items():
        assert job.id == jobs[name].id
        assert job.state is S.COMPLETED
        assert job.output == {"task": name, "attempt": 1}
        assert job.workflow_deps == jobs[name].workflow_deps
    assert {n: j.state for n, j in final.items()} == dict.fromkeys("abcd", S.COMPLETED)

    assert sorted(steps.events("start")) == ["a", "b", "c", "d"]  # each ran once
    assert steps.index("end", "a") < min(steps.index("start", "b"), steps.index("start", "c"))
    assert max(steps.index("end", "b"), steps.index("end", "c")) < steps.index("start", "d")


async def test_workflow_get_and_job_list_by_workflow(store_url: str) -> None:
    with trio.fail_after(30):
        async with tq.open_client(store_url) as client:
            before = await client.insert(Step("outside"))
            wf = tq.Workflow("w-one")
            wf.add("zeta", Step("zeta"))
            wf.add("alpha", Step("alpha"), deps=["zeta"])
            wf.add("mid", Step("mid"))
            wf.add("last", Step("last"), deps=["alpha", "mid"])
            one = await client.insert_workflow(wf)
            two = await client.insert_workflow(diamond("w-two"))
            unnamed = await client.insert_workflow(diamond())
            after = await client.insert(Step("outside"))

            got = await client.workflow_get("w-one")
            assert list(got) == ["zeta", "alpha", "mid", "last"]  # the order added
            assert [j.id for j in got.values()] == [one[n].id for n in got]
            assert [j.state for j in got.values()] == [S.AVAILABLE, S.PENDING] * 2
            assert list(await client.workflow_get("w-two")) == ["a", "b", "c", "d"]
            assert await client.workflow_get("nothing-by-this-name") == {}
            with pytest.raises(tq.ValidationError, match="workflow_id"):
                await client.workflow_get("")

            # An unnamed workflow gets an id of its own, shared by its tasks.
            ids = {j.workflow_id for j in unnamed.values()}
            [unnamed_id] = ids
            assert unnamed_id not in (None, "w-one", "w-two")
            got_unnamed = await client.workflow_get(unnamed_id)
            assert {n: j.id for n, j in got_unnamed.items()} == {
                n: j.id for n, j in unnamed.items()
            }

            listed = await client.job_list(tq.JobListParams(workflow_id="w-one"))
            assert [j.id for j in listed.jobs] == sorted(j.id for j in one.values())
            pending = await client.job_list(
                tq.JobListParams(workflow_id="w-two", states=[S.PENDING])
            )
            assert [j.workflow_task for j in pending.jobs] == ["b", "c", "d"]
            page = await client.job_list(tq.JobListParams(workflow_id="w-two", limit=2))
            rest = await client.job_list(
                tq.JobListParams(workflow_id="w-two", after=page.last_cursor)
            )
            assert [j.id for j in page.jobs + rest.jobs] == [two[n].id for n in "abcd"]
            outside = await client.job_list(tq.JobListParams(ids=[before.job.id, after.job.id]))
            assert [j.workflow_id for j in outside.jobs] == [None, None]
            nothing = await client.job_list(tq.JobListParams(workflow_id="nothing"))
            assert nothing.jobs == []


# ------------------------------------------------------------------ with everything else


async def test_a_task_due_later_is_promoted_to_scheduled_then_runs(store_url: str) -> None:
    steps = Steps()
    now = datetime.now(UTC)
    soon = now + timedelta(seconds=1.5)
    later = now + timedelta(hours=1)
    wf = tq.Workflow("scheduled")
    wf.add("a", Step("a"))
    wf.add("later", Step("later"), deps=["a"], opts=tq.InsertOpts(scheduled_at=later))
    wf.add("soon", Step("soon"), deps=["a"], opts=tq.InsertOpts(scheduled_at=soon))
    wf.add("after", Step("after"), deps=["soon"])
    with trio.fail_after(30):
        async with working(store_url, steps) as client:
            jobs = await client.insert_workflow(wf)
            assert jobs["later"].state is S.PENDING
            assert jobs["soon"].state is S.PENDING
            found = await wait_until(
                client,
                jobs,
                lambda now: now["a"].state is S.COMPLETED and now["later"].state is not S.PENDING,
            )
            # Its deps completed, but it is not due: scheduled, not available.
            assert found["later"].state is S.SCHEDULED
            assert found["later"].scheduled_at == later
            found = await wait_until(client, jobs, lambda now: now["after"].state is S.COMPLETED)
            assert (await client.job_get(jobs["later"].id)).state is S.SCHEDULED
    ran = found["soon"]
    assert ran.state is S.COMPLETED
    assert ran.attempted_at is not None and ran.attempted_at >= soon
    assert steps.index("end", "soon") < steps.index("start", "after")
    assert "later" not in steps.events("start")


async def test_priorities_and_queues_per_task(store_url: str) -> None:
    steps = Steps()
    wf = tq.Workflow("priorities")
    wf.add("root", Step("root"))
    for p in (3, 1, 4, 2):
        wf.add(f"p{p}", Step(f"p{p}"), deps=["root"], opts=tq.InsertOpts(priority=p))
    wf.add(
        "image",
        Step("image"),
        deps=["root"],
        opts=tq.InsertOpts(queue="images", priority=2, tags=["img"], metadata={"m": 1}),
    )
    wf.add("end", Step("end"), deps=["p1", "p2", "p3", "p4", "image"])
    # One worker in the default queue: once root completes, its four dependents are
    # available together and run one at a time, by priority.
    queues = {
        "default": tq.QueueConfig(max_workers=1),
        "images": tq.QueueConfig(max_workers=1),
    }
    with trio.fail_after(30):
        async with working(store_url, steps, queues) as client:
            jobs = await client.insert_workflow(wf)
            final = await wait_final(client, jobs)
    assert jobs["image"].queue == "images"
    assert jobs["image"].tags == ["img"]
    assert jobs["image"].metadata == {"m": 1}
    assert [jobs[f"p{p}"].priority for p in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert all(job.state is S.COMPLETED for job in final.values())
    assert final["image"].queue == "images"
    started = [n for n in steps.events("start") if n.startswith("p")]
    assert started == ["p1", "p2", "p3", "p4"]
    assert steps.index("end", "root") < steps.index("start", "image")
    assert steps.index("start", "end") > max(
        steps.index("end", n) for n in ("p1", "p2", "p3", "p4", "image")
    )


async def test_a_task_in_a_limited_queue(store_url: str) -> None:
    steps = Steps()
    wf = tq.Workflow("limited")
    wf.add("root", Step("root"))
    fan = [f"t{i}" for i in range(6)]
    for name in fan:
        wf.add(name, Step(name, hold=1), deps=["root"], opts=tq.InsertOpts(queue="limited"))
    wf.add("join", Step("join"), deps=fan)
    queues = {
        "default": tq.QueueConfig(max_workers=4),
        "limited": tq.QueueConfig(max_workers=6, global_limit=tq.GlobalLimit(2)),
    }
    with trio.fail_after(40):
        async with working(store_url, steps, queues) as client:
            jobs = await client.insert_workflow(wf)
            await steps.wait_for(lambda: steps.running["limited"] == 2)
            # Fetches that began after the two started find no room for a third.
            await wait_fetches(client, "limited", 3)
            assert steps.running["limited"] == 2
            now = await read(client, jobs)
            assert sorted(j.state for n, j in now.items() if n in fan) == sorted(
                [S.RUNNING] * 2 + [S.AVAILABLE] * 4
            )
            assert now["join"].state is S.PENDING
            steps.release()
            final = await wait_final(client, jobs)
    assert all(job.state is S.COMPLETED for job in final.values())
    assert steps.peak["limited"] == 2
    assert steps.index("start", "join") > max(steps.index("end", n) for n in fan)


async def test_a_unique_duplicate_stands_in_for_its_task(store_url: str) -> None:
    steps = Steps()
    unique = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        async with tq.open_client(store_url) as inserter:
            live = (await inserter.insert(Step("shared", hold=1), unique)).job
            wf = tq.Workflow("stand-in")
            wf.add("u", Step("shared", hold=1), opts=unique)
            wf.add("own", Step("own"))
            wf.add("after", Step("after"), deps=["u"])
            wf.add("join", Step("join"), deps=["own", "u"])
            jobs = await inserter.insert_workflow(wf)

        assert jobs["u"].id == live.id
        assert jobs["after"].workflow_deps == (live.id,)
        assert jobs["join"].workflow_deps == (jobs["own"].id, live.id)
        assert jobs["after"].state is S.PENDING

        async with working(store_url, steps) as client:
            await steps.wait_for(lambda: "shared" in steps.events("start"))
            await wait_until(client, jobs, lambda now: now["own"].state is S.COMPLETED)
            await wait_fetches(client, "default", 2)
            now = await read(client, jobs)
            assert now["after"].state is S.PENDING  # waits for the job that stands in
            assert now["join"].state is S.PENDING
            steps.release()
            final = await wait_final(client, jobs)
            tasks = await client.workflow_get("stand-in")
    assert all(job.state is S.COMPLETED for job in final.values())
    assert steps.events("start").count("shared") == 1
    assert steps.index("end", "shared") < steps.index("start", "after")
    assert steps.index("end", "shared") < steps.index("start", "join")
    assert {"own", "after", "join"} <= set(tasks)


async def test_a_completed_duplicate_stands_in_and_its_dependents_run_at_once(
    store_url: str,
) -> None:
    steps = Steps()
    unique = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        async with working(store_url, steps) as client:
            first = (await client.insert(Step("once"), unique)).job
            await wait_final(client, {"once": first})
            wf = tq.Workflow("completed-stand-in")
            wf.add("u", Step("once"), opts=unique)
            wf.add("after", Step("after"), deps=["u"])
            jobs = await client.insert_workflow(wf)
            # Its dep is already completed: promoted as it is inserted.
            assert jobs["u"].id == first.id
            assert jobs["u"].state is S.COMPLETED
            assert jobs["after"].state in (S.AVAILABLE, S.RUNNING, S.COMPLETED)
            final = await wait_final(client, jobs)
    assert final["after"].state is S.COMPLETED
    assert steps.events("start") == ["once", "after"]


@attrs.frozen
class Retag:
    """Insert middleware: every job gets priority 4 and the tag ``mw``; with ``drop``,
    it passes on all but the last job."""

    drop: bool = False

    async def insert_many(self, params: list[Any], call_next: Any) -> Any:
        changed = [attrs.evolve(p, priority=4, tags=(*p.tags, "mw")) for p in params]
        return await call_next(changed[:-1] if self.drop else changed)


async def test_insert_middleware_sees_every_task(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(30):
        async with working(store_url, steps, middleware=[Retag()]) as client:
            jobs = await client.insert_workflow(diamond("through-middleware"))
            final = await wait_final(client, jobs)
        assert {j.priority for j in jobs.values()} == {4}
        assert {tuple(j.tags) for j in final.values()} == {("mw",)}
        assert {j.state for j in final.values()} == {S.COMPLETED}
        assert jobs["d"].workflow_deps == (jobs["b"].id, jobs["c"].id)

        async with tq.open_client(store_url, middleware=[Retag(drop=True)]) as client:
            with pytest.raises(tq.ValidationError, match="one job per task"):
                await client.insert_workflow(diamond("dropped"))
            assert await client.workflow_get("dropped") == {}
            assert await count_jobs(client) == 4


@attrs.frozen
class ShortChange:
    """Insert middleware that passes every job on but returns one result too few."""

    async def insert_many(self, params: list[Any], call_next: Any) -> Any:
        return (await call_next(params))[:-1]


async def test_insert_middleware_that_returns_too_few_results_is_named(store_url: str) -> None:
    async with tq.open_client(store_url, middleware=[ShortChange()]) as client:
        with pytest.raises(tq.TrioqueueError, match="not what call_next returned"):
            await client.insert_workflow(diamond("short"))
        assert len(await client.workflow_get("short")) == 4  # it was inserted
