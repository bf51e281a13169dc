-- trioqueue schema, version 5: composition. A job's recorded output, and workflows: jobs
-- that wait for other jobs (their deps) and are promoted or cancelled in the same
-- statement as the change that decides them.
--
-- The rules (docs/workflows.md):
-- * A task with deps is inserted `pending`. It becomes `available` (or `scheduled`, if it
--   is not due yet) once every dep is `completed`.
-- * A dep that ends `cancelled` or `discarded`, or is deleted, cancels its waiting
--   dependents, transitively, unless a dependent ignores failed deps: that one runs once
--   all its deps are final (or deleted).
-- * A dep that leaves a final state again (job_retry) brings back the dependents its
--   failure cancelled, transitively; they wait again, and are promoted when it completes.
-- trioqueue/driver/memory/workflows.py does the same in memory.

-- The worker's return value as JSON; NULL: no output (it returned None, or has not
-- completed).
ALTER TABLE tq_job ADD COLUMN output jsonb;

-- Whether some client waits for the job (job_wait): the completer announces the jobs it
-- finishes on tq_final only when they are waited for, so a client whose jobs nobody
-- waits for never takes NOTIFY's database-wide lock at each commit.
ALTER TABLE tq_job ADD COLUMN waited boolean;

-- The workflow a job belongs to and its task name there (both NULL outside workflows).
ALTER TABLE tq_job ADD COLUMN workflow_id text;
ALTER TABLE tq_job ADD COLUMN workflow_task text;
-- The ids of the jobs a waiting task depends on, in the order they were added (NULL: none).
ALTER TABLE tq_job ADD COLUMN workflow_deps bigint[];
-- Whether the task runs once its deps are final, whatever their outcome.
ALTER TABLE tq_job ADD COLUMN workflow_ignore_failed boolean;
-- Whether some task depends on this job: only such jobs are passed to
-- tq_workflow_advance, so jobs outside workflows (and a workflow's leaves) pay nothing
-- for it.
ALTER TABLE tq_job ADD COLUMN has_dependents boolean;

-- workflow_get, job_list(workflow_id=...), and one task name per workflow.
CREATE UNIQUE INDEX tq_job_workflow_idx ON tq_job (workflow_id, workflow_task)
    WHERE workflow_id IS NOT NULL;

-- How many of a waiting task's deps (from the first) were seen done: the check for "all
-- done" goes on from there, so a task with thousands of deps is not read whole at each
-- one. A table of its own, not a column of tq_job: writing it would write a new version
-- of the task's row, and of its entries in tq_job_workflow_deps_idx (one per dep). A row
-- lives while its task waits (none: nothing seen done yet).
CREATE TABLE tq_workflow_progress (
    job_id    bigint PRIMARY KEY,
    deps_done integer NOT NULL
);

-- A job's waiting (or dep-cancelled) dependents: one index lookup by the dep's id.
-- No fast update: its pending list would be read whole by every lookup.
CREATE INDEX tq_job_workflow_deps_idx ON tq_job USING gin (workflow_deps)
    WITH (fastupdate = off)
    WHERE workflow_deps IS NOT NULL AND state IN ('pending', 'cancelled');

-- Settle the dependents of p_ids: jobs with dependents that reached a final state, left
-- one (job_retry), were deleted, or were just inserted. Every statement that does one of
-- those calls it, in the same statement, with the ids it changed (it sees their new
-- state: a volatile function's queries see what the calling statement wrote). Cancels
-- and revivals cascade in rounds here; each round writes its promotions, cancels and
-- progress with one UPDATE each, whatever the number of tasks. Returns how many
-- dependents changed state. Promoted tasks' queues get an insert notification and
-- cancelled tasks a final one (tq_final, for job_wait).
CREATE FUNCTION tq_workflow_advance(p_ids bigint[], p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    v_changed bigint[] := coalesce(p_ids, '{}');
    v_failed bigint[];
    v_open bigint[];
    v_next bigint[];
    v_revived bigint[];
    v_promote bigint[];
    v_cancel bigint[];
    v_cause bigint[];
    v_moved bigint[];
    v_moved_done integer[];
    v_cancelled bigint[] := '{}';
    v_queues text[] := '{}';
    v_count integer := 0;
    d record;
    v_deps bigint[];
    v_i integer;
    v_done integer;
    v_n integer;
    v_state tq_job_state;
    v_verdict text;
    v_why bigint;
BEGIN
    IF cardinality(v_changed) = 0 THEN
        RETURN 0;
    END IF;
    IF current_setting('transaction_isolation') NOT IN ('read committed', 'read uncommitted')
    THEN  -- (PostgreSQL runs READ UNCOMMITTED as READ COMMITTED.)
        -- One snapshot for the whole transaction would not see the deps that other
        -- clients completed meanwhile: a task could wait for ever.
        RAISE EXCEPTION 'trioqueue settles workflows under READ COMMITTED only, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported';
    END IF;
    WHILE cardinality(v_changed) > 0 LOOP
        v_next := '{}';
        v_promote := '{}';
        v_cancel := '{}'; v_cause := '{}';
        v_moved := '{}'; v_moved_done := '{}';
        -- Which of the changed jobs failed (final but not completed, or gone), and which are
        -- live again.
        SELECT coalesce(array_agg(c.id) FILTER (
                   WHERE j.id IS NULL OR j.state IN ('cancelled', 'discarded')), '{}'),
               coalesce(array_agg(c.id) FILTER (
                   WHERE j.state NOT IN ('cancelled', 'completed', 'discarded')), '{}')
        INTO v_failed, v_open
        FROM unnest(v_changed) AS c(id)
        LEFT JOIN tq_job j ON j.id = c.id;

        -- A live-again dep brings back the dependents its failure cancelled; they are live
        -- again too, so their own dep-cancelled dependents come back on the next round.
        IF cardinality(v_open) > 0 THEN
            WITH revived AS (
                UPDATE tq_job j
                SET state = 'pending', finalized_at = NULL,
                    metadata = j.metadata - 'workflow_cancelled_by'
                WHERE j.workflow_deps && v_open
                  AND j.workflow_deps IS NOT NULL
                  AND j.state = 'cancelled'
                  AND j.metadata ->> 'workflow_cancelled_by' = ANY(v_open::text[])
                RETURNING j.id, j.has_dependents
            )
            SELECT coalesce(array_agg(id), '{}'),
                   coalesce(array_agg(id) FILTER (WHERE has_dependents), '{}')
            INTO v_revived, v_next
            FROM revived;
            v_count := v_count + cardinality(v_revived);
        END IF;

        FOR d IN
            SELECT j.id, j.workflow_deps, coalesce(j.workflow_ignore_failed, false) AS ignore,
                   j.has_dependents
            FROM tq_job j
            WHERE j.workflow_deps && v_changed
              AND j.workflow_deps IS NOT NULL
              AND j.state = 'pending'
            ORDER BY j.id
            FOR UPDATE
        LOOP
            v_verdict := 'wait';
            v_why := NULL;
            -- Read once the task is locked: whoever held the lock may have moved it.
            SELECT coalesce(max(p.deps_done), 0) INTO v_done
            FROM tq_workflow_progress p WHERE p.job_id = d.id;
            v_i := v_done;
            -- One copy, read in place below: a task with thousands of deps has them
            -- stored out of line (TOAST), and every read of the column would fetch and
            -- decompress them all again.
            v_deps := d.workflow_deps;
            IF cardinality(v_open) > 0 AND v_deps && v_open THEN
                v_i := 0;  -- a dep it had seen done is live again: look from the start
                IF NOT d.ignore THEN
                    -- Brought back (or set back) behind another dep that failed: cancelled
                    -- again at once, by the first failed dep in order, not once the walk
                    -- reaches it. (Rare: only a retry leads here, so a full look is fine.)
                    SELECT u.dep INTO v_why
                    FROM unnest(v_deps) WITH ORDINALITY AS u(dep, pos)
                    LEFT JOIN tq_job j ON j.id = u.dep
                    WHERE j.id IS NULL OR j.state IN ('cancelled', 'discarded')
                    ORDER BY u.pos
                    LIMIT 1;
                    IF v_why IS NOT NULL THEN
                        v_verdict := 'cancel';
                    END IF;
                END IF;
            END IF;
            IF v_verdict = 'cancel' THEN
                NULL;  -- decided above
            ELSIF NOT d.ignore AND cardinality(v_failed) > 0 AND v_deps && v_failed THEN
                v_verdict := 'cancel';
                SELECT f INTO v_why FROM unnest(v_failed) f WHERE f = ANY(v_deps) LIMIT 1;
            ELSE
                v_n := cardinality(v_deps);
                LOOP
                    IF v_i >= v_n THEN
                        v_verdict := 'promote';
                        EXIT;
                    END IF;
                    SELECT j.state INTO v_state FROM tq_job j WHERE j.id = v_deps[v_i + 1];
                    IF NOT FOUND OR v_state IN ('cancelled', 'discarded') THEN
                        IF NOT d.ignore THEN
                            v_verdict := 'cancel';
                            v_why := v_deps[v_i + 1];
                            EXIT;
                        END IF;
                    ELSIF v_state <> 'completed' THEN
                        EXIT;  -- still waiting for this one
                    END IF;
                    v_i := v_i + 1;
                END LOOP;
            END IF;

            IF v_verdict = 'promote' THEN
                v_promote := v_promote || d.id;
            ELSIF v_verdict = 'cancel' THEN
                v_cancel := v_cancel || d.id;
                v_cause := v_cause || v_why;
                IF d.has_dependents THEN
                    v_next := v_next || d.id;
                END IF;
            ELSIF v_i <> v_done THEN
                v_moved := v_moved || d.id;
                v_moved_done := v_moved_done || v_i;
            END IF;
        END LOOP;

        IF cardinality(v_promote) > 0 THEN
            WITH promoted AS (
                UPDATE tq_job j
                SET state = CASE WHEN j.scheduled_at > p_now THEN 'scheduled'::tq_job_state
                                 ELSE 'available'::tq_job_state END
                FROM unnest(v_promote) AS u(id)
                WHERE j.id = u.id
                RETURNING j.queue, j.state
            )
            SELECT v_queues || coalesce(array_agg(DISTINCT queue)
                                        FILTER (WHERE state = 'available'), '{}')
            INTO v_queues
            FROM promoted;
            v_count := v_count + cardinality(v_promote);
            DELETE FROM tq_workflow_progress WHERE job_id = ANY(v_promote);
        END IF;
        IF cardinality(v_cancel) > 0 THEN
            UPDATE tq_job j
            SET state = 'cancelled', finalized_at = p_now,
                metadata = j.metadata || jsonb_build_object('workflow_cancelled_by', u.cause)
            FROM unnest(v_cancel, v_cause) AS u(id, cause)
            WHERE j.id = u.id;
            v_count := v_count + cardinality(v_cancel);
            v_cancelled := v_cancelled || v_cancel;
            DELETE FROM tq_workflow_progress WHERE job_id = ANY(v_cancel);
        END IF;
        IF cardinality(v_moved) > 0 THEN
            INSERT INTO tq_workflow_progress (job_id, deps_done)
            SELECT * FROM unnest(v_moved, v_moved_done)
            ON CONFLICT (job_id) DO UPDATE SET deps_done = EXCLUDED.deps_done;
        END IF;
        v_changed := v_next;
    END LOOP;

    PERFORM pg_notify('tq_insert', json_build_object('queue', q)::text)
    FROM (SELECT DISTINCT q FROM unnest(v_queues) AS q) AS queues;
    IF cardinality(v_cancelled) > 0 THEN
        PERFORM tq_notify_final(v_cancelled);
    END IF;
    RETURN v_count;
END;
$$;

-- Tell job_wait's listeners that these jobs are final: {"ids": [...]}, at most 400 ids a
-- payload (under NOTIFY's 8000-byte bound).
CREATE FUNCTION tq_notify_final(p_ids bigint[])
RETURNS integer
LANGUAGE sql
VOLATILE
AS $$
    SELECT count(pg_notify('tq_final', json_build_object('ids', ids)::text))::integer
    FROM (
        SELECT array_agg(id) AS ids
        FROM (SELECT id, (row_number() OVER () - 1) / 400 AS chunk
              FROM unnest(p_ids) AS id) AS numbered
        GROUP BY chunk
    ) AS chunks;
$$;

-- The limited fetch of version 4 (tq_job_get_available_limited, explained there), now
-- returning each claimed job's output and workflow columns too.
DROP FUNCTION tq_job_get_available_limited(text, timestamptz, integer, text, jsonb);
CREATE FUNCTION tq_job_get_available_limited(
    p_queue text, p_now timestamptz, p_max integer, p_client_id text, p_limits jsonb
)
RETURNS TABLE (
    o_id bigint, o_kind text, o_args jsonb, o_queue text, o_state text,
    o_priority smallint, o_attempt smallint, o_max_attempts smallint,
    o_attempted_at timestamptz, o_attempted_by text[], o_created_at timestamptz,
    o_finalized_at timestamptz, o_scheduled_at timestamptz, o_errors jsonb,
    o_metadata jsonb, o_tags varchar(255)[], o_output jsonb, o_workflow_id text,
    o_workflow_task text, o_workflow_deps bigint[], o_held_back boolean, o_next_open timestamptz
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
    v_keep interval := greatest(r_per, interval '10 seconds');
    r_args text[] := ARRAY(SELECT jsonb_array_elements_text(
        coalesce(p_limits -> 'rate' -> 'by_args', '[]'::jsonb)));
    -- How a limit's partition follows from a job's limit_key: 0, it is not partitioned;
    -- 1, it partitions by all of the key; 2, by part of it (tq_limit_project).
    g_mode integer;
    r_mode integer;
    v_busiest_g bigint := 0;  -- running jobs of the busiest global partition
    v_busiest_r bigint := 0;  -- starts in the window of the busiest rate partition
    g_running jsonb;  -- {partition text: running jobs} of the global limit
    r_started jsonb;  -- {partition text: starts in the window} of the rate limit
    v_walk integer := 2 * p_max + 16;
    v_prefix text := '{' || tq_limit_shape(
        coalesce((p_limits -> 'key' ->> 'by_kind')::boolean, false),
        ARRAY(SELECT jsonb_array_elements_text(
            coalesce(p_limits -> 'key' -> 'by_args', '[]'::jsonb))));
    v_plen integer := length(v_prefix);
    v_paused boolean;
    v_stored boolean;
    v_claimed integer;
    v_held boolean := false;
    v_next timestamptz;
BEGIN
    g_mode := CASE WHEN NOT g_kind AND cardinality(g_args) = 0 THEN 0
                   WHEN g_kind = coalesce((p_limits -> 'key' ->> 'by_kind')::boolean, false)
                        AND cardinality(g_args) = jsonb_array_length(p_limits -> 'key' -> 'by_args')
                   THEN 1 ELSE 2 END;
    r_mode := CASE WHEN NOT r_kind AND cardinality(r_args) = 0 THEN 0
                   WHEN r_kind = coalesce((p_limits -> 'key' ->> 'by_kind')::boolean, false)
                        AND cardinality(r_args) = jsonb_array_length(p_limits -> 'key' -> 'by_args')
                   THEN 1 ELSE 2 END;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- One snapshot for the whole statement would not see the claims committed while
        -- this fetch waited for its turn: the counts could be stale.
        RAISE EXCEPTION 'trioqueue fetches limited queues under READ COMMITTED only, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF p_max < 0 THEN
        RAISE EXCEPTION 'LIMIT must not be negative' USING ERRCODE = 'invalid_row_count_in_limit_clause';
    END IF;
    -- The turn of this queue's fetches, keyed by the job table itself (its oid), whatever
    -- the session's search_path. Not waited for: while another fetch of the queue holds
    -- it, say so (held back, look again in a moment), so that a fetch never blocks, and a
    -- stop never waits, on another client's fetch.
    IF NOT pg_try_advisory_xact_lock(
        hashtextextended('trioqueue.limited_fetch.' || 'tq_job'::regclass::oid || '.' || p_queue, 0)
    ) THEN
        RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::text,
            NULL::smallint, NULL::smallint, NULL::smallint, NULL::timestamptz, NULL::text[],
            NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::jsonb, NULL::jsonb,
            NULL::varchar(255)[], NULL::jsonb, NULL::text, NULL::text, NULL::bigint[], true, p_now + interval '2 milliseconds';
        RETURN;
    END IF;
    SELECT q.paused_at IS NOT NULL, q.limits IS NOT NULL INTO v_paused, v_stored
    FROM tq_queue q WHERE q.name = p_queue;
    IF NOT coalesce(v_stored, false) THEN
        -- No client stored limits for this queue (each does as it starts): its jobs may
        -- have no partition key yet. Give them the keys of these limits.
        UPDATE tq_job j
        SET limit_key = tq_limit_key(p_limits, j.kind, j.args)
        WHERE j.queue = p_queue
          AND j.state IN ('available', 'pending', 'retryable', 'running', 'scheduled')
          AND j.limit_key IS DISTINCT FROM tq_limit_key(p_limits, j.kind, j.args);
    END IF;
    IF p_max > 0 AND NOT coalesce(v_paused, false) THEN
        IF g_limit IS NOT NULL THEN
            SELECT coalesce(jsonb_object_agg(x.p, x.n), '{}'::jsonb), coalesce(max(x.n), 0)
            INTO g_running, v_busiest_g
            FROM (
                SELECT CASE g_mode WHEN 1 THEN k.key WHEN 0 THEN '{"~": "|"}' ELSE tq_limit_project(k.key, g_kind, g_args) END AS p, count(*) AS n
                FROM tq_job j
                CROSS JOIN LATERAL (
                    SELECT CASE WHEN left(j.limit_key, v_plen) = v_prefix THEN j.limit_key
                             ELSE tq_limit_key(p_limits, j.kind, j.args) END AS key
                ) k
                WHERE j.state = 'running' AND j.queue = p_queue
                GROUP BY 1
            ) x;
        END IF;
        IF r_limit IS NOT NULL THEN
            -- Starts are kept a while after they leave this fetch's window: another
            -- client's clock may run behind ours (or its `now` was taken before ours and
            -- its statement runs after), and its window still holds them. Every start
            -- from the window's beginning on counts, later ones included.
            DELETE FROM tq_rate_start
            WHERE queue = p_queue AND started_at <= p_now - r_per - v_keep;
            SELECT coalesce(jsonb_object_agg(x.p, x.n), '{}'::jsonb), coalesce(max(x.n), 0)
            INTO r_started, v_busiest_r
            FROM (
                SELECT s.partition::text AS p, count(*) AS n
                FROM tq_rate_start s
                WHERE s.queue = p_queue AND s.started_at > p_now - r_per
                GROUP BY 1
            ) x;
        END IF;

        IF (g_limit IS NULL OR v_busiest_g + p_max <= g_limit)
           AND (r_limit IS NULL OR v_busiest_r + p_max <= r_limit)
        THEN
            -- Even the busiest partition has room for every job this fetch may take:
            -- no choice to make, so claim as job_get_available does.
            RETURN QUERY
            WITH locked AS (
                SELECT j.id
                FROM tq_job j
                WHERE j.state = 'available' AND j.queue = p_queue AND j.scheduled_at <= p_now
                ORDER BY j.priority, j.scheduled_at, j.id
                LIMIT p_max
                FOR UPDATE SKIP LOCKED
            ),
            claimed AS (
                UPDATE tq_job j
                SET state = 'running',
                    attempt = j.attempt + 1,
                    attempted_at = p_now,
                    attempted_by = j.attempted_by[greatest(cardinality(j.attempted_by) - 98,
                                                           1):] || p_client_id,
                    limit_key = CASE WHEN left(j.limit_key, v_plen) = v_prefix THEN j.limit_key
                             ELSE tq_limit_key(p_limits, j.kind, j.args) END
                FROM locked
                WHERE j.id = locked.id
                RETURNING j.id, j.kind, j.args, j.queue, j.state::text, j.priority,
                          j.attempt, j.max_attempts, j.attempted_at, j.attempted_by,
                          j.created_at, j.finalized_at, j.scheduled_at,
                          nullif(j.errors, '[]') AS errors, nullif(j.metadata, '{}') AS metadata,
                          j.tags, j.output, j.workflow_id, j.workflow_task, j.workflow_deps,
                          j.limit_key
            ),
            recorded AS (
                INSERT INTO tq_rate_start (queue, partition, started_at)
                SELECT p_queue,
                       CASE r_mode WHEN 1 THEN cl.limit_key WHEN 0 THEN '{"~": "|"}'
                            ELSE tq_limit_project(cl.limit_key, r_kind, r_args) END,
                       p_now
                FROM claimed cl
                WHERE r_limit IS NOT NULL
            )
            SELECT cl.id, cl.kind, cl.args, cl.queue, cl.state, cl.priority, cl.attempt,
                   cl.max_attempts, cl.attempted_at, cl.attempted_by, cl.created_at,
                   cl.finalized_at, cl.scheduled_at, cl.errors, cl.metadata, cl.tags, cl.output,
                   cl.workflow_id, cl.workflow_task, cl.workflow_deps, false,
                   NULL::timestamptz
            FROM claimed cl
            ORDER BY cl.priority, cl.scheduled_at, cl.id;
        ELSE
        -- One statement: the walk, the partitions' first jobs if the walk is not enough,
        -- the choice, the claim and the record of the starts.
        RETURN QUERY
        WITH RECURSIVE walk AS MATERIALIZED (
            SELECT j.id, j.priority, j.scheduled_at, k.key
            FROM tq_job j
            CROSS JOIN LATERAL (
                SELECT CASE WHEN left(j.limit_key, v_plen) = v_prefix THEN j.limit_key
                             ELSE tq_limit_key(p_limits, j.kind, j.args) END AS key
            ) k
            WHERE j.state = 'available' AND j.queue = p_queue AND j.scheduled_at <= p_now
            ORDER BY j.priority, j.scheduled_at, j.id
            LIMIT v_walk
        ),
        walked AS MATERIALIZED (
            SELECT w.id, w.priority, w.scheduled_at, pk.gp, pk.rp
            FROM walk w
            CROSS JOIN LATERAL (
                SELECT CASE g_mode WHEN 1 THEN w.key WHEN 0 THEN '{"~": "|"}'
                        ELSE tq_limit_project(w.key, g_kind, g_args) END AS gp,
                       CASE r_mode WHEN 1 THEN w.key WHEN 0 THEN '{"~": "|"}'
                        ELSE tq_limit_project(w.key, r_kind, r_args) END AS rp
            ) pk
        ),
        -- The walked jobs that fit: those whose partitions have room at all, then the
        -- first of each global partition up to its room (in fetch order), then of those
        -- the first of each rate partition up to its room, in the fair order (priority,
        -- then round robin across the global partitions).
        fit_global AS MATERIALIZED (
            SELECT r.*, CASE WHEN g_limit IS NOT NULL THEN r.rn_g ELSE r.rn_t END AS fair
            FROM (
                SELECT w.id, w.priority, w.scheduled_at, w.gp, w.rp,
                       row_number() OVER (PARTITION BY w.gp
                                          ORDER BY w.priority, w.scheduled_at, w.id) AS rn_g,
                       row_number() OVER (PARTITION BY w.rp
                                          ORDER BY w.priority, w.scheduled_at, w.id) AS rn_t
                FROM walked w
                WHERE (g_limit IS NULL
                       OR coalesce((g_running ->> w.gp::text)::integer, 0) < g_limit)
                  AND (r_limit IS NULL
                       OR coalesce((r_started ->> w.rp::text)::integer, 0) < r_limit)
            ) r
            WHERE g_limit IS NULL
               OR r.rn_g <= g_limit - coalesce((g_running ->> r.gp::text)::integer, 0)
        ),
        fitting AS MATERIALIZED (
            SELECT f.id, f.priority, f.scheduled_at, f.gp, f.rp
            FROM (
                SELECT x.*,
                       row_number() OVER (PARTITION BY x.rp
                                          ORDER BY x.priority, x.fair, x.scheduled_at, x.id)
                           AS rn_r
                FROM fit_global x
            ) f
            WHERE (r_limit IS NULL
                   OR f.rn_r <= r_limit - coalesce((r_started ->> f.rp::text)::integer, 0))
        ),
        -- Too few fit, and more jobs lie beyond the walk: every partition with room adds
        -- its first jobs (a loose scan of tq_job_limit_idx finds the partitions).
        keys(k) AS (
            (SELECT j.limit_key FROM tq_job j
             WHERE j.state = 'available' AND j.queue = p_queue AND j.limit_key IS NOT NULL
               AND j.limit_key > v_prefix
               AND (SELECT count(*) FROM fitting) < p_max
               AND (SELECT count(*) FROM walk) = v_walk
             ORDER BY j.limit_key LIMIT 1)
            UNION ALL
            SELECT (SELECT j.limit_key FROM tq_job j
                    WHERE j.state = 'available' AND j.queue = p_queue
                      AND j.limit_key IS NOT NULL AND j.limit_key > keys.k
                    ORDER BY j.limit_key LIMIT 1)
            FROM keys
            WHERE left(keys.k, v_plen) = v_prefix
        ),
        key_room AS (
            SELECT keys.k, pk.gp, pk.rp,
                   least(
                       p_max,
                       CASE WHEN g_limit IS NULL THEN p_max
                            ELSE g_limit - coalesce((g_running ->> pk.gp::text)::integer, 0) END,
                       CASE WHEN r_limit IS NULL THEN p_max
                            ELSE r_limit - coalesce((r_started ->> pk.rp::text)::integer, 0) END
                   ) AS room
            FROM keys
            CROSS JOIN LATERAL (
                SELECT CASE g_mode WHEN 1 THEN keys.k WHEN 0 THEN '{"~": "|"}'
                        ELSE tq_limit_project(keys.k, g_kind, g_args) END AS gp,
                       CASE r_mode WHEN 1 THEN keys.k WHEN 0 THEN '{"~": "|"}'
                        ELSE tq_limit_project(keys.k, r_kind, r_args) END AS rp
            ) pk
            WHERE left(keys.k, v_plen) = v_prefix
        ),
        extra AS (
            SELECT f.id, f.priority, f.scheduled_at, kr.gp, kr.rp
            FROM key_room kr
            CROSS JOIN LATERAL (
                SELECT j.id, j.priority, j.scheduled_at FROM tq_job j
                WHERE j.state = 'available' AND j.queue = p_queue AND j.limit_key = kr.k
                  AND j.scheduled_at <= p_now
                  AND j.id NOT IN (SELECT ft.id FROM fitting ft)
                ORDER BY j.priority, j.scheduled_at, j.id
                LIMIT kr.room
            ) f
            WHERE kr.room > 0
        ),
        candidates AS (
            SELECT * FROM fitting
            UNION ALL
            SELECT * FROM extra
        ),
        -- The same choice over every candidate, in the fair order, up to p_max.
        chosen_global AS MATERIALIZED (
            SELECT r.*, CASE WHEN g_limit IS NOT NULL THEN r.rn_g ELSE r.rn_t END AS fair
            FROM (
                SELECT w.id, w.priority, w.scheduled_at, w.gp, w.rp,
                       row_number() OVER (PARTITION BY w.gp
                                          ORDER BY w.priority, w.scheduled_at, w.id) AS rn_g,
                       row_number() OVER (PARTITION BY w.rp
                                          ORDER BY w.priority, w.scheduled_at, w.id) AS rn_t
                FROM candidates w
                WHERE (g_limit IS NULL
                       OR coalesce((g_running ->> w.gp::text)::integer, 0) < g_limit)
                  AND (r_limit IS NULL
                       OR coalesce((r_started ->> w.rp::text)::integer, 0) < r_limit)
            ) r
            WHERE g_limit IS NULL
               OR r.rn_g <= g_limit - coalesce((g_running ->> r.gp::text)::integer, 0)
        ),
        chosen_fit AS MATERIALIZED (
            SELECT f.id, f.rp, f.priority, f.fair, f.scheduled_at
            FROM (
                SELECT x.*,
                       row_number() OVER (PARTITION BY x.rp
                                          ORDER BY x.priority, x.fair, x.scheduled_at, x.id)
                           AS rn_r
                FROM chosen_global x
            ) f
            WHERE (r_limit IS NULL
                   OR f.rn_r <= r_limit - coalesce((r_started ->> f.rp::text)::integer, 0))
        ),
        chosen AS (
            SELECT c.id, c.rp
            FROM chosen_fit c
            ORDER BY c.priority, c.fair, c.scheduled_at, c.id
            LIMIT p_max
        ),
        locked AS (
            SELECT j.id, ch.rp
            FROM tq_job j
            JOIN chosen ch ON ch.id = j.id
            WHERE j.state = 'available'
            FOR UPDATE OF j SKIP LOCKED
        ),
        claimed AS (
            UPDATE tq_job j
            SET state = 'running',
                attempt = j.attempt + 1,
                attempted_at = p_now,
                attempted_by = j.attempted_by[greatest(cardinality(j.attempted_by) - 98, 1):]
                               || p_client_id,
                limit_key = CASE WHEN left(j.limit_key, v_plen) = v_prefix THEN j.limit_key
                             ELSE tq_limit_key(p_limits, j.kind, j.args) END
            FROM locked
            WHERE j.id = locked.id
            RETURNING j.id, j.kind, j.args, j.queue, j.state::text, j.priority, j.attempt,
                      j.max_attempts, j.attempted_at, j.attempted_by, j.created_at,
                      j.finalized_at, j.scheduled_at, nullif(j.errors, '[]') AS errors,
                      nullif(j.metadata, '{}') AS metadata, j.tags, j.output, j.workflow_id,
                      j.workflow_task, j.workflow_deps, locked.rp
        ),
        recorded AS (
            INSERT INTO tq_rate_start (queue, partition, started_at)
            SELECT p_queue, cl.rp, p_now
            FROM claimed cl
            WHERE r_limit IS NOT NULL
        )
        SELECT cl.id, cl.kind, cl.args, cl.queue, cl.state, cl.priority, cl.attempt,
               cl.max_attempts, cl.attempted_at, cl.attempted_by, cl.created_at,
               cl.finalized_at, cl.scheduled_at, cl.errors, cl.metadata, cl.tags, cl.output,
                   cl.workflow_id, cl.workflow_task, cl.workflow_deps, false,
               NULL::timestamptz
        FROM claimed cl
        ORDER BY cl.priority, cl.scheduled_at, cl.id;
        END IF;
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
                    WHERE s.queue = p_queue AND s.started_at > p_now - r_per
                    GROUP BY s.partition
                    HAVING count(*) >= r_limit
                ) x;
            END IF;
        END IF;
    END IF;
    RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::jsonb, NULL::text, NULL::text,
        NULL::smallint, NULL::smallint, NULL::smallint, NULL::timestamptz, NULL::text[],
        NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::jsonb, NULL::jsonb,
        NULL::varchar(255)[], NULL::jsonb, NULL::text, NULL::text, NULL::bigint[], v_held, v_next;
END;
$$;
