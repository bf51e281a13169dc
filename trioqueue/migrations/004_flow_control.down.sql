-- Undo version 4: no limits stored, no recent starts, no limited fetch.
DROP FUNCTION tq_job_get_available_limited(text, timestamptz, integer, text, jsonb);
DROP FUNCTION tq_limit_partition(boolean, text[], text, jsonb);
DROP TABLE tq_rate_start;
ALTER TABLE tq_queue DROP COLUMN limits;
