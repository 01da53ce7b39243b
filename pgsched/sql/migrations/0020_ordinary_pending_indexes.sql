-- pgsched: no-transaction
-- 0020: suspects leave the pending indexes the ordinary claims walk (issue 14).
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Suspects (0019) wait near the front of every walk: their due time is their first
-- attempt's. The walks said `NOT suspect` as a filter on jobs_pending_queue_idx and
-- jobs_pending_due_idx, so after a fleet-wide crash each ordinary claim read every due
-- suspect of its path (2,033 rows with 2,000 suspects, 33 after this migration,
-- tests/faults/test_suspects.py). The two indexes are rebuilt under new names with `AND
-- NOT suspect` in their predicates, which the walks' `NOT suspect` proves; the suspects
-- have their own index (jobs_pending_suspect_idx, same key as the queue one), so every
-- pending row is in exactly one of jobs_pending_ordinary_queue_idx and
-- jobs_pending_suspect_idx. What reads every pending row of a queue in key order (`top`'s
-- next jobs, pending_counts below) walks both. The claim's statistics gate
-- (store.PREPARED_CLAIM_ROWS) reads jobs_pending_ordinary_due_idx's reltuples from now
-- on: the ordinary pending rows, those its walks read.
--
-- Outside a transaction and CONCURRENTLY (README.md in this folder): claims, heartbeats
-- and completions go on during the builds, as for 0005 and 0014. The old indexes stay
-- (see below), so the claims of workers still running the code before 0020 walk them,
-- and those of this code find a new one as soon as it is valid (until then they plan
-- against an old one and filter, as before). Each DROP before a CREATE removes what a
-- cut-short build left; every statement can run again.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_ordinary_queue_idx;
CREATE INDEX CONCURRENTLY jobs_pending_ordinary_queue_idx
    ON {schema}.jobs (queue, priority, execution_time, id)
    WHERE status = 'pending' AND NOT suspect;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_pending_ordinary_due_idx;
CREATE INDEX CONCURRENTLY jobs_pending_ordinary_due_idx
    ON {schema}.jobs (priority, execution_time, id)
    WHERE status = 'pending' AND NOT suspect;
-- pending_counts (0015) counts every pending row, suspects too: each count and probe
-- reads the ordinary index and the suspect one, up to the same limits. The queues come
-- from a loose scan of jobs_pending_queue_id_idx (0008), which holds them all.
CREATE OR REPLACE FUNCTION {schema}.pending_counts(count_limit integer)
RETURNS TABLE (queue text, jobs bigint, due bigint, oldest_due timestamptz, capped boolean)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE pending_queues AS (
        (SELECT j.queue FROM {schema}.jobs j WHERE j.status = 'pending'
         ORDER BY j.queue LIMIT 1)
        UNION ALL
        SELECT (SELECT j.queue FROM {schema}.jobs j
                WHERE j.status = 'pending' AND j.queue > q.queue ORDER BY j.queue LIMIT 1)
        FROM pending_queues q WHERE q.queue IS NOT NULL
    )
    SELECT q.queue, least(c.jobs, count_limit), least(c.due, count_limit), o.oldest_due,
           coalesce(c.jobs > count_limit, false)
    FROM pending_queues q
    CROSS JOIN LATERAL (
        SELECT count(*) AS jobs, count(*) FILTER (WHERE s.execution_time <= now()) AS due
        FROM ((SELECT j.execution_time FROM {schema}.jobs j
               WHERE j.status = 'pending' AND NOT j.suspect AND j.queue = q.queue
               ORDER BY j.priority, j.execution_time
               LIMIT count_limit + 1)
              UNION ALL
              (SELECT j.execution_time FROM {schema}.jobs j
               WHERE j.status = 'pending' AND j.suspect AND j.queue = q.queue
               ORDER BY j.priority, j.execution_time
               LIMIT count_limit + 1)) s
    ) c
    CROSS JOIN LATERAL (
        SELECT min(f.execution_time) AS oldest_due
        FROM generate_series(0, 9) AS p(priority)
        CROSS JOIN LATERAL (
            (SELECT j.execution_time FROM {schema}.jobs j
             WHERE j.status = 'pending' AND NOT j.suspect AND j.queue = q.queue
               AND j.priority = p.priority AND j.execution_time <= now()
             ORDER BY j.execution_time LIMIT 1)
            UNION ALL
            (SELECT j.execution_time FROM {schema}.jobs j
             WHERE j.status = 'pending' AND j.suspect AND j.queue = q.queue
               AND j.priority = p.priority AND j.execution_time <= now()
             ORDER BY j.execution_time LIMIT 1)) f
    ) o
    WHERE q.queue IS NOT NULL
$$;
-- claim_room (0012) asks whether a global limit held back jobs due now: its probe of the
-- due rows of each (queue, priority), suspects too, reads both indexes likewise. With no
-- suspect term it could use neither: 6 sequential scans, 300,036 rows read by a claim of
-- a queue at its limit with 50,000 jobs due later (tests/test_limits.py). Same body but the probe, whose ORDER BY is the
-- indexes' (as for the flat claim's paused probes in queries.sql): unordered, PostgreSQL
-- planned it as a scan of jobs expected to stop at an early match. The runner keeps a
-- dollar-quoted body whole (README.md in this folder).
CREATE OR REPLACE FUNCTION {schema}.claim_room(
    queues text[], caps integer[], priorities smallint[], recheck double precision
) RETURNS TABLE (queue text, room integer, recheck_at timestamptz)
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    locked text[];
BEGIN
    SELECT coalesce(array_agg(l.queue), '{{}}') INTO locked FROM (
        SELECT ql.queue FROM {schema}.queue_limits ql
        WHERE ql.queue = ANY(queues) ORDER BY ql.queue
        FOR UPDATE SKIP LOCKED) l;
    RETURN QUERY
    SELECT x.name, x.room,
           CASE WHEN x.room < x.cap AND x.room < (
                    SELECT count(*) FROM (
                        SELECT 1 FROM unnest(priorities) AS p(priority)
                        CROSS JOIN LATERAL (
                            (SELECT 1 FROM {schema}.jobs j
                             WHERE j.status = 'pending' AND NOT j.suspect
                               AND j.queue = x.name AND j.priority = p.priority
                               AND j.execution_time <= now()
                             ORDER BY j.execution_time LIMIT x.room::bigint + 1)
                            UNION ALL
                            (SELECT 1 FROM {schema}.jobs j
                             WHERE j.status = 'pending' AND j.suspect
                               AND j.queue = x.name AND j.priority = p.priority
                               AND j.execution_time <= now()
                             ORDER BY j.execution_time LIMIT x.room::bigint + 1)) d
                        LIMIT x.room::bigint + 1) due)
                THEN x.recheck_at END
    FROM (
        SELECT q.name, q.cap,
               CASE WHEN l.queue IS NULL THEN NULL
                    WHEN NOT (l.queue = ANY(locked)) THEN 0
                    ELSE greatest(0, least(
                        coalesce(l.global_concurrency - r.running, 2147483647),
                        coalesce(l.rate_jobs - w.started, 2147483647)))::integer END AS room,
               CASE WHEN l.queue = ANY(locked) AND l.rate_jobs - w.started
                             < coalesce(l.global_concurrency - r.running, 2147483647)
                    THEN greatest(w.oldest + make_interval(secs => l.rate_period_seconds),
                                  clock_timestamp())
                    ELSE clock_timestamp() + make_interval(secs => recheck) END AS recheck_at
        FROM unnest(queues, caps) AS q(name, cap)
        LEFT JOIN {schema}.queue_limits l ON l.queue = q.name
        LEFT JOIN LATERAL (
            -- jobs_running_idx (0009): the running rows, then those of this queue
            SELECT count(*) AS running FROM {schema}.jobs j
            WHERE j.worker_id IS NOT NULL AND j.finished_at IS NULL AND j.status = 'running'
              AND j.queue = l.queue AND l.global_concurrency IS NOT NULL
        ) r ON true
        LEFT JOIN LATERAL (
            SELECT coalesce(sum(b.jobs), 0) AS started, min(b.at) AS oldest
            FROM unnest(l.window_at, l.window_jobs) AS b(at, jobs)
            WHERE b.at > now() - make_interval(secs => l.rate_period_seconds)
        ) w ON true
    ) x;
END
$$;
-- jobs_pending_queue_idx and jobs_pending_due_idx stay. Workers of the release before
-- this migration run on during a rolling upgrade (a worker migrates as it starts), and
-- their loose scans, next_due and paused probes say only `status = 'pending'`, which no
-- new index's predicate is proven by: without the old indexes their claims scanned jobs
-- (700,076 rows read for 10 jobs among 100,000, tests/test_upgrade_0020.py). Kept, they
-- also leave the claims an index while this file runs again after a failure (its DROP
-- of a new index before it is built again). A later release drops them (expand, then
-- contract); until then each pending row costs two index entries more when it is added
-- (bulk enqueue about a quarter slower, docs/delivery.md).
-- The builds above set the new indexes' reltuples to the pending rows there are, which
-- the claim's statistics gate (store.PREPARED_CLAIM_ROWS) and the statistics check
-- (refresh_pending_statistics) read as what the last ANALYZE saw: a burst that came
-- since would look analysed, and claims were prepared on column statistics that counted
-- no pending row (1,499,364 rows read by 13 claims of 2 after a burst of 50,000,
-- tests/test_upgrade_0020.py). An ANALYZE samples the table as the builds saw it; it
-- takes no lock that stops claims, heartbeats or completions. Only a table analysed or
-- vacuumed before: a new one (reltuples -1) stays as the claims' gates expect it.
DO $$
BEGIN
    IF (SELECT reltuples FROM pg_class WHERE oid = '{schema}.jobs'::regclass) >= 0 THEN
        ANALYZE {schema}.jobs;
    END IF;
END
$$;
