"""Composition cases of the driver conformance suite about failed and retried deps: the
transitive cancel by every write that fails or deletes a dep (outcomes, cancels, rescues,
the scheduler's discards, deletes), tasks that ignore failed deps, long chains and wide
fan-ins, and the dependents a retried dep brings back. ``driver_suite_workflows.py``
imports this module at its end (it uses the helpers there), so these cases join ``SUITE``
and run against every driver.
"""

from __future__ import annotations

import itertools

from driver_suite import NOW, at, case, get, insert_one, outcome
from driver_suite_workflows import (
    LISTENED,
    Task,
    claim,
    final_ids,
    finish,
    insert_workflow,
    notes,
    states,
    task,
)

from trioqueue.driver.protocol import (
    CONTROL_CHANNEL,
    FINAL_CHANNEL,
    INSERT_CHANNEL,
    Driver,
    JobRescue,
)
from trioqueue.job import JobListParams, JobState

# ------------------------------------------------------------------------ failed deps


def _chain(n: int) -> list[Task]:
    return [task("t0")] + [task(f"t{i}", f"t{i - 1}") for i in range(1, n)]


@case
async def a_discarded_dep_cancels_its_dependents_transitively(driver: Driver) -> None:
    wf = await insert_workflow(
        driver,
        "wf",
        task("a"),
        task("b", "a", metadata={"mine": 1}),
        task("c", "b"),
        task("d", "a", "b", ignore_failed=True, queue="dq"),
        task("other"),
    )
    a, b, c = wf["a"], wf["b"], wf["c"]
    async with driver.open_listener(LISTENED) as listener:
        await finish(driver, a.id, JobState.DISCARDED, seconds=30)
        got = await notes(driver, listener, "marker")
    rows = {name: await get(driver, wf[name].id) for name in wf}
    assert (rows["b"].state, rows["b"].finalized_at) == ("cancelled", at(30))
    assert rows["b"].metadata == {"mine": 1, "workflow_cancelled_by": a.id}
    assert (rows["c"].state, rows["c"].finalized_at) == ("cancelled", at(30))
    assert rows["c"].metadata == {"workflow_cancelled_by": b.id}
    # d ignores failed deps: both are final, so it runs.
    assert (rows["d"].state, rows["d"].metadata) == ("available", {})
    assert rows["other"].state == "available"
    assert sorted(final_ids(got)) == sorted([a.id, b.id, c.id])
    assert (INSERT_CHANNEL, {"queue": "dq"}) in got
    assert len([n for n in got if n[0] == FINAL_CHANNEL]) <= 2  # a batch, not one per job


@case
async def cancelling_a_queued_dep_cancels_its_dependents(driver: Driver) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a"), task("c", "b"))
    async with driver.open_listener(LISTENED) as listener:
        row = await driver.job_cancel(wf["a"].id, at(40))
        assert row is not None and row.state == "cancelled"
        got = await notes(driver, listener, "marker")
    b, c = await get(driver, wf["b"].id), await get(driver, wf["c"].id)
    assert (b.state, b.finalized_at, b.metadata) == (
        "cancelled",
        at(40),
        {"workflow_cancelled_by": wf["a"].id},
    )
    assert (c.state, c.metadata) == ("cancelled", {"workflow_cancelled_by": b.id})
    assert sorted(final_ids(got)) == sorted([wf["a"].id, b.id, c.id])


@case
async def cancelling_a_running_dep_waits_for_its_outcome(driver: Driver) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a"))
    await claim(driver, wf["a"].id)
    async with driver.open_listener([*LISTENED, CONTROL_CHANNEL]) as listener:
        row = await driver.job_cancel(wf["a"].id, at(1))
        assert row is not None and row.state == "running"
        got = await notes(driver, listener, "marker")
    assert [channel for channel, _ in got] == [CONTROL_CHANNEL]  # nothing final yet
    assert await states(driver, wf["b"]) == ["pending"]
    # The run ends: asked to cancel, its retry becomes a cancel, which cascades.
    await driver.job_set_state_if_running_many(
        [outcome(wf["a"].id, JobState.RETRYABLE, scheduled_at=at(60), error_json="{}")], at(2)
    )
    assert await states(driver, wf["a"], wf["b"]) == ["cancelled", "cancelled"]


@case
async def deleting_a_dep_cancels_its_dependents(driver: Driver) -> None:
    wf = await insert_workflow(
        driver,
        "wf",
        task("a"),
        task("b"),
        task("c", "a", "b"),
        task("d", "c"),
        task("e", "a", ignore_failed=True),
    )
    await finish(driver, wf["a"].id)
    assert await states(driver, wf["c"], wf["e"]) == ["pending", "available"]
    deleted = await driver.job_delete(wf["b"].id)
    assert deleted is not None and deleted.id == wf["b"].id
    c, d = await get(driver, wf["c"].id), await get(driver, wf["d"].id)
    assert (c.state, c.metadata) == ("cancelled", {"workflow_cancelled_by": wf["b"].id})
    assert (d.state, d.metadata) == ("cancelled", {"workflow_cancelled_by": c.id})
    assert c.finalized_at is not None and d.finalized_at == c.finalized_at


@case
async def a_task_ignoring_failed_deps_runs_once_all_are_final(driver: Driver) -> None:
    wf = await insert_workflow(
        driver,
        "wf",
        task("a"),
        task("b"),
        task("c"),
        task("d"),
        task("cb", "a", "b", "c", "d", ignore_failed=True),
    )
    await finish(driver, wf["a"].id, JobState.DISCARDED, seconds=10)
    await driver.job_cancel(wf["b"].id, at(11))
    await finish(driver, wf["c"].id, seconds=12)
    assert await states(driver, wf["cb"]) == ["pending"]  # d still runs
    await claim(driver, wf["d"].id, at(13))
    assert await states(driver, wf["cb"]) == ["pending"]
    await driver.job_set_state_if_running_many(
        [outcome(wf["d"].id, JobState.RETRYABLE, scheduled_at=at(60), error_json="{}")], at(14)
    )
    assert await states(driver, wf["cb"]) == ["pending"]
    await driver.job_delete(wf["d"].id)
    row = await get(driver, wf["cb"].id)
    assert (row.state, row.metadata, row.finalized_at) == ("available", {}, None)


@case
async def a_dep_rescued_to_discarded_cancels_its_dependents(driver: Driver) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a"))
    running = await claim(driver, wf["a"].id, at(-7200))
    async with driver.open_listener(LISTENED) as listener:
        rescued = await driver.job_rescue_many(
            [
                JobRescue(
                    running.id,
                    JobState.DISCARDED,
                    at(5),
                    None,
                    '{"error": "stuck"}',
                    running.attempted_at or NOW,
                )
            ]
        )
        assert rescued == [(running.id, "wf", "discarded")]
        got = await notes(driver, listener, "marker")
    b = await get(driver, wf["b"].id)
    assert (b.state, b.finalized_at) == ("cancelled", at(5))
    assert sorted(final_ids(got)) == [running.id, b.id]


@case
async def a_dep_the_scheduler_discards_cancels_its_dependents(driver: Driver) -> None:
    # A retryable dep (minimal unique states: retryable does not hold the key) whose key
    # a new job took meanwhile is discarded when it comes due; its dependent is cancelled.
    minimal = frozenset({JobState.AVAILABLE, JobState.PENDING, JobState.RUNNING})
    wf = await insert_workflow(
        driver,
        "wf",
        task("a", unique_key=b"k", unique_states=minimal),
        task("b", "a"),
    )
    await finish(driver, wf["a"].id, JobState.RETRYABLE, seconds=1)
    live = await insert_one(driver, queue="wf", unique_key=b"k", unique_states=minimal)
    async with driver.open_listener(LISTENED) as listener:
        assert await driver.job_schedule(at(100), at(90), 10) == {}
        got = await notes(driver, listener, "marker")
    a, b = await get(driver, wf["a"].id), await get(driver, wf["b"].id)
    assert (a.state, b.state, b.finalized_at) == ("discarded", "cancelled", at(90))
    assert b.metadata == {"workflow_cancelled_by": a.id}
    assert sorted(final_ids(got)) == [a.id, b.id]
    assert await states(driver, live) == ["available"]


@case
async def a_long_chain_cancels_to_its_end(driver: Driver) -> None:
    # 100 tasks in a row: the cascade runs in a loop, not by nested triggers.
    wf = await insert_workflow(driver, "chain", *_chain(100))
    async with driver.open_listener(LISTENED) as listener:
        await finish(driver, wf["t0"].id, JobState.DISCARDED, seconds=10)
        got = await notes(driver, listener, "marker")
    rows = await driver.job_list(JobListParams(workflow_id="chain", limit=200))
    assert [r.state for r in rows] == ["discarded"] + ["cancelled"] * 99
    for before, after in itertools.pairwise(rows):
        assert after.metadata == {"workflow_cancelled_by": before.id}
        assert after.finalized_at == at(10)
    assert sorted(final_ids(got)) == [r.id for r in rows]


@case
async def a_wide_fan_in_is_promoted_when_its_last_dep_completes(driver: Driver) -> None:
    deps = [task(f"d{i}", queue="fan") for i in range(2000)]
    wf = await insert_workflow(
        driver, "fan", *deps, task("join", *(t.name for t in deps), queue="join")
    )
    claimed = await driver.job_get_available("fan", at(1), 2000, "client-1")
    assert len(claimed) == 2000
    first = wf["d0"].id
    rest = [outcome(r.id, JobState.COMPLETED, finalized_at=at(2)) for r in claimed if r.id != first]
    assert len(await driver.job_set_state_if_running_many(rest, at(2), rows=False)) == 1999
    assert await states(driver, wf["join"]) == ["pending"]
    await driver.job_set_state_if_running_many(
        [outcome(first, JobState.COMPLETED, finalized_at=at(3))], at(3), rows=False
    )
    assert await states(driver, wf["join"]) == ["available"]


# ------------------------------------------------------------------------ retried deps


@case
async def retrying_a_failed_dep_brings_its_dependents_back(driver: Driver) -> None:
    wf = await insert_workflow(
        driver, "wf", task("a"), task("z"), task("b", "a"), task("c", "b"), task("x", "a", "z")
    )
    a, b, c, x = wf["a"], wf["b"], wf["c"], wf["x"]
    await finish(driver, a.id, JobState.DISCARDED, seconds=10)
    assert await states(driver, b, c, x) == ["cancelled"] * 3
    await driver.job_cancel(wf["z"].id, at(11))
    retried = await driver.job_retry(a.id, at(20))
    assert retried is not None and retried.state == "available"
    # What a's failure cancelled waits again; x, brought back behind z (failed meanwhile),
    # is cancelled again at once, by z.
    for row in (b, c):
        back = await get(driver, row.id)
        assert (back.state, back.finalized_at, back.metadata) == ("pending", None, {})
    gone = await get(driver, x.id)
    assert (gone.state, gone.finalized_at) == ("cancelled", at(20))
    assert gone.metadata == {"workflow_cancelled_by": wf["z"].id}
    await finish(driver, a.id, seconds=30)
    assert await states(driver, b, c, x) == ["available", "pending", "cancelled"]
    await finish(driver, b.id, seconds=40)
    assert await states(driver, c) == ["available"]


@case
async def a_retried_task_never_skips_its_deps(
    driver: Driver,
) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a"), task("c", "b"))
    await driver.job_cancel(wf["a"].id, at(1))
    assert await states(driver, wf["b"], wf["c"]) == ["cancelled", "cancelled"]
    # b retried by hand while a is still cancelled: settled at once, cancelled again.
    retried = await driver.job_retry(wf["b"].id, at(2))
    assert retried is not None and retried.state == "cancelled"
    assert retried.metadata == {"workflow_cancelled_by": wf["a"].id}
    assert await states(driver, wf["a"], wf["b"], wf["c"]) == ["cancelled"] * 3
    # Retrying a brings both back, waiting; they run in order once a completes.
    await driver.job_retry(wf["a"].id, at(3))
    assert await states(driver, wf["a"], wf["b"], wf["c"]) == ["available", "pending", "pending"]
    await finish(driver, wf["a"].id, seconds=5)
    assert await states(driver, wf["b"], wf["c"]) == ["available", "pending"]
    await finish(driver, wf["b"].id, seconds=6)
    assert await states(driver, wf["c"]) == ["available"]


@case
async def retrying_a_completed_dep_makes_its_dependents_wait_for_it_again(
    driver: Driver,
) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b"), task("c", "a", "b"))
    await finish(driver, wf["a"].id, seconds=10)
    await driver.job_retry(wf["a"].id, at(20))
    await finish(driver, wf["b"].id, seconds=30)
    assert await states(driver, wf["c"]) == ["pending"]  # a runs again
    await finish(driver, wf["a"].id, seconds=40)
    assert await states(driver, wf["c"]) == ["available"]


@case
async def job_delete_announces_the_deleted_job_and_its_cancelled_dependents(
    driver: Driver,
) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a"))
    plain = await insert_one(driver)
    async with driver.open_listener(LISTENED) as listener:
        await driver.job_delete(plain.id)
        await driver.job_delete(wf["a"].id)
        got = await notes(driver, listener, "marker")
    assert sorted(final_ids(got)) == sorted([plain.id, wf["a"].id, wf["b"].id])
    assert await states(driver, wf["b"]) == ["cancelled"]


@case
async def a_foreign_cancelled_by_value_never_fails_a_retry(driver: Driver) -> None:
    # Metadata someone else wrote under the key (not a job id) is compared as text: the
    # task it marks was cancelled by hand, not by its dep, so it stays cancelled.
    odd = '{"workflow_cancelled_by": "not a number"}'
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a", metadata_json=odd))
    await driver.job_cancel(wf["b"].id, at(1))
    await driver.job_cancel(wf["a"].id, at(1))
    retried = await driver.job_retry(wf["a"].id, at(2))
    assert retried is not None and retried.state == "available"
    assert await states(driver, wf["b"]) == ["cancelled"]


@case
async def the_cleaner_keeps_a_dep_while_a_dependent_may_come_back(driver: Driver) -> None:
    # t waits for d and a; d completes; a is cancelled, which cancels t. Retrying a later
    # brings t back, so d must still be there then (else t is cancelled by d at once).
    wf = await insert_workflow(driver, "wf", task("d"), task("a"), task("t", "d", "a"))
    await finish(driver, wf["d"].id, seconds=1)
    await driver.job_cancel(wf["a"].id, at(2))
    assert await states(driver, wf["t"]) == ["cancelled"]
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(1000), 100) == 0
    await driver.job_retry(wf["a"].id, at(1001))
    assert await states(driver, wf["d"], wf["t"]) == ["completed", "pending"]
    await finish(driver, wf["a"].id, seconds=1002)
    assert await states(driver, wf["t"]) == ["available"]


@case
async def a_task_cancelled_by_hand_midway_through_its_deps_can_be_retried(
    driver: Driver,
) -> None:
    # t has seen a done (its progress is stored); cancelled by hand, then b completes, then
    # t is retried: it waits no more for a, and is promoted at once.
    wf = await insert_workflow(driver, "wf", task("a"), task("b"), task("t", "a", "b"))
    await finish(driver, wf["a"].id, seconds=1)
    await driver.job_cancel(wf["t"].id, at(2))
    await finish(driver, wf["b"].id, seconds=3)
    retried = await driver.job_retry(wf["t"].id, at(4))
    assert retried is not None and retried.state == "available"
