-- Flow control queries (migration 004; docs/decisions/0003-flow-control-in-the-fetch.md).

-- name: job_get_available_limited
-- job_get_available for a queue with limits ($5, QueueLimits.to_json()): the claimed jobs
-- in run order, then a status row (NULL id) saying whether due jobs were held back and
-- when a rate window next opens.
SELECT * FROM tq_job_get_available_limited($1::text, $2::timestamptz, $3::integer, $4::text,
                                           $5::text::jsonb);

-- name: queue_limit_partitions
-- The partitions of limited queue $1 (limits $2) at $3: per partition (the global limit's
-- partitioning, else the rate limit's), the jobs running and the due jobs held back by a
-- full global partition or an exhausted rate window; the busiest $4 partitions (ties in
-- no order: the driver asks for more and breaks them itself), each row also carrying the
-- total held back over all partitions. Due jobs that have no partition
-- key yet (inserted while the limits were being stored) are not counted until they get one.
WITH cfg AS (
    SELECT (l -> 'global' ->> 'limit')::integer AS g_limit,
           coalesce((l -> 'global' ->> 'by_kind')::boolean, false) AS g_kind,
           ARRAY(SELECT jsonb_array_elements_text(coalesce(l -> 'global' -> 'by_args', '[]')))
               AS g_args,
           (l -> 'rate' ->> 'limit')::integer AS r_limit,
           make_interval(secs => coalesce((l -> 'rate' ->> 'per')::float8, 0)) AS r_per,
           coalesce((l -> 'rate' ->> 'by_kind')::boolean, false) AS r_kind,
           ARRAY(SELECT jsonb_array_elements_text(coalesce(l -> 'rate' -> 'by_args', '[]')))
               AS r_args
    FROM (SELECT $2::text::jsonb AS l) AS given
),
-- Jobs are counted per partition key first (the due ones through tq_job_limit_idx,
-- reading no job's args), and only each key is then mapped to the limits' partitions.
per_key AS (
    SELECT k, sum(running) AS running, sum(due) AS due
    FROM (
        SELECT coalesce(j.limit_key, tq_limit_key($2::text::jsonb, j.kind, j.args)) AS k,
               count(*) AS running, 0 AS due
        FROM tq_job j
        WHERE j.state = 'running' AND j.queue = $1::text
        GROUP BY 1
        UNION ALL
        SELECT j.limit_key, 0, count(*)
        FROM tq_job j
        WHERE j.state = 'available' AND j.queue = $1::text AND j.limit_key IS NOT NULL
          AND j.scheduled_at <= $3::timestamptz
        GROUP BY 1
    ) counted
    GROUP BY k
),
keys AS (
    SELECT tq_limit_project(d.k, cfg.g_kind, cfg.g_args) AS gp,
           tq_limit_project(d.k, cfg.r_kind, cfg.r_args) AS rp,
           d.running, d.due
    FROM per_key d, cfg
),
running_g AS (SELECT gp AS p, sum(running) AS n FROM keys GROUP BY gp),
started AS (
    SELECT s.partition AS p, count(*) AS n
    FROM tq_rate_start s, cfg
    WHERE s.queue = $1::text AND s.started_at > $3::timestamptz - cfg.r_per
    GROUP BY s.partition
),
per_key_held AS (
    SELECT CASE WHEN cfg.g_limit IS NOT NULL THEN d.gp ELSE d.rp END AS p,
           d.running,
           CASE WHEN (cfg.g_limit IS NOT NULL AND coalesce(rg.n, 0) >= cfg.g_limit)
                  OR (cfg.r_limit IS NOT NULL AND coalesce(st.n, 0) >= cfg.r_limit)
                THEN d.due ELSE 0 END AS held
    FROM keys d
    CROSS JOIN cfg
    LEFT JOIN running_g rg ON rg.p = d.gp
    LEFT JOIN started st ON st.p = d.rp
),
per_partition AS (
    SELECT p, sum(running) AS running, sum(held) AS held FROM per_key_held GROUP BY p
)
SELECT p, running, held, sum(held) OVER () AS held_total
FROM per_partition
WHERE running > 0 OR held > 0
ORDER BY running DESC, held DESC
FETCH FIRST ($4::integer) ROWS WITH TIES;

-- name: queue_limited
-- The queues with limits: job_insert_fast inserts their jobs by job_insert_many_keyed.
SELECT name FROM tq_queue WHERE limits IS NOT NULL;

-- name: job_insert_many_keyed
-- job_insert_many's rows, with each job's partition key from its queue's limits, and no
-- unique conflict handling: a unique job that collides fails the statement, as in a COPY.
WITH limited AS MATERIALIZED (  -- each limited queue's partition fields, read once
    SELECT q.name, (q.limits -> 'key' ->> 'by_kind')::boolean AS by_kind,
           ARRAY(SELECT jsonb_array_elements_text(q.limits -> 'key' -> 'by_args')) AS fields
    FROM tq_queue q
    WHERE q.limits IS NOT NULL
)
INSERT INTO tq_job (args, kind, max_attempts, metadata, priority, queue, scheduled_at, state,
                    tags, unique_key, unique_states, created_at, limit_key)
SELECT i.args::jsonb, i.kind, i.max_attempts, i.metadata::jsonb, i.priority, i.queue,
       i.scheduled_at, i.state::tq_job_state,
       CASE WHEN i.tags = '' THEN '{}'::varchar(255)[]
            ELSE string_to_array(i.tags, ',')::varchar(255)[] END,
       i.unique_key, i.unique_states::bit(8), $12,
       (SELECT tq_limit_key_of(lq.by_kind, lq.fields, i.kind, i.args::jsonb)
        FROM limited lq WHERE lq.name = i.queue)
FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::smallint[],
            $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::bytea[],
            $11::text[])
     AS i(args, kind, max_attempts, metadata, priority, queue, scheduled_at, state, tags,
          unique_key, unique_states);
