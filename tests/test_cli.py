"""The `trioqueue` command: migrate and demo as real subprocesses, jobs and queues in
process (``main(argv)``), the worker as a real subprocess stopped by signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio
from cli_worker import Worker, open_worker_process

import trioqueue as tq
from trioqueue._cli import common
from trioqueue.cli import main
from trioqueue.embedded import DATABASE_URL_ENV
from trioqueue.limits import GlobalLimit, QueueLimits, RateLimit


def _run(*args: str, env_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TRIOQUEUE_DATABASE_URL", None)
    if env_url is not None:
        env["TRIOQUEUE_DATABASE_URL"] = env_url
    return subprocess.run(
        [sys.executable, "-m", "trioqueue.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_migrate_up_list_down(empty_database_url: str) -> None:
    first = _run("migrate", "--database-url", empty_database_url)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    again = _run("migrate", "up", "--database-url", empty_database_url)
    assert again.returncode == 0 and "up to date" in again.stdout
    listed = _run("migrate", "list", env_url=empty_database_url)
    assert listed.returncode == 0
    assert "001 initial" in listed.stdout and "applied" in listed.stdout
    down = _run("migrate", "down", "--database-url", empty_database_url)
    assert down.returncode == 0 and "reverted" in down.stdout
    listed = _run("migrate", "list", "--database-url", empty_database_url)
    assert "pending" in listed.stdout


def test_unreachable_database_is_a_clean_error() -> None:
    result = _run("migrate", "--database-url", "postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 1
    assert result.stderr.startswith("trioqueue migrate: error: ")
    assert "Traceback" not in result.stderr


def test_python_dash_m_trioqueue_is_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trioqueue", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for command in ("migrate", "worker", "jobs", "queues", "demo", "bench"):
        assert command in result.stdout


def test_demo_runs_to_completion(database_url: str) -> None:
    result = _run("demo", "--jobs", "300", "--database-url", database_url)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "jobs worked      300" in result.stdout
    assert "start latency" in result.stdout
    assert "final states" in result.stdout
    assert "completed" in result.stdout


# ------------------------------------------------------------------ in-process helpers


@attrs.frozen
class Quick:
    kind: ClassVar[str] = "cli_quick"
    n: int = 0


@attrs.frozen
class Block:
    kind: ClassVar[str] = "cli_block"
    shielded: bool = False


WORKER_MODULE = """
from typing import ClassVar

import attrs
import trio
import trioqueue as tq


@attrs.frozen
class Quick:
    kind: ClassVar[str] = "cli_quick"
    n: int = 0


@attrs.frozen
class Block:
    kind: ClassVar[str] = "cli_block"
    shielded: bool = False


workers = tq.Workers()


@workers.worker(Quick)
async def quick(job: tq.Job[Quick]) -> None:
    await trio.sleep(0)


@workers.worker(Block, timeout=None)
async def block(job: tq.Job[Block]) -> None:
    with trio.CancelScope(shield=job.args.shielded):
        await trio.sleep_forever()


def make_workers() -> tq.Workers:
    return workers


not_workers = 42
"""


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the command line in this process; its exit code, stdout and stderr."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def _insert(url: str, *items: Any) -> list[int]:
    async with tq.open_client(url) as client:
        return [r.job.id for r in await client.insert_many(list(items))]


def insert(url: str, *items: Any) -> list[int]:
    return trio.run(_insert, url, *items)


async def _jobs(url: str) -> dict[int, tq.Job[Any]]:
    async with tq.open_client(url) as client:
        page = await client.job_list(tq.JobListParams(limit=1000))
    return {job.id: job for job in page.jobs}


def jobs_by_id(url: str) -> dict[int, tq.Job[Any]]:
    return trio.run(_jobs, url)


# ------------------------------------------------------------------ jobs and queues


def test_without_click_it_says_how_to_install() -> None:
    code = (
        "import sys; sys.modules['click'] = None; from trioqueue.cli import main; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "jobs", "list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "trioqueue: the command line needs click: pip install 'trioqueue[cli]'"
    ]


def test_jobs_list_table_filters_paging_and_json(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = insert(
        database_url,
        Quick(1),
        (Quick(2), tq.InsertOpts(queue="emails", priority=3)),
        (Block(), tq.InsertOpts(queue="emails")),
    )
    code, out, err = cli(capsys, "jobs", "list", "--database-url", database_url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "KIND", "QUEUE", "STATE", "ATTEMPT/MAX", "PRIORITY", "SCHEDULED_AT"
    ]  # fmt: skip
    assert [line.split()[:6] for line in lines[1:]] == [
        [str(ids[0]), "cli_quick", "default", "available", "0/25", "1"],
        [str(ids[1]), "cli_quick", "emails", "available", "0/25", "3"],
        [str(ids[2]), "cli_block", "emails", "available", "0/25", "1"],
    ]
    # Aligned: every column starts at the same offset on every line.
    assert len({line.index("available") for line in lines[1:]}) == 1
    assert lines[0].index("STATE") == lines[1].index("available")

    code, out, _ = cli(
        capsys, "jobs", "list", "--queue", "emails", "--kind", "cli_quick",
        "--state", "AVAILABLE", "--database-url", database_url,
    )  # fmt: skip
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == [str(ids[1])]

    code, out, err = cli(capsys, "jobs", "list", "--limit", "2", "--database-url", database_url)
    assert code == 0 and len(out.splitlines()) == 3
    assert f"--after {ids[1]}" in err
    code, out, _ = cli(
        capsys, "jobs", "list", "--after", str(ids[1]), "--json", "--database-url", database_url
    )
    document = json.loads(out)
    assert [j["id"] for j in document["jobs"]] == [ids[2]] and document["last_cursor"] == ids[2]
    job = document["jobs"][0]
    assert job["state"] == "available" and job["args"] == {"shielded": False}
    assert datetime.fromisoformat(job["scheduled_at"]).tzinfo is not None

    code, out, _ = cli(capsys, "jobs", "list", "--state", "running", "--database-url", database_url)
    assert code == 0 and out.strip() == "no jobs found"


def test_jobs_get_cancel_retry_delete(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    [first, second] = insert(database_url, Quick(1), (Quick(2), tq.InsertOpts(tags=["red"])))
    url = ("--database-url", database_url)

    code, out, _ = cli(capsys, "jobs", "get", str(second), *url)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith(" "))
    assert fields["id"] == str(second) and fields["state"] == "available"
    assert fields["tags"] == "red" and json.loads(fields["args"]) == {"n": 2}
    code, out, _ = cli(capsys, "jobs", "get", str(second), "--json", *url)
    assert code == 0 and json.loads(out)["tags"] == ["red"]

    code, out, _ = cli(capsys, "jobs", "cancel", str(first), *url)
    assert code == 0 and out.strip() == f"job {first}: cancelled"
    assert jobs_by_id(database_url)[first].state is tq.JobState.CANCELLED
    code, out, _ = cli(capsys, "jobs", "retry", str(first), *url)
    assert code == 0 and out.strip() == f"job {first}: available"
    assert jobs_by_id(database_url)[first].state is tq.JobState.AVAILABLE
    code, out, _ = cli(capsys, "jobs", "delete", str(first), *url)
    assert code == 0 and "deleted" in out
    assert first not in jobs_by_id(database_url)

    for action in ("get", "cancel", "retry", "delete"):
        code, out, err = cli(capsys, "jobs", action, str(first), *url)
        assert code == 1, action
        assert err.strip() == f"trioqueue jobs {action}: error: job {first} not found"
    code, _, err = cli(capsys, "jobs", "get", "abc", *url)
    assert code == 2 and "'ID'" in err


def test_queues_list_pause_resume(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = ("--database-url", database_url)
    code, out, _ = cli(capsys, "queues", "list", *url)
    assert code == 0 and out.strip() == "no queues found"

    code, out, _ = cli(capsys, "queues", "pause", "emails", *url)
    assert code == 0 and "created it paused" in out
    insert(database_url, (Quick(1), tq.InsertOpts(queue="emails")), Quick(2))
    code, out, _ = cli(capsys, "queues", "list", *url)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "STATUS", "AVAILABLE", "RUNNING"]
    assert lines[1].split()[:4] == ["emails", "paused", "1", "0"]
    assert len(lines) == 2  # "default" has jobs but no row: no worker ran it yet

    code, out, _ = cli(capsys, "queues", "resume", "emails", *url)
    assert code == 0 and out.strip() == "resumed queue 'emails'"
    code, out, _ = cli(capsys, "queues", "list", "--json", *url)
    [queue] = json.loads(out)["queues"]
    assert queue["name"] == "emails" and queue["paused_at"] is None
    assert (queue["available"], queue["running"]) == (1, 0)
    assert datetime.fromisoformat(queue["created_at"]).tzinfo is not None

    code, out, _ = cli(capsys, "queues", "pause", "*", *url)
    assert code == 0 and out.startswith("paused every queue")
    code, out, _ = cli(capsys, "queues", "resume", "*", *url)
    assert code == 0 and out.strip() == "resumed every queue"

    code, _, err = cli(capsys, "queues", "resume", "nope", *url)
    assert code == 1 and "no queue named 'nope' (known queues: emails)" in err
    code, _, err = cli(capsys, "queues", "pause", "Not A Queue", *url)
    assert code == 2 and "Invalid value for 'NAME'" in err


@attrs.frozen
class Call:
    kind: ClassVar[str] = "cli_call"
    customer: Any = None


async def _hold_back(url: str) -> None:
    """Queue ``calls``, one running job per customer: three claimed, four held back (the
    claims go through the driver, so no worker keeps them running); ``emails``: no limits."""
    limits = QueueLimits(GlobalLimit(1, by_args=("customer",)), RateLimit(100, 60.0, by_kind=True))
    customers = ["acme", "acme", "acme", 7, 7, "x\x1b[31m\u202e", "x\x1b[31m\u202e"]
    async with tq.open_client(url) as client:
        await client.insert_many([(Call(c), tq.InsertOpts(queue="calls")) for c in customers])
        now = datetime.now(UTC)
        await client.driver.queue_upsert("calls", now, limits)
        await client.driver.queue_upsert("emails", now)
        fetched = await client.driver.job_get_available_limited("calls", now, 10, "t", limits)
        assert len(fetched.rows) == 3 and fetched.held_back


def test_queues_list_shows_limits_held_back_and_partitions(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(_hold_back, database_url)
    url = ("--database-url", database_url)
    code, out, err = cli(capsys, "queues", "list", *url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME", "STATUS", "AVAILABLE", "RUNNING", "HELD_BACK", "PAUSED_AT", "UPDATED_AT", "LIMITS"
    ]  # fmt: skip
    calls, emails = lines[1:]
    assert calls.split()[:6] == ["calls", "active", "4", "3", "4", "-"]
    assert calls.endswith("  global 1 by args.customer; rate 100/60s by kind")
    assert emails.split()[:6] == ["emails", "active", "0", "0", "-", "-"]
    assert emails.endswith("  -")
    assert lines[0].index("LIMITS") == calls.index("global")
    assert "busiest partitions" not in out

    code, out, err = cli(capsys, "queues", "list", "--partitions", *url)
    assert code == 0, err
    assert out.splitlines()[:3] == lines  # the same table first
    section = out.split("\n\n", 1)[1].splitlines()
    assert section[0] == f"calls: busiest partitions ({calls.split('  ')[-1]})"
    assert [line.split(maxsplit=2) for line in section[1:]] == [
        ["RUNNING", "HELD_BACK", "PARTITION"],
        ["1", "2", 'args.customer="acme"'],
        ["1", "1", 'args.customer="x\\u001b[31m\\u202e"'],  # no escape reaches the terminal
        ["1", "1", "args.customer=7"],
    ]
    assert "\x1b" not in out and "\u202e" not in out
    assert "emails" not in out.split("\n\n", 1)[1]  # no limits, no section

    code, out, _ = cli(capsys, "queues", "list", "--json", *url)
    assert code == 0
    document = {q["name"]: q for q in json.loads(out)["queues"]}
    calls_json = document["calls"]
    assert calls_json["held_back"] == 4 and calls_json["running"] == 3
    assert calls_json["global_limit"] == {"limit": 1, "by_kind": False, "by_args": ["customer"]}
    assert calls_json["rate_limit"] == {"limit": 100, "per": 60.0, "by_kind": True, "by_args": []}
    assert calls_json["partitions"] == [
        {"partition": {"args.customer": "acme"}, "running": 1, "held_back": 2},
        {"partition": {"args.customer": "x\x1b[31m\u202e"}, "running": 1, "held_back": 1},
        {"partition": {"args.customer": 7}, "running": 1, "held_back": 1},
    ]
    assert document["emails"]["global_limit"] is None and document["emails"]["partitions"] == []


def test_database_url_from_the_environment(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    [job_id] = insert(database_url, Quick(1))
    monkeypatch.setenv(DATABASE_URL_ENV, database_url)
    code, out, _ = cli(capsys, "jobs", "get", str(job_id))
    assert code == 0 and out.startswith("id ")


@pytest.mark.parametrize(
    "args",
    [
        ("worker", "app:workers"),
        ("jobs", "list"),
        ("jobs", "get", "1"),
        ("queues", "list"),
        ("queues", "pause", "default"),
    ],
)
def test_commands_that_need_a_database_say_so(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert "no database: pass --database-url URL or set $TRIOQUEUE_DATABASE_URL" in err
    assert "Traceback" not in err


def test_unmigrated_database_says_run_migrate(
    empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (("jobs", "list"), ("queues", "list")):
        code, _, err = cli(capsys, *args, "--database-url", empty_database_url)
        assert code == 1
        assert "run `trioqueue migrate`" in err and len(err.strip().splitlines()) == 1


def test_unreachable_database_in_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://nobody@127.0.0.1:1/none"
    for args in (("jobs", "get", "1"), ("queues", "list")):
        code, _, err = cli(capsys, *args, "--database-url", url)
        assert code == 1
        assert err.startswith(f"trioqueue {' '.join(args[:2])}: error: ")
        assert len(err.strip().splitlines()) == 1


UNUSED_URL = "postgresql://unused@127.0.0.1:1/none"
"""Usage errors are found before any connection is made."""


@pytest.mark.parametrize("bad", ["9999999999999999999", "9223372036854775808", "-1", "²",
                                 "\uff19", "1_0", " 1", "0x1", "0"])  # fmt: skip
def test_job_ids_must_be_digits_within_bigint(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("get", "cancel", "retry", "delete"):
        code, _, err = cli(capsys, "jobs", action, "--database-url", UNUSED_URL, "--", bad)
        assert code == 2, (action, err)
        assert "Invalid value for 'ID'" in err and "Traceback" not in err
    if bad != "0":  # 0 is a fine cursor
        code, _, err = cli(capsys, "jobs", "list", "--after", bad, "--database-url", UNUSED_URL)
        assert code == 2 and "Invalid value for '--after'" in err, err


def test_closed_output_pipe_ends_quietly(database_url: str) -> None:
    """`trioqueue jobs list | head -1`: once the reader has gone, the command ends with 0 and
    says nothing (no "Broken pipe" error, no message from the interpreter's last flush)."""
    [job_id] = insert(database_url, Quick(1))
    for args in (
        ("jobs", "list"),
        ("jobs", "list", "--json"),
        ("jobs", "get", str(job_id)),
        ("jobs", "retry", str(job_id)),
        ("queues", "list"),
        ("queues", "pause", "default"),
        ("migrate", "list"),
        ("jobs", "list", "--help"),  # click's own output
    ):
        read, write = os.pipe()
        os.close(read)  # the reader has gone before the first write
        try:
            result = subprocess.run(
                [sys.executable, "-m", "trioqueue.cli", *args, "--database-url", database_url],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        finally:
            os.close(write)
        assert (result.returncode, result.stderr) == (0, ""), args


def test_ctrl_c_anywhere_is_exit_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def interrupted_in_a_nursery() -> None:
        async def child() -> None:
            raise KeyboardInterrupt

        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)

    assert common.run_trio(interrupted_in_a_nursery) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def interrupted_import(spec: str) -> tq.Workers:
        raise KeyboardInterrupt  # Ctrl-C while the worker module is imported

    monkeypatch.setattr(sys.modules["trioqueue._cli.worker"], "load_workers", interrupted_import)
    code, _, err = cli(capsys, "worker", "app:workers", "--database-url", UNUSED_URL)
    assert code == 130 and err.strip().endswith("interrupted"), err


@pytest.mark.parametrize(
    ("target", "queue", "expected"),
    [
        ("workers_mod", None, "'workers_mod' is not MODULE:ATTR"),
        ("no_such_module:workers", None, "no module named 'no_such_module'"),
        ("workers_mod:missing", None, "module 'workers_mod' has no attribute 'missing'"),
        ("workers_mod:not_workers", None, "workers_mod:not_workers is a int"),
        ("workers_mod:Quick", None, "is a type, not a trioqueue.Workers"),
        ("workers_mod:workers", "default", "'default' is not NAME=MAX_WORKERS"),
        ("workers_mod:workers", "Bad=3", "'Bad=3': queue name 'Bad' must be"),
        ("workers_mod:workers", "q=0", "'q=0': MAX_WORKERS must be an integer from 1"),
        ("workers_mod:workers", "q=lots", "'q=lots': MAX_WORKERS must be an integer"),
    ],
)
def test_worker_usage_errors(
    target: str,
    queue: str | None,
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "workers_mod.py").write_text(WORKER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "workers_mod", raising=False)
    queue_args = ("--queue", queue) if queue is not None else ()
    code, _, err = cli(capsys, "worker", target, *queue_args, "--database-url", UNUSED_URL)
    assert code == 2, err
    assert expected in err
    assert ("--queue" if queue else "MODULE:ATTR") in err


def test_worker_module_that_fails_to_import(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "broken_mod.py").write_text("workers = undefined_name\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code, _, err = cli(capsys, "worker", "broken_mod:workers", "--database-url", UNUSED_URL)
    assert code == 1
    assert "importing 'broken_mod' failed: NameError" in err and "line 1" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ the worker process


@asynccontextmanager
async def open_worker(tmp_path: Path, *args: str) -> AsyncIterator[Worker]:
    (tmp_path / "app_workers.py").write_text(WORKER_MODULE)
    async with open_worker_process(tmp_path, *args) as worker:
        yield worker


async def wait_for_states(url: str, ids: list[int], state: tq.JobState) -> None:
    async with tq.open_client(url) as client:
        while True:
            page = await client.job_list(tq.JobListParams(ids=ids))
            if [j.state for j in page.jobs] == [state] * len(ids):
                return
            await trio.sleep(0.05)


async def test_worker_works_jobs_then_stops_on_sigterm(database_url: str, tmp_path: Path) -> None:
    ids = await _insert(database_url, *[Quick(i) for i in range(20)])
    ids += await _insert(
        database_url, *[(Quick(i), tq.InsertOpts(queue="other")) for i in range(5)]
    )
    with trio.fail_after(90):
        async with open_worker(
            tmp_path, "app_workers:make_workers", "--queue", "default=5", "--queue",
            "other=2", "--database-url", database_url,
        ) as worker:  # fmt: skip
            await wait_for_states(database_url, ids, tq.JobState.COMPLETED)
            await worker.wait_for("worker started")
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 0, worker.stderr
    assert f"pid {worker.process.pid}" in worker.stderr
    assert "queues default=5, other=2" in worker.stderr
    assert "soft stop" in worker.stderr and "worker stopped" in worker.stderr
    assert "Traceback" not in worker.stderr


async def test_worker_second_signal_is_a_hard_stop(database_url: str, tmp_path: Path) -> None:
    ids = await _insert(database_url, Block())
    with trio.fail_after(90):
        async with open_worker(
            tmp_path, "app_workers:workers", "--database-url", database_url
        ) as worker:
            await wait_for_states(database_url, ids, tq.JobState.RUNNING)
            await worker.wait_for("worker started")
            assert "queues default=100" in worker.stderr
            worker.signal(signal.SIGTERM)
            await worker.wait_for("SIGTERM: soft stop")
            worker.signal(signal.SIGINT)
            assert await worker.process.wait() == 0, worker.stderr
    assert "SIGINT: hard stop" in worker.stderr and "worker stopped" in worker.stderr
    job = (await _jobs(database_url))[ids[0]]
    assert job.state is tq.JobState.AVAILABLE and job.attempt == 0 and not job.errors


async def test_worker_third_signal_exits_at_once(database_url: str, tmp_path: Path) -> None:
    ids = await _insert(database_url, Block(shielded=True))
    with trio.fail_after(90):
        async with open_worker(
            tmp_path, "app_workers:workers", "--database-url", database_url
        ) as worker:
            await wait_for_states(database_url, ids, tq.JobState.RUNNING)
            await worker.wait_for("worker started")
            worker.signal(signal.SIGTERM)
            await worker.wait_for("SIGTERM: soft stop")
            worker.signal(signal.SIGTERM)
            await worker.wait_for("SIGTERM: hard stop")
            worker.signal(signal.SIGTERM)
            assert await worker.process.wait() == 130, worker.stderr
    assert "exiting at once" in worker.stderr and "worker stopped" not in worker.stderr
    # Shielded from the hard stop, the job was still running: the rescuer's business now.
    assert (await _jobs(database_url))[ids[0]].state is tq.JobState.RUNNING
