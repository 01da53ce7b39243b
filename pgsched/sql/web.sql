-- The web service's own statements (pgsched/web), loaded by pgsched/store.py like every
-- sql/*.sql file. Same conventions as queries.sql. All of them only read; each touches
-- the rows it reports on through an index, never the whole job history.

-- name: web_job_changes
-- The change feed's one query, run every few hundred milliseconds: jobs created, started
-- or finished after %(since)s, and the current row of each id in %(watch)s (the jobs last
-- seen running: a retry back to pending or a recovery leaves no new timestamp). Each arm
-- reads one index: jobs_created_idx, jobs_leased_idx (running rows), jobs_finished_idx,
-- the primary key. Large columns (args, result) stay out: events are summaries.
WITH changed AS (
    SELECT id FROM {schema}.jobs WHERE created_at > %(since)s
    UNION
    SELECT id FROM {schema}.jobs WHERE lease_until IS NOT NULL AND started_at > %(since)s
    UNION
    -- One arm per finished status: an equality on the leading column makes each a short
    -- range scan of jobs_finished_idx; `status IN (...)` made it read the whole index.
    SELECT id FROM {schema}.jobs WHERE status = 'completed' AND finished_at > %(since)s
    UNION
    SELECT id FROM {schema}.jobs WHERE status = 'failed' AND finished_at > %(since)s
    UNION
    SELECT id FROM {schema}.jobs WHERE status = 'cancelled' AND finished_at > %(since)s
    UNION
    SELECT id FROM {schema}.jobs WHERE status = 'expired' AND finished_at > %(since)s
    UNION
    SELECT unnest(%(watch)s::text[])
)
SELECT j.id, j.task, j.queue, j.status::text AS status, j.priority, j.attempts,
       j.max_retries, j.execution_time, j.created_at, j.started_at, j.finished_at,
       j.worker_id, left(j.last_error, 500) AS last_error
FROM (SELECT id FROM changed LIMIT %(limit)s) c JOIN {schema}.jobs j ON j.id = c.id;

-- name: web_state
-- What else the dashboard shows live, small enough to read every tick: the database
-- clock, paused queues, the worker registry's membership, and the schedules' last change.
SELECT now() AS db_now,
       (SELECT coalesce(array_agg(queue ORDER BY queue), '{{}}') FROM {schema}.paused_queues)
           AS paused_queues,
       (SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM {schema}.workers) AS workers,
       (SELECT max(greatest(updated_at, last_fire_at)) FROM {schema}.schedules)
           AS schedules_changed,
       (SELECT count(*) FROM {schema}.schedules) AS schedules;

-- name: web_schedule_outcomes
-- The last %(limit)s jobs of each schedule, newest first (windows and triggered runs).
-- No index leads with schedule_id for triggered runs, so the jobs are found through each
-- schedule's window index entries plus its last_job_id.
SELECT s.id AS schedule_id, j.id, j.status::text AS status, j.execution_time,
       j.finished_at
FROM {schema}.schedules s
CROSS JOIN LATERAL (
    SELECT id, status, execution_time, finished_at FROM (
        SELECT w.id, w.status, w.execution_time, w.finished_at FROM {schema}.jobs w
        WHERE w.schedule_id = s.id AND w.fire_time IS NOT NULL
        ORDER BY w.fire_time DESC LIMIT %(limit)s
    ) windows
    UNION
    SELECT l.id, l.status, l.execution_time, l.finished_at FROM {schema}.jobs l
    WHERE l.id = s.last_job_id
    ORDER BY execution_time DESC LIMIT %(limit)s
) j
ORDER BY s.id, j.execution_time DESC;

-- name: web_throughput_series
-- Jobs that ended in each of the last 60 minutes, by outcome (jobs_finished_idx).
SELECT date_trunc('minute', finished_at) AS minute, status::text AS status,
       count(*) AS jobs
FROM {schema}.jobs
WHERE status IN ('completed', 'failed', 'expired')
  AND finished_at > date_trunc('minute', now()) - interval '59 minutes'
GROUP BY 1, 2
ORDER BY 1;
