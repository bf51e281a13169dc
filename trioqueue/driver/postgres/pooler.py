"""Telling whether a connection pooler stands in the way of prepared statements or LISTEN.

A transaction pooler (PgBouncer with ``pool_mode = transaction``, and the like) hands each
transaction, or each statement outside one, to whichever server session is free. Two
things trioqueue uses by default need a session of their own: named prepared statements
(a name made on one server session is missing on the next, or taken there by another
client) and LISTEN (the notifications go to a server session that other clients borrow).
Behind such a pooler a client with those settings fails only later, with errors such as
``prepared statement "tq_2" already exists``; `check_pooler` finds out at start-up. So
does a session pooler that hands a client a server session still holding the previous
client's prepared statements (PgBouncer with an empty ``server_reset_query``).

How (measured against PgBouncer 1.18, which has no SHOW command on ordinary databases and
lets LISTEN succeed, silently): a proxy hands the client a made-up backend key, so on a
direct connection the server's ``pg_backend_pid()`` equals the pid libpq was told, and
behind any proxy it does not. Behind one, two client sessions held open at once that run
on the same server session (or one client session whose server session changes) can only
mean transaction pooling; a session pooler never does that. Prepared statements are
checked by trying some: a transaction pooler that keeps them per client (PgBouncer 1.21+
with ``max_prepared_statements``) passes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import psycopg
from psycopg import errors

from ...errors import PoolerError
from .connection import PgConnection
from .pool import PgPool

__all__ = ["check_pooler", "pooler_error"]

_PID: Final = "SELECT pg_backend_pid()"
_ROUNDS: Final = 3
"""Tries at catching two client sessions on one server session. An idle PgBouncer hands
the server session just released to the next transaction (LIFO), so the first try
catches it; a busy one may not, and `pooler_error` explains what fails later."""

_LOST_STATEMENT: Final = (errors.DuplicatePreparedStatement, errors.InvalidSqlStatementName)
"""SQLSTATE 42P05 (the name is taken on the server session) and 26000 (the name is
missing there): what named prepared statements run into through such poolers."""


@asynccontextmanager
async def _second_session(pool: PgPool, conninfo: str) -> AsyncIterator[PgConnection]:
    """Another client session while the caller holds one: from the pool when it has room
    for two, else a connection of its own, closed afterwards."""
    if pool.max_size >= 2:
        async with pool.acquire() as conn:
            yield conn
        return
    async with await PgConnection.connect(conninfo) as conn:
        yield conn


async def _shares_server_sessions(a: PgConnection, b: PgConnection, pid: int) -> bool:
    """Whether client sessions ``a`` (whose last statement ran on server session ``pid``)
    and ``b`` are served by server sessions that the pooler moves between them."""
    for _ in range(_ROUNDS):
        if await b.fetchval(_PID) == pid:
            return True
        if await a.fetchval(_PID) != pid:
            return True
    return False


async def _prepared_statements_fail(a: PgConnection, b: PgConnection) -> str | None:
    """How named prepared statements fail on client sessions ``a`` and ``b``, or None if
    they work. Each makes the same name (its first) for a statement of its own, then
    each runs its own, in turns, and must get its own answer every time. Through a
    pooler that moves server sessions between clients and keeps no statements per
    client, this fails at once when the pooler is idle, and almost always when it is
    busy (a lucky pass is left to `pooler_error`); through one that hands out server
    sessions holding other clients' statements, it fails on the first name."""
    try:
        for _ in range(_ROUNDS + 1):
            for conn, n in ((a, 1), (b, 2)):
                if await conn.fetchval(f"SELECT {n}", prepare=True) != n:
                    return "a prepared statement ran another client's statement"
    except _LOST_STATEMENT as exc:
        return exc.diag.message_primary or str(exc)
    return None


async def check_pooler(pool: PgPool, conninfo: str, *, prepare: bool, listen: bool) -> None:
    """Raise `PoolerError` if the sessions of ``pool`` (made from ``conninfo``) go
    through a pooler that cannot serve what the client is set up to use: prepared
    statements (``prepare``), LISTEN (``listen``). Does nothing when it uses neither.

    Costs one round trip on a direct connection; behind a session pooler, a second
    client session (from the pool) and some twenty more round trips. Raises
    ``psycopg.Error`` if the database cannot be reached. Cancellation as for any
    statement.
    """
    if not prepare and not listen:
        return
    async with pool.acquire() as a:
        pid = await a.fetchval(_PID)
        if pid == a.backend_pid:
            return  # a direct connection: the server session is the one libpq knows
        async with _second_session(pool, conninfo) as b:
            shared = await _shares_server_sessions(a, b, pid)
            failed = await _prepared_statements_fail(a, b) if prepare else None
    if shared:
        problems = ["prepared statements"] if failed is not None else []
        if listen:
            problems.append("LISTEN/NOTIFY")
        if problems:
            raise PoolerError(problems)
    elif failed is not None:
        raise PoolerError(["prepared statements"], seen=failed)


def pooler_error(exc: psycopg.Error) -> PoolerError | None:
    """What an error that one of our own prepared statements (``tq_<n>``) ran into
    means, since a pooler is its likely cause; None for any other error. For what the
    start-up check did not catch (a pooler too busy to show itself, a pool mode changed
    on a running PgBouncer)."""
    if not isinstance(exc, _LOST_STATEMENT):
        return None
    message = exc.diag.message_primary or ""
    if '"tq_' not in message:
        return None
    return PoolerError(["prepared statements"], seen=message)
