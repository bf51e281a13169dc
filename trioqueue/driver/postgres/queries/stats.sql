-- Counting jobs for the dashboard, bounded on any table size (docs/dashboard.md has the
-- EXPLAIN output of each on a table of a million finalized jobs).

-- name: job_count_live
-- Jobs per queue in every state that is not finalized: exact, from one grouped index-only
-- pass over those states' entries of tq_job_fetch_idx (its leading column is `state`).
SELECT queue, state::text, count(*)
FROM tq_job
WHERE state IN ('available', 'pending', 'retryable', 'running', 'scheduled')
GROUP BY queue, state;

-- name: job_count_finalized
-- Per finalized state: the planner's estimate of the state's rows (the table's row count as
-- the planner scales it to the table's current size, reltuples / relpages * pages now, times
-- the state's frequency in the column statistics; NULL until the table has been analyzed),
-- and, only when that estimate is NULL or below 2 * $1, an exact count of at most $1 rows
-- (a walk of tq_job_state_finalized_at_idx that stops at $1; NULL when skipped). So a big
-- table costs a few catalog lookups, and a small one is counted exactly. Each state is
-- spelled out: with a literal state the planner walks the index and stops at the limit,
-- where a joined state made it build a bitmap of every entry of the state first.
WITH tbl AS (
    SELECT CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN NULL
                ELSE c.reltuples / c.relpages
                     * greatest(pg_relation_size(c.oid) / current_setting('block_size')::int, 1)
           END AS total_rows,
           n.nspname
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'tq_job'::regclass
),
freqs AS (
    SELECT v.state, v.freq
    FROM tbl
    JOIN pg_stats s ON s.schemaname = tbl.nspname AND s.tablename = 'tq_job'
                   AND s.attname = 'state'
    CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs)
        AS v(state, freq)
),
estimates AS MATERIALIZED (
    SELECT f.state,
           CASE WHEN tbl.total_rows IS NULL OR NOT EXISTS (SELECT 1 FROM freqs) THEN NULL
                ELSE round(tbl.total_rows * coalesce(fr.freq, 0))::bigint END AS estimate
    FROM tbl
    CROSS JOIN unnest('{cancelled,completed,discarded}'::text[]) AS f(state)
    LEFT JOIN freqs fr ON fr.state = f.state
)
SELECT e.state,
       CASE WHEN e.estimate IS NULL OR e.estimate < 2 * $1::bigint THEN
           CASE e.state
               WHEN 'cancelled' THEN (SELECT count(*) FROM (
                   SELECT 1 FROM tq_job
                   WHERE state = 'cancelled' AND finalized_at IS NOT NULL LIMIT $1) AS capped)
               WHEN 'completed' THEN (SELECT count(*) FROM (
                   SELECT 1 FROM tq_job
                   WHERE state = 'completed' AND finalized_at IS NOT NULL LIMIT $1) AS capped)
               ELSE (SELECT count(*) FROM (
                   SELECT 1 FROM tq_job
                   WHERE state = 'discarded' AND finalized_at IS NOT NULL LIMIT $1) AS capped)
           END
       END,
       e.estimate
FROM estimates e
ORDER BY e.state;

-- name: job_count_finalized_since
-- Per finalized state: jobs finalized at or after $1, counting at most $2 of them (an
-- index-only range scan of tq_job_state_finalized_at_idx that stops at $2).
SELECT 'cancelled', (SELECT count(*) FROM (
    SELECT 1 FROM tq_job WHERE state = 'cancelled' AND finalized_at >= $1::timestamptz LIMIT $2
) AS capped)
UNION ALL
SELECT 'completed', (SELECT count(*) FROM (
    SELECT 1 FROM tq_job WHERE state = 'completed' AND finalized_at >= $1::timestamptz LIMIT $2
) AS capped)
UNION ALL
SELECT 'discarded', (SELECT count(*) FROM (
    SELECT 1 FROM tq_job WHERE state = 'discarded' AND finalized_at >= $1::timestamptz LIMIT $2
) AS capped);
