-- Undo version 4: no limits stored, no partition keys, no recent starts, no limited fetch.
DROP FUNCTION tq_job_get_available_limited(text, timestamptz, integer, text, jsonb);
DROP FUNCTION tq_limit_project(text, boolean, text[]);
DROP FUNCTION tq_limit_key(jsonb, text, jsonb);
DROP FUNCTION tq_limit_key_of(boolean, text[], text, jsonb);
DROP FUNCTION tq_limit_shape(boolean, text[]);
DROP TABLE tq_rate_start;
DROP INDEX tq_job_limit_idx;
ALTER TABLE tq_job DROP COLUMN limit_key;
ALTER TABLE tq_queue DROP COLUMN limits;
