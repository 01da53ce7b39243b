-- pgsched: no-transaction
-- 0005: queues that can be paused, a claim index per queue, and cancelling running jobs.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
-- Outside a transaction (README.md in this folder), so that the index is built
-- CONCURRENTLY; every statement can run again after a failure.

-- A queue listed here is not claimed from by any worker until it is resumed (deleted
-- from here). Running jobs of a paused queue run to their end.
CREATE TABLE IF NOT EXISTS {schema}.paused_queues (
    queue      text PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text,  -- user@host of whoever ran `pgsched pause --queue`
    reason     text
);

-- Set by `pgsched cancel` on a running job: its worker stops the task and records the
-- job as cancelled; if the worker is gone, orphan recovery cancels it instead of running
-- it again. Cleared when a job is claimed, so it only ever applies to the current attempt.
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz;

-- The claim path walks each (queue, priority) pair over its due rows only, so a paused
-- queue's backlog or queues served by other workers are never scanned (see claim_jobs).
-- The leading queue column also lets a loose index scan list the queues with pending
-- jobs in one probe per queue. It replaces the (priority, execution_time, id) index.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_queue_idx;
CREATE INDEX CONCURRENTLY jobs_pending_queue_idx
    ON {schema}.jobs (queue, priority, execution_time, id) WHERE status = 'pending';
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_idx;
