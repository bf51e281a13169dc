-- Durable state of periodic jobs (tq_periodic_job). The leader reads it, then writes each
-- run's job and the job's new state in one transaction.

-- name: periodic_job_get_many
SELECT id, schedule, next_run_at, last_run_at
FROM tq_periodic_job
WHERE id = ANY($1::text[]);

-- name: periodic_job_save
-- Compare-and-set: write the new state ($1-$4) only if the row is still as the caller read
-- it ($6 next_run_at, $7 schedule, $8 last_run_at; $6 and $7 NULL: there was no row).
-- Returns a row only when written, so a caller that lost a race rolls back and reads
-- again. last_run_at never moves backwards.
INSERT INTO tq_periodic_job (id, schedule, next_run_at, last_run_at, updated_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE
    SET schedule = EXCLUDED.schedule,
        next_run_at = EXCLUDED.next_run_at,
        last_run_at = greatest(tq_periodic_job.last_run_at, EXCLUDED.last_run_at),
        updated_at = EXCLUDED.updated_at
    WHERE tq_periodic_job.next_run_at IS NOT DISTINCT FROM $6::timestamptz
      AND tq_periodic_job.schedule IS NOT DISTINCT FROM $7::text
      AND tq_periodic_job.last_run_at IS NOT DISTINCT FROM $8::timestamptz
RETURNING id;

-- name: periodic_claim_limits
-- Inside the transaction that claims a periodic run (and holds its state row until it
-- ends): another claimant waits at most 2 s for the row (then 55P03, a lost race), and a
-- session left idle inside the transaction for 30 s (its process wedged) is ended by the
-- server, releasing the row for the other clients. Returns the lock_timeout in force
-- before, which periodic_claim_lock_timeout_restore puts back once the claim is made, so
-- that the rest of the transaction (the run's insert, the commit) waits as usual.
SELECT current_setting('lock_timeout'),
       set_config('lock_timeout', '2s', true),
       set_config('idle_in_transaction_session_timeout', '30s', true);

-- name: periodic_claim_lock_timeout_restore
SELECT set_config('lock_timeout', $1, true);
