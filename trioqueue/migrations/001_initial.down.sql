-- Undo version 1: drops every trioqueue table, with all jobs in them.
DROP TABLE IF EXISTS tq_leader;
DROP TABLE IF EXISTS tq_queue;
DROP TABLE IF EXISTS tq_job;
DROP FUNCTION IF EXISTS tq_job_state_in_bitmask(bit(8), tq_job_state);
DROP TYPE IF EXISTS tq_job_state;
