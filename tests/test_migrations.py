"""Schema migrations (``tq.migrate`` is idempotent and safe to run concurrently)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import attrs
import pytest
import trio

import trioqueue as tq
from trioqueue.driver.postgres import PgConnection
from trioqueue.migrations import migrations

TABLES = ("tq_job", "tq_queue", "tq_leader", "tq_migration", "tq_periodic_job")
ALL = [m.version for m in migrations()]
"""Every shipped migration's version, oldest first."""


@attrs.frozen
class NoteArgs:
    kind: ClassVar[str] = "note"
    text: str


@asynccontextmanager
async def _connect(url: str) -> AsyncIterator[PgConnection]:
    # The client refuses an unmigrated database, so inspect the schema with a bare connection.
    conn = await PgConnection.connect(url)
    try:
        yield conn
    finally:
        await conn.aclose()


async def _tables(url: str) -> dict[str, bool]:
    async with _connect(url) as conn:
        return {
            name: bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", [name]))
            for name in TABLES
        }


async def _recorded_versions(url: str) -> list[int]:
    async with _connect(url) as conn:
        return [int(r[0]) for r in await conn.fetch("SELECT version FROM tq_migration ORDER BY 1")]


def _statuses(statuses: list[Any]) -> list[tuple[int, bool]]:
    return [(s.version, s.applied) for s in statuses]


async def _client_works(url: str) -> None:
    async with tq.open_client(url) as client:
        job = (await client.insert(NoteArgs("hi"))).job
        assert (await client.job_get(job.id)).args == {"text": "hi"}


async def test_migrate_empty_database_then_idempotent(empty_database_url: str) -> None:
    url = empty_database_url
    with trio.fail_after(30):
        assert await _tables(url) == dict.fromkeys(TABLES, False)
        assert await tq.migrate(url) == ALL
        assert await _tables(url) == dict.fromkeys(TABLES, True)
        assert await _recorded_versions(url) == ALL
        assert await tq.migrate(url) == []
        assert await tq.migrate(url) == []
        assert await _recorded_versions(url) == ALL
        await _client_works(url)


async def test_migrate_keeps_existing_jobs(empty_database_url: str) -> None:
    url = empty_database_url
    with trio.fail_after(30):
        await tq.migrate(url)
        async with tq.open_client(url) as client:
            job = (await client.insert(NoteArgs("keep"))).job
        assert await tq.migrate(url) == []
        async with tq.open_client(url) as client:
            assert (await client.job_get(job.id)).args == {"text": "keep"}


async def test_migration_list(empty_database_url: str) -> None:
    url = empty_database_url
    with trio.fail_after(30):
        before = await tq.migration_list(url)
        assert _statuses(before) == [(v, False) for v in ALL]
        assert all(isinstance(s.name, str) and s.name for s in before)
        # Listing changes nothing.
        assert await _tables(url) == dict.fromkeys(TABLES, False)

        await tq.migrate(url)
        after = await tq.migration_list(url)
        assert _statuses(after) == [(v, True) for v in ALL]
        assert [s.name for s in after] == [s.name for s in before]

        # Down without a target reverts only the newest.
        await tq.migrate(url, direction="down")
        assert _statuses(await tq.migration_list(url)) == [(v, v != ALL[-1]) for v in ALL]


async def test_migration_list_on_migrated_fixture(database_url: str) -> None:
    with trio.fail_after(30):
        assert _statuses(await tq.migration_list(database_url)) == [(v, True) for v in ALL]


async def test_concurrent_migrate_in_one_process(empty_database_url: str) -> None:
    url = empty_database_url
    results: list[list[int]] = []

    async def run() -> None:
        results.append(await tq.migrate(url))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(run)
        # Each migration is applied by exactly one caller; the others find it done.
        assert sorted(v for done in results for v in done) == ALL
        assert await _recorded_versions(url) == ALL
        assert await _tables(url) == dict.fromkeys(TABLES, True)
        await _client_works(url)


async def test_concurrent_migrate_in_separate_processes(empty_database_url: str) -> None:
    url = empty_database_url
    code = "import sys, trio, trioqueue; print(trio.run(trioqueue.migrate, sys.argv[1]))"
    outputs: list[str] = []

    async def run() -> None:
        proc = await trio.run_process(
            [sys.executable, "-c", code, url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        outputs.append(proc.stdout.decode().strip())

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(run)
        applied = [v for out in outputs for v in json.loads(out)]
        assert sorted(applied) == ALL
        assert await _recorded_versions(url) == ALL
        await _client_works(url)


async def test_migrate_down_and_up_again(empty_database_url: str) -> None:
    url = empty_database_url
    with trio.fail_after(30):
        await tq.migrate(url)
        await _client_works(url)

        assert await tq.migrate(url, direction="down", target_version=0) == ALL[::-1]
        tables = await _tables(url)
        assert tables["tq_job"] is False
        assert tables["tq_queue"] is False
        assert tables["tq_leader"] is False
        async with _connect(url) as conn:
            assert await conn.fetchval("SELECT to_regclass('tq_job') IS NULL") is True
            assert await conn.fetchval("SELECT to_regtype('tq_job_state') IS NULL") is True
        with pytest.raises(tq.TrioqueueError, match="migrate"):
            async with tq.open_client(url):
                pytest.fail("the client must not open")  # pragma: no cover

        # Nothing left to revert.
        assert await tq.migrate(url, direction="down") == []

        assert await tq.migrate(url) == ALL
        assert await _tables(url) == dict.fromkeys(TABLES, True)
        async with tq.open_client(url) as client:
            assert (await client.job_list()).jobs == []  # the old jobs went with the tables
        await _client_works(url)


async def test_migrate_down_to_zero(empty_database_url: str) -> None:
    url = empty_database_url
    with trio.fail_after(30):
        await tq.migrate(url)
        assert await tq.migrate(url, direction="down", target_version=0) == ALL[::-1]
        assert await _tables(url) == dict.fromkeys(TABLES, False) | {"tq_migration": True}
        assert await tq.migrate(url, target_version=1) == [1]
        assert (await _tables(url))["tq_job"] is True


async def test_migrate_down_on_empty_database(empty_database_url: str) -> None:
    with trio.fail_after(30):
        assert await tq.migrate(empty_database_url, direction="down") == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"direction": "sideways"}, "direction"),
        ({"target_version": 999}, "target_version"),
        ({"target_version": -1}, "target_version"),
    ],
)
async def test_migrate_bad_arguments(
    empty_database_url: str, kwargs: dict[str, Any], field: str
) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError, match=field):
            await tq.migrate(empty_database_url, **kwargs)
        assert await _tables(empty_database_url) == dict.fromkeys(TABLES, False)


def _other_database(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@pytest.mark.parametrize("call", [tq.migrate, tq.migration_list])
async def test_missing_database_raises_database_error(
    empty_database_url: str, call: Callable[[str], Any]
) -> None:
    if not empty_database_url.startswith(("postgresql://", "postgres://")):
        pytest.skip("needs a URL-style database address")
    url = _other_database(empty_database_url, "tq_no_such_database_here")
    with trio.fail_after(30):
        with pytest.raises(tq.DatabaseError):
            await call(url)


def test_migrate_from_a_plain_script(empty_database_url: str) -> None:
    """The README's form: a sync program calling ``trio.run(trioqueue.migrate, URL)``."""
    code = "import sys, trio, trioqueue; print(trio.run(trioqueue.migrate, sys.argv[1]))"
    first = subprocess.run(
        [sys.executable, "-c", code, empty_database_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    second = subprocess.run(
        [sys.executable, "-c", code, empty_database_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert first.stdout.strip() == str(ALL)
    assert second.stdout.strip() == "[]"


async def _job_indexes(url: str) -> dict[str, str]:
    async with _connect(url) as conn:
        rows = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tq_job'"
        )
    return {str(r[0]): str(r[1]) for r in rows}


async def test_migration_3_keeps_only_indexes_that_earn_their_writes(
    empty_database_url: str,
) -> None:
    # Every index entry costs server time on each state change of each job: version 3
    # drops the kind index and keeps the fetch index to live jobs; down restores both.
    url = empty_database_url
    with trio.fail_after(30):
        await tq.migrate(url, target_version=2)
        before = await _job_indexes(url)
        assert "tq_job_kind_idx" in before
        assert "WHERE" not in before["tq_job_fetch_idx"]

        await tq.migrate(url)
        after = await _job_indexes(url)
        assert "tq_job_kind_idx" not in after
        fetch_idx = after["tq_job_fetch_idx"]
        assert "(state, queue, priority, scheduled_at, id)" in fetch_idx
        for state in ("available", "pending", "retryable", "running", "scheduled"):
            assert f"'{state}'" in fetch_idx
        for state in ("cancelled", "completed", "discarded"):
            assert f"'{state}'" not in fetch_idx
        await _client_works(url)

        assert await tq.migrate(url, direction="down", target_version=2) == [5, 4, 3]
        assert await _job_indexes(url) == before


# Every statement that reads live jobs by state, with literal arguments for its parameters
# (None: the statement has none).
_LIVE_STATE_READERS: dict[str, str | None] = {
    "job_get_available": "'q', now(), 10, 'client-1'",
    "job_schedule": "now(), 100, now()",
    "job_get_stuck": "now(), 100, 0",
    "job_count_live": None,
    "queue_list": None,
    "job_list_live": "NULL, NULL, NULL, '{available,running}', NULL, NULL, NULL, 51, NULL",
    "job_list_desc_live": "NULL, NULL, NULL, '{running}', NULL, NULL, NULL, 51, NULL",
}


@pytest.mark.parametrize("name", sorted(_LIVE_STATE_READERS))
async def test_live_state_readers_can_use_the_partial_fetch_index(
    database_url: str, name: str
) -> None:
    # A partial index serves a query only when the query's own conditions imply the
    # index's predicate, and a prepared statement runs a generic plan, which knows no
    # parameter values. So each of these must name its states in the SQL itself.
    from trioqueue.driver.postgres.queries import QUERIES

    args = _LIVE_STATE_READERS[name]
    with trio.fail_after(30):
        async with _connect(database_url) as conn:
            await conn.execute(
                "INSERT INTO tq_job (state, max_attempts, finalized_at, args, kind)"
                " SELECT 'completed', 1, now(), '{}', 'k' FROM generate_series(1, 2000)"
            )
            await conn.execute("ANALYZE tq_job")
            await conn.execute("SET enable_seqscan = off")
            if args is None:
                plan = await conn.fetch("EXPLAIN " + QUERIES[name])
            else:
                await conn.execute("SET plan_cache_mode = force_generic_plan")
                await conn.execute("PREPARE under_test AS " + QUERIES[name])
                plan = await conn.fetch(f"EXPLAIN EXECUTE under_test({args})")
    text = "\n".join(str(r[0]) for r in plan)
    assert "tq_job_fetch_idx" in text, text


def test_schema_version_is_the_newest_migration() -> None:
    # The drivers and the client read the leaf _schema, not the runner: they must agree.
    from trioqueue import _schema, migrations

    assert _schema.SCHEMA_VERSION == migrations.latest_version()


_IMPORT_MIGRATIONS_ALONE = """
import importlib.util, json, sys, types

# Load trioqueue.migrations under a bare trioqueue package, so that trioqueue/__init__.py
# (which loads the client, the drivers and psycopg) does not run: what is loaded then is
# what the migrations package itself pulls in.
spec = importlib.util.find_spec("trioqueue")
package = types.ModuleType("trioqueue")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["trioqueue"] = package

import trioqueue.migrations

assert trioqueue.migrations.latest_version() >= 1
print(json.dumps(sorted(sys.modules)))
"""


def test_migrations_package_loads_no_driver_server_or_psycopg() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_MIGRATIONS_ALONE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = set(json.loads(out))
    assert "trioqueue.migrations" in loaded
    assert "trioqueue.client" not in loaded  # the package's __init__ did not run
    unwanted = ("psycopg", "trioqueue.embedded", "trioqueue.driver")
    found = sorted(
        m for m in loaded if m in unwanted or m.startswith(tuple(u + "." for u in unwanted))
    )
    assert not found


@attrs.frozen
class CustomerNote:
    kind: ClassVar[str] = "customer_note"
    customer: int


async def _schema_objects(url: str) -> dict[str, list[str]]:
    """The columns of tq_job and tq_queue, the tq_ tables, functions and tq_job's indexes."""
    async with _connect(url) as conn:

        async def names(query: str) -> list[str]:
            return sorted(str(r[0]) for r in await conn.fetch(query))

        return {
            "tq_job": await names(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'tq_job'"
            ),
            "tq_queue": await names(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'tq_queue'"
            ),
            "tables": await names("SELECT tablename FROM pg_tables WHERE tablename LIKE 'tq%'"),
            "functions": await names("SELECT proname FROM pg_proc WHERE proname LIKE 'tq%'"),
            "indexes": await names("SELECT indexname FROM pg_indexes WHERE tablename = 'tq_job'"),
        }


async def test_migration_4_adds_flow_control_and_down_removes_it(empty_database_url: str) -> None:
    from support import FAST, eventually

    url = empty_database_url
    with trio.fail_after(60):
        await tq.migrate(url, target_version=3)
        before = await _schema_objects(url)
        assert "limit_key" not in before["tq_job"] and "limits" not in before["tq_queue"]
        assert "tq_rate_start" not in before["tables"]
        async with _connect(url) as conn:
            # A job from before the migration: no partition key.
            await conn.execute(
                "INSERT INTO tq_job (state, max_attempts, args, kind, queue)"
                " VALUES ('available', 25, '{\"customer\": 1}', 'customer_note', 'lq')"
            )

        assert await tq.migrate(url) == [4, 5]
        after = await _schema_objects(url)
        assert "limit_key" in after["tq_job"] and "limits" in after["tq_queue"]
        assert "tq_rate_start" in after["tables"]
        assert "tq_job_limit_idx" in after["indexes"]
        assert {"tq_limit_key", "tq_job_get_available_limited"} <= set(after["functions"])

        # A client with limits works the old job and a new one.
        done: list[int] = []
        workers = tq.Workers()

        @workers.worker(CustomerNote)
        async def note(job: tq.Job[CustomerNote]) -> None:
            done.append(job.id)

        limited = tq.QueueConfig(
            max_workers=2,
            global_limit=tq.GlobalLimit(1, by_args=("customer",)),
            rate_limit=tq.RateLimit(100, 60.0),
        )
        async with tq.open_client(url, workers=workers, queues={"lq": limited}, **FAST) as client:
            await client.insert(CustomerNote(2), tq.InsertOpts(queue="lq"))
            await eventually(lambda: len(done) == 2)
            [info] = [q for q in await client.queue_list() if q.name == "lq"]
            assert info.global_limit == limited.global_limit
            assert info.rate_limit == limited.rate_limit
        async with _connect(url) as conn:
            assert await conn.fetchval("SELECT count(*) FROM tq_rate_start") == 2
            assert await conn.fetchval("SELECT limits IS NOT NULL FROM tq_queue") is True

        assert await tq.migrate(url, direction="down", target_version=3) == [5, 4]
        assert await _schema_objects(url) == before
        async with _connect(url) as conn:
            states = await conn.fetch("SELECT state::text FROM tq_job ORDER BY id")
        assert [str(s) for (s,) in states] == ["completed", "completed"]  # the jobs stay

        assert await tq.migrate(url) == [4, 5]
        await _client_works(url)


async def test_migration_5_adds_composition_and_down_removes_it(empty_database_url: str) -> None:
    from support import FAST, eventually

    url = empty_database_url
    with trio.fail_after(60):
        await tq.migrate(url, target_version=4)
        before = await _schema_objects(url)
        assert "output" not in before["tq_job"] and "workflow_id" not in before["tq_job"]
        async with _connect(url) as conn:
            await conn.execute(  # a job from before the migration
                "INSERT INTO tq_job (state, max_attempts, args, kind)"
                " VALUES ('available', 25, '{\"customer\": 1}', 'customer_note')"
            )

        assert await tq.migrate(url) == [5]
        after = await _schema_objects(url)
        assert {"output", "workflow_id", "workflow_task", "workflow_deps"} <= set(after["tq_job"])
        assert {"has_dependents", "workflow_ignore_failed"} <= set(after["tq_job"])
        assert "tq_workflow_progress" in after["tables"]
        assert {"tq_job_workflow_idx", "tq_job_workflow_deps_idx"} <= set(after["indexes"])
        assert {"tq_workflow_advance", "tq_notify_final"} <= set(after["functions"])

        # The old job runs and records its output; a workflow runs in order.
        order: list[int] = []
        workers = tq.Workers()

        @workers.worker(CustomerNote)
        async def note(job: tq.Job[CustomerNote]) -> dict[str, int]:
            order.append(job.args.customer)
            return {"customer": job.args.customer}

        async with tq.open_client(
            url, workers=workers, queues={"default": tq.QueueConfig()}, **FAST
        ) as client:
            wf = tq.Workflow()
            wf.add("first", CustomerNote(2))
            wf.add("second", CustomerNote(3), deps=["first"])
            jobs = await client.insert_workflow(wf)
            await eventually(lambda: len(order) == 3)
            done = await client.job_wait(jobs["second"].id)
            assert done.output == {"customer": 3}
        assert order.index(2) < order.index(3)

        assert await tq.migrate(url, direction="down", target_version=4) == [5]
        assert await _schema_objects(url) == before
        async with _connect(url) as conn:
            assert await conn.fetchval("SELECT count(*) FROM tq_job") == 3  # the jobs stay
        assert await tq.migrate(url) == [5]
        await _client_works(url)
