-- Undo version 2: forget every periodic job's schedule state (their jobs stay).
DROP TABLE IF EXISTS tq_periodic_job;
