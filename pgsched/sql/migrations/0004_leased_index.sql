-- 0004: orphan recovery's index covers leased rows, so the fenced writes cannot use it.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Why: the index was partial on status = 'running'. complete_jobs, heartbeat_jobs and
-- release_jobs filter on status = 'running' too, so the planner could read their target
-- rows through it, and it did: statistics taken while jobs were pending say that almost
-- no row is running, so a nested loop over "all running rows" x "the batch" looked free.
-- During a backlog drain the running rows and the batch both grow, and one completion
-- took seconds (measured: a 20,000 job drain fell from 8,000 to 1,500 jobs/s). With the
-- index on lease_until IS NOT NULL those statements can only look rows up by primary
-- key, one probe per id, whatever the statistics say.
--
-- Invariant: lease_until is set exactly while a job is running (the claim sets it, every
-- way out of running clears it). recover_orphans' `lease_until < now()` implies the
-- predicate, so it still walks only leased rows.
CREATE INDEX jobs_leased_idx ON {schema}.jobs (lease_until) WHERE lease_until IS NOT NULL;
DROP INDEX {schema}.jobs_running_lease_idx;
