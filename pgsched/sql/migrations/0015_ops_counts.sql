-- 0015: pending jobs per queue counted up to a limit, for the operator views (`top`,
-- `queues`, `status`, the web queue list), so that a refresh costs a bounded number of
-- index entries however big the backlog is.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
--
-- Why: counting 200,000 pending rows (4% of 5M jobs, bench/ops_at_size.py) is an
-- index-only scan of every entry of jobs_pending_queue_idx, 35-100 ms on the 2-core test
-- machine, over the 20 ms an operator query may take (issue 14). This function reads at
-- most count_limit + 1 entries per queue (queues found by a loose index scan) and says
-- when it stopped: `capped` rows carry lower bounds for jobs and due (at most
-- count_limit each), shown as "10000+". The oldest due job is exact in every case: one
-- probe per (queue, priority) pair, the first entry in execution_time order.
-- count_limit NULL counts everything (metrics scrapes, which want the exact depth).
-- In one transaction: a function only; no index is built and no row is written.
CREATE FUNCTION {schema}.pending_counts(count_limit integer, priorities smallint[])
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
        FROM (SELECT j.execution_time FROM {schema}.jobs j
              WHERE j.status = 'pending' AND j.queue = q.queue
              LIMIT count_limit + 1) s
    ) c
    CROSS JOIN LATERAL (
        SELECT min(f.execution_time) AS oldest_due
        FROM unnest(priorities) AS p(priority)
        CROSS JOIN LATERAL (
            SELECT j.execution_time FROM {schema}.jobs j
            WHERE j.status = 'pending' AND j.queue = q.queue AND j.priority = p.priority
              AND j.execution_time <= now()
            ORDER BY j.execution_time LIMIT 1) f
    ) o
    WHERE q.queue IS NOT NULL
$$;
