"""Schema migrations (API.md: ``tq.migrate`` is idempotent and safe to run concurrently)."""

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
