-- Undo version 3: the fetch index over every state again, and the kind index.
DROP INDEX tq_job_fetch_idx;
CREATE INDEX tq_job_fetch_idx ON tq_job (state, queue, priority, scheduled_at, id);
CREATE INDEX tq_job_kind_idx ON tq_job (kind);
