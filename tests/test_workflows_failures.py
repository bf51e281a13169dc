"""Workflows when things go wrong (issue 17), through real clients on both drivers
(``store_url``): a dep cancelled, discarded or deleted cancels its dependents transitively
(``ignore_failed_deps`` ones run instead); ``job_retry`` brings them back; a hard stop
hands tasks back and the workflow completes on restart; the cleaner keeps a dep while a
dependent waits; the batch recipe.

Tasks are `workflow_worker.Step` jobs; a task meant to stay queued is put in the ``held``
queue, which no client here works. Order is checked on the `Steps` record, never with
timings; every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from support import wait_fetches
from workflow_worker import (
    Callback,
    Seen,
    Step,
    Steps,
    read,
    wait_final,
    wait_until,
    working,
)

import trioqueue as tq

S = tq.JobState
HELD = tq.InsertOpts(queue="held")
"""No client in these tests works the ``held`` queue: a task there stays queued."""


def cancelled_by(job: tq.Job[Any]) -> Any:
    return job.metadata.get("workflow_cancelled_by")


def states(found: dict[str, tq.Job[Any]]) -> dict[str, S]:
    return {n: j.state for n, j in found.items()}


def fan(root_opts: tq.InsertOpts | None = None, **root: Any) -> tq.Workflow:
    """a; b after a; c after b; d after a, ignoring failures; e after c, ignoring
    failures; f after e and b."""
    wf = tq.Workflow()
    wf.add("a", Step("a", **root), opts=root_opts)
    wf.add("b", Step("b"), deps=["a"])
    wf.add("c", Step("c"), deps=["b"])
    wf.add("d", Step("d"), deps=["a"], ignore_failed_deps=True)
    wf.add("e", Step("e"), deps=["c"], ignore_failed_deps=True)
    wf.add("f", Step("f"), deps=["e", "b"])
    return wf


def assert_failed_cascade(final: dict[str, tq.Job[Any]], steps: Steps, state: S) -> None:
    """``fan``'s a ended in ``state``: b, c and f were cancelled (by a, b and b), and d
    and e ran after a ended."""
    a = final["a"]
    assert a.state is state
    assert {n: j.state for n, j in final.items() if n != "a"} == {
        "b": S.CANCELLED,
        "c": S.CANCELLED,
        "d": S.COMPLETED,
        "e": S.COMPLETED,
        "f": S.CANCELLED,
    }
    assert cancelled_by(final["b"]) == a.id
    assert cancelled_by(final["c"]) == final["b"].id
    assert cancelled_by(final["f"]) == final["b"].id
    assert cancelled_by(final["d"]) is None
    for name in "bcf":
        assert final[name].finalized_at is not None
        assert final[name].attempt == 0
        assert name not in steps.events("start")
    assert sorted(steps.events("start"))[-2:] == ["d", "e"]


# ------------------------------------------------------------------ cancel, discard, delete


async def test_cancelling_a_queued_task_cancels_its_dependents(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(30):
        async with working(store_url, steps) as client:
            jobs = await client.insert_workflow(fan(HELD))
            cancelled = await client.job_cancel(jobs["a"].id)
            assert cancelled.state is S.CANCELLED
            # Settled in the same statement as the cancel.
            now = await read(client, jobs)
            assert {n: now[n].state for n in "bcf"} == dict.fromkeys("bcf", S.CANCELLED)
            assert {now["d"].state, now["e"].state} <= {S.AVAILABLE, S.RUNNING, S.COMPLETED}
            final = await wait_final(client, jobs)
    assert_failed_cascade(final, steps, S.CANCELLED)
    assert cancelled_by(final["a"]) is None


async def test_cancelling_a_running_task_cancels_its_dependents(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(30):
        async with working(store_url, steps) as client:
            jobs = await client.insert_workflow(fan(hold=1))
            await steps.wait_for(lambda: "a" in steps.events("start"))
            assert (await read(client, jobs))["b"].state is S.PENDING
            await client.job_cancel(jobs["a"].id)
            final = await wait_final(client, jobs)
    assert_failed_cascade(final, steps, S.CANCELLED)


async def test_a_discarded_task_cancels_its_dependents(store_url: str) -> None:
    steps = Steps()
    opts = tq.InsertOpts(max_attempts=2)
    with trio.fail_after(30):
        # Retries wait an hour: the task stays retryable until job_retry runs it again.
        async with working(store_url, steps, retry_policy=lambda job: 3600.0) as client:
            jobs = await client.insert_workflow(fan(opts, fail=2))
            now = await wait_until(client, jobs, lambda now: now["a"].state is S.RETRYABLE)
            # A failed attempt with attempts left decides nothing for the dependents.
            assert {n: now[n].state for n in "bcdef"} == dict.fromkeys("bcdef", S.PENDING)
            await client.job_retry(jobs["a"].id)
            final = await wait_final(client, jobs)
    assert_failed_cascade(final, steps, S.DISCARDED)
    assert [e for e, n, _ in steps.log if n == "a"] == ["start", "fail", "start", "fail"]
    assert steps.index("fail", "a") < steps.index("start", "d")


async def test_retrying_a_discarded_task_brings_its_dependents_back(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(40):
        async with working(store_url, steps) as client:
            # Fails its only attempt; the retry (attempt 2) succeeds.
            jobs = await client.insert_workflow(fan(tq.InsertOpts(max_attempts=1), fail=1))
            first = await wait_final(client, jobs)
        assert_failed_cascade(first, steps, S.DISCARDED)

        async with tq.open_client(store_url) as manager:
            retried = await manager.job_retry(jobs["a"].id)
            assert retried.state is S.AVAILABLE
            now = await read(manager, jobs)
        # Back, in the same statement: waiting for a again, without the cancel's marks.
        for name in "bcf":
            assert now[name].state is S.PENDING, name
            assert cancelled_by(now[name]) is None
            assert now[name].finalized_at is None
        # What ran stays as it was.
        assert now["d"].state is S.COMPLETED
        assert now["e"].state is S.COMPLETED

        steps.log.clear()
        async with working(store_url, steps) as client:
            final = await wait_final(client, jobs)
    assert {n: j.state for n, j in final.items()} == dict.fromkeys("abcdef", S.COMPLETED)
    assert final["a"].attempt == 2
    assert steps.events("start") == ["a", "b", "c", "f"]
    assert steps.events("end") == ["a", "b", "c", "f"]
    assert final["c"].output == {"task": "c", "attempt": 1}


async def test_retrying_a_waiting_task_by_hand_keeps_it_waiting(store_url: str) -> None:
    """``job_retry`` of a task with deps never runs it before they allow it
    (docs/workflows.md): it waits again, or is cancelled again at once while a dep it
    needs has failed. Retrying that dep brings it back."""
    steps = Steps()
    wf = tq.Workflow()
    wf.add("a", Step("a"), opts=HELD)
    wf.add("b", Step("b"), deps=["a"])
    wf.add("x", Step("x"), opts=HELD)
    wf.add("y", Step("y"), deps=["x"])
    with trio.fail_after(40):
        async with working(store_url, steps) as client:
            jobs = await client.insert_workflow(wf)
            await client.job_cancel(jobs["x"].id)
            assert cancelled_by(await client.job_get(jobs["y"].id)) == jobs["x"].id
            retried = await client.job_retry(jobs["y"].id)
            assert retried.state is S.CANCELLED  # x is still cancelled
            assert cancelled_by(retried) == jobs["x"].id
            waiting = await client.job_retry(jobs["b"].id)
            assert waiting.state is S.PENDING  # a has not run
            back = await client.job_retry(jobs["x"].id)
            assert back.state is S.AVAILABLE
            await wait_fetches(client, "default", 2)
            final = await read(client, jobs)
    assert {n: final[n].state for n in "abxy"} == {
        "a": S.AVAILABLE,
        "b": S.PENDING,
        "x": S.AVAILABLE,
        "y": S.PENDING,
    }
    assert cancelled_by(final["y"]) is None
    assert "b" not in steps.events("start") and "y" not in steps.events("start")


async def test_deleting_a_dep_cancels_its_dependents(store_url: str) -> None:
    steps = Steps()
    with trio.fail_after(30):
        async with working(store_url, steps) as client:
            # A queued root deleted.
            jobs = await client.insert_workflow(fan(HELD))
            deleted = await client.job_delete(jobs["a"].id)
            assert deleted.id == jobs["a"].id
            with pytest.raises(tq.JobNotFoundError):
                await client.job_get(jobs["a"].id)
            final = await wait_final(client, {n: j for n, j in jobs.items() if n != "a"})

            # A pending task deleted: its dependents are cancelled by it; its own dep
            # is left alone.
            wf = tq.Workflow()
            wf.add("root", Step("root"), opts=HELD)
            wf.add("mid", Step("mid"), deps=["root"])
            wf.add("leaf", Step("leaf"), deps=["mid"])
            wf.add("tail", Step("tail"), deps=["leaf"])
            wf.add("anyway", Step("anyway"), deps=["mid"], ignore_failed_deps=True)
            chain = await client.insert_workflow(wf)
            await client.job_delete(chain["mid"].id)
            rest = await wait_until(
                client,
                {n: chain[n] for n in ("root", "leaf", "tail", "anyway")},
                lambda now: now["anyway"].state is S.COMPLETED,
            )
    assert final["b"].state is S.CANCELLED
    assert cancelled_by(final["b"]) == jobs["a"].id
    assert {final[n].state for n in "cf"} == {S.CANCELLED}
    assert final["d"].state is S.COMPLETED
    assert final["e"].state is S.COMPLETED

    assert rest["root"].state is S.AVAILABLE
    assert rest["leaf"].state is S.CANCELLED
    assert cancelled_by(rest["leaf"]) == chain["mid"].id
    assert rest["tail"].state is S.CANCELLED
    assert cancelled_by(rest["tail"]) == chain["leaf"].id
    assert {"mid", "leaf", "tail"}.isdisjoint(steps.events("start"))


async def test_cancelling_the_head_of_a_long_chain_cancels_it_all(store_url: str) -> None:
    wf = tq.Workflow("chain")
    wf.add("t0", Step("t0"), opts=HELD)
    for i in range(1, 60):
        wf.add(f"t{i}", Step(f"t{i}"), deps=[f"t{i - 1}"])
    with trio.fail_after(30):
        async with tq.open_client(store_url) as client:
            jobs = await client.insert_workflow(wf)
            ids = [jobs[f"t{i}"].id for i in range(60)]
            await client.job_cancel(ids[0])
            cancelled = await client.workflow_get("chain")
            # Retrying the head brings every task back; a second cancel ends them again.
            await client.job_retry(ids[0])
            revived = await client.workflow_get("chain")
            await client.job_cancel(ids[0])
            again = await client.workflow_get("chain")
    assert [j.id for j in cancelled.values()] == ids
    assert {j.state for j in cancelled.values()} == {S.CANCELLED}
    assert [cancelled_by(j) for j in cancelled.values()] == [None, *ids[:-1]]
    assert revived["t0"].state is S.AVAILABLE
    assert {revived[f"t{i}"].state for i in range(1, 60)} == {S.PENDING}
    assert {j.state for j in again.values()} == {S.CANCELLED}
    assert [cancelled_by(j) for j in again.values()] == [None, *ids[:-1]]


# ------------------------------------------------------------------ stops and maintenance


async def test_a_hard_stop_hands_tasks_back_and_the_workflow_completes_later(
    store_url: str,
) -> None:
    steps = Steps()
    wf = tq.Workflow("stopped")
    wf.add("a", Step("a"))
    middle = ["m0", "m1", "m2"]
    for name in middle:
        wf.add(name, Step(name, hold=1), deps=["a"])
    wf.add("z", Step("z"), deps=middle)
    with trio.fail_after(40):
        async with working(store_url, steps) as client:
            jobs = await client.insert_workflow(wf)
            await steps.wait_for(lambda: steps.running["default"] == 3)
            await client.stop(cancel=True)
            now = await read(client, jobs)
        assert now["a"].state is S.COMPLETED
        for name in middle:
            assert now[name].state is S.AVAILABLE  # handed back, its attempt given back
            assert now[name].attempt == 0
            assert now[name].errors == []
        assert now["z"].state is S.PENDING
        assert steps.events("end") == ["a"]

        steps.release()
        async with working(store_url, steps) as client:
            final = await wait_final(client, jobs)
    assert {n: j.state for n, j in final.items()} == dict.fromkeys(jobs, S.COMPLETED)
    assert steps.events("start").count("z") == 1
    assert steps.index("start", "z") > max(steps.index("end", n) for n in middle)


async def test_the_cleaner_keeps_a_completed_dep_while_a_dependent_waits(
    store_url: str,
) -> None:
    steps = Steps()
    wf = tq.Workflow("kept")
    wf.add("dep", Step("dep"))
    wf.add("leaf", Step("leaf"))
    wf.add("gate", Step("gate"), opts=HELD)
    wf.add("waits", Step("waits"), deps=["dep", "gate"])
    config: dict[str, Any] = {
        "cleaner_interval": 0.1,
        "completed_job_retention": 0.1,
        "cancelled_job_retention": 0.1,
    }
    with trio.fail_after(40):
        async with working(store_url, steps, **config) as client:
            jobs = await client.insert_workflow(wf)
            await wait_until(client, jobs, lambda now: now["dep"].state is S.COMPLETED)
            # A job that completed after "dep" is deleted: the cleaner has passed "dep" by.
            later = {"later": (await client.insert(Step("later"))).job}
            await wait_until(client, later, lambda now: now["later"].state is S.COMPLETED)
            await wait_until(client, later, lambda now: not now)
            kept = await read(client, jobs)
            # Once nothing waits for it any more, it goes too.
            await client.job_cancel(jobs["gate"].id)
            await wait_until(client, jobs, lambda now: not now)
    # "leaf", completed with nobody waiting for it, went the way "later" did.
    assert states(kept) == {"dep": S.COMPLETED, "gate": S.AVAILABLE, "waits": S.PENDING}


async def test_the_batch_recipe(store_url: str) -> None:
    """Many tasks and a callback that depends on all of them with ignore_failed_deps:
    it runs once, after every task is final, and reads their outputs."""
    steps = Steps()
    wf = tq.Workflow("batch")
    names = [f"t{i:03}" for i in range(100)]
    failing = {n for i, n in enumerate(names) if i % 9 == 4}
    for name in names:
        wf.add(name, Step(name, fail=int(name in failing)), opts=tq.InsertOpts(max_attempts=1))
    wf.add("callback", Callback(), deps=names, ignore_failed_deps=True)
    with trio.fail_after(60):
        async with working(store_url, steps) as client:
            jobs = await client.insert_workflow(wf)
            assert jobs["callback"].state is S.PENDING
            assert jobs["callback"].workflow_deps == tuple(jobs[n].id for n in names)
            final = await wait_final(client, jobs)
            await wait_fetches(client, "default", 2)
    assert final["callback"].state is S.COMPLETED
    [seen] = steps.callbacks
    assert list(seen) == names
    assert seen == {
        name: Seen(S.DISCARDED, None)
        if name in failing
        else Seen(S.COMPLETED, {"task": name, "attempt": 1})
        for name in names
    }
    assert sorted(steps.events("start")) == names
    assert states({n: final[n] for n in failing}) == dict.fromkeys(failing, S.DISCARDED)
