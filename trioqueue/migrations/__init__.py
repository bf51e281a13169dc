"""Numbered SQL migrations: ``NNN_name.up.sql`` and ``NNN_name.down.sql`` in this folder.

Each migration runs in its own transaction under a transaction-level advisory lock, and is
recorded in ``tq_migration``; so running :func:`migrate` from several processes at once is
safe (they queue on the lock, and each applies only what is still missing).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal, final

import attrs
import psycopg
import trio

from ..driver.postgres import PgConnection
from ..errors import DatabaseError, ValidationError

__all__ = ["Migration", "MigrationStatus", "migrate", "migration_list", "migrations"]

# An arbitrary constant: every trioqueue migrator takes this advisory lock.
_LOCK_KEY = 0x7471_6D69  # "tqmi"

_FILE_RE = re.compile(r"^(\d{3})_([a-z0-9_]+)\.(up|down)\.sql$")

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS tq_migration (
    version    bigint PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@final
@attrs.frozen
class Migration:
    """One numbered migration with its up and down SQL."""

    version: int
    name: str
    up: str
    down: str


@final
@attrs.frozen
class MigrationStatus:
    """A migration and whether the database has it applied."""

    version: int
    name: str
    applied: bool


def migrations() -> list[Migration]:
    """Every migration shipped with trioqueue, in version order."""
    found: dict[int, dict[str, str]] = {}
    for entry in resources.files(__package__).iterdir():
        m = _FILE_RE.match(entry.name)
        if not m:
            continue
        version = int(m.group(1))
        slot = found.setdefault(version, {"name": m.group(2)})
        slot[m.group(3)] = entry.read_text(encoding="utf-8")
    result = []
    for version in sorted(found):
        slot = found[version]
        if "up" not in slot or "down" not in slot:
            raise RuntimeError(f"migration {version:03d} lacks its up or down file")
        result.append(Migration(version, slot["name"], slot["up"], slot["down"]))
    return result


async def _applied(conn: PgConnection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('tq_migration') IS NOT NULL")
    if not exists:
        return set()
    return {int(r[0]) for r in await conn.fetch("SELECT version FROM tq_migration")}


def _is_memory_url(database_url: str | None) -> bool:
    from ..driver.memory import MEMORY_URL_PREFIX
    from ..embedded import resolve_database_url

    url = resolve_database_url(database_url)
    return url is not None and url.startswith(MEMORY_URL_PREFIX)


@asynccontextmanager
async def _connect(database_url: str | None) -> AsyncIterator[PgConnection]:
    from ..embedded import open_embedded_server, resolve_database_url

    url = resolve_database_url(database_url)
    if url is None:
        async with open_embedded_server() as embedded_url:
            conn = await PgConnection.connect(embedded_url)
            try:
                yield conn
            finally:
                await conn.aclose()
        return
    try:
        conn = await PgConnection.connect(url)
    except psycopg.Error as exc:
        raise DatabaseError("connecting to run migrations", exc) from exc
    try:
        yield conn
    finally:
        await conn.aclose()


async def migrate_connection(
    conn: PgConnection,
    *,
    direction: Literal["up", "down"] = "up",
    target_version: int | None = None,
) -> list[int]:
    """Apply (``up``) or revert (``down``) migrations on ``conn``; return the versions done.

    ``up`` applies everything up to ``target_version`` (default: the newest). ``down``
    reverts down to ``target_version`` (default: only the newest applied one; 0 reverts all).

    On cancellation: each migration is atomic; those finished before stay done.
    """
    if direction not in ("up", "down"):
        raise ValidationError("direction", "must be 'up' or 'down'")
    available = migrations()
    if target_version is not None and (
        target_version < 0
        or (target_version > 0 and target_version not in {m.version for m in available})
    ):
        raise ValidationError("target_version", f"no migration {target_version}")
    done: list[int] = []
    steps = available if direction == "up" else list(reversed(available))
    for migration in steps:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", [_LOCK_KEY])
            await conn.execute_script(_BOOTSTRAP)
            applied = await _applied(conn)
            if direction == "up":
                if target_version is not None and migration.version > target_version:
                    break
                if migration.version in applied:
                    continue
                await conn.execute_script(migration.up)
                await conn.execute(
                    "INSERT INTO tq_migration (version, name) VALUES ($1, $2)",
                    [migration.version, migration.name],
                )
            else:
                if migration.version not in applied:
                    continue
                floor = target_version if target_version is not None else None
                if floor is not None and migration.version <= floor:
                    break
                await conn.execute_script(migration.down)
                await conn.execute(
                    "DELETE FROM tq_migration WHERE version = $1", [migration.version]
                )
        done.append(migration.version)
        if direction == "down" and target_version is None:
            break
    return done


async def migrate(
    database_url: str | None = None,
    *,
    direction: Literal["up", "down"] = "up",
    target_version: int | None = None,
) -> list[int]:
    """Bring the database's schema up to date (idempotent); return the versions applied.

    ``database_url`` ``None`` means ``$TRIOQUEUE_DATABASE_URL``, else the embedded server.
    Safe when several processes run it at once. Database errors are raised as
    ``DatabaseError`` naming the migration step. A ``memory://`` URL has nothing to
    migrate (the memory store always has the newest schema): returns ``[]``.
    """
    if _is_memory_url(database_url):
        await trio.lowlevel.checkpoint()
        return []
    async with _connect(database_url) as conn:
        try:
            return await migrate_connection(
                conn, direction=direction, target_version=target_version
            )
        except psycopg.Error as exc:
            raise DatabaseError(f"running migrations {direction}", exc) from exc


async def migration_list(database_url: str | None = None) -> list[MigrationStatus]:
    """Every known migration and whether it is applied (all of them, for ``memory://``)."""
    if _is_memory_url(database_url):
        await trio.lowlevel.checkpoint()
        return [MigrationStatus(m.version, m.name, True) for m in migrations()]
    async with _connect(database_url) as conn:
        try:
            applied = await _applied(conn)
        except psycopg.Error as exc:
            raise DatabaseError("listing migrations", exc) from exc
    return [MigrationStatus(m.version, m.name, m.version in applied) for m in migrations()]


async def schema_version(conn: PgConnection) -> int:
    """The newest applied migration on ``conn``'s database (0 when none)."""
    applied = await _applied(conn)
    return max(applied, default=0)


def latest_version() -> int:
    return max((m.version for m in migrations()), default=0)
