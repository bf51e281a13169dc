"""``trioqueue.migrate`` and ``trioqueue.migration_list``: the migration runner, given a URL.

These connect (to the URL given, else ``$TRIOQUEUE_DATABASE_URL``, else a private embedded
server) and run :mod:`trioqueue.migrations`' runner on that connection, turning psycopg's
errors into ``DatabaseError``.  The runner itself stays free of drivers and servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

import psycopg
import trio

from ._urls import is_memory_url, resolve_database_url
from .driver.postgres import PgConnection
from .errors import DatabaseError
from .migrations import MigrationStatus, applied_versions, migrate_connection, migrations

__all__ = ["migrate", "migration_list"]


@asynccontextmanager
async def _connect(database_url: str | None) -> AsyncIterator[PgConnection]:
    from .embedded import open_embedded_server

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
    if is_memory_url(resolve_database_url(database_url)):
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
    if is_memory_url(resolve_database_url(database_url)):
        await trio.lowlevel.checkpoint()
        return [MigrationStatus(m.version, m.name, True) for m in migrations()]
    async with _connect(database_url) as conn:
        try:
            applied = await applied_versions(conn)
        except psycopg.Error as exc:
            raise DatabaseError("listing migrations", exc) from exc
    return [MigrationStatus(m.version, m.name, m.version in applied) for m in migrations()]
