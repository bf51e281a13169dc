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
-- Per finalized state: the count of at most $1 rows (an index-only walk of the partial
-- index tq_job_state_finalized_at_idx that stops at $1), and the planner's estimate of the
-- state's rows: the table's row count as the planner scales it to the table's current size
-- (reltuples / relpages * pages now), times the state's frequency in the column statistics.
-- The estimate is NULL until the table has been analyzed.
WITH tbl AS (
    SELECT c.oid, n.nspname,
           CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN NULL
                ELSE c.reltuples / c.relpages
                     * greatest(pg_relation_size(c.oid) / current_setting('block_size')::int, 1)
           END AS total_rows
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
)
SELECT f.state::text,
       (SELECT count(*)
        FROM (SELECT 1 FROM tq_job j
              WHERE j.state = f.state AND j.finalized_at IS NOT NULL
              LIMIT $1) AS capped),
       (SELECT round(tbl.total_rows * coalesce(fr.freq, 0))::bigint
        FROM tbl LEFT JOIN freqs fr ON fr.state = f.state::text
        WHERE tbl.total_rows IS NOT NULL
          AND EXISTS (SELECT 1 FROM freqs))
FROM unnest('{cancelled,completed,discarded}'::tq_job_state[]) AS f(state);

-- name: job_count_finalized_since
-- Per finalized state: jobs finalized at or after $1, counting at most $2 of them (an
-- index-only range scan of tq_job_state_finalized_at_idx that stops at $2).
SELECT f.state::text,
       (SELECT count(*)
        FROM (SELECT 1 FROM tq_job j
              WHERE j.state = f.state AND j.finalized_at >= $1::timestamptz
              LIMIT $2) AS capped)
FROM unnest('{cancelled,completed,discarded}'::tq_job_state[]) AS f(state);
