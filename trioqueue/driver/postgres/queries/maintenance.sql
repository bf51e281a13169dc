-- Queries of the leader-only maintenance services.

-- name: job_get_stuck
-- Running jobs attempted before $1 with ids above $3: candidates for the rescuer (it
-- decides per job, and pages by id past the ones it leaves alone).
SELECT id, kind, args, queue, state::text, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags,
       output, workflow_id, workflow_task, workflow_deps
FROM tq_job
WHERE state = 'running'
  AND attempted_at < $1
  AND id > $3
ORDER BY id
LIMIT $2;

-- name: job_rescue_many
-- Apply the rescuer's decisions, only to rows still running the same attempt. A
-- rescue_count that is not a plain count (written by hand: inserts refuse the key) counts
-- as 0, so that one such row cannot fail the whole batch, rescue after rescue. Jobs
-- discarded here are announced on tq_final (job_wait) and settle their dependents.
WITH rescued AS (
    UPDATE tq_job j
    SET state = i.state::tq_job_state,
        finalized_at = i.finalized_at,
        scheduled_at = coalesce(i.scheduled_at, j.scheduled_at),
        errors = j.errors || jsonb_build_array(i.error::jsonb),
        metadata = j.metadata || jsonb_build_object(
            'rescue_count',
            CASE WHEN jsonb_typeof(j.metadata -> 'rescue_count') = 'number'
                      AND (j.metadata ->> 'rescue_count') ~ '^[0-9]{1,9}$'
                 THEN (j.metadata ->> 'rescue_count')::int
                 ELSE 0 END + 1)
    FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::text[],
                $6::timestamptz[])
         AS i(id, state, finalized_at, scheduled_at, error, attempted_at)
    WHERE j.id = i.id
      AND j.state = 'running'
      AND j.attempted_at = i.attempted_at
    RETURNING j.id, j.queue, j.state::text AS state, j.finalized_at,
              j.has_dependents AS hd
),
notified AS (
    SELECT tq_notify_final(array_agg(id) FILTER (
        WHERE state IN ('cancelled', 'completed', 'discarded'))) AS n
    FROM rescued
),
advanced AS (
    SELECT tq_workflow_advance(
               array_agg(id) FILTER (
                   WHERE hd AND state IN ('cancelled', 'completed', 'discarded')),
               coalesce(max(finalized_at), now())) AS n
    FROM rescued
)
SELECT rescued.id, rescued.queue, rescued.state
FROM rescued CROSS JOIN notified CROSS JOIN advanced;

-- name: job_delete_finalized
-- Delete up to $3 jobs in state $1 finalized before $2; returns how many. A workflow's
-- dep whose dependents still wait, or may wait again, is kept until they no longer can.
WITH doomed AS (
    SELECT id
    FROM tq_job j
    WHERE state = $1::text::tq_job_state
      AND finalized_at < $2
      -- A dep stays while a task still waits for it (deleting it would cancel the task),
      -- or may wait again: one cancelled by a failed dep comes back when that is retried.
      AND NOT (coalesce(j.has_dependents, false) AND EXISTS (
          SELECT 1 FROM tq_job d
          WHERE d.workflow_deps @> ARRAY[j.id] AND d.workflow_deps IS NOT NULL
            AND (d.state = 'pending'
                 OR (d.state = 'cancelled' AND d.metadata ? 'workflow_cancelled_by'))))
    ORDER BY finalized_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
),
deleted AS (
    DELETE FROM tq_job WHERE id IN (SELECT id FROM doomed) RETURNING id, has_dependents AS hd
),
advanced AS (
    SELECT tq_workflow_advance(array_agg(id) FILTER (WHERE hd), now()) AS n FROM deleted
)
SELECT count(*) FROM deleted CROSS JOIN advanced;

-- name: queue_delete_stale
-- Queue rows nobody has announced since $1, unless paused (a pause must survive).
DELETE FROM tq_queue
WHERE updated_at < $1
  AND paused_at IS NULL
RETURNING name;
