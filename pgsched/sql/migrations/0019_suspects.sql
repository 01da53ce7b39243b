-- pgsched: no-transaction
-- 0019: suspects, the jobs recovered from a crash that no single job can be blamed for
-- (recover_orphans in queries.sql): each runs alone until it ends, so that a poison pill
-- is told apart from the innocent jobs that ran beside it.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- The column has a constant default: PostgreSQL adds it without rewriting the table (a
-- brief ACCESS EXCLUSIVE lock on jobs, no scan). Outside a transaction and CONCURRENTLY
-- (README.md in this folder), so that claims, heartbeats and completions go on during the
-- index build; each statement is safe to run again.
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS suspect boolean NOT NULL DEFAULT false;
-- A shared crash is recorded too (so that its jobs recovered by later passes are not
-- taken for a crash of their own), against no job.
ALTER TABLE {schema}.worker_crashes ALTER COLUMN job_id DROP NOT NULL;
-- The suspect claim's walk (claim_jobs with suspects = true) and the cheap `suspect_due`
-- probe every claim makes: the pending suspects in the order of the claim's per-queue
-- walks. Almost always empty: written only for jobs of a crash, and left by their claim.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_suspect_idx;
CREATE INDEX CONCURRENTLY jobs_pending_suspect_idx
    ON {schema}.jobs (queue, priority, execution_time, id) WHERE status = 'pending' AND suspect;
