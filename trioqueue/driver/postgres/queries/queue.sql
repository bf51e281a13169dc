-- Queue queries. A queue row exists once a producer has run it or somebody paused it.

-- name: queue_upsert
-- A producer announces its queue and the limits it works it with ($3, QueueLimits.to_json(),
-- or NULL for none); returns whether the queue is paused, and whether the limits differ
-- from those stored before (then the driver runs queue_rekey).
WITH old AS (SELECT limits FROM tq_queue WHERE name = $1),
announced AS (
    INSERT INTO tq_queue (name, created_at, updated_at, limits)
    VALUES ($1, $2, $2, $3::text::jsonb)
    ON CONFLICT (name) DO UPDATE SET updated_at = EXCLUDED.updated_at, limits = EXCLUDED.limits
    RETURNING paused_at IS NOT NULL AS paused
)
SELECT paused, (SELECT limits FROM old) IS DISTINCT FROM $3::text::jsonb FROM announced;

-- name: queue_rekey
-- Give the live jobs of queue $1 the partition keys of its limits $2 (NULL: none), after
-- they changed, or in a client's second announcement a few seconds after its first (to
-- catch jobs inserted while the limits were being stored). Migration 004.
UPDATE tq_job j
SET limit_key = tq_limit_key($2::text::jsonb, j.kind, j.args)
WHERE j.queue = $1
  AND j.state IN ('available', 'pending', 'retryable', 'running', 'scheduled')
  AND j.limit_key IS DISTINCT FROM tq_limit_key($2::text::jsonb, j.kind, j.args);

-- name: queue_pause
-- Pause one queue, creating its row if need be (a pause keeps its first paused_at);
-- returns the queue's name, paused or not before: clients ignore a repeated pause.
INSERT INTO tq_queue (name, created_at, updated_at, paused_at)
VALUES ($1, $2, $2, $2)
ON CONFLICT (name) DO UPDATE
    SET paused_at = coalesce(tq_queue.paused_at, EXCLUDED.paused_at),
        updated_at = EXCLUDED.updated_at
RETURNING name;

-- name: queue_pause_all
UPDATE tq_queue SET paused_at = $1, updated_at = $1
WHERE paused_at IS NULL
RETURNING name;

-- name: queue_resume
UPDATE tq_queue SET paused_at = NULL, updated_at = $2
WHERE name = $1
RETURNING name;

-- name: queue_resume_all
UPDATE tq_queue SET paused_at = NULL, updated_at = $1
WHERE paused_at IS NOT NULL
RETURNING name;

-- name: queue_paused
-- Which of these queues are paused?
SELECT name FROM tq_queue WHERE name = ANY($1::text[]) AND paused_at IS NOT NULL;

-- name: notify_many
SELECT count(pg_notify($1, p)) FROM unnest($2::text[]) AS p;

-- name: queue_list
-- Every queue row with its available and running job counts and its limits. The counts come from one
-- grouped pass over tq_job_fetch_idx, restricted to its leading `state` column: an
-- index-only scan of those two states' entries, never a scan of the whole table.
SELECT q.name, q.paused_at, q.created_at, q.updated_at,
       coalesce(c.available, 0), coalesce(c.running, 0), q.limits::text
FROM tq_queue q
LEFT JOIN (
    SELECT queue,
           count(*) FILTER (WHERE state = 'available') AS available,
           count(*) FILTER (WHERE state = 'running') AS running
    FROM tq_job
    WHERE state IN ('available', 'running')
    GROUP BY queue
) c ON c.queue = q.name
ORDER BY q.name;
