"""A workflow whose worker process is killed mid-task (issue 17), on PostgreSQL: a
``tests/workflow_worker.py`` process runs two tasks that hold, and is SIGKILLed while they
run. They stay ``running`` until the rescuer of a client in this process (with a short
``rescue_stuck_jobs_after``) returns them: one with attempts left runs again and its
workflow completes; the other, out of attempts, is discarded and cancels its dependents
(an ``ignore_failed_deps`` one runs). Bounded by ``fail_after``; the process is killed
whatever happens.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from workflow_worker import Step, Steps, read, wait_final, working

import trioqueue as tq
from trioqueue.driver.postgres import PgConnection

S = tq.JobState
WORKER = Path(__file__).with_name("workflow_worker.py")


@asynccontextmanager
async def worker_process(url: str) -> AsyncIterator[trio.Process]:
    """A running ``workflow_worker.py`` (it has said ``ready``); SIGKILLed, if still alive,
    when the block ends."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(WORKER), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        seen = b""
        while b"ready " not in seen:
            chunk = await proc.stdout.receive_some()
            assert chunk, f"worker exited with {await proc.wait()}"
            seen += chunk
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
            assert proc.stdout is not None and proc.stdin is not None
            await proc.stdout.aclose()
            await proc.stdin.aclose()


async def test_a_killed_worker_s_task_is_rescued_and_the_workflow_completes(
    database_url: str,
) -> None:
    steps = Steps()
    retried = tq.Workflow("retried")
    retried.add("a", Step("a"))
    retried.add("b", Step("b", hold=1), deps=["a"])
    retried.add("c", Step("c"), deps=["b"])
    discarded = tq.Workflow("discarded")
    discarded.add("x", Step("x", hold=1), opts=tq.InsertOpts(max_attempts=1))
    discarded.add("y", Step("y"), deps=["x"])
    discarded.add("z", Step("z"), deps=["x"], ignore_failed_deps=True)
    with trio.fail_after(60):
        conn = await PgConnection.connect(database_url)
        async with conn:
            await conn.execute(
                "CREATE TABLE wf_runs (job_id bigint NOT NULL, attempt integer NOT NULL,"
                " pid integer NOT NULL)"
            )
            async with worker_process(database_url) as proc:
                async with tq.open_client(database_url) as inserter:
                    jobs = {
                        **await inserter.insert_workflow(retried),
                        **await inserter.insert_workflow(discarded),
                    }
                    held = {jobs["b"].id, jobs["x"].id}
                    while True:
                        rows = await conn.fetch("SELECT job_id FROM wf_runs")
                        if held <= {r[0] for r in rows}:
                            break
                        await trio.sleep(0.05)
                    proc.kill()
                    await proc.wait()
                    now = await read(inserter, jobs)
            assert now["b"].state is S.RUNNING
            assert now["x"].state is S.RUNNING
            assert now["c"].state is S.PENDING
            assert now["y"].state is S.PENDING
            runs = await conn.fetch("SELECT job_id, attempt, pid FROM wf_runs ORDER BY job_id")

        rescue = {"rescue_stuck_jobs_after": 0.5, "rescuer_interval": 0.2}
        async with working(database_url, steps, None, **rescue) as client:
            final = await wait_final(client, jobs)

    assert {r[2] for r in runs} == {proc.pid}
    assert final["b"].state is S.COMPLETED
    assert final["b"].attempt == 2
    assert [e.attempt for e in final["b"].errors] == [1]  # the rescue
    assert final["b"].metadata.get("rescue_count") == 1
    assert final["c"].state is S.COMPLETED
    assert steps.index("end", "b") < steps.index("start", "c")

    assert final["x"].state is S.DISCARDED
    assert final["y"].state is S.CANCELLED
    assert final["y"].metadata["workflow_cancelled_by"] == jobs["x"].id
    assert final["z"].state is S.COMPLETED
    assert "y" not in steps.events("start")
    assert "x" not in steps.events("start")  # only the killed process ran it
