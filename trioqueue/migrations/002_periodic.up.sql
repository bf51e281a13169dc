-- trioqueue schema, version 2: durable state of periodic jobs.
--
-- One row per periodic job id, written by the leader in the same transaction as each run's
-- job, so a new leader (or a restarted process) knows which run comes next and which runs
-- were missed while nobody was leading. `schedule` is the schedule the row was computed
-- for ('every=60', 'cron=*/5 * * * *'); when the configured schedule differs, the state
-- starts afresh. NULL means unknown: next_run_at is trusted as it is.
CREATE TABLE tq_periodic_job (
    id          text PRIMARY KEY,
    schedule    text,
    next_run_at timestamptz NOT NULL,
    last_run_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tq_periodic_job_id_length CHECK (char_length(id) > 0 AND char_length(id) < 129)
);
