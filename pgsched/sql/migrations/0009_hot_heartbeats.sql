-- pgsched: no-transaction
-- 0009: heartbeats become HOT updates; room on each page for them; autovacuum sized for
-- a table that churns.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Why: a heartbeat writes lease_until and heartbeat_at. PostgreSQL updates a row in place
-- on its page (HOT: no new index entries, the old version pruned without VACUUM) only
-- when no changed column is in any index, key or predicate, and the page has room.
-- jobs_leased_idx (0004) is on lease_until, so every heartbeat was a non-HOT update that
-- added an entry to every index (500 of 500 measured by bench/hot_heartbeats.py).
--
-- jobs_running_idx replaces it, keyed and restricted on columns no heartbeat writes.
-- Invariant: worker_id IS NOT NULL AND finished_at IS NULL holds exactly while a job is
-- running (a claim sets worker_id and clears finished_at; every way back to pending
-- clears worker_id, every way to an end sets finished_at). Orphan recovery and the
-- operator views say `worker_id IS NOT NULL AND finished_at IS NULL AND status =
-- 'running'` to walk only these rows; the status term is in the predicate too, so that
-- the planner estimates the index by the few running rows (the two NULL tests alone
-- look like 4% of a 5M-row table, and it then ANDed the index with big ones).
-- 0004's trap stays shut: a fenced write (complete, fail, release, heartbeat) states
-- worker_id = ... but never finished_at IS NULL, so it cannot read its rows through this
-- index and probes the primary key per id.
--
-- fillfactor 90 leaves a tenth of each page free, so the heartbeat's new version fits on
-- the row's own page: measured with bench/hot_heartbeats.py (50 jobs held in 10,000, 10
-- beats), see docs/pgbouncer.md's "Table health". Autovacuum: the default 20% of the
-- table is 14M dead rows at 70M jobs; every finished job is a dead version, so vacuum
-- (and analyze, whose estimates of pending and running rows the claim relies on) run
-- after 1% instead, without the cost delay that lets them fall behind the churn.
-- Outside a transaction (README.md in this folder): the index is built CONCURRENTLY and
-- ALTER TABLE SET takes only a SHARE UPDATE EXCLUSIVE lock. Every statement can run again.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_running_idx;
CREATE INDEX CONCURRENTLY jobs_running_idx ON {schema}.jobs (worker_id)
    WHERE worker_id IS NOT NULL AND finished_at IS NULL AND status = 'running';
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_leased_idx;
ALTER TABLE {schema}.jobs SET (
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0
);
