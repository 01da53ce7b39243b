-- 0018: orphan recovery remembers, per worker, the crash it has counted, so that a crash
-- whose jobs come back over several passes is counted once (recover_orphans in
-- queries.sql says when a crash is the same one).
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
-- In one transaction: one new, empty table; nothing is built on jobs.

-- The last crash counted for each worker id: on which job, when, and the registry
-- heartbeat the worker was judged silent by (NULL: it was gone from the registry).
-- Written only by recover_orphans, in the statement that counts the crash; a row outlives
-- the registry row (the worker may be pruned while jobs of the crash are still running)
-- and is deleted by prune_workers once the worker holds no running job. No foreign key:
-- a crashed worker may never have been registered, or no longer be.
CREATE TABLE {schema}.worker_crashes (
    worker_id      text PRIMARY KEY,
    job_id         text NOT NULL,
    registry_beat  timestamptz,
    counted_at     timestamptz NOT NULL
);
