-- trioqueue schema, version 4: flow control (global and rate limits), enforced in the fetch.
--
-- Limits are configured on the clients that work a queue (QueueConfig); each stores them
-- in its queue row, so that every client, the CLI and the dashboard can read them. The
-- fetch of a limited queue is tq_job_get_available_limited below: the design and its
-- measurements are in docs/decisions/0003-flow-control-in-the-fetch.md.

ALTER TABLE tq_queue ADD COLUMN limits jsonb;

-- Recent job starts of rate-limited queues: one row per start, kept for one window (the
-- fetch deletes what has left it). At most `limit` rows per partition per window.
CREATE TABLE tq_rate_start (
    queue      text NOT NULL,
    partition  jsonb NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX tq_rate_start_queue_idx ON tq_rate_start (queue, started_at);

-- The partition a job is in under a limit partitioned by kind and/or top-level args
-- fields: an object of those values ({"kind": ..., "args.<field>": ...}), null for a
-- field the args lack. trioqueue.limits.partition_of computes the same for the memory
-- driver.
CREATE FUNCTION tq_limit_partition(by_kind boolean, by_args text[], kind text, args jsonb)
RETURNS jsonb
LANGUAGE sql
IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN by_kind THEN jsonb_build_object('kind', kind) ELSE '{}'::jsonb END
        || CASE WHEN cardinality(by_args) = 0 THEN '{}'::jsonb
                ELSE (SELECT jsonb_object_agg('args.' || f,
                                              coalesce(args -> f, 'null'::jsonb))
                      FROM unnest(by_args) AS f)
           END;
$$;

-- Claim up to p_max due available jobs of p_queue for p_client_id, as job_get_available
-- does, without going over the limits in p_limits (QueueLimits.to_json()):
--   {"global": {"limit", "by_kind", "by_args"}, "rate": {"limit", "per", ...}}
--
-- * Fetches of one limited queue take turns: a transaction-level advisory lock, held
--   until this statement commits. Each query below runs with a fresh snapshot (a
--   volatile function under READ COMMITTED), so it sees every claim committed before
--   the lock was granted: the running counts are exact, and the limit is never passed,
--   not even for a moment. Completions, rescues and cancels only lower the counts, so
--   they need no lock.
-- * A partition that is full is filtered out while walking the fetch index, so it never
--   holds back the jobs of other partitions; within one priority, jobs are taken round
--   robin across partitions (the first of each, then the second of each, ...).
-- * The rows come back in the order to run them, then one status row whose o_id is NULL:
--   o_held_back says due jobs were left unclaimed, o_next_open when a rate window next
--   opens for them.
CREATE FUNCTION tq_job_get_available_limited(
    p_queue text, p_now timestamptz, p_max integer, p_client_id text, p_limits jsonb
)
RETURNS TABLE (
    o_id bigint, o_kind text, o_args jsonb, o_queue text, o_state text,
    o_priority smallint, o_attempt smallint, o_max_attempts smallint,
    o_attempted_at timestamptz, o_attempted_by text[], o_created_at timestamptz,
    o_finalized_at timestamptz, o_scheduled_at timestamptz, o_errors jsonb,
    o_metadata jsonb, o_tags varchar(255)[], o_held_back boolean, o_next_open timestamptz
)
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    g_limit integer := (p_limits -> 'global' ->> 'limit')::integer;
    g_kind boolean := coalesce((p_limits -> 'global' ->> 'by_kind')::boolean, false);
    g_args text[] := ARRAY(SELECT jsonb_array_elements_text(
        coalesce(p_limits -> 'global' -> 'by_args', '[]'::jsonb)));
    r_limit integer := (p_limits -> 'rate' ->> 'limit')::integer;
    r_per interval := make_interval(secs => coalesce((p_limits -> 'rate' ->> 'per')::float8, 0));
    r_kind boolean := coalesce((p_limits -> 'rate' ->> 'by_kind')::boolean, false);
    r_args text[] := ARRAY(SELECT jsonb_array_elements_text(
        coalesce(p_limits -> 'rate' -> 'by_args', '[]'::jsonb)));
    v_claimed integer;
    v_held boolean := false;
    v_next timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(74051717, hashtext(current_schema() || '.' || p_queue));
    IF EXISTS (SELECT 1 FROM tq_queue WHERE name = p_queue AND paused_at IS NOT NULL) THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::text,
            NULL::smallint, NULL::smallint, NULL::smallint, NULL::timestamptz, NULL::text[],
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::jsonb,
            NULL::jsonb, NULL::varchar(255)[], false, NULL::timestamptz;
        RETURN;
    END IF;
    IF r_limit IS NOT NULL THEN
        DELETE FROM tq_rate_start WHERE queue = p_queue AND started_at <= p_now - r_per;
    END IF;

    RETURN QUERY
    WITH running AS (
        SELECT tq_limit_partition(g_kind, g_args, j.kind, j.args) AS p, count(*) AS n
        FROM tq_job j
        WHERE g_limit IS NOT NULL AND j.state = 'running' AND j.queue = p_queue
        GROUP BY 1
    ),
    started AS (
        SELECT s.partition AS p, count(*) AS n
        FROM tq_rate_start s
        WHERE r_limit IS NOT NULL AND s.queue = p_queue
        GROUP BY 1
    ),
    candidates AS (
        SELECT c.id, c.priority, c.scheduled_at, c.gp, c.rp
        FROM (
            SELECT j.id, j.priority, j.scheduled_at,
                   tq_limit_partition(g_kind, g_args, j.kind, j.args) AS gp,
                   tq_limit_partition(r_kind, r_args, j.kind, j.args) AS rp
            FROM tq_job j
            WHERE j.state = 'available' AND j.queue = p_queue AND j.scheduled_at <= p_now
            ORDER BY j.priority, j.scheduled_at, j.id
        ) c
        WHERE (g_limit IS NULL
               OR c.gp NOT IN (SELECT ru.p FROM running ru WHERE ru.n >= g_limit))
          AND (r_limit IS NULL
               OR c.rp NOT IN (SELECT st.p FROM started st WHERE st.n >= r_limit))
        LIMIT 2 * p_max + 16
    ),
    ranked AS (
        SELECT c.id, c.priority, c.scheduled_at, c.gp, c.rp,
               row_number() OVER (PARTITION BY c.gp ORDER BY c.priority, c.scheduled_at, c.id)
                   AS rn_g,
               row_number() OVER (PARTITION BY c.rp ORDER BY c.priority, c.scheduled_at, c.id)
                   AS rn_r
        FROM candidates c
    ),
    chosen AS (
        SELECT k.id
        FROM ranked k
        LEFT JOIN running ru ON ru.p = k.gp
        LEFT JOIN started st ON st.p = k.rp
        WHERE (g_limit IS NULL OR k.rn_g <= g_limit - coalesce(ru.n, 0))
          AND (r_limit IS NULL OR k.rn_r <= r_limit - coalesce(st.n, 0))
        ORDER BY k.priority,
                 CASE WHEN g_limit IS NOT NULL THEN k.rn_g ELSE k.rn_r END,
                 k.scheduled_at, k.id
        LIMIT p_max
    ),
    locked AS (
        SELECT j.id
        FROM tq_job j
        WHERE j.id IN (SELECT ch.id FROM chosen ch) AND j.state = 'available'
        FOR UPDATE OF j SKIP LOCKED
    ),
    claimed AS (
        UPDATE tq_job j
        SET state = 'running',
            attempt = j.attempt + 1,
            attempted_at = p_now,
            attempted_by = j.attempted_by[greatest(cardinality(j.attempted_by) - 98, 1):]
                           || p_client_id
        FROM locked
        WHERE j.id = locked.id
        RETURNING j.id, j.kind, j.args, j.queue, j.state::text, j.priority, j.attempt,
                  j.max_attempts, j.attempted_at, j.attempted_by, j.created_at,
                  j.finalized_at, j.scheduled_at, nullif(j.errors, '[]'),
                  nullif(j.metadata, '{}'), j.tags
    ),
    recorded AS (
        INSERT INTO tq_rate_start (queue, partition, started_at)
        SELECT p_queue, tq_limit_partition(r_kind, r_args, cl.kind, cl.args), p_now
        FROM claimed cl
        WHERE r_limit IS NOT NULL
    )
    SELECT cl.*, false, NULL::timestamptz
    FROM claimed cl
    ORDER BY cl.priority, cl.scheduled_at, cl.id;
    GET DIAGNOSTICS v_claimed = ROW_COUNT;

    IF v_claimed < p_max THEN
        v_held := EXISTS (
            SELECT 1 FROM tq_job j
            WHERE j.state = 'available' AND j.queue = p_queue AND j.scheduled_at <= p_now
        );
        IF v_held AND r_limit IS NOT NULL THEN
            SELECT min(x.oldest) + r_per INTO v_next
            FROM (
                SELECT min(s.started_at) AS oldest
                FROM tq_rate_start s
                WHERE s.queue = p_queue
                GROUP BY s.partition
                HAVING count(*) >= r_limit
            ) x;
        END IF;
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::text,
        NULL::smallint, NULL::smallint, NULL::smallint, NULL::timestamptz, NULL::text[],
        NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::jsonb, NULL::jsonb,
        NULL::varchar(255)[], v_held, v_next;
END;
$$;
