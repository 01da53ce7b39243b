-- The operator commands' statements (status, top, workers, retry), loaded by
-- pgsched/store.py like every sql/*.sql file. Same conventions as queries.sql: {schema}
-- is the quoted schema identifier, %(name)s are parameters, time is the database clock.
--
-- Everything here but ops_retry_jobs only reads. The dashboard (`pgsched top`) runs the
-- read statements once a second, so each is shaped to touch the rows it reports on and
-- never the whole job history: pending and running rows through their partial indexes,
-- finished rows through jobs_finished_idx (status, finished_at). Running rows are found
-- with `worker_id IS NOT NULL AND finished_at IS NULL AND status = 'running'`: the first
-- two terms are the predicate of jobs_running_idx (migration 0009), the last keeps the
-- meaning exact.

-- name: ops_job_counts
-- Jobs per queue and status (one pass over the table: `pgsched status` only). For pending
-- rows also how many are due and the oldest due time.
SELECT queue, status::text AS status, count(*) AS jobs,
       count(*) FILTER (WHERE status = 'pending' AND execution_time <= now()) AS due,
       min(execution_time) FILTER (WHERE status = 'pending' AND execution_time <= now())
           AS oldest_due
FROM {schema}.jobs
GROUP BY queue, status
ORDER BY queue, status;

-- name: ops_finished_estimates
-- Finished jobs per status as the planner estimates them: the table's row count
-- (pg_class.reltuples) times the status's share among the most common values that
-- ANALYZE sampled (autovacuum analyzes jobs once a hundredth of it changed, migration 0009). No
-- row of jobs is read. `rows` is the estimated size of the whole table (0 before the
-- first ANALYZE); a status too rare to be sampled estimates as 0.
WITH t AS (
    SELECT greatest(c.reltuples, 0) AS rows, n.nspname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = '{schema}.jobs'::regclass
),
shares AS (
    SELECT v.status, v.share
    FROM t, pg_stats s,
         unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS v(status, share)
    WHERE s.schemaname = t.nspname AND s.tablename = 'jobs' AND s.attname = 'status'
)
SELECT f.status, round(t.rows * coalesce(shares.share, 0))::bigint AS jobs,
       t.rows::bigint AS rows
FROM t CROSS JOIN unnest(ARRAY['completed', 'failed', 'cancelled', 'expired']) AS f(status)
LEFT JOIN shares ON shares.status = f.status;

-- name: ops_active_counts
-- Like ops_job_counts for pending and running jobs only, never reading the history:
-- pending rows per queue counted up to %(count_limit)s (pending_counts, migration 0015:
-- `capped` marks lower bounds; the oldest due time is exact), running rows through
-- jobs_running_idx (they are at most the workers' concurrency).
SELECT queue, 'pending' AS status, jobs, due, oldest_due, capped
FROM {schema}.pending_counts(%(count_limit)s)
UNION ALL
SELECT queue, 'running', count(*), 0, NULL, false
FROM {schema}.jobs WHERE worker_id IS NOT NULL AND finished_at IS NULL
      AND status = 'running'
GROUP BY queue
ORDER BY 1, 2;

-- name: ops_throughput
-- Jobs that ended completed, failed or expired in the last minute and the last hour
-- (by finished_at; a failed attempt that is retried has not ended and is not counted).
SELECT
    count(*) FILTER (WHERE status = 'completed' AND finished_at > now() - interval '1 minute')
        AS completed_1m,
    count(*) FILTER (WHERE status = 'failed' AND finished_at > now() - interval '1 minute')
        AS failed_1m,
    count(*) FILTER (WHERE status = 'expired' AND finished_at > now() - interval '1 minute')
        AS expired_1m,
    count(*) FILTER (WHERE status = 'completed') AS completed_1h,
    count(*) FILTER (WHERE status = 'failed') AS failed_1h,
    count(*) FILTER (WHERE status = 'expired') AS expired_1h
FROM {schema}.jobs
WHERE status IN ('completed', 'failed', 'expired') AND finished_at > now() - interval '1 hour';

-- name: ops_workers
-- The worker registry with the age of each heartbeat and how many jobs each runs now.
SELECT w.id, w.host, w.pid, w.version, w.concurrency, w.queues, w.started_at,
       w.heartbeat_at, extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age,
       coalesce(r.running, 0) AS running
FROM {schema}.workers w
LEFT JOIN (
    SELECT worker_id, count(*) AS running FROM {schema}.jobs
    WHERE worker_id IS NOT NULL AND finished_at IS NULL
      AND status = 'running' GROUP BY worker_id
) r ON r.worker_id = w.id
ORDER BY w.started_at, w.id;

-- name: ops_running_jobs
-- Running jobs, longest running first, with their elapsed time.
SELECT id, task, queue, worker_id, attempts, started_at, lease_until,
       extract(epoch FROM now() - started_at)::float8 AS elapsed
FROM {schema}.jobs WHERE worker_id IS NOT NULL AND finished_at IS NULL
      AND status = 'running'
ORDER BY started_at, id
LIMIT %(limit)s;

-- name: ops_next_jobs
-- The pending jobs that run next: due ones in claim order (priority, then due time), then
-- future ones by due time. Like claim_jobs it walks the pending index (queue, priority,
-- execution_time, id) once per (queue, priority) pair, the queues found by a loose index
-- scan, so a backlog of millions is never sorted: at most %(limit)s rows per pair are.
-- Suspects are in an index of their own (jobs_pending_suspect_idx, same key as
-- jobs_pending_ordinary_queue_idx, migration 0020): each pair is walked in both. The
-- loose scan reads jobs_pending_queue_id_idx, which holds every pending row.
WITH RECURSIVE pending_queues AS (
    (SELECT queue FROM {schema}.jobs WHERE status = 'pending' ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {schema}.jobs j
            WHERE j.status = 'pending' AND j.queue > q.queue ORDER BY j.queue LIMIT 1)
    FROM pending_queues q WHERE q.queue IS NOT NULL
)
SELECT n.*, extract(epoch FROM n.execution_time - now())::float8 AS due_in
FROM pending_queues q
CROSS JOIN unnest(%(priorities)s::smallint[]) AS p(priority)
CROSS JOIN LATERAL (
    (SELECT id, task, queue, priority, execution_time, attempts, last_error
     FROM {schema}.jobs
     WHERE status = 'pending' AND NOT suspect AND queue = q.queue AND priority = p.priority
     ORDER BY execution_time, id
     LIMIT %(limit)s)
    UNION ALL
    (SELECT id, task, queue, priority, execution_time, attempts, last_error
     FROM {schema}.jobs
     WHERE status = 'pending' AND suspect AND queue = q.queue AND priority = p.priority
     ORDER BY execution_time, id
     LIMIT %(limit)s)
) n
WHERE q.queue IS NOT NULL
ORDER BY n.execution_time > now(),
         CASE WHEN n.execution_time <= now() THEN n.priority END,
         n.execution_time, n.id
LIMIT %(limit)s;

-- name: ops_recent_failures
-- The most recently failed jobs (the dead-letter queue, newest first).
SELECT id, task, queue, attempts, finished_at, last_error,
       extract(epoch FROM now() - finished_at)::float8 AS age
FROM {schema}.jobs WHERE status = 'failed'
ORDER BY finished_at DESC, id
LIMIT %(limit)s;

-- name: ops_retry_jobs
-- Put failed, expired or cancelled jobs back to pending, due now, with a fresh retry and
-- recovery budget; the attempts counter and the errors history are kept (attempt numbers
-- stay unique and every write after a claim stays fenced), and the history records the
-- retry: budgets dated from the history (defer_job's) start again after it. Selects either the given ids
-- or, with %(ids)s NULL, the jobs matching the filters that ended before %(cutoff)s: a
-- bulk retry runs in batches, and the cut-off keeps a job it retried that failed again
-- meanwhile from being picked up a second time. Wakes the workers like insert_job.
WITH picked AS (
    SELECT id FROM {schema}.jobs
    WHERE status = ANY(%(statuses)s::{schema}.job_status[])
      AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s::text[]))
      AND (%(task)s::text IS NULL OR task = %(task)s)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
      AND finished_at <= %(cutoff)s
    ORDER BY finished_at, id
    LIMIT %(limit)s
    FOR UPDATE
),
runs AS (
    UPDATE {schema}.jobs AS j SET
        -- one scheduled with depends_on waits again (dependencies.sql; settled next)
        -- a fresh count of crashes (recover_orphans): no longer a suspect either
        status = 'pending', failures = 0, recoveries = 0, snoozes = 0, suspect = false,
        execution_time = CASE WHEN EXISTS (SELECT 1 FROM {schema}.job_dependencies e
                                           WHERE e.job_id = j.id)
                              THEN '9999-12-31Z' ELSE now() END,
        due_after_dependencies = CASE WHEN EXISTS (SELECT 1 FROM {schema}.job_dependencies e
                                                   WHERE e.job_id = j.id) THEN now() END,
        worker_id = NULL, lease_until = NULL, heartbeat_at = NULL, result = NULL,
        started_at = NULL, finished_at = NULL,
        -- An operator's re-run is no longer deduplicated: it must not fail on (or take the
        -- place of) a job enqueued with the same unique key since (insert_unique_job).
        unique_key = NULL, unique_until = NULL,
        errors = {schema}.append_error(j.errors, jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'outcome', 'retried'),
            %(errors_first)s, %(errors_last)s)
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.schedule_id
),
-- A retried run of an overlap = false schedule is a run in progress for its next window.
-- include: withdrawn_overlap_window
rewound AS (
    UPDATE {schema}.schedules s SET next_fire_at = least(s.next_fire_at, w.first)
    FROM (SELECT schedule_id, min(fire_time) AS first FROM withdrawn GROUP BY schedule_id) w
    WHERE s.id = w.schedule_id
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM now())::text)
    FROM runs HAVING count(*) > 0
)
SELECT runs.id FROM runs LEFT JOIN wake ON true LEFT JOIN replan ON true;
