"""Numbered SQL migrations: ``NNN_name.up.sql`` and ``NNN_name.down.sql`` in this folder.

This package holds the SQL files and the runner only: the runner works on any connection
that has the few methods of :class:`MigrationConnection`, and imports no driver, no
embedded server and not psycopg.  The public entry points that take a database URL
(``trioqueue.migrate`` and ``trioqueue.migration_list``) connect in ``trioqueue._migrate``.

Each migration runs in its own transaction under a transaction-level advisory lock, and is
recorded in ``tq_migration``; so migrating from several processes at once is safe (they
queue on the lock, and each applies only what is still missing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from importlib import resources
from typing import Any, Literal, Protocol, final

import attrs

from ..errors import ValidationError

__all__ = [
    "Migration",
    "MigrationConnection",
    "MigrationStatus",
    "applied_versions",
    "latest_version",
    "migrate_connection",
    "migrations",
    "schema_version",
]

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


class MigrationConnection(Protocol):
    """What the runner needs of a connection (``PgConnection`` has it): ``$1, $2``
    placeholders, rows as sequences, and ``async with conn.transaction():``."""

    async def execute(self, query: str, params: Sequence[Any] | None = None) -> object: ...

    async def fetch(
        self, query: str, params: Sequence[Any] | None = None
    ) -> Sequence[Sequence[Any]]: ...

    async def fetchval(self, query: str, params: Sequence[Any] | None = None) -> Any: ...

    async def execute_script(self, sql: str) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[object]: ...


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


async def applied_versions(conn: MigrationConnection) -> set[int]:
    """The versions recorded as applied on ``conn``'s database (none before the first run)."""
    exists = await conn.fetchval("SELECT to_regclass('tq_migration') IS NOT NULL")
    if not exists:
        return set()
    return {int(r[0]) for r in await conn.fetch("SELECT version FROM tq_migration")}


async def migrate_connection(
    conn: MigrationConnection,
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
            applied = await applied_versions(conn)
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


async def schema_version(conn: MigrationConnection) -> int:
    """The newest applied migration on ``conn``'s database (0 when none)."""
    applied = await applied_versions(conn)
    return max(applied, default=0)


def latest_version() -> int:
    """The newest migration shipped (0 when none)."""
    return max((m.version for m in migrations()), default=0)
