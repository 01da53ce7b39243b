-- pgsched: no-transaction
-- 0011: priorities 0-9, unique jobs, and schedules whose windows skip while a run is active.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Outside a transaction (README.md in this folder): the indexes are built CONCURRENTLY
-- and VALIDATE reads the table under a SHARE UPDATE EXCLUSIVE lock only, so claims,
-- heartbeats and completions go on meanwhile. Every statement can run again after a
-- failure half-way.

-- Priorities: the claim no longer walks a fixed list of values but the priorities each
-- queue has pending rows of (claim_jobs), so any of 0-9 is claimed. 0006's constraints
-- (IN (1, 5)) give way to new ones under new names, added NOT VALID (a brief lock, no
-- row read) before the old ones go, so that no moment is without a check. A rerun drops
-- and adds the new ones again, which is as cheap.
ALTER TABLE {schema}.jobs DROP CONSTRAINT IF EXISTS jobs_priority_range;
ALTER TABLE {schema}.jobs ADD CONSTRAINT jobs_priority_range
    CHECK (priority BETWEEN 0 AND 9) NOT VALID;
ALTER TABLE {schema}.jobs DROP CONSTRAINT IF EXISTS jobs_priority_claimed;
ALTER TABLE {schema}.schedules DROP CONSTRAINT IF EXISTS schedules_priority_range;
ALTER TABLE {schema}.schedules ADD CONSTRAINT schedules_priority_range
    CHECK (priority BETWEEN 0 AND 9) NOT VALID;
ALTER TABLE {schema}.schedules DROP CONSTRAINT IF EXISTS schedules_priority_claimed;
ALTER TABLE {schema}.jobs VALIDATE CONSTRAINT jobs_priority_range;
ALTER TABLE {schema}.schedules VALIDATE CONSTRAINT schedules_priority_range;

-- Unique jobs (schedule(..., unique_for=...)): unique_key names what is a duplicate (the
-- task and its canonical arguments, or the caller's key), unique_until ends the period
-- bucket the job was enqueued in. Both NULL for every other job. Adding a nullable
-- column without a default rewrites nothing.
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS unique_key text;
ALTER TABLE {schema}.jobs ADD COLUMN IF NOT EXISTS unique_until timestamptz;

-- At most one pending or running job per (key, bucket): the database refuses a second
-- one however many clients insert at once (insert_unique_job). A job leaves the index
-- when it finishes, so the next one can be enqueued at once. Partial on unique_key IS
-- NOT NULL: only unique jobs are in it, and no statement of the claim, the completions
-- or the operator views (none names unique_key) can read its rows through it (0008's
-- trap with status IN ('pending', 'running')).
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_unique_active_idx;
CREATE UNIQUE INDEX CONCURRENTLY jobs_unique_active_idx
    ON {schema}.jobs (unique_key, unique_until)
    WHERE unique_key IS NOT NULL AND status IN ('pending', 'running');

-- Schedules that must not overlap their own runs (@periodic(overlap=False), add
-- --no-overlap): the planner records a window whose previous run is still pending or
-- running as a skipped job instead of enqueueing it (advance_schedules). The planner
-- finds a schedule's active runs through the index below, which holds only pending and
-- running jobs made by schedules, whatever the size of their history.
ALTER TABLE {schema}.schedules ADD COLUMN IF NOT EXISTS overlap boolean NOT NULL DEFAULT true;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_schedule_active_idx;
CREATE INDEX CONCURRENTLY jobs_schedule_active_idx ON {schema}.jobs (schedule_id)
    WHERE schedule_id IS NOT NULL AND status IN ('pending', 'running');
