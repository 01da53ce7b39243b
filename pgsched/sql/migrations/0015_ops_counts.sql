-- pgsched: no-transaction
-- 0015: the operator views at 5M jobs (issue 14: every CLI, `top` and web list statement
-- within 20 ms). {schema} is replaced by the quoted schema identifier; literal braces are
-- doubled. Measured with bench/ops_at_size.py (`python -m bench --only ops`): 5M jobs, 4%
-- pending over 10 queues and 50 tasks, the rest finished over a week.
--
-- pending_counts: pending jobs per queue counted up to count_limit, for `top`, `queues`,
-- `status` and the web queue list. Counting 200,000 pending rows is an index-only scan of
-- every entry of jobs_pending_queue_idx, 35-100 ms on the 2-core test machine; this reads
-- at most count_limit + 1 entries per queue (queues found by a loose index scan) and
-- says when it stopped (the ORDER BY is the index's: without it the planner may read
-- the queue's whole range into a bitmap first): `capped` rows carry lower bounds for
-- jobs and due (at most count_limit each), shown as "500+". The oldest due job is exact in every case: one
-- probe per (queue, priority) pair, the first entry in execution_time order (priorities
-- 0-9: jobs_priority_range, migration 0011).
-- count_limit NULL counts everything (metrics scrapes, which want the exact depth).
--
-- jobs_retry_task_idx, jobs_retry_queue_idx: `retry --task/--queue` take their batches
-- of failed, cancelled or expired jobs in finished_at order. Through jobs_finished_idx
-- they read every failed row of the table to find a task's few (115-700 ms for a task
-- with none); these hold only the rows a retry can pick (2% of the table measured), so
-- a batch reads what it takes. Neither is written by an enqueue, a claim, a heartbeat or
-- a completion as `completed`: their predicate is false for those rows.
--
-- Outside a transaction (README.md in this folder) for the CONCURRENTLY builds; the
-- function's body keeps its statement on lines that do not end in `;`, so the split at
-- line-ending `;` leaves it whole, and CREATE OR REPLACE runs again safely.
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
        FROM (SELECT j.execution_time FROM {schema}.jobs j
              WHERE j.status = 'pending' AND j.queue = q.queue
              ORDER BY j.priority, j.execution_time
              LIMIT count_limit + 1) s
    ) c
    CROSS JOIN LATERAL (
        SELECT min(f.execution_time) AS oldest_due
        FROM generate_series(0, 9) AS p(priority)
        CROSS JOIN LATERAL (
            SELECT j.execution_time FROM {schema}.jobs j
            WHERE j.status = 'pending' AND j.queue = q.queue AND j.priority = p.priority
              AND j.execution_time <= now()
            ORDER BY j.execution_time LIMIT 1) f
    ) o
    WHERE q.queue IS NOT NULL
$$;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_retry_task_idx;
CREATE INDEX CONCURRENTLY jobs_retry_task_idx ON {schema}.jobs (task, finished_at, id)
    WHERE status IN ('failed', 'cancelled', 'expired');
DROP INDEX CONCURRENTLY IF EXISTS {schema}.jobs_retry_queue_idx;
CREATE INDEX CONCURRENTLY jobs_retry_queue_idx ON {schema}.jobs (queue, finished_at, id)
    WHERE status IN ('failed', 'cancelled', 'expired');
