-- pgsched: no-transaction
-- 0008: indexes for the operator commands, so that none reads the whole job history.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Chosen by measurement on 5M jobs (4% pending over 10 queues and 50 tasks, the rest
-- finished over a week: bench/ops_at_size.py), where each of these statements read the
-- whole table or sorted every pending row (p50 170-1,750 ms; after: under 1 ms for the
-- `ls` forms, the cancel batches bound by writing their 5,000 rows):
-- - jobs_created_idx: `ls` (newest first, keyset by (created_at, id)) and `ls --since`
--   walk it backwards and stop at the limit instead of sorting the table.
-- - jobs_task_created_idx: `ls --task` likewise, within one task.
-- - jobs_pending_task_idx, jobs_pending_queue_id_idx: `cancel --task/--queue` take
--   their batches of pending rows in id order (the order they lock in) from these;
--   partial, so they stay as small as the backlog. Not `status IN ('pending',
--   'running')`: a statement about running rows would be able to read (and the planner
--   did read, ANDed with jobs_running_idx) every pending row through such an index.
-- Outside a transaction and CONCURRENTLY (README.md in this folder): claims, heartbeats
-- and completions go on during the builds. Each DROP removes what a cut-short build left.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_created_idx;
CREATE INDEX CONCURRENTLY jobs_created_idx ON {schema}.jobs (created_at, id);
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_task_created_idx;
CREATE INDEX CONCURRENTLY jobs_task_created_idx ON {schema}.jobs (task, created_at, id);
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_task_idx;
CREATE INDEX CONCURRENTLY jobs_pending_task_idx ON {schema}.jobs (task, id)
    WHERE status = 'pending';
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_queue_id_idx;
CREATE INDEX CONCURRENTLY jobs_pending_queue_id_idx ON {schema}.jobs (queue, id)
    WHERE status = 'pending';
