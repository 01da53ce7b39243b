-- 0017: analyze_jobs(), with which a worker refreshes the planner's statistics of jobs
-- when its pending jobs have outgrown them (Store.refresh_pending_statistics, issue 14).
-- {schema} is replaced by the quoted schema identifier.
--
-- Analysed while no job was pending (a drained table that keeps its history), PostgreSQL
-- expects about one pending row, and after a burst every claim, planned or prepared, read
-- a pending index whole and sorted it (one claim of 10 read 550,010 rows at 50,000
-- pending; 4,000,010 for a worker of 10 queues) until the next ANALYZE: autovacuum's,
-- which comes a minute later at best (autovacuum_naptime, a server setting; 0009 already
-- analyses after 1% of the table changed). ANALYZE needs the table's owner (or MAINTAIN,
-- PostgreSQL 17), which the runtime role of `migrate --grant` is not: SECURITY DEFINER
-- runs it as the owner, and it does nothing else. search_path is pinned so that no
-- object of the caller's can stand in for one of the catalog's; EXECUTE goes only to the
-- roles `--grant` names (sql/security.sql), not to PUBLIC.
-- SKIP_LOCKED: while autovacuum, another worker's ANALYZE, a VACUUM or a migration holds
-- the table, it is skipped at once with a WARNING (SQLSTATE 55P03), instead of waiting
-- (or making autovacuum cancel itself for a conflicting lock). lock_timeout bounds the
-- waits SKIP_LOCKED does not cover: from PostgreSQL 15.9 (16.5, 17.1) ANALYZE's in-place
-- update of jobs' pg_class row waits for a transaction that updated that row and has
-- not ended (a GRANT on jobs, `migrate --grant`), which takes no conflicting table lock.
-- client_min_messages: the caller learns that the table was skipped only from that
-- WARNING, which a role or database set to send errors only would not be sent.
CREATE FUNCTION {schema}.analyze_jobs() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET lock_timeout = '100ms'
SET client_min_messages = warning AS $$
BEGIN
    ANALYZE (SKIP_LOCKED) {schema}.jobs;
END
$$;
REVOKE ALL ON FUNCTION {schema}.analyze_jobs() FROM PUBLIC;
