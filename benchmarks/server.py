"""The PostgreSQL server the benchmarks run on: the one given, else a temporary embedded
one; a fresh database per measurement, and its transaction counts."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

from .common import URL_ENV, log


def with_dbname(url: str, dbname: str) -> str:
    if url.startswith(("postgresql://", "postgres://")):
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


class Server:
    """Admin operations on the benchmark's server, through ``url``'s own database."""

    def __init__(self, url: str, where: str) -> None:
        self.url = url
        self.where = where
        self._names = itertools.count(1)
        self._tag = f"{os.getpid()}"

    def _admin(self, statement: sql.Composable | str, params: Any = None) -> list[Any]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def settings(self) -> dict[str, str]:
        names = (
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "shared_buffers",
            "max_connections",
        )
        out = {}
        for name in names:
            out[name] = str(self._admin(f"SHOW {name}")[0][0])
        return out

    @contextlib.contextmanager
    def database(self, label: str) -> Iterator[tuple[str, str]]:
        """A fresh, empty database for one measurement; dropped afterwards."""
        name = f"tqbench_{self._tag}_{next(self._names)}_{label}"[:63]
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name, with_dbname(self.url, name)
        finally:
            self._admin(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def transactions(self, dbname: str) -> int:
        """Committed + rolled back transactions of ``dbname`` so far, read once no session
        is connected to it (a backend flushes its counters when it exits) and the count
        holds still."""
        deadline = time.monotonic() + 10
        last: int | None = None
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = %(d)s),"
                    " (SELECT xact_commit + xact_rollback FROM pg_stat_database"
                    "  WHERE datname = %(d)s)",
                    {"d": dbname},
                ).fetchone()
                assert row is not None
                busy, value = int(row[0]), int(row[1])
                if busy == 0 and value == last:
                    return value
                if time.monotonic() > deadline:
                    return value
                last = value if busy == 0 else None
                time.sleep(0.1)

    def fill_finalized(self, url: str, rows: int) -> float:
        """Insert ``rows`` completed jobs (finalized within the last hour, so the cleaner
        leaves them alone) into the default queue, then VACUUM ANALYZE; returns seconds."""
        start = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                """
                INSERT INTO tq_job (state, attempt, max_attempts, attempted_at, attempted_by,
                                    created_at, finalized_at, scheduled_at, args, kind, queue)
                SELECT 'completed', 1, 25, t, '{filler}', t, t, t,
                       jsonb_build_object('i', g), 'bench_noop', 'default'
                FROM generate_series(1, %(rows)s) AS g,
                     LATERAL (SELECT now() - (g %% 3600) * interval '1 second' AS t) AS x
                """,
                {"rows": rows},
            )
            conn.execute("VACUUM ANALYZE tq_job")
        return time.perf_counter() - start


@contextlib.contextmanager
def open_server(url: str | None) -> Iterator[Server]:
    url = url or os.environ.get(URL_ENV) or None
    if url is not None:
        yield Server(url, "given URL")
        return
    from trioqueue.embedded import EmbeddedServer

    log("starting a temporary embedded PostgreSQL server")
    with EmbeddedServer(temporary=True) as server:
        yield Server(server.url, "embedded (trioqueue.embedded, temporary, tmpfs if available)")
