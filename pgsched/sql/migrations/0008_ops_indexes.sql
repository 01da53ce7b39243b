-- pgsched: no-transaction
-- 0008: indexes for the operator commands, so that none reads the whole job history.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Chosen by measurement on 5M jobs (4% pending over 10 queues and 50 tasks, the rest
-- finished over a week: bench/ops_at_size.py), where each of these statements read the
-- whole table (170-1,700 ms):
-- - jobs_created_idx: `ls` (newest first, keyset by (created_at, id)) and `ls --since`
--   walk it backwards and stop at the limit instead of sorting the table.
-- - jobs_task_created_idx: `ls --task` likewise, within one task.
-- - jobs_active_task_idx, jobs_active_queue_idx: `cancel --task/--queue` lock their
--   batches in id order over pending and running rows only (partial, so they stay as
--   small as the live work and finished history never enters them).
-- Outside a transaction and CONCURRENTLY (README.md in this folder): claims, heartbeats
-- and completions go on during the builds. Each DROP removes what a cut-short build left.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_created_idx;
CREATE INDEX CONCURRENTLY jobs_created_idx ON {schema}.jobs (created_at, id);
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_task_created_idx;
CREATE INDEX CONCURRENTLY jobs_task_created_idx ON {schema}.jobs (task, created_at, id);
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_active_task_idx;
CREATE INDEX CONCURRENTLY jobs_active_task_idx ON {schema}.jobs (task, id)
    WHERE status IN ('pending', 'running');
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_active_queue_idx;
CREATE INDEX CONCURRENTLY jobs_active_queue_idx ON {schema}.jobs (queue, id)
    WHERE status IN ('pending', 'running');
