-- Workflow queries (migration 005). Job-returning queries list the columns of job.sql.

-- name: workflow_lock
-- The turn of inserts of workflow $1 (a transaction-level advisory lock, keyed by the job
-- table itself, whatever the session's search_path).
SELECT pg_advisory_xact_lock(
    hashtextextended('trioqueue.workflow.' || 'tq_job'::regclass::oid || '.' || $1, 0));

-- name: workflow_exists
SELECT EXISTS (SELECT 1 FROM tq_job WHERE workflow_id = $1);

-- name: workflow_reserve_ids
-- Job ids for a workflow's tasks, taken before the insert, so that each task's row can
-- name its deps' ids in the same statement.
SELECT nextval(pg_get_serial_sequence('tq_job', 'id')) FROM generate_series(1, $1::integer);

-- name: workflow_insert
-- job_insert_many for a workflow's tasks, with their reserved ids ($14), the workflow
-- ($15), task names ($16), deps' ids (text literals of bigint[], NULL: none; $17),
-- ignore_failed ($18) and whether some task depends on them ($19). A task whose unique
-- key collides with a live job returns that job, flagged as skipped.
WITH notified AS (
    SELECT count(pg_notify('tq_insert', json_build_object('queue', q)::text)) AS n
    FROM unnest($13::text[]) AS q
),
limited AS MATERIALIZED (
    SELECT q.name, (q.limits -> 'key' ->> 'by_kind')::boolean AS by_kind,
           ARRAY(SELECT jsonb_array_elements_text(q.limits -> 'key' -> 'by_args')) AS fields
    FROM tq_queue q
    WHERE q.limits IS NOT NULL
),
inserted AS (
    INSERT INTO tq_job (id, args, kind, max_attempts, metadata, priority, queue,
                        scheduled_at, state, tags, unique_key, unique_states, created_at,
                        limit_key, workflow_id, workflow_task, workflow_deps,
                        workflow_ignore_failed, has_dependents)
    SELECT i.id, i.args::jsonb, i.kind, i.max_attempts, i.metadata::jsonb, i.priority,
           i.queue, i.scheduled_at, i.state::tq_job_state,
           CASE WHEN i.tags = '' THEN '{}'::varchar(255)[]
                ELSE string_to_array(i.tags, ',')::varchar(255)[] END,
           i.unique_key, i.unique_states::bit(8), $12,
           (SELECT tq_limit_key_of(lq.by_kind, lq.fields, i.kind, i.args::jsonb)
            FROM limited lq WHERE lq.name = i.queue),
           $15::text, i.task, i.deps::bigint[], nullif(i.ignore_failed, false),
           nullif(i.has_dependents, false)
    FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::smallint[],
                $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::bytea[],
                $11::text[], $14::bigint[], $16::text[], $17::text[], $18::boolean[],
                $19::boolean[])
         AS i(args, kind, max_attempts, metadata, priority, queue, scheduled_at, state, tags,
              unique_key, unique_states, id, task, deps, ignore_failed, has_dependents)
    ON CONFLICT (unique_key)
        WHERE unique_key IS NOT NULL
          AND unique_states IS NOT NULL
          AND tq_job_state_in_bitmask(unique_states, state)
        DO UPDATE SET kind = EXCLUDED.kind
    RETURNING id, kind, args, queue, state::text, priority, attempt, max_attempts,
              attempted_at, attempted_by, created_at, finalized_at, scheduled_at, errors,
              metadata, tags, output, workflow_id, workflow_task, workflow_deps,
              (xmax <> 0) AS skipped
)
SELECT inserted.*, (SELECT n FROM notified) AS notified FROM inserted;

-- name: workflow_stand_in
-- After a workflow insert where unique duplicates stood in for tasks: the dependents of
-- each skipped task wait for the job that stood in ($1: reserved ids, $2: the jobs that
-- stand in for them), which is marked as having dependents ($3: the workflow). The
-- caller then settles the dependents whose deps are already final (workflow_settle).
WITH remapped AS (
    UPDATE tq_job j
    SET workflow_deps = ARRAY(
        SELECT coalesce(m.stand_in, d.dep)
        FROM unnest(j.workflow_deps) WITH ORDINALITY AS d(dep, pos)
        LEFT JOIN unnest($1::bigint[], $2::bigint[]) AS m(reserved, stand_in)
               ON m.reserved = d.dep
        ORDER BY d.pos)
    WHERE j.workflow_id = $3 AND j.workflow_deps && $1::bigint[]
    RETURNING j.id
),
marked AS (
    UPDATE tq_job SET has_dependents = true
    WHERE id = ANY($2::bigint[]) AND has_dependents IS NOT TRUE
    RETURNING id
)
SELECT (SELECT count(*) FROM remapped), (SELECT count(*) FROM marked);

-- name: workflow_settle
SELECT tq_workflow_advance($1::bigint[], $2);

-- name: workflow_rows
SELECT id, kind, args, queue, state::text, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags,
       output, workflow_id, workflow_task, workflow_deps
FROM tq_job
WHERE id = ANY($1::bigint[]);
