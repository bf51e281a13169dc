"""Composition cases of the driver conformance suite (``driver_suite.py`` imports this
module at its end, so these cases join ``SUITE`` and run against every driver).

They exercise what migration 005 adds: a completed run's recorded output, the workflow
columns of job rows, `Driver.job_insert_workflow`, the promotion of a workflow's
dependents, the cleaner keeping a dep its dependents wait for, and the ``tq_final``
notifications that `Client.job_wait` listens to; ``driver_suite_workflow_failures.py``
(imported at the end, with the helpers here) has failed and retried deps. Times are fixed
(``NOW`` plus offsets) wherever the driver takes ``now``; a deleted dep settles its
dependents at the storage's own time, so those cases only check that a time was set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import pytest
from driver_suite import (
    CHANNELS,
    NOW,
    Row,
    at,
    case,
    collect_until,
    get,
    insert_one,
    outcome,
    params,
    running_job,
)

import trioqueue as tq
from trioqueue.driver.protocol import (
    FINAL_CHANNEL,
    INSERT_CHANNEL,
    Driver,
    JobRow,
    Listener,
    WorkflowTaskParams,
)
from trioqueue.job import JobListParams, JobState

LISTENED = [INSERT_CHANNEL, FINAL_CHANNEL]


class Task(NamedTuple):
    """One task of a workflow to insert with `insert_workflow`."""

    name: str
    deps: tuple[str, ...]
    ignore_failed: bool
    opts: dict[str, Any]


def task(name: str, *deps: str, ignore_failed: bool = False, **opts: Any) -> Task:
    """A task named ``name`` waiting for the tasks ``deps`` (named, added before); ``opts``
    go to `params` (a task with deps is inserted ``pending``)."""
    return Task(name, deps, ignore_failed, opts)


async def insert_workflow_rows(
    driver: Driver,
    workflow_id: str,
    tasks: Sequence[Task],
    *,
    notify: Sequence[str] = (),
    now: Any = NOW,
    ex: Any = None,
) -> list[tuple[JobRow, bool]]:
    positions = {t.name: n for n, t in enumerate(tasks)}
    many = []
    for t in tasks:
        opts = dict(t.opts)
        opts.setdefault("queue", "wf")
        if t.deps:
            opts.setdefault("state", JobState.PENDING)
        many.append(
            WorkflowTaskParams(
                params(**opts), t.name, tuple(positions[d] for d in t.deps), t.ignore_failed
            )
        )
    return await driver.job_insert_workflow(workflow_id, many, list(notify), now, ex=ex)


async def insert_workflow(
    driver: Driver, workflow_id: str, *tasks: Task, now: Any = NOW
) -> dict[str, Row]:
    """Insert the tasks as workflow ``workflow_id``; their rows by task name."""
    rows = await insert_workflow_rows(driver, workflow_id, tasks, now=now)
    assert [skipped for _, skipped in rows] == [False] * len(tasks)
    return {t.name: row for t, (row, _) in zip(tasks, rows, strict=True)}


async def claim(driver: Driver, job_id: int, now: Any = NOW) -> Row:
    row = await driver.job_claim(job_id, now, "client-1")
    assert row is not None, f"job {job_id} could not be claimed"
    return row


async def finish(
    driver: Driver,
    job_id: int,
    state: JobState = JobState.COMPLETED,
    seconds: float = 10,
    *,
    rows: bool = True,
    output: Any = None,
    waited: bool = True,
) -> None:
    """Claim the job and write the outcome ``state`` of the run, at ``at(seconds)``;
    ``waited``: as a job some client waits for (announced on tq_final as it ends)."""
    if waited:
        await driver.job_mark_waited([job_id])
    await claim(driver, job_id, at(seconds - 1))
    final = state in (JobState.COMPLETED, JobState.CANCELLED, JobState.DISCARDED)
    done = outcome(
        job_id,
        state,
        finalized_at=at(seconds) if final else None,
        scheduled_at=None if final else at(seconds + 60),
        error_json=None if state is JobState.COMPLETED else '{"error": "boom"}',
        output_json=None if output is None else json.dumps(output),
    )
    written = await driver.job_set_state_if_running_many([done], at(seconds), rows=rows)
    assert [r[0] for r in written] == [job_id]


async def states(driver: Driver, *rows: Row) -> list[str]:
    return [(await get(driver, row.id)).state for row in rows]


async def notes(driver: Driver, listener: Listener, marker: str) -> list[tuple[str, Any]]:
    """Send ``marker`` and return what the listener got before it, payloads decoded."""
    await driver.notify_many(INSERT_CHANNEL, [marker])
    return [
        (n.channel, json.loads(n.payload))
        for n in await collect_until(listener, INSERT_CHANNEL, marker)
    ]


def final_ids(got: list[tuple[str, Any]]) -> list[int]:
    """The ids announced on tq_final, in order (each payload at most 400)."""
    found: list[int] = []
    for channel, payload in got:
        if channel == FINAL_CHANNEL:
            assert set(payload) == {"ids"} and 0 < len(payload["ids"]) <= 400
            found += payload["ids"]
    return found


# ------------------------------------------------------------------------ rows and output


@case
async def workflow_rows_carry_their_fields(driver: Driver) -> None:
    plain = await insert_one(driver, queue="wf")
    assert len(plain) == 20
    assert (plain.output, plain.workflow_id, plain.workflow_task, plain.workflow_deps) == (
        None,
        None,
        None,
        None,
    )
    wf = await insert_workflow(
        driver,
        "wf-1",
        task("a"),
        task("b", "a"),
        task("c", "a", "b", ignore_failed=True, queue="other", priority=2),
    )
    a, b, c = wf["a"], wf["b"], wf["c"]
    assert [(r.workflow_id, r.workflow_task) for r in (a, b, c)] == [
        ("wf-1", "a"),
        ("wf-1", "b"),
        ("wf-1", "c"),
    ]
    assert [r.workflow_deps for r in (a, b, c)] == [None, [a.id], [a.id, b.id]]
    assert [r.state for r in (a, b, c)] == ["available", "pending", "pending"]
    assert (c.queue, c.priority, c.output) == ("other", 2, None)
    for row in (a, b, c):
        stored = await get(driver, row.id)
        assert type(stored) is JobRow and stored == row
    await insert_workflow(driver, "wf-2", task("a"))
    listed = await driver.job_list(JobListParams(workflow_id="wf-1"))
    assert listed == [a, b, c]
    assert await driver.job_list(JobListParams(workflow_id="wf-1", states=["pending"])) == [b, c]
    assert await driver.job_list(JobListParams(workflow_id="none")) == []


@case
async def workflow_insert_notifies_the_given_queues(driver: Driver) -> None:
    async with driver.open_listener(LISTENED) as listener:
        await insert_workflow_rows(
            driver, "wf", [task("a", queue="q1"), task("b", "a", queue="q2")], notify=["q1"]
        )
        got = await notes(driver, listener, "marker")
    assert got == [(INSERT_CHANNEL, {"queue": "q1"})]


@case
async def a_completed_run_records_its_output(driver: Driver) -> None:
    job = await insert_one(driver, queue="out")
    value = {"url": "https://example.com/ü", "sizes": [64, 1024], "ratio": 0.5, "ok": True}
    await finish(driver, job.id, output=value, seconds=10)
    assert (await get(driver, job.id)).output == value
    # A later failing run leaves it; a later completion without output clears it.
    await driver.job_retry(job.id, at(20))
    await finish(driver, job.id, JobState.RETRYABLE, seconds=30, output={"ignored": 1})
    row = await get(driver, job.id)
    assert (row.state, row.output) == ("retryable", value)
    await finish(driver, job.id, JobState.COMPLETED, seconds=40)
    assert (await get(driver, job.id)).output is None
    # Without rows too, and a plain JSON scalar.
    other = await insert_one(driver, queue="out")
    await finish(driver, other.id, output="done", rows=False)
    assert (await get(driver, other.id)).output == "done"
    # A discarded run leaves the output of an earlier completion.
    await driver.job_retry(other.id, at(50))
    await finish(driver, other.id, JobState.DISCARDED, seconds=60)
    row = await get(driver, other.id)
    assert (row.state, row.output) == ("discarded", "done")


@case
async def outcome_rows_carry_the_output(driver: Driver) -> None:
    job = await running_job(driver)
    [row] = await driver.job_set_state_if_running_many(
        [outcome(job.id, JobState.COMPLETED, output_json='{"n": 1}')], at(10)
    )
    assert isinstance(row, JobRow) and row.output == {"n": 1}


# ------------------------------------------------------------------------ promotion


async def _promotes_when_every_dep_completes(driver: Driver, rows: bool) -> None:
    wf = await insert_workflow(
        driver, "wf", task("a"), task("b"), task("c", "a", "b", queue="cq"), task("d", "c")
    )
    async with driver.open_listener(LISTENED) as listener:
        await finish(driver, wf["a"].id, rows=rows)
        assert await states(driver, wf["c"], wf["d"]) == ["pending", "pending"]
        await finish(driver, wf["b"].id, rows=rows, seconds=20)
        got = await notes(driver, listener, "marker")
    assert await states(driver, wf["c"], wf["d"]) == ["available", "pending"]
    # One statement's notifications may come in either order; its own ids in one payload.
    assert sorted(got, key=lambda n: n[0]) == [
        (FINAL_CHANNEL, {"ids": [wf["a"].id]}),
        (FINAL_CHANNEL, {"ids": [wf["b"].id]}),
        (INSERT_CHANNEL, {"queue": "cq"}),
    ]
    row = await get(driver, wf["c"].id)
    assert (row.finalized_at, row.metadata, row.workflow_deps) == (
        None,
        {},
        [wf["a"].id, wf["b"].id],
    )
    await finish(driver, wf["c"].id, seconds=30, rows=rows)
    assert await states(driver, wf["d"]) == ["available"]


@case
async def dependents_are_promoted_when_every_dep_completes(driver: Driver) -> None:
    await _promotes_when_every_dep_completes(driver, rows=True)


@case
async def dependents_are_promoted_by_completions_written_without_rows(driver: Driver) -> None:
    await _promotes_when_every_dep_completes(driver, rows=False)


@case
async def deps_completed_in_one_batch_promote_once(driver: Driver) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b"), task("c", "a", "b"))
    for name in ("a", "b"):
        await claim(driver, wf[name].id)
    written = await driver.job_set_state_if_running_many(
        [outcome(wf[n].id, JobState.COMPLETED, finalized_at=at(5)) for n in ("a", "b")],
        at(5),
        rows=False,
    )
    assert len(written) == 2
    assert await states(driver, wf["c"]) == ["available"]


@case
async def a_task_not_due_yet_is_promoted_to_scheduled(driver: Driver) -> None:
    later = at(3600)
    wf = await insert_workflow(
        driver, "wf", task("a"), task("b", "a", queue="bq", scheduled_at=later)
    )
    async with driver.open_listener(LISTENED) as listener:
        await finish(driver, wf["a"].id, seconds=10)
        got = await notes(driver, listener, "marker")
    assert got == [(FINAL_CHANNEL, {"ids": [wf["a"].id]})]  # bq is not due: no insert
    row = await get(driver, wf["b"].id)
    assert (row.state, row.scheduled_at, row.finalized_at) == ("scheduled", later, None)
    assert await driver.job_schedule(at(3601), at(3601), 10) == {"bq": 1}
    assert await states(driver, wf["b"]) == ["available"]


# ------------------------------------------------------------------------ inserting workflows


@case
async def a_workflow_id_in_use_is_refused_and_nothing_is_written(driver: Driver) -> None:
    await insert_workflow(driver, "dup", task("a"))
    before = await driver.job_list(JobListParams())
    with pytest.raises(tq.ValidationError) as info:
        await insert_workflow(driver, "dup", task("x"), task("y", "x"))
    assert info.value.field == "workflow"
    assert await driver.job_list(JobListParams()) == before
    # In a transaction, the workflow's own jobs count too.
    async with driver.transaction() as tx:
        await insert_workflow_rows(driver, "in-tx", [task("a")], ex=tx)
        with pytest.raises(tq.ValidationError):
            await insert_workflow_rows(driver, "in-tx", [task("b")], ex=tx)
    assert len(await driver.job_list(JobListParams(workflow_id="in-tx"))) == 1


@case
async def a_failed_workflow_insert_writes_nothing(driver: Driver) -> None:
    before = await driver.job_list(JobListParams())
    with pytest.raises(tq.DatabaseError):
        await insert_workflow_rows(driver, "bad", [task("a"), task("b", "a", priority=9)])
    assert await driver.job_list(JobListParams()) == before
    # The id is free: nothing of the failed insert stayed.
    assert len(await insert_workflow(driver, "bad", task("a"))) == 1


@case
async def a_workflow_inserted_in_a_rolled_back_transaction_leaves_nothing(
    driver: Driver,
) -> None:
    with pytest.raises(RuntimeError):
        async with driver.transaction() as tx:
            await insert_workflow_rows(driver, "gone", [task("a"), task("b", "a")], ex=tx)
            raise RuntimeError("roll back")
    assert await driver.job_list(JobListParams(workflow_id="gone")) == []
    assert len(await insert_workflow(driver, "gone", task("a"))) == 1


@case
async def a_unique_duplicate_task_stands_in(driver: Driver) -> None:
    existing = await insert_one(driver, queue="wf", unique_key=b"once")
    rows = await insert_workflow_rows(
        driver, "wf", [task("a", unique_key=b"once"), task("b", "a"), task("c")]
    )
    (a, a_skipped), (b, b_skipped), (c, c_skipped) = rows
    assert (a.id, a_skipped, b_skipped, c_skipped) == (existing.id, True, False, False)
    # The job that stood in is not made a task of the workflow; its dependents wait for it.
    assert (a.workflow_id, a.workflow_task) == (None, None)
    assert (b.workflow_deps, b.state) == ([existing.id], "pending")
    listed = await driver.job_list(JobListParams(workflow_id="wf"))
    assert [r.id for r in listed] == [b.id, c.id]
    await finish(driver, existing.id, seconds=10)
    assert await states(driver, b) == ["available"]


@case
async def a_completed_stand_in_promotes_its_dependents_at_once(driver: Driver) -> None:
    # The default unique states hold the key while completed.
    existing = await insert_one(driver, queue="wf", unique_key=b"done")
    await finish(driver, existing.id, seconds=10)
    async with driver.open_listener(LISTENED) as listener:
        rows = await insert_workflow_rows(
            driver,
            "wf",
            [task("a", unique_key=b"done"), task("b", "a", queue="bq"), task("c", "b")],
            now=at(20),
        )
        got = await notes(driver, listener, "marker")
    (a, a_skipped), (b, _), (c, _) = rows
    assert (a.id, a_skipped, a.state) == (existing.id, True, "completed")
    assert (b.state, c.state) == ("available", "pending")
    assert await states(driver, b, c) == ["available", "pending"]
    assert got == [(INSERT_CHANNEL, {"queue": "bq"})]


# ------------------------------------------------------------------------ the cleaner


@case
async def the_cleaner_keeps_a_dep_while_a_dependent_waits(driver: Driver) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b"), task("c", "a", "b"))
    plain = await insert_one(driver, queue="wf")
    await finish(driver, wf["a"].id, seconds=10)
    await finish(driver, plain.id, seconds=10)
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(1000), 100) == 1
    assert await states(driver, wf["a"], wf["c"]) == ["completed", "pending"]
    await finish(driver, wf["b"].id, seconds=20)
    assert await states(driver, wf["c"]) == ["available"]
    assert await driver.job_delete_finalized(JobState.COMPLETED, at(1000), 100) == 2
    assert await driver.job_get(wf["a"].id) is None
    assert await states(driver, wf["c"]) == ["available"]


# ------------------------------------------------------------------------ tq_final


@case
async def final_jobs_are_announced_on_tq_final(driver: Driver) -> None:
    done = await running_job(driver)
    done_quietly = await running_job(driver)
    retried = await running_job(driver)
    running = await running_job(driver)
    unwaited = await running_job(driver)
    queued = await insert_one(driver, queue="f")
    # Outcome writes announce the jobs somebody waits for only; the others, always.
    await driver.job_mark_waited([done.id, done_quietly.id, retried.id, running.id])
    async with driver.open_listener(LISTENED) as listener:
        await driver.job_set_state_if_running_many(
            [
                outcome(done.id, JobState.COMPLETED),
                outcome(retried.id, JobState.RETRYABLE, scheduled_at=at(60), error_json="{}"),
                outcome(unwaited.id, JobState.COMPLETED),
            ],
            at(10),
        )
        await driver.job_set_state_if_running_many(
            [outcome(done_quietly.id, JobState.COMPLETED)], at(10), rows=False
        )
        await driver.job_cancel(queued.id, at(11))
        await driver.job_cancel(running.id, at(11))  # asked to cancel: not final yet
        got = await notes(driver, listener, "marker")
    assert got == [
        (FINAL_CHANNEL, {"ids": [done.id]}),
        (FINAL_CHANNEL, {"ids": [done_quietly.id]}),
        (FINAL_CHANNEL, {"ids": [queued.id]}),
    ]


@case
async def job_mark_waited_marks_finished_jobs_and_skips_missing_ones(driver: Driver) -> None:
    # A finished job is marked too: retried before its waiter reads it, its next end
    # must be announced.
    done = await running_job(driver)
    await driver.job_set_state_if_running_many([outcome(done.id, JobState.COMPLETED)], at(5))
    queued = await insert_one(driver)
    marked = await driver.job_mark_waited([done.id, queued.id, 987654321])
    assert sorted(marked) == sorted([done.id, queued.id])
    assert await driver.job_mark_waited([queued.id]) == [queued.id]  # again: still marked
    await driver.job_retry(done.id, at(6))
    for job_id in (done.id, queued.id):
        await claim(driver, job_id, at(6))
    async with driver.open_listener(LISTENED) as listener:
        await driver.job_set_state_if_running_many(
            [
                outcome(queued.id, JobState.DISCARDED, error_json="{}"),
                outcome(done.id, JobState.COMPLETED),
            ],
            at(7),
            rows=False,
        )
        got = await notes(driver, listener, "marker")
    assert sorted(final_ids(got)) == sorted([queued.id, done.id])


@case
async def a_batch_of_final_jobs_is_announced_400_ids_at_a_time(driver: Driver) -> None:
    await driver.job_insert_fast([params(queue="big") for _ in range(450)], [], NOW)
    claimed = await driver.job_get_available("big", NOW, 450, "client-1")
    await driver.job_mark_waited([r.id for r in claimed])
    async with driver.open_listener(LISTENED) as listener:
        await driver.job_set_state_if_running_many(
            [outcome(r.id, JobState.COMPLETED) for r in claimed], at(10), rows=False
        )
        got = await notes(driver, listener, "marker")
    assert len(got) == 2
    assert sorted(final_ids(got)) == sorted(r.id for r in claimed)


@case
async def a_cascade_in_a_transaction_is_announced_at_commit(driver: Driver) -> None:
    wf = await insert_workflow(driver, "wf", task("a"), task("b", "a"))
    async with driver.open_listener(LISTENED) as listener:
        async with driver.transaction() as tx:
            await driver.job_cancel(wf["a"].id, at(5), ex=tx)
            inside = await driver.job_get(wf["b"].id, ex=tx)
            assert inside is not None and inside.state == "cancelled"
            assert await states(driver, wf["b"]) == ["pending"]  # not committed yet
            assert await notes(driver, listener, "before") == []
        got = await notes(driver, listener, "after")
    assert sorted(final_ids(got)) == [wf["a"].id, wf["b"].id]
    assert await states(driver, wf["b"]) == ["cancelled"]


@case
async def cancel_and_retry_outside_workflows_announce_as_before(driver: Driver) -> None:
    # Jobs without dependents: no workflow work, and tq_final only for the final ones.
    job = await insert_one(driver, queue="plain")
    async with driver.open_listener([*CHANNELS, FINAL_CHANNEL]) as listener:
        await driver.job_cancel(job.id, at(1))
        await driver.job_retry(job.id, at(2))
        got = await notes(driver, listener, "marker")
    assert got == [(FINAL_CHANNEL, {"ids": [job.id]}), (INSERT_CHANNEL, {"queue": "plain"})]
    assert await states(driver, job) == ["available"]


# The cases about failed and retried deps live in a module of their own (it uses the
# helpers above); importing it adds them to SUITE.
import driver_suite_workflow_failures  # noqa: E402, F401  (registers its cases)
