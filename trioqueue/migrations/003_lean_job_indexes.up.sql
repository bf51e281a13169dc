-- trioqueue schema, version 3: fewer index entries per job.
--
-- `state` is indexed, so no update that changes it is a HOT update: every claim and every
-- completion writes a new row version, and that version gets an entry in every index whose
-- predicate it satisfies. Each entry costs the server time on every state change of every
-- job, so an index has to earn it.
--
-- * tq_job_kind_idx goes. Only a `kinds` filter of job_list could use it, and the
--   dashboard bounds that filter to the newest jobs anyway (docs/dashboard.md). Without it
--   a kind filter walks the primary key; pass `within_newest` to bound it on a big table.
-- * tq_job_fetch_idx keeps live jobs only. Claims, the scheduler, the rescuer and the live
--   counts read it for live states alone, and finalized jobs are found through
--   tq_job_state_finalized_at_idx. So a completed job no longer adds a fetch-index entry
--   that nothing reads, and the index stays the size of the backlog, not of the history.
--   A query can use it only when its own WHERE clause implies the predicate: spell the
--   states out (see job_list_live in driver/postgres/queries.py).
--
-- On the benchmark's machine (docs/benchmarks.md) this cut the server's time per processed
-- no-op job by about a fifth.

DROP INDEX tq_job_kind_idx;
DROP INDEX tq_job_fetch_idx;
CREATE INDEX tq_job_fetch_idx ON tq_job (state, queue, priority, scheduled_at, id)
    WHERE state IN ('available', 'pending', 'retryable', 'running', 'scheduled');
