-- Global limits per queue (migration 0012's queue_limits): setting and showing them.
-- Named blocks loaded by pgsched/store.py (see queries.sql for the conventions). The
-- claim enforces them (claim_jobs with claim_room); nothing here counts for it.

-- name: upsert_queue_limits
-- Set a queue's global limits: each of global_concurrency and the rate is changed only
-- when its set_ flag is true (NULL then removes it), the other is kept. Waits for a
-- claim that holds the row (milliseconds), so the claims after it see the new values.
INSERT INTO {schema}.queue_limits AS l
    (queue, global_concurrency, rate_jobs, rate_period_seconds, set_by)
VALUES (%(queue)s, %(global_concurrency)s, %(rate_jobs)s, %(rate_period_seconds)s,
        %(set_by)s)
ON CONFLICT (queue) DO UPDATE SET
    global_concurrency = CASE WHEN %(set_concurrency)s THEN excluded.global_concurrency
                              ELSE l.global_concurrency END,
    rate_jobs = CASE WHEN %(set_rate)s THEN excluded.rate_jobs ELSE l.rate_jobs END,
    rate_period_seconds = CASE WHEN %(set_rate)s THEN excluded.rate_period_seconds
                               ELSE l.rate_period_seconds END,
    set_at = now(), set_by = excluded.set_by;

-- name: drop_empty_queue_limits
-- Remove the row of a queue left with no limit at all, and wake idle workers: a limit
-- raised or removed may let jobs go that waited for room.
WITH dropped AS (
    DELETE FROM {schema}.queue_limits
    WHERE queue = %(queue)s AND global_concurrency IS NULL AND rate_jobs IS NULL
)
SELECT pg_notify(%(channel)s, extract(epoch FROM now())::text);

-- name: list_queue_limits
-- Every queue with a global limit (or the one named), with what counts against it now:
-- its running jobs and the starts in its rate window.
SELECT l.queue, l.global_concurrency, l.rate_jobs, l.rate_period_seconds, l.set_at,
       l.set_by,
       (SELECT count(*) FROM {schema}.jobs j
        WHERE j.worker_id IS NOT NULL AND j.finished_at IS NULL AND j.status = 'running'
          AND j.queue = l.queue) AS running,
       (SELECT coalesce(sum(b.jobs), 0) FROM unnest(l.window_at, l.window_jobs) AS b(at, jobs)
        WHERE b.at > now() - make_interval(secs => l.rate_period_seconds))::bigint
           AS started_in_window
FROM {schema}.queue_limits l
WHERE %(queue)s::text IS NULL OR l.queue = %(queue)s
ORDER BY l.queue;
