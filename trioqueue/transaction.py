"""The application's own transaction, shared with trioqueue's ``*_tx`` calls."""

from __future__ import annotations

from typing import Any, final

__all__ = ["Transaction"]


@final
class Transaction:
    """An open database transaction from ``client.transaction()``.

    Use it for the application's own statements (``$1``-style parameters) and pass it to
    ``client.insert_tx`` and friends: everything commits together when the block exits
    normally, and rolls back together on an exception or cancellation. Do not share it
    between tasks.
    """

    def __init__(self, executor: Any, driver: Any = None) -> None:
        self._conn = executor
        self._driver = driver
        """The driver that opened it (for ``trioqueue.testing``'s reads inside it)."""

    @property
    def connection(self) -> Any:
        """The driver's executor for this transaction (a ``PgConnection`` on PostgreSQL)."""
        return self._conn

    async def execute(self, query: str, *params: Any) -> str:
        """Run a statement; return its command status (such as ``"INSERT 0 1"``)."""
        result = await self._conn.execute(query, params)
        return str(result.status)

    async def fetch(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run a query; return every row."""
        rows: list[tuple[Any, ...]] = await self._conn.fetch(query, params)
        return rows

    async def fetchrow(self, query: str, *params: Any) -> tuple[Any, ...] | None:
        """Run a query; return its first row, or None."""
        row: tuple[Any, ...] | None = await self._conn.fetchrow(query, params)
        return row

    async def fetchval(self, query: str, *params: Any) -> Any:
        """Run a query; return the first column of its first row, or None."""
        return await self._conn.fetchval(query, params)
