"""Workflows, generated (issue 17): random DAGs under failures, cancels, retries, deletes
and stops, on both drivers.

Hypothesis generates plans (``workflow_plan.plans``): one workflow of 1 to 50 tasks, each
depending on up to three earlier ones (shrinking towards a chain), some ignoring failed
deps, some scheduled a little later; each task's runs complete, raise (1 to 3 attempts),
raise JobCancel or snooze, as scripted; one or two clients (some polling only); and a
timeline of retries (of final tasks, now and then of waiting ones, some while the queue is
paused), cancels, deletes of tasks not running, pauses and resumes of the queue, soft and
hard stops and restarts. After the timeline a client works until every task is final.
``workflow_plan`` lists the invariants: a task starts only once its deps completed (or
are final, with ``ignore_failed_deps``), every snapshot of the workflow is settled (no
task waits once its deps decide it; a dep-cancelled task names a failed dep), every task
ends final, none runs twice at once, and each completed task's output is what its last run
returned.

Profiles (chosen by ``$TRIOQUEUE_SOAK``, registered here and applied per test): the
default runs 500 memory examples and 40 PostgreSQL ones; ``TRIOQUEUE_SOAK=1`` runs 3,000
and 200. Under CI (``TRIOQUEUE_CI=1``) they are derandomized, as every generated suite.
Hand-written plans run first (``WORKED``, every rule in one plan) and after (the failures
found, pinned), on both drivers.
"""

from __future__ import annotations

import pytest
from conftest import fresh_database
from hypothesis import event, example, given, settings
from support import GENERATED, GENERATED_POSTGRES, LONG, SOAK
from workflow_plan import (
    Harness,
    Plan,
    Step,
    TaskSpec,
    assert_holds,
    plans,
    run_on_memory,
    run_on_postgres,
)

PG_SCALE = 0.02
"""On PostgreSQL one plan unit is 20 ms of real time."""

settings.register_profile("trioqueue-workflow-memory", max_examples=500, **GENERATED)
settings.register_profile("trioqueue-workflow-memory-soak", max_examples=3_000, **GENERATED)
settings.register_profile("trioqueue-workflow-postgres", max_examples=40, **GENERATED_POSTGRES)
settings.register_profile(
    "trioqueue-workflow-postgres-soak", max_examples=200, **GENERATED_POSTGRES
)
MEMORY = settings.get_profile(
    "trioqueue-workflow-memory-soak" if SOAK else "trioqueue-workflow-memory"
)
POSTGRES = settings.get_profile(
    "trioqueue-workflow-postgres-soak" if SOAK else "trioqueue-workflow-postgres"
)

# Every rule in one plan, run first on both drivers: a diamond whose one side fails (its
# dependents cancelled, transitively) and a callback that ignores failed deps; a waiting
# task's dep is deleted; a completed dep is retried while a dependent waits on another; a
# client is hard-stopped and started again; then the failed task is retried, and its
# dependents come back and run.
WORKED = Plan(
    tasks=(
        TaskSpec(sleep=3.0),  # t0
        TaskSpec(deps=(0,), outcomes=("raise",), max_attempts=1),  # t1: discarded
        TaskSpec(deps=(0,), sleep=10.0),  # t2
        TaskSpec(deps=(1, 2)),  # t3: cancelled by t1, until t1 is retried
        TaskSpec(deps=(3,)),  # t4: cancelled by t3
        TaskSpec(deps=(1, 2, 3, 4), ignore_failed_deps=True),  # t5: the callback
        TaskSpec(sleep=40.0, outcomes=("snooze",)),  # t6
        TaskSpec(deps=(0, 6)),  # t7: waits on t6 again when t0 is retried
        TaskSpec(delay=100.0),  # t8
        TaskSpec(deps=(8,)),  # t9: its dep is deleted while it waits
    ),
    clients=(2, 3),
    steps=(
        Step(5.0, "delete", task=8),
        Step(20.0, "retry", task=0),
        Step(5.0, "hard_stop", 1),
        Step(5.0, "start", 1),
        Step(20.0, "retry", task=1),
    ),
)


def _statistics(harness: Harness) -> None:
    for feature, count in harness.features.items():  # see --hypothesis-show-statistics
        if count:
            event(feature)


@LONG
@MEMORY
@example(plan=WORKED)
@given(plan=plans())
def test_workflow_plans_on_memory(plan: Plan) -> None:
    harness = run_on_memory(plan)
    _statistics(harness)
    assert_holds(harness)


@LONG
@POSTGRES
@example(plan=WORKED)
@given(plan=plans(postgres=True))
def test_workflow_plans_on_postgres(plan: Plan, pg_server_url: str, template_database: str) -> None:
    with fresh_database(pg_server_url, template_database, "tq_wf") as url:
        harness = run_on_postgres(plan, url, scale=PG_SCALE)
    _statistics(harness)
    assert_holds(harness)


@pytest.mark.parametrize("driver", ["memory", "postgres"])
def test_the_worked_plan_exercises_every_rule(
    driver: str, pg_server_url: str, template_database: str
) -> None:
    """The hand-written plan through the harness, so that a broken harness shows here
    rather than as a generated failure; and it does what it is there for."""
    if driver == "memory":
        harness = run_on_memory(WORKED)
    else:
        with fresh_database(pg_server_url, template_database, "tq_wf") as url:
            harness = run_on_postgres(WORKED, url, scale=PG_SCALE)
    assert_holds(harness)
    final = {f"t{i}": row.state for i, row in harness.final_snapshot.items()}
    assert final["t1"] == "completed"  # retried: its second run completes
    assert final["t3"] == final["t4"] == final["t5"] == "completed"  # revived, then run
    assert final["t8"] == "deleted" and final["t9"] == "cancelled"
    assert harness.final_snapshot[9].cause == harness.ids[8]
    runs = {s.task for s in harness.starts if s.task in (3, 4)}
    assert runs == {3, 4}
    if driver == "memory":  # (on PostgreSQL each step's moment depends on the machine)
        f = harness.features
        assert f["deleting a dep cancelled a waiting dependent"] == 1
        assert f["a waiting dependent waits again for a retried dep"] == 1
        assert f["a task a failed dep cancelled came back and ran"] == 2
        assert f["hard stop"] == 1


# A task a failed dep cancelled, retried by hand: a task with deps waits for them again, so
# it is cancelled again at once, by the same dep; retrying that dep brings it back, and it
# runs once the dep completes. (Before, it ran at once, its deps failed.) The waits are long
# enough for PostgreSQL's real time too.
RETRIED_BEHIND_A_FAILED_DEP = Plan(
    tasks=(TaskSpec(outcomes=("raise",), max_attempts=1), TaskSpec(deps=(0,))),
    clients=(1,),
    steps=(Step(15.0, "retry", task=1), Step(15.0, "retry", task=0)),
)


# A task a failed dep cancelled whose other dep failed too, while it was cancelled: when the
# first is retried, the task must be cancelled again at once, by the other (a failed dep
# cancels the tasks waiting for it), not wait for the retried one to finish. Both drivers
# let it wait (pending, its dep t1 discarded) until t0 completed; job_wait on it blocked,
# and its own dependents waited with it.
REVIVED_BEHIND_ANOTHER_FAILED_DEP = Plan(
    tasks=(
        TaskSpec(outcomes=("raise",), max_attempts=1),  # t0: discarded at once
        TaskSpec(outcomes=("raise",), max_attempts=1, sleep=5.0),  # t1: discarded later
        TaskSpec(deps=(0, 1)),  # t2: cancelled by t0
        TaskSpec(deps=(2,)),  # t3: cancelled by t2
    ),
    clients=(2,),
    steps=(Step(15.0, "retry", task=0),),
)


def _run_pinned(plan: Plan, driver: str, pg_server_url: str, template_database: str) -> Harness:
    if driver == "memory":
        harness = run_on_memory(plan)
    else:
        with fresh_database(pg_server_url, template_database, "tq_wf") as url:
            harness = run_on_postgres(plan, url, scale=PG_SCALE)
    assert_holds(harness)
    return harness


@pytest.mark.parametrize("driver", ["memory", "postgres"])
def test_a_retried_task_whose_dep_failed_waits_for_the_dep_to_be_retried(
    driver: str, pg_server_url: str, template_database: str
) -> None:
    harness = _run_pinned(RETRIED_BEHIND_A_FAILED_DEP, driver, pg_server_url, template_database)
    assert [(s.task, s.result) for s in harness.starts] == [
        (0, "raised"),
        (0, "returned"),
        (1, "returned"),
    ]
    [retry_t1, _] = harness.acts
    assert retry_t1.after == "cancelled"
    assert harness.final_snapshot[1].state == "completed"


@pytest.mark.parametrize("driver", ["memory", "postgres"])
def test_a_task_brought_back_behind_another_failed_dep_is_cancelled_again_at_once(
    driver: str, pg_server_url: str, template_database: str
) -> None:
    harness = _run_pinned(
        REVIVED_BEHIND_ANOTHER_FAILED_DEP, driver, pg_server_url, template_database
    )
    final = harness.final_snapshot
    assert [final[i].state for i in range(4)] == [
        "completed",
        "discarded",
        "cancelled",
        "cancelled",
    ]
    assert (final[2].cause, final[3].cause) == (harness.ids[1], harness.ids[2])
