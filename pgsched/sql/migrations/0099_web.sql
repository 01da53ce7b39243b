-- 0099: the newest-first job list (`pgsched web`'s job table, `pgsched ls`).
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.

-- Without it, "the newest 50 jobs" sorts the whole table (hundreds of milliseconds at a
-- million rows). It also serves the web change feed's "created since" arm. Its cost: one
-- more index entry per non-HOT update of a job (every claim and completion already is one,
-- since they change indexed columns), a few microseconds each.
CREATE INDEX jobs_created_idx ON {schema}.jobs (created_at, id);
