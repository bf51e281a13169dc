"""``trioqueue worker`` as a production process: WorkerSettings targets, flags over
settings, signals, the health endpoint and JSON logs.

The worker runs as a real subprocess (``python -m trioqueue worker``) on tests/worker_app.py,
with this folder as its working directory; everything its jobs do is read back from the
database. Loading, flags, the health responder and the JSON formatter are also tested in
process, where they are quick.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio
import worker_app
from cli_worker import Worker, open_worker_process
from worker_app import Gate, Notify, Order

import trioqueue as tq
from trioqueue._cli.health import listening_addresses, open_health_listeners, serve_health
from trioqueue._cli.logs import JsonFormatter
from trioqueue._cli.worker import load_workers, worker_settings
from trioqueue.cli import main

APP_DIR = Path(__file__).parent
UNUSED_URL = "postgresql://unused@127.0.0.1:1/none"
RETRYING = "start-up: connecting to the database failed (attempt 1), retrying"
STOP_BOUND = 10
"""Seconds a stop during start-up may take before the test fails: well under the 30 s
of the default ``startup_timeout`` that a start-up deaf to signals would retry for."""


# The args of tests/worker_edge_app.py's kinds, which the tests insert but never import
# (importing that module configures logging).


@attrs.frozen
class EdgeStopSelf:
    kind: ClassVar[str] = "edge_stop_self"
    cancel: bool


@attrs.frozen
class EdgeExplode:
    kind: ClassVar[str] = "edge_explode"


@attrs.frozen
class EdgeInterrupt:
    kind: ClassVar[str] = "edge_interrupt"


# ------------------------------------------------------------------ helpers


@asynccontextmanager
async def open_worker(*args: str) -> AsyncIterator[Worker]:
    async with open_worker_process(APP_DIR, *args) as worker:
        yield worker


async def http(port: int, path: str = "/healthz", method: str = "GET") -> tuple[int, str]:
    """One request to 127.0.0.1:``port``: the response's status and body."""
    return await raw_http(port, f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())


async def raw_http(port: int, request: bytes) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode()
    assert status_line.startswith("HTTP/1.1 "), data
    return int(status_line.split(" ")[1]), body.decode()


@contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def json_records(stderr: str) -> list[dict[str, Any]]:
    """Every line of ``stderr`` as the JSON object it must be."""
    records = [json.loads(line) for line in stderr.splitlines()]
    assert records and all(isinstance(r, dict) for r in records), stderr
    return records


async def create_tables(url: str) -> None:
    async with tq.open_client(url) as client, client.transaction() as tx:
        for statement in worker_app.TABLES.strip().split(";"):
            if statement.strip():
                await tx.execute(statement)


async def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    async with tq.open_client(url) as client, client.transaction() as tx:
        return await tx.fetch(sql, *params)


async def jobs(url: str, **filters: Any) -> list[tq.Job[Any]]:
    async with tq.open_client(url, args_types=[Order, Notify, Gate]) as client:
        page = await client.job_list(tq.JobListParams(limit=1000, **filters))
    return page.jobs


async def until(check: Callable[[], Any]) -> None:
    """Wait until the async ``check()`` returns something true (callers bound the time)."""
    while True:
        if await check():
            return
        await trio.sleep(0.1)


def in_state(url: str, ids: list[int], state: tq.JobState) -> Callable[[], Any]:
    async def check() -> bool:
        return await states(url, ids) == [state] * len(ids)

    return check


async def states(url: str, ids: list[int]) -> list[tq.JobState]:
    return [job.state for job in await jobs(url, ids=ids)]


# ------------------------------------------------------------------ the whole process


async def test_settings_worker_runs_periodic_jobs_middleware_and_follow_ups(
    database_url: str,
) -> None:
    """The issue's "done when": WorkerSettings with a periodic job, middleware and a job
    that inserts its follow-up through current_client(); SIGTERM; exit 0, nothing running."""
    await create_tables(database_url)
    async with tq.open_client(database_url) as client:
        orders = [r.job.id for r in await client.insert_many([Order(1), Order(2)])]
        gate = (await client.insert(Gate("release"))).job.id
    with trio.fail_after(90):
        async with open_worker(
            "worker_app:settings", "--database-url", database_url, "--health-port", "0"
        ) as worker:
            port = await worker.health_port()
            await worker.wait_for("worker started")

            async def all_three_worked() -> bool:
                notified = await jobs(database_url, kinds=["app_notify"])
                ticks = await jobs(database_url, kinds=["app_tick"])
                marked = {kind for (kind,) in await query(
                    database_url, "SELECT kind FROM worker_app_marks WHERE note = 'worked'"
                )}  # fmt: skip
                return (
                    await states(database_url, orders) == [tq.JobState.COMPLETED] * 2
                    and sorted(j.args.number for j in notified if j.state is tq.JobState.COMPLETED)
                    == [1, 2]
                    and any(j.state is tq.JobState.COMPLETED for j in ticks)
                    and {"app_order", "app_notify", "app_tick"} <= marked
                    and await states(database_url, [gate]) == [tq.JobState.RUNNING]
                )

            await until(all_three_worked)
            assert await http(port) == (200, "ok\n")
            assert (await http(port, "/"))[0] == 404

            worker.signal(signal.SIGTERM)
            await worker.wait_for("SIGTERM: soft stop")
            # The gate job keeps the soft stop going: the endpoint says so.
            assert await http(port) == (503, "stopping\n")
            await query(database_url, "INSERT INTO worker_app_gates VALUES ('release')")
            assert await worker.process.wait() == 0, worker.stderr

    ticks = await jobs(database_url, kinds=["app_tick"])
    assert all(j.metadata["periodic_job_id"] == "app-tick" for j in ticks)
    notified = await jobs(database_url, kinds=["app_notify"])
    assert sorted(type(j.args).__name__ for j in notified) == ["Notify", "Notify"]
    assert await states(database_url, [gate]) == [tq.JobState.COMPLETED]
    assert not await jobs(database_url, states=[tq.JobState.RUNNING])
    assert "periodic jobs 1" in worker.stderr and "queues default=10, other=3" in worker.stderr
    assert "worker stopped" in worker.stderr and "Traceback" not in worker.stderr


async def test_three_worker_processes_configured_alike_insert_each_run_once(
    database_url: str,
) -> None:
    """Three ``trioqueue worker`` processes with one periodic job (every 0.5 s): whichever
    of them leads, each run time gets exactly one job."""
    await create_tables(database_url)

    async def ticks() -> list[tq.Job[Any]]:
        return await jobs(database_url, kinds=["app_tick"])

    with trio.fail_after(120):
        async with (
            open_worker("worker_app:settings", "--database-url", database_url) as one,
            open_worker("worker_app:settings", "--database-url", database_url) as two,
            open_worker("worker_app:settings", "--database-url", database_url) as three,
        ):
            for worker in (one, two, three):
                await worker.wait_for("worker started")

            async def enough() -> bool:
                return len(await ticks()) >= 8

            await until(enough)
            for worker in (one, two, three):
                worker.signal(signal.SIGTERM)
            for worker in (one, two, three):
                assert await worker.process.wait() == 0, worker.stderr
    run_times = [j.metadata["periodic_run_at"] for j in await ticks()]
    assert len(run_times) == len(set(run_times)) >= 8
    assert not await jobs(database_url, states=[tq.JobState.RUNNING])


async def test_flags_override_the_settings_and_logs_are_json(database_url: str) -> None:
    await create_tables(database_url)
    async with tq.open_client(database_url) as client:
        in_default = (await client.insert(Notify(1))).job.id
        in_other = (await client.insert(Notify(2), tq.InsertOpts(queue="other"))).job.id
    with trio.fail_after(90):
        async with open_worker(
            "worker_app:make_settings", "--database-url", database_url,
            "--queue", "other=2", "--id", "cli-override-1",
            "--log-format", "json", "--log-level", "debug",
        ) as worker:  # fmt: skip
            await until(in_state(database_url, [in_other], tq.JobState.COMPLETED))
            await worker.wait_for('"worker started')
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 0, worker.stderr

    (other,) = await jobs(database_url, ids=[in_other])
    assert other.attempted_by == ["cli-override-1"]
    # Only the queue named by --queue was worked.
    assert await states(database_url, [in_default]) == [tq.JobState.AVAILABLE]

    records = [json.loads(line) for line in worker.stderr.splitlines() if line.strip()]
    assert records, worker.stderr
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
    started = next(r for r in records if r["message"].startswith("worker started"))
    assert "client cli-override-1" in started["message"]
    assert "queues other=2" in started["message"] and started["level"] == "INFO"
    finished = [r for r in records if r.get("job_id") == in_other]
    assert finished and finished[0]["outcome"] == "completed", records
    assert finished[0]["logger"] == "trioqueue.executor" and finished[0]["kind"] == "app_notify"


async def test_second_sigterm_is_a_hard_stop(database_url: str) -> None:
    await create_tables(database_url)
    async with tq.open_client(database_url) as client:
        gate = (await client.insert(Gate("never"))).job.id
    with trio.fail_after(90):
        async with open_worker("worker_app:settings", "--database-url", database_url) as worker:
            await worker.wait_for("worker started")
            await until(in_state(database_url, [gate], tq.JobState.RUNNING))
            worker.signal(signal.SIGTERM)
            await worker.wait_for("SIGTERM: soft stop")
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 0, worker.stderr
    assert "SIGTERM: hard stop" in worker.stderr and "worker stopped" in worker.stderr
    (job,) = await jobs(database_url, ids=[gate])
    assert job.state is tq.JobState.AVAILABLE and job.attempt == 0 and not job.errors


async def test_soft_stop_timeout_flag_turns_a_long_soft_stop_hard(database_url: str) -> None:
    await create_tables(database_url)
    async with tq.open_client(database_url) as client:
        gate = (await client.insert(Gate("never"))).job.id
    with trio.fail_after(90):
        async with open_worker(
            "worker_app:settings", "--database-url", database_url, "--soft-stop-timeout", "0.5"
        ) as worker:
            await worker.wait_for("worker started")
            await until(in_state(database_url, [gate], tq.JobState.RUNNING))
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 0, worker.stderr
    assert "soft_stop_timeout passed" in worker.stderr
    (job,) = await jobs(database_url, ids=[gate])
    assert job.state is tq.JobState.AVAILABLE and job.attempt == 0


async def test_health_says_starting_until_the_client_runs() -> None:
    """A "database" that accepts connections and never answers keeps the worker starting."""
    (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    silent_port = silent.socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, hold, [silent])
            async with open_worker(
                "worker_app:settings",
                "--database-url",
                f"postgresql://nobody@127.0.0.1:{silent_port}/none",
                "--health-port",
                "0",
            ) as worker:
                port = await worker.health_port()
                assert await http(port) == (503, "starting\n")
                # A connection attempt in flight is cut short by the stop, too.
                worker.signal(signal.SIGTERM)
                with trio.fail_after(STOP_BOUND):
                    assert await worker.process.wait() == 0, worker.stderr
            nursery.cancel_scope.cancel()
    assert "worker stopped before it started" in worker.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_during_startup_retries_stops_the_worker_with_0(
    signum: signal.Signals,
) -> None:
    """The database refuses connections: start-up retries for the default 30 s
    ``startup_timeout``, and one signal ends that at once, cleanly (nothing runs yet)."""
    with refusing_port() as db_port, trio.fail_after(60):
        async with open_worker(
            "worker_app:settings",
            "--database-url",
            f"postgresql://nobody@127.0.0.1:{db_port}/none",
            "--health-port",
            "0",
        ) as worker:
            port = await worker.health_port()
            await worker.wait_for(RETRYING)
            assert await http(port) == (503, "starting\n")
            worker.signal(signum)
            with trio.fail_after(STOP_BOUND):
                assert await worker.process.wait() == 0, worker.stderr
    assert f"{signum.name}: start-up cancelled" in worker.stderr
    assert "worker stopped before it started" in worker.stderr
    assert "worker started" not in worker.stderr
    assert "error" not in worker.stderr and "Traceback" not in worker.stderr


async def test_a_stop_signal_mid_startup_on_a_working_database_stops_it_with_0(
    database_url: str,
) -> None:
    """The database works, but the test holds a lock that registering the queues waits
    for: the worker is caught mid start-up, connected, for as long as the test likes."""
    queue_waits = (
        "SELECT count(*) FROM pg_locks WHERE relation = 'tq_queue'::regclass AND NOT granted"
    )

    async def registering_waits() -> bool:
        return (await query(database_url, queue_waits))[0][0] > 0

    with trio.fail_after(60):
        async with tq.open_client(database_url) as holder, holder.transaction() as tx:
            await tx.execute("LOCK TABLE tq_queue IN EXCLUSIVE MODE")
            async with open_worker(
                "worker_app:settings", "--database-url", database_url, "--health-port", "0"
            ) as worker:
                port = await worker.health_port()
                await until(registering_waits)
                assert await http(port) == (503, "starting\n")
                worker.signal(signal.SIGTERM)
                with trio.fail_after(STOP_BOUND):
                    assert await worker.process.wait() == 0, worker.stderr
            # The registration was cancelled, not left waiting for the lock.
            assert not await registering_waits()
    assert "SIGTERM: start-up cancelled" in worker.stderr
    assert "worker stopped before it started" in worker.stderr
    assert "worker started" not in worker.stderr and "Traceback" not in worker.stderr
    assert not await query(database_url, "SELECT name FROM tq_queue")


@pytest.mark.parametrize("cancel", [True, False])
async def test_a_client_stopped_from_a_job_ends_the_process_with_0(
    database_url: str, cancel: bool
) -> None:
    """``current_client().stop()`` from a job: called from inside the client, it starts the
    stop and returns (before, a soft stop waited for the calling job, that is on itself,
    for ever); the process exits 0 without a soft_stop_timeout."""
    async with tq.open_client(database_url) as client:
        stopper = (await client.insert(EdgeStopSelf(cancel))).job.id
    with trio.fail_after(60):
        async with open_worker(
            "worker_edge_app:settings", "--database-url", database_url
        ) as worker:
            assert await worker.process.wait() == 0, worker.stderr
    assert "the client was stopped from within (not by a signal)" in worker.stderr
    assert "worker stopped: pid" in worker.stderr and "Traceback" not in worker.stderr
    (job,) = await jobs(database_url, ids=[stopper])
    if cancel:
        # The hard stop cancelled the job that asked for it: back to available, attempt
        # given back.
        assert job.state is tq.JobState.AVAILABLE and job.attempt == 0
    else:
        # The soft stop let it finish.
        assert job.state is tq.JobState.COMPLETED


async def test_a_client_that_fails_ends_the_process_with_1(database_url: str) -> None:
    async with tq.open_client(database_url) as client:
        await client.insert(EdgeExplode())
    with trio.fail_after(60):
        async with open_worker(
            "worker_edge_app:settings", "--database-url", database_url
        ) as worker:
            assert await worker.process.wait() == 1, worker.stderr
    assert "EdgeFailure: the error handler gave up on everything" in worker.stderr
    assert "worker stopped" not in worker.stderr


async def test_logging_flags_hold_for_a_module_that_logs_at_import(database_url: str) -> None:
    """worker_edge_app calls logging.basicConfig() and logs as it is imported: the
    worker's logging is in place before, so the module's set-up does nothing."""
    with trio.fail_after(60):
        async with open_worker(
            "worker_edge_app:settings", "--database-url", database_url,
            "--log-format", "json", "--log-level", "debug",
        ) as worker:  # fmt: skip
            await worker.wait_for('"worker started')
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 0, worker.stderr
    records = json_records(worker.stderr)
    at_import = [r for r in records if r["logger"] == "worker_edge_app"]
    assert [(r["level"], r["message"]) for r in at_import] == [
        ("DEBUG", "worker_edge_app: debug at import"),
        ("WARNING", "worker_edge_app: warning at import"),
    ], records
    assert any(r["message"].startswith("worker stopped: pid") for r in records)

    with refusing_port() as db_port, trio.fail_after(60):
        async with open_worker(
            "worker_edge_app:settings", "--database-url",
            f"postgresql://nobody@127.0.0.1:{db_port}/none", "--log-level", "warning",
        ) as worker:  # fmt: skip
            await worker.wait_for(RETRYING)
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 0, worker.stderr
    assert " WARNING worker_edge_app: worker_edge_app: warning at import" in worker.stderr
    assert "edge_app WARNING" not in worker.stderr  # the module's own format: unused
    assert "debug at import" not in worker.stderr and " INFO " not in worker.stderr


async def test_json_mode_ends_with_json_errors_and_interruptions(database_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(60):
            async with open_worker(
                "worker_app:settings", "--database-url", UNUSED_URL,
                "--health-port", str(port), "--log-format", "json",
            ) as worker:  # fmt: skip
                assert await worker.process.wait() == 1, worker.stderr
    last = json_records(worker.stderr)[-1]
    assert last["level"] == "ERROR" and last["logger"] == "trioqueue.worker", last
    assert last["message"].startswith("trioqueue worker: error: health endpoint: cannot listen")

    # A job's KeyboardInterrupt stops the client, and the worker as interrupted (130):
    # the last line is written whatever the log level (a WARNING under --log-level error).
    for log_format, level in (("json", "info"), ("json", "error"), ("text", "info")):
        async with tq.open_client(database_url) as client:
            await client.insert(EdgeInterrupt())
        with trio.fail_after(60):
            async with open_worker(
                "worker_edge_app:settings", "--database-url", database_url,
                "--log-format", log_format, "--log-level", level,
            ) as worker:  # fmt: skip
                assert await worker.process.wait() == 130, worker.stderr
        if log_format == "json":
            last = json_records(worker.stderr)[-1]
            assert (last["level"], last["message"]) == ("WARNING", "interrupted"), last
        else:
            assert worker.stderr.endswith("\ninterrupted\n"), worker.stderr


async def test_health_port_in_use_is_a_runtime_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with trio.fail_after(60):
            async with open_worker(
                "worker_app:settings", "--database-url", UNUSED_URL, "--health-port", str(port)
            ) as worker:
                assert await worker.process.wait() == 1, worker.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in worker.stderr
    assert worker.stderr.startswith("trioqueue worker: error: health endpoint:")


# ------------------------------------------------------------------ loading and flags


@pytest.fixture
def in_app_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(APP_DIR)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.mark.parametrize("target", ["worker_app:settings", "worker_app:make_settings"])
def test_settings_targets_load_as_they_are(target: str, in_app_dir: None) -> None:
    assert load_workers(target) is worker_app.settings


@pytest.mark.parametrize("target", ["worker_app:workers", "worker_app:make_workers"])
def test_workers_targets_get_default_settings(target: str, in_app_dir: None) -> None:
    loaded = load_workers(target)
    assert loaded == tq.WorkerSettings(workers=worker_app.workers)
    assert worker_settings(loaded).queues == {"default": tq.QueueConfig(max_workers=100)}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker_app:no_workers"], "worker_app:no_workers is a trioqueue.WorkerSettings without"),
        (["worker_app:empty_workers"], "worker_app:empty_workers has no workers registered"),
        (["worker_app:not_settings"], "is a str, not a trioqueue.Workers, a trioqueue.Worker"),
        (["worker_app:Order"], "worker_app:Order is a type, not a trioqueue.Workers"),
        (["worker_app:make_async"], "worker_app:make_async is an async function"),
        (["worker_app:make_nothing"], "make_nothing() returned NoneType, not a trioqueue."),
        (["worker_app:settings", "--job-timeout", "0"], "'0' is not a number of seconds"),
        (["worker_app:settings", "--soft-stop-timeout", "nan"], "'nan' is not a number"),
        (["worker_app:settings", "--id", ""], "'--id': must be a string of 1-100 characters"),
        (["worker_app:settings", "--health-port", "70000"], "'--health-port'"),
        (["worker_app:settings", "--health-host", " "], "must be a host name or address"),
        (["worker_app:settings", "--log-format", "xml"], "'--log-format'"),
        (["worker_app:settings", "--queue", "other"], "is not NAME=MAX_WORKERS"),
    ],
)
def test_bad_targets_and_flags_are_usage_errors(
    args: list[str],
    expected: str,
    in_app_dir: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["worker", *args, "--database-url", UNUSED_URL])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert "Traceback" not in err


def test_a_target_function_that_raises_is_a_runtime_error(
    in_app_dir: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["worker", "worker_app:make_broken", "--database-url", UNUSED_URL])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "calling worker_app:make_broken() failed: RuntimeError: no settings today" in err
    assert "worker_app.py, line" in err


def test_flags_given_override_and_flags_not_given_leave_the_settings() -> None:
    base = worker_app.settings
    assert worker_settings(base) == base
    changed = worker_settings(
        base,
        queues={"other": 2, "extra": 4},
        client_id="pod-7",
        poll_only=True,
        no_prepared_statements=True,
        job_timeout=math.inf,
        soft_stop_timeout=25.0,
    )
    assert changed.queues == {
        "other": tq.QueueConfig(max_workers=2),
        "extra": tq.QueueConfig(max_workers=4),
    }
    assert (changed.id, changed.poll_only, changed.prepared_statements) == ("pod-7", True, False)
    assert (changed.job_timeout, changed.soft_stop_timeout) == (None, 25.0)
    assert changed.periodic_jobs == base.periodic_jobs and changed.workers is base.workers
    assert worker_settings(base, job_timeout=5.0).job_timeout == 5.0


# ------------------------------------------------------------------ the health responder


async def test_health_responder_answers_probes_only() -> None:
    answer = [(200, "ok")]
    listeners = await open_health_listeners("127.0.0.1", 0)
    (address,) = listening_addresses(listeners)
    port = int(address.rsplit(":", 1)[1])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_health, listeners, lambda: answer[0])
            assert await http(port) == (200, "ok\n")
            assert await http(port, "/healthz?from=kubelet") == (200, "ok\n")
            assert await http(port, method="HEAD") == (200, "")
            assert (await http(port, "/metrics"))[0] == 404
            assert (await http(port, method="POST"))[0] == 405
            assert (await raw_http(port, b"hello\r\n\r\n"))[0] == 400
            assert (await raw_http(port, b"GET /healthz HTTP/1.1\r\n" + b"x" * 9000))[0] == 400
            # A prober that goes away before asking harms nothing.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            answer[0] = (503, "stopping")
            assert await http(port) == (503, "stopping\n")
            nursery.cancel_scope.cancel()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


# ------------------------------------------------------------------ JSON log lines


def test_json_log_lines_hold_the_record_its_extras_and_its_exception() -> None:
    formatter = JsonFormatter()
    logger = logging.getLogger("trioqueue.test")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logger.makeRecord(
            "trioqueue.test",
            logging.WARNING,
            __file__,
            1,
            "job %d failed",
            (7,),
            sys.exc_info(),
            extra={
                "job_id": 7,
                "duration": math.nan,
                "when": datetime(2026, 1, 2, tzinfo=UTC),
                "thing": object(),
                "level": "not the level",
            },
        )
    line = formatter.format(record)
    assert "\n" not in line
    document = json.loads(line)
    assert document["level"] == "WARNING" and document["logger"] == "trioqueue.test"
    assert document["message"] == "job 7 failed"
    assert datetime.fromisoformat(document["time"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert "ValueError: boom\nsecond line" in document["exception"]
    assert document["job_id"] == 7 and document["duration"] == "nan"
    assert document["when"] == "2026-01-02T00:00:00+00:00"
    assert document["thing"].startswith("<object object")
    plain = json.loads(formatter.format(logging.makeLogRecord({"msg": "hi"})))
    assert set(plain) == {"time", "level", "logger", "message"}
