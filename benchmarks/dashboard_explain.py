"""EXPLAIN every dashboard query on a job table of 1,000,000 finalized and 10,000 live jobs.

    python -m benchmarks.dashboard_explain > plans.md

Starts a temporary embedded PostgreSQL server, loads the table with generate_series (about
15 s), VACUUM ANALYZEs it, then runs each query as the dashboard does (unnamed statements,
so each is planned with its actual values) under EXPLAIN (ANALYZE, BUFFERS). The findings
are in docs/dashboard.md.
"""

import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import trio

from trioqueue import migrate
from trioqueue.driver.postgres import PgConnection
from trioqueue.driver.postgres.queries import QUERIES
from trioqueue.embedded import EmbeddedServer

NOW = datetime.now(UTC)
EXPLAIN = "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, SUMMARY ON) "
LOAD = """
INSERT INTO tq_job (state, attempt, max_attempts, attempted_at, created_at, finalized_at,
                    scheduled_at, args, kind, queue, tags, attempted_by)
SELECT CASE WHEN g %% 100 = 0 THEN 'cancelled' WHEN g %% 50 = 1 THEN 'discarded'
            ELSE 'completed' END::tq_job_state,
       1, 25, %(now)s - (g * interval '80 ms'), %(now)s - (g * interval '90 ms'),
       %(now)s - (g * interval '80 ms'), %(now)s - (g * interval '90 ms'),
       jsonb_build_object('n', g, 'payload', repeat('x', 40)), 'kind_' || (g %% 20),
       'q' || (g %% 5), CASE WHEN g %% 10 = 0 THEN ARRAY['tagged']::varchar(255)[] ELSE '{}' END,
       ARRAY['worker-1']
FROM generate_series(1, 1000000) g;
INSERT INTO tq_job (state, max_attempts, created_at, scheduled_at, args, kind, queue)
SELECT CASE WHEN g %% 10 < 6 THEN 'available' WHEN g %% 10 < 8 THEN 'scheduled'
            WHEN g %% 10 = 8 THEN 'retryable' ELSE 'pending' END::tq_job_state,
       25, %(now)s,
       %(now)s + CASE WHEN g %% 10 IN (6, 7, 8) THEN interval '1 hour' ELSE interval '0' END,
       jsonb_build_object('n', g), 'kind_' || (g %% 20), 'q' || (g %% 5)
FROM generate_series(1, 10000) g;
UPDATE tq_job SET state = 'running', attempt = 1, attempted_at = %(now)s
WHERE id IN (SELECT id FROM tq_job WHERE state = 'available' ORDER BY id LIMIT 500);
UPDATE tq_job SET state = 'retryable', finalized_at = NULL
WHERE id IN (SELECT id FROM tq_job WHERE state = 'completed'
             ORDER BY id DESC LIMIT 200 OFFSET 999000);
"""


def lst(**kw: Any) -> list[Any]:
    """job_list's parameters: ids, kinds, queues, states, priorities, tags, after, limit,
    within_newest (a page of 50 plus one, as the dashboard asks)."""
    return [
        kw.get("ids"),
        kw.get("kinds"),
        kw.get("queues"),
        kw.get("states"),
        None,
        kw.get("tags"),
        kw.get("after"),
        51,
        kw.get("within"),
    ]


def cases() -> list[tuple[str, str, list[Any]]]:
    return [
        ("overview: live counts (job_count_live)", "job_count_live", []),
        ("overview: finalized counts (job_count_finalized)", "job_count_finalized", [10_000]),
        (
            "overview: finished in the last minute",
            "job_count_finalized_since",
            [NOW - timedelta(minutes=1), 50_000],
        ),
        (
            "overview: finished in the last hour",
            "job_count_finalized_since",
            [NOW - timedelta(hours=1), 50_000],
        ),
        ("overview: leader", "leader_get", []),
        ("queues page: queue rows", "queue_list", []),
        ("job list: no filter, first page", "job_list_desc", lst()),
        (
            "job list: no filter, a page deep down (after=500000)",
            "job_list_desc",
            lst(after=500000),
        ),
        (
            "job list: state=completed (bounded)",
            "job_list_desc",
            lst(states=["completed"], within=100_000),
        ),
        (
            "job list: state=discarded (bounded)",
            "job_list_desc",
            lst(states=["discarded"], within=100_000),
        ),
        ("job list: state=available", "job_list_desc_live", lst(states=["available"])),
        ("job list: state=running", "job_list_desc_live", lst(states=["running"])),
        (
            "job list: state=retryable (some of them the oldest jobs)",
            "job_list_desc_live",
            lst(states=["retryable"]),
        ),
        (
            "job list: state=cancelled (bounded)",
            "job_list_desc",
            lst(states=["cancelled"], within=100_000),
        ),
        (
            "job list: kind=kind_3 (bounded to newest 100,000 ids)",
            "job_list_desc",
            lst(kinds=["kind_3"], within=100_000),
        ),
        (
            "job list: kind=nosuchkind (bounded)",
            "job_list_desc",
            lst(kinds=["nosuchkind"], within=100_000),
        ),
        (
            "job list: kind=nosuchkind, NOT bounded (what the bound avoids)",
            "job_list_desc",
            lst(kinds=["nosuchkind"]),
        ),
        ("job list: tag=tagged (bounded)", "job_list_desc", lst(tags=["tagged"], within=100_000)),
        (
            "job list: tag=nosuchtag (bounded)",
            "job_list_desc",
            lst(tags=["nosuchtag"], within=100_000),
        ),
        ("job list: queue=q1 (bounded)", "job_list_desc", lst(queues=["q1"], within=100_000)),
        (
            "job list: queue=q1 & state=available",
            "job_list_desc_live",
            lst(queues=["q1"], states=["available"]),
        ),
        ("job detail (job_get)", "job_get", [123456]),
    ]


async def main(url: str) -> None:
    conn = await PgConnection.connect(url)
    try:
        out = []
        for title, name, params in cases():
            sql = QUERIES.get(name, name)
            rows = await conn.fetch(EXPLAIN + sql, params)
            plan = "\n".join(r[0] for r in rows)
            # One more plain run for a wall-clock figure.
            start = time.perf_counter()
            res = await conn.fetch(sql, params)
            ms = (time.perf_counter() - start) * 1000
            out.append(
                f"### {title}\n\n`{name}` — {ms:.1f} ms, {len(res)} rows\n\n```\n{plan}\n```\n"
            )
        print("\n".join(out))
    finally:
        await conn.aclose()


def run() -> None:
    with EmbeddedServer(temporary=True) as server:
        base = server.url
        with psycopg.connect(base, autocommit=True) as c:
            c.execute("CREATE DATABASE bench1m")
        url = base.rsplit("/", 1)[0] + "/bench1m"
        trio.run(migrate, url)
        t = time.time()
        with psycopg.connect(url, autocommit=True) as c:
            for stmt in LOAD.split(";"):
                if stmt.strip():
                    c.execute(stmt, {"now": NOW})
            c.execute("VACUUM ANALYZE tq_job")
            print("server", c.execute("SHOW server_version").fetchone()[0], file=sys.stderr)
            print(
                c.execute("SELECT state, count(*) FROM tq_job GROUP BY 1 ORDER BY 1").fetchall(),
                file=sys.stderr,
            )
            print(
                c.execute("SELECT pg_size_pretty(pg_total_relation_size('tq_job'))").fetchone(),
                file=sys.stderr,
            )
        print(f"loaded in {time.time() - t:.0f}s", file=sys.stderr)
        trio.run(main, url)


if __name__ == "__main__":
    run()
