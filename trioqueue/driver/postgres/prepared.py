"""The named prepared statements of one session: made on first use, for each combination
of parameter types, and reused for as long as the session lasts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import psycopg
from psycopg import errors, generators, pq
from psycopg.pq.abc import PGresult

if TYPE_CHECKING:
    from .connection import PgConnection

__all__ = ["PreparedStatements"]

MAX_PREPARED: Final = 256
"""Prepared statements kept per session; past this, statements run unprepared."""

_ENCODING: Final = "utf-8"


class PreparedStatements:
    """One session's prepared statements, by query text and parameter types."""

    __slots__ = ("_names", "_seq")

    def __init__(self) -> None:
        self._names: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._names)

    async def name(self, conn: PgConnection, query: str, types: Sequence[int]) -> bytes | None:
        """The name of ``query`` prepared for these parameter types on ``conn``'s session,
        preparing it first if need be (one extra round trip, once); None once the cache
        is full. The caller holds the connection's statement lock."""
        key = (query, tuple(types))
        name = self._names.get(key)
        if name is not None or len(self._names) >= MAX_PREPARED:
            return name
        # A fresh name per attempt: a prepare cancelled midway may or may not exist.
        self._seq += 1
        name = b"tq_%d" % self._seq
        pgconn = conn._usable()
        try:
            pgconn.send_prepare(name, query.encode(_ENCODING), param_types=types)
        except psycopg.OperationalError:
            raise conn._broke("sending the query failed") from None
        results: list[PGresult] = await conn._run(generators.execute(pgconn))
        for res in results:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                raise errors.error_from_result(res, encoding=_ENCODING)
        self._names[key] = name
        return name
