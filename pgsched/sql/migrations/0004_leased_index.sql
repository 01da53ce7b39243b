-- pgsched: no-transaction
-- 0004: the index of running jobs is keyed on their lease, so fenced writes cannot use it.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Why: jobs_running_lease_idx was partial on status = 'running'. complete_jobs,
-- heartbeat_jobs and release_jobs filter on status = 'running' too, so the planner could
-- read their rows through it, and did: statistics taken while jobs were pending say that
-- almost no row is running, so a nested loop over "every running row" x "the batch"
-- looked free. In a backlog drain both grow, and single completions took seconds
-- (a 20,000 job drain at concurrency 100 fell from about 8,000 to 1,500 jobs/s, with
-- 220-1,000 us of backend CPU per job instead of 30). Partial on lease_until IS NOT NULL,
-- the index cannot serve those statements, which then probe the primary key once per id
-- whatever the statistics say.
--
-- Invariant: lease_until is set exactly while a job is running (the claim sets it, every
-- way out of running clears it). recover_orphans' `lease_until < now()` implies the
-- predicate; queries that list running jobs say `lease_until IS NOT NULL AND status =
-- 'running'` (sql/ops.sql) to walk only the leased rows.
--
-- Built CONCURRENTLY (outside a transaction, see README.md in this folder): a plain
-- CREATE INDEX holds a SHARE lock on jobs for the whole build, which stops heartbeats and
-- completions for as long. The first DROP removes what a build cut short left (an
-- invalid index), so running the file again is safe.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_leased_idx;
CREATE INDEX CONCURRENTLY jobs_leased_idx ON {schema}.jobs (lease_until)
    WHERE lease_until IS NOT NULL;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_running_lease_idx;
