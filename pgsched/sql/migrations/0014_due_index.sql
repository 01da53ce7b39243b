-- pgsched: no-transaction
-- 0014: an index of pending jobs in claim order, for the flat claim (issue 14, per-tenant
-- queues). {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- A worker that serves every queue, with no per-queue caps and no global limits, claims by
-- walking this index once per priority (claim_jobs_flat in queries.sql) while more than
-- one queue has pending jobs: the same dozen probes whether 2 or 1,000 queues have jobs
-- due, where the per-queue walks of jobs_pending_queue_idx cost about 20 us per queue.
-- jobs_pending_queue_idx stays: listed and capped queues, global limits, a single queue
-- and paused queues with a due backlog still walk it. The cost is one more index entry
-- per job written as pending (partial: rows leave it when they stop being pending),
-- about 8% of schedule_bulk()'s throughput as measured for this change.
-- Outside a transaction and CONCURRENTLY (README.md in this folder): claims, heartbeats
-- and completions go on during the build. The DROP removes what a cut-short build left.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_due_idx;
CREATE INDEX CONCURRENTLY jobs_pending_due_idx
    ON {schema}.jobs (priority, execution_time, id) WHERE status = 'pending';
