"""Workflows under concurrent writers, on PostgreSQL: what one statement sees of another's
work when it waited for a lock, and the isolation level the settling requires."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar

import attrs
import pytest
import trio

import trioqueue as tq
from trioqueue.driver.protocol import JobOutcome
from trioqueue.job import JobState


@attrs.frozen
class Step:
    kind: ClassVar[str] = "race_step"
    name: str


def _done(job_id: int, at: datetime) -> JobOutcome:
    return JobOutcome(job_id, JobState.COMPLETED, at, None, False, None, None)


async def _waiting_for_locks(client: tq.Client) -> int:
    async with client.transaction() as tx:
        found = await tx.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
    return int(found)


async def test_a_task_is_judged_by_its_progress_as_it_is_once_locked(database_url: str) -> None:
    """t waits for a and b; a completed (t's progress: one dep seen done). One transaction
    retries a (t's progress goes back to none) and holds t while a second write completes b
    and waits for t. Once the first commits, the second must read t's progress anew: read
    before the wait, it would skip a (available again) and promote t."""
    async with tq.open_client(database_url) as client:
        driver = client.driver
        wf = tq.Workflow()
        wf.add("a", Step("a"))
        wf.add("b", Step("b"))
        wf.add("t", Step("t"), deps=["a", "b"])
        jobs = await client.insert_workflow(wf)
        a, b, t = jobs["a"].id, jobs["b"].id, jobs["t"].id
        now = driver.clock()
        for job_id in (a, b):
            assert await driver.job_claim(job_id, now, "racer") is not None
        await driver.job_set_state_if_running_many([_done(a, now)], now)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                async with client.transaction() as tx:
                    retried = await driver.job_retry(a, now, ex=tx.connection)
                    assert retried is not None and retried.state == "available"
                    nursery.start_soon(driver.job_set_state_if_running_many, [_done(b, now)], now)
                    while await _waiting_for_locks(client) == 0:  # noqa: ASYNC110 - the server
                        await trio.sleep(0.01)
                # committed: the completion of b goes on

        tasks = await client.workflow_get(jobs["t"].workflow_id)
        assert tasks["a"].state is tq.JobState.AVAILABLE
        assert tasks["b"].state is tq.JobState.COMPLETED
        assert tasks["t"].state is tq.JobState.PENDING  # a runs again first
        assert t == tasks["t"].id


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
async def test_settling_refuses_to_run_on_one_snapshot(database_url: str, level: str) -> None:
    """Under REPEATABLE READ a settle would not see deps other clients completed meanwhile,
    and a task could wait for ever: it refuses, naming the level."""
    async with tq.open_client(database_url) as client:
        with pytest.raises(tq.DatabaseError, match="READ COMMITTED only"):
            async with client.transaction() as tx:
                await tx.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
                await tx.fetchval(
                    "SELECT tq_workflow_advance(ARRAY[1]::bigint[], $1)", datetime.now(UTC)
                )
        # Nothing to settle: no check, whatever the level (every outcome write calls it).
        async with client.transaction() as tx:
            await tx.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
            assert (
                await tx.fetchval(
                    "SELECT tq_workflow_advance('{}'::bigint[], $1)", datetime.now(UTC)
                )
                == 0
            )


async def test_marking_a_waited_job_skips_a_row_a_writer_holds(database_url: str) -> None:
    """job_wait's mark never waits behind a transaction that holds the job (it would
    stall every wait of the client, or deadlock with the completer): the row is skipped,
    and marked by a later round once free."""
    async with tq.open_client(database_url) as client:
        driver = client.driver
        held = (await client.insert(Step("held"))).job.id
        free = (await client.insert(Step("free"))).job.id
        with trio.fail_after(30):
            async with client.transaction() as tx:
                await tx.execute("SELECT 1 FROM tq_job WHERE id = $1 FOR UPDATE", held)
                assert await driver.job_mark_waited([held, free, 10**12]) == [free]
            assert sorted(await driver.job_mark_waited([held, free])) == sorted([free, held])
