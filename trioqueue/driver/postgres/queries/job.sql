-- Job queries. Every job-returning query lists the columns in this order:
-- id, kind, args, queue, state, priority, attempt, max_attempts, attempted_at,
-- attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags, output,
-- workflow_id, workflow_task, workflow_deps
-- `now` is always a parameter (the client's clock), never the database's now().

-- name: job_insert_many
-- One statement for a whole batch: parallel arrays unnested into rows. A job of a queue
-- with limits gets its partition key (limit_key, migration 004) from the queue's row. A row whose unique
-- key collides with a live job returns that job, flagged as skipped. Insert notifications
-- for the queues in $13 go out when the surrounding transaction commits.
WITH notified AS (
    SELECT count(pg_notify('tq_insert', json_build_object('queue', q)::text)) AS n
    FROM unnest($13::text[]) AS q
),
limited AS MATERIALIZED (  -- each limited queue's partition fields, read once
    SELECT q.name, (q.limits -> 'key' ->> 'by_kind')::boolean AS by_kind,
           ARRAY(SELECT jsonb_array_elements_text(q.limits -> 'key' -> 'by_args')) AS fields
    FROM tq_queue q
    WHERE q.limits IS NOT NULL
),
inserted AS (
    INSERT INTO tq_job (args, kind, max_attempts, metadata, priority, queue, scheduled_at,
                        state, tags, unique_key, unique_states, created_at, limit_key)
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
              unique_key, unique_states)
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

-- name: job_insert_one
-- job_insert_many for a single job: plain VALUES, cheaper for the server than unnesting
-- arrays. $13 is the queue to notify, or NULL.
WITH notified AS (
    SELECT count(pg_notify('tq_insert', json_build_object('queue', $13::text)::text)) AS n
    WHERE $13::text IS NOT NULL
),
inserted AS (
    INSERT INTO tq_job (args, kind, max_attempts, metadata, priority, queue, scheduled_at,
                        state, tags, unique_key, unique_states, created_at, limit_key)
    VALUES ($1::text::jsonb, $2::text, $3::smallint, $4::text::jsonb, $5::smallint, $6::text,
            $7::timestamptz, $8::text::tq_job_state, $9::text[]::varchar(255)[], $10::bytea,
            $11::text::bit(8), $12::timestamptz,
            (SELECT tq_limit_key(q.limits, $2::text, $1::text::jsonb) FROM tq_queue q
             WHERE q.name = $6::text AND q.limits IS NOT NULL))
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

-- name: job_insert_one_plain
-- job_insert_one for the common case, a job with no unique key and no notification to
-- send: a bare INSERT, about a tenth cheaper for the server than the statement above.
INSERT INTO tq_job (args, kind, max_attempts, metadata, priority, queue, scheduled_at,
                    state, tags, created_at, limit_key)
VALUES ($1::text::jsonb, $2::text, $3::smallint, $4::text::jsonb, $5::smallint, $6::text,
        $7::timestamptz, $8::text::tq_job_state, $9::text[]::varchar(255)[], $10::timestamptz,
        (SELECT tq_limit_key(q.limits, $2::text, $1::text::jsonb) FROM tq_queue q
         WHERE q.name = $6::text AND q.limits IS NOT NULL))
RETURNING id, kind, args, queue, state::text, priority, attempt, max_attempts,
          attempted_at, attempted_by, created_at, finalized_at, scheduled_at, errors,
          metadata, tags, output, workflow_id, workflow_task, workflow_deps, false AS skipped;

-- name: job_notify_insert
SELECT count(pg_notify('tq_insert', json_build_object('queue', q)::text))
FROM unnest($1::text[]) AS q;

-- name: job_get_available
-- Claim up to $3 available jobs of queue $1 that are due at $2, in priority order, skipping
-- rows other clients hold, unless the queue is paused. One statement, so a claim is atomic.
-- The rows come back in priority order (UPDATE ... RETURNING has none of its own), and
-- empty errors and metadata as NULL: the client decodes every column of every claimed
-- job, and most of these two are empty.
WITH locked AS (
    SELECT id
    FROM tq_job
    WHERE state = 'available'
      AND queue = $1
      AND scheduled_at <= $2
      AND NOT EXISTS (SELECT 1 FROM tq_queue WHERE name = $1 AND paused_at IS NOT NULL)
    ORDER BY priority, scheduled_at, id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE tq_job j
    SET state = 'running',
        attempt = j.attempt + 1,
        attempted_at = $2,
        attempted_by = j.attempted_by[greatest(cardinality(j.attempted_by) - 98, 1):] || $4::text
    FROM locked
    WHERE j.id = locked.id
    RETURNING j.id, j.kind, j.args, j.queue, j.state::text, j.priority, j.attempt,
              j.max_attempts, j.attempted_at, j.attempted_by, j.created_at, j.finalized_at,
              j.scheduled_at, nullif(j.errors, '[]'), nullif(j.metadata, '{}'), j.tags,
              j.output, j.workflow_id, j.workflow_task, j.workflow_deps
)
SELECT * FROM claimed ORDER BY priority, scheduled_at, id;

-- name: job_claim
-- Claim one job by id for a run outside any producer (trioqueue.testing's work_one): unless
-- it is running or finalized, it becomes running as job_get_available makes it, whatever
-- its queue, schedule or pause state. No row: no such job, or it is not claimable.
UPDATE tq_job j
SET state = 'running',
    attempt = j.attempt + 1,
    attempted_at = $2,
    attempted_by = j.attempted_by[greatest(cardinality(j.attempted_by) - 98, 1):] || $3::text
WHERE j.id = $1
  AND j.state IN ('available', 'pending', 'retryable', 'scheduled')
RETURNING j.id, j.kind, j.args, j.queue, j.state::text, j.priority, j.attempt, j.max_attempts,
          j.attempted_at, j.attempted_by, j.created_at, j.finalized_at, j.scheduled_at,
          j.errors, j.metadata, j.tags, j.output, j.workflow_id, j.workflow_task,
          j.workflow_deps;

-- name: job_set_state_if_running_many
-- Write a batch of outcomes. Only rows still `running` change, and only while they run the
-- run each outcome came from ($9: its attempted_at; NULL: any run), so a write retried after
-- its reply was lost never lands on a later run of the job. A job whose cancellation was
-- requested while it ran ends `cancelled` instead of going back to be retried or snoozed.
-- SET expressions read the row as locked, so a cancel request that lands first is seen.
-- A completed job's output ($10) replaces the stored one. Jobs that end final are announced
-- on tq_final when some client waits for them (job_wait marks them), and those some
-- workflow task waits for settle it
-- (tq_workflow_advance, migration 005), all in this statement.
-- The args column comes back NULL: the caller has them, and decoding them again for every
-- finished job is the single largest cost of this statement.
WITH written AS (
    UPDATE tq_job j
    SET state = CASE WHEN j.metadata ? 'cancel_attempted_at'
                          AND i.state IN ('retryable', 'scheduled', 'available')
                     THEN 'cancelled'::tq_job_state
                     ELSE i.state::tq_job_state END,
        finalized_at = CASE WHEN j.metadata ? 'cancel_attempted_at'
                                 AND i.state IN ('retryable', 'scheduled', 'available')
                            THEN $8 ELSE i.finalized_at END,
        scheduled_at = coalesce(i.scheduled_at, j.scheduled_at),
        attempt = CASE WHEN i.give_back_attempt THEN greatest(j.attempt - 1, 0)
                       ELSE j.attempt END,
        errors = CASE WHEN i.error IS NULL THEN j.errors
                      ELSE j.errors || jsonb_build_array(i.error::jsonb) END,
        metadata = CASE WHEN i.metadata IS NULL THEN j.metadata
                        ELSE j.metadata || i.metadata::jsonb END,
        output = CASE WHEN i.state = 'completed' THEN i.output::jsonb ELSE j.output END
    FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                $5::boolean[], $6::text[], $7::text[], $9::timestamptz[], $10::text[])
         AS i(id, state, finalized_at, scheduled_at, give_back_attempt, error, metadata,
              attempted_at, output)
    WHERE j.id = i.id
      AND j.state = 'running'
      AND (i.attempted_at IS NULL OR j.attempted_at = i.attempted_at)
    RETURNING j.id, j.kind, NULL::jsonb AS args, j.queue, j.state::text AS state, j.priority,
              j.attempt, j.max_attempts, j.attempted_at, j.attempted_by, j.created_at,
              j.finalized_at, j.scheduled_at, j.errors, j.metadata, j.tags, j.output,
              j.workflow_id, j.workflow_task, j.workflow_deps, j.has_dependents AS hd,
              j.waited
),
notified AS (
    SELECT tq_notify_final(array_agg(id) FILTER (
        WHERE waited AND state IN ('cancelled', 'completed', 'discarded'))) AS n
    FROM written
),
advanced AS (  -- no call at all when no written job has dependents (the usual batch)
    SELECT CASE WHEN bool_or(hd) THEN tq_workflow_advance(array_agg(id) FILTER (
               WHERE hd AND state IN ('cancelled', 'completed', 'discarded')), $8) END AS n
    FROM written
)
SELECT id, kind, args, queue, state, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags, output,
       workflow_id, workflow_task, workflow_deps
FROM written CROSS JOIN notified CROSS JOIN advanced;

-- name: job_complete_many_ids
-- The usual batch: every outcome `completed`, nobody reading the rows back ($5: now).
-- job_set_state_if_running_many would do the same (its CASEs change nothing for a
-- completed job), at about a sixth more server time per row.
WITH written AS (
    UPDATE tq_job j
    SET state = 'completed',
        finalized_at = i.finalized_at,
        output = i.output::jsonb
    FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::text[])
         AS i(id, finalized_at, attempted_at, output)
    WHERE j.id = i.id
      AND j.state = 'running'
      AND (i.attempted_at IS NULL OR j.attempted_at = i.attempted_at)
    RETURNING j.id, j.has_dependents AS hd, j.waited
),
notified AS (
    SELECT tq_notify_final(array_agg(id) FILTER (WHERE waited)) AS n FROM written
),
advanced AS (  -- no call at all when no written job has dependents (the usual batch)
    SELECT CASE WHEN bool_or(hd) THEN tq_workflow_advance(array_agg(id) FILTER (WHERE hd), $5)
           END AS n
    FROM written
)
SELECT written.id FROM written CROSS JOIN notified CROSS JOIN advanced;

-- name: job_get
SELECT id, kind, args, queue, state::text, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags,
       output, workflow_id, workflow_task, workflow_deps
FROM tq_job
WHERE id = $1;

-- name: job_list
-- Every filter is optional: a NULL array means "any". Ordered by id for cursor paging.
-- $9 (within_newest): only ids above the highest id minus $9, which bounds the primary key
-- walk of a filter no index serves; max(id) is one step down the primary key.
SELECT id, kind, args, queue, state::text, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags,
       output, workflow_id, workflow_task, workflow_deps
FROM tq_job
WHERE ($1::bigint[] IS NULL OR id = ANY($1::bigint[]))
  AND ($2::text[] IS NULL OR kind = ANY($2::text[]))
  AND ($3::text[] IS NULL OR queue = ANY($3::text[]))
  AND ($4::text[] IS NULL OR state = ANY($4::text[]::tq_job_state[]))
  AND ($5::smallint[] IS NULL OR priority = ANY($5::smallint[]))
  AND ($6::text[] IS NULL OR tags @> $6::text[]::varchar(255)[])
  AND ($7::bigint IS NULL OR id > $7::bigint)
  AND ($9::bigint IS NULL OR id > (SELECT max(id) FROM tq_job) - $9::bigint)
ORDER BY id
LIMIT $8;

-- name: job_cancel
-- Queued jobs are cancelled at once; a running job is marked so that its owner cancels it
-- (the caller then sends a control notification); finalized jobs are left as they are.
-- A job cancelled here is announced on tq_final (job_wait), and settles the workflow
-- tasks that wait for it (tq_workflow_advance, migration 005).
WITH cancelled AS (
    UPDATE tq_job
    SET state = CASE WHEN state = 'running' THEN state ELSE 'cancelled'::tq_job_state END,
        finalized_at = CASE WHEN state = 'running' THEN NULL ELSE $2 END,
        metadata = CASE WHEN state = 'running'
                        THEN metadata || jsonb_build_object('cancel_attempted_at', $2::timestamptz)
                        ELSE metadata END
    WHERE id = $1
      AND state NOT IN ('cancelled', 'completed', 'discarded')
    RETURNING id, kind, args, queue, state::text AS state, priority, attempt, max_attempts,
              attempted_at, attempted_by, created_at, finalized_at, scheduled_at, errors,
              metadata, tags, output, workflow_id, workflow_task, workflow_deps,
              has_dependents AS hd
),
notified AS (
    SELECT tq_notify_final(array_agg(id) FILTER (WHERE state = 'cancelled')) AS n
    FROM cancelled
),
forgotten AS (  -- a cancelled task waits no more
    DELETE FROM tq_workflow_progress
    WHERE job_id IN (SELECT id FROM cancelled WHERE state = 'cancelled')
    RETURNING job_id
),
advanced AS (  -- after the delete (it reads its count): both change the progress rows
    SELECT tq_workflow_advance(array_agg(id) FILTER (WHERE hd AND state = 'cancelled'), $2)
        AS n
    FROM cancelled, (SELECT count(*) FROM forgotten) AS f
)
SELECT id, kind, args, queue, state, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags, output,
       workflow_id, workflow_task, workflow_deps
FROM cancelled CROSS JOIN notified CROSS JOIN advanced;

-- name: job_retry
-- Make a job available now. A running job is left alone. A job out of attempts gets one more.
-- A workflow dep that was final is live again: the tasks its failure cancelled wait for it
-- again, and those that had seen it done wait for it to complete again. A workflow task
-- with deps never runs before they allow it: it waits again (pending), and is settled at
-- once with the others waiting for its deps (migration 005).
WITH retried AS (
    UPDATE tq_job
    SET state = CASE WHEN workflow_deps IS NOT NULL THEN 'pending'::tq_job_state
                     ELSE 'available'::tq_job_state END,
        finalized_at = NULL,
        scheduled_at = CASE WHEN state = 'available' AND scheduled_at < $2 THEN scheduled_at
                            ELSE $2 END,
        max_attempts = CASE WHEN attempt >= max_attempts THEN attempt + 1
                            ELSE max_attempts END,
        metadata = metadata - 'cancel_attempted_at' - 'workflow_cancelled_by',
        -- Its partition under the limits of now: they may have changed since it ended.
        limit_key = (SELECT tq_limit_key(q.limits, tq_job.kind, tq_job.args) FROM tq_queue q
                     WHERE q.name = tq_job.queue AND q.limits IS NOT NULL)
    WHERE id = $1
      AND state <> 'running'
    RETURNING id, kind, args, queue, state::text AS state, priority, attempt, max_attempts,
              attempted_at, attempted_by, created_at, finalized_at, scheduled_at, errors,
              metadata, tags, output, workflow_id, workflow_task, workflow_deps,
              has_dependents AS hd
),
forgotten AS (  -- a retried task starts over through its deps
    DELETE FROM tq_workflow_progress WHERE job_id IN (SELECT id FROM retried)
    RETURNING job_id
),
advanced AS (  -- after the delete (it reads its count): both change the progress rows
    SELECT tq_workflow_advance(
               coalesce(array_agg(id) FILTER (WHERE hd), '{}')
               || coalesce((SELECT workflow_deps FROM retried), '{}'),
               $2) AS n
    FROM retried, (SELECT count(*) FROM forgotten) AS f
)
SELECT id, kind, args, queue, state, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags, output,
       workflow_id, workflow_task, workflow_deps
FROM retried CROSS JOIN advanced;

-- name: job_delete
-- A deleted workflow dep counts as failed for the tasks that wait for it (migration 005).
-- The deletion is announced on tq_final too: job_wait's waiters of the job learn it is gone.
WITH deleted AS (
    DELETE FROM tq_job
    WHERE id = $1
      AND state <> 'running'
    RETURNING id, kind, args, queue, state::text AS state, priority, attempt, max_attempts,
              attempted_at, attempted_by, created_at, finalized_at, scheduled_at, errors,
              metadata, tags, output, workflow_id, workflow_task, workflow_deps,
              has_dependents AS hd
),
forgotten AS (
    DELETE FROM tq_workflow_progress WHERE job_id IN (SELECT id FROM deleted)
    RETURNING job_id
),
advanced AS (  -- after the delete (it reads its count): both change the progress rows
    SELECT tq_workflow_advance(array_agg(id) FILTER (WHERE hd), now()) AS n
    FROM deleted, (SELECT count(*) FROM forgotten) AS f
),
notified AS (
    SELECT tq_notify_final(array_agg(id)) AS n FROM deleted
)
SELECT id, kind, args, queue, state, priority, attempt, max_attempts, attempted_at,
       attempted_by, created_at, finalized_at, scheduled_at, errors, metadata, tags, output,
       workflow_id, workflow_task, workflow_deps
FROM deleted CROSS JOIN advanced CROSS JOIN notified;

-- name: job_mark_waited
-- Some client waits for these jobs (job_wait): the completer announces them on tq_final
-- when they end. Finished jobs are marked too: one may be retried before the waiter
-- reads it, and its next end must be announced. A row another transaction holds is
-- skipped, never waited for (a waiter must not stall behind a write, nor deadlock with
-- the completer): it is not returned, and the caller marks it again later. Returns the
-- ids that are marked now (already marked ones included).
WITH candidates AS (
    SELECT id, waited
    FROM tq_job
    WHERE id = ANY($1::bigint[])
    ORDER BY id
    FOR UPDATE SKIP LOCKED
),
marked AS (
    UPDATE tq_job j
    SET waited = true
    FROM candidates c
    WHERE j.id = c.id AND c.waited IS NOT TRUE
    RETURNING j.id
)
SELECT id FROM candidates WHERE waited
UNION ALL
SELECT id FROM marked;

-- name: job_state
SELECT state::text FROM tq_job WHERE id = $1;

-- name: job_cancel_requested
-- Which of these running jobs has somebody asked to cancel? (The poll-mode path.)
SELECT id
FROM tq_job
WHERE id = ANY($1::bigint[])
  AND state = 'running'
  AND metadata ? 'cancel_attempted_at';

-- name: job_schedule
-- Move due scheduled/retryable jobs (due by $1) to available, at most $2 of them, and return
-- how many became available per queue. A job whose unique key is taken by another live job
-- (or by an earlier job of the same batch) is discarded instead, with the reason in metadata.
-- Among due jobs with one key, one that holds it now (being scheduled) ranks first and keeps
-- it; otherwise the first in (priority, scheduled_at, id) order takes it. (Ranked by order
-- alone, a later holder discarded the first job and was then discarded as its duplicate.)
-- A discarded job whose unique_states include `discarded` would still hold the key, which the
-- unique index refuses (failing every run of the scheduler): it leaves uniqueness instead
-- (unique_states NULL), the live job keeping the key.
WITH due AS (
    SELECT id, unique_key, unique_states, state, priority, scheduled_at
    FROM tq_job
    WHERE state IN ('retryable', 'scheduled')
      AND scheduled_at <= $1
    ORDER BY priority, scheduled_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
ranked AS (
    SELECT id, unique_key, unique_states,
           row_number() OVER (
               PARTITION BY unique_key
               ORDER BY tq_job_state_in_bitmask(unique_states, state) DESC,
                        priority, scheduled_at, id
           ) AS rn
    FROM due
    WHERE unique_key IS NOT NULL AND unique_states IS NOT NULL
      AND tq_job_state_in_bitmask(unique_states, 'available')
),
conflicting AS (
    SELECT r.id
    FROM ranked r
    WHERE r.rn > 1
       OR EXISTS (
           SELECT 1 FROM tq_job o
           WHERE o.unique_key = r.unique_key
             AND o.id <> r.id
             AND o.unique_states IS NOT NULL
             AND tq_job_state_in_bitmask(o.unique_states, o.state)
       )
),
updated AS (
    UPDATE tq_job j
    SET state = CASE WHEN c.id IS NULL THEN 'available'::tq_job_state
                     ELSE 'discarded'::tq_job_state END,
        finalized_at = CASE WHEN c.id IS NULL THEN NULL ELSE $3::timestamptz END,
        metadata = CASE WHEN c.id IS NULL THEN j.metadata
                        ELSE j.metadata || '{"unique_key_conflict": "scheduler_discarded"}'
                   END,
        unique_states = CASE WHEN c.id IS NOT NULL
                                  AND tq_job_state_in_bitmask(j.unique_states, 'discarded')
                             THEN NULL ELSE j.unique_states END
    FROM due
    LEFT JOIN conflicting c ON c.id = due.id
    WHERE j.id = due.id
    RETURNING j.id, j.queue, j.state, j.has_dependents AS hd
),
notified AS (  -- the discarded ones are final (job_wait) and settle their dependents
    SELECT tq_notify_final(array_agg(id) FILTER (WHERE state = 'discarded')) AS n
    FROM updated
),
advanced AS (
    SELECT tq_workflow_advance(array_agg(id) FILTER (WHERE hd AND state = 'discarded'), $3)
        AS n
    FROM updated
)
SELECT queue, count(*)::int
FROM updated
WHERE state = 'available'
GROUP BY queue
-- A last row (queue NULL) that reads both: a CTE nobody reads from is never run, and the
-- rows above may be none (when every due job was discarded).
UNION ALL
SELECT NULL, (SELECT n FROM notified) + (SELECT n FROM advanced);
