-- Queues and cancellation: pausing and resuming queues, queue statistics, cancelling
-- pending and running jobs. Named blocks loaded by pgsched/store.py (see queries.sql for
-- the conventions: {schema}, %(name)s parameters, the database clock).

-- name: request_cancel
-- Cancel pending jobs, and mark running ones so their worker stops them: the given ids,
-- or (ids NULL) every job of a task and/or queue, at most %(limit)s rows per call. Bulk
-- callers repeat until nothing comes back, so a running job already marked is left out
-- of the bulk form. Each affected worker is notified once with the payload
-- 'cancel:<worker id>' (enqueue wake-ups carry a bare epoch number instead). Returns each
-- id with its status afterwards: 'cancelled', or 'running' (cancel requested).
-- Rows are locked in id order so that two bulk cancels cannot deadlock each other.
-- Candidates come from two walks, each over an index that holds only what it reads:
-- pending rows by task or queue in id order (jobs_pending_task_idx and
-- jobs_pending_queue_id_idx, migration 0008), running rows through jobs_running_idx
-- (0009); neither reads the finished history.
WITH candidates AS (
    (SELECT id FROM {schema}.jobs
     WHERE status = 'pending'
       AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s::text[]))
       AND (%(task)s::text IS NULL OR task = %(task)s)
       AND (%(queue)s::text IS NULL OR queue = %(queue)s)
     ORDER BY id
     LIMIT %(limit)s)
    UNION ALL
    SELECT id FROM {schema}.jobs
    WHERE worker_id IS NOT NULL AND finished_at IS NULL AND status = 'running'
      AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s::text[]))
      AND (%(task)s::text IS NULL OR task = %(task)s)
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
      AND (%(ids)s::text[] IS NOT NULL OR cancel_requested_at IS NULL)
),
target AS (
    SELECT id FROM {schema}.jobs
    WHERE id IN (SELECT id FROM candidates) AND status IN ('pending', 'running')
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE
),
changed AS (
    UPDATE {schema}.jobs AS j SET
        status = CASE WHEN j.status = 'pending' THEN 'cancelled' ELSE j.status END
                 ::{schema}.job_status,
        finished_at = CASE WHEN j.status = 'pending' THEN now() ELSE j.finished_at END,
        cancel_requested_at = CASE WHEN j.status = 'running'
                                   THEN coalesce(j.cancel_requested_at, now()) END
    FROM target t
    WHERE j.id = t.id
    RETURNING j.id, j.status::text AS status, j.worker_id
),
wake AS (
    SELECT count(pg_notify(%(channel)s, 'cancel:' || w.worker_id)) AS workers
    FROM (SELECT DISTINCT worker_id FROM changed WHERE status = 'running') w
)
SELECT changed.id, changed.status FROM changed CROSS JOIN wake;

-- name: hold_withdrawn_windows
-- An operator's cancel of given ids (request_cancel by id, run just before it) that names
-- the job of a window planned ahead and then withdrawn: cancelled by a schedule change
-- (migrations 0016, 0021) or by a run that came first (withdrawn_overlap_window), and
-- waiting to be taken over by the planner (advance_schedules' `revived`) if the window
-- comes. The cancel makes it the operator's: its last_error is no longer the
-- withdrawal's, so it is not taken over, and the window makes no job (the id is taken).
-- A planner that takes it over first leaves it pending, which the cancel that follows
-- cancels. Bulk cancels (by task or queue) leave such jobs alone: they are not pending.
UPDATE {schema}.jobs SET last_error = 'cancelled: by an operator after its window was withdrawn'
WHERE id = ANY(%(ids)s) AND status = 'cancelled' AND attempts = 0 AND errors = '[]'
  AND last_error IN ('cancelled: its schedule changed before the window came',
                     'cancelled: withdrawn for a run that came first (overlap is off)')
RETURNING id;

-- name: finish_cancelled_jobs
-- Record running jobs this worker stopped because a cancel was requested. Fenced like
-- complete_jobs (and on the request itself); returns the ids actually recorded.
UPDATE {schema}.jobs AS j SET
    status = 'cancelled', finished_at = now(), lease_until = NULL,
    last_error = 'cancelled while running',
    errors = j.errors || jsonb_build_object(
        'attempt', j.attempts, 'worker_id', j.worker_id, 'at', now(),
        'error', 'cancelled on request while running')
FROM unnest(%(ids)s::text[], %(attempts)s::int[]) AS c(id, attempt)
WHERE j.id = c.id AND j.attempts = c.attempt
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
  AND j.cancel_requested_at IS NOT NULL
RETURNING j.id;

-- name: pause_queues
-- Stop every worker from claiming from these queues. Returns the queues newly paused
-- (one already paused keeps its original time, author and reason).
INSERT INTO {schema}.paused_queues (queue, paused_by, reason)
SELECT unnest(%(queues)s::text[]), %(paused_by)s, %(reason)s
ON CONFLICT (queue) DO NOTHING
RETURNING queue;

-- name: resume_queues
-- Let workers claim from these queues again, and wake idle workers at once. Returns the
-- queues that were paused.
WITH resumed AS (
    DELETE FROM {schema}.paused_queues WHERE queue = ANY(%(queues)s::text[]) RETURNING queue
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM now())::text)
    FROM resumed HAVING count(*) > 0
)
SELECT resumed.queue FROM resumed LEFT JOIN wake ON true;

-- name: queue_stats
-- Per queue: due, scheduled (future) and running jobs, the lag of the oldest due job, and
-- whether it is paused; paused queues without jobs are listed too. Pending rows are
-- counted up to %(count_limit)s per queue (pending_counts, migration 0015: `capped`
-- marks due and scheduled as lower bounds; NULL counts all, for metrics); running rows
-- through jobs_running_idx. Neither reads the finished history.
WITH pending AS (
    SELECT queue, due, jobs - due AS scheduled, oldest_due AS oldest, capped
    FROM {schema}.pending_counts(%(count_limit)s)
),
running AS (
    SELECT queue, count(*) AS running FROM {schema}.jobs
    WHERE worker_id IS NOT NULL AND finished_at IS NULL AND status = 'running'
    GROUP BY queue
),
queues AS (
    SELECT queue FROM pending UNION SELECT queue FROM running
    UNION SELECT queue FROM {schema}.paused_queues
)
SELECT q.queue,
       coalesce(p.due, 0) AS due,
       coalesce(p.scheduled, 0) AS scheduled,
       coalesce(r.running, 0) AS running,
       coalesce(p.capped, false) AS capped,
       greatest(0, extract(epoch FROM now() - p.oldest))::float8 AS lag_seconds,
       z.queue IS NOT NULL AS paused, z.paused_at, z.paused_by, z.reason
FROM queues q
LEFT JOIN pending p ON p.queue = q.queue
LEFT JOIN running r ON r.queue = q.queue
LEFT JOIN {schema}.paused_queues z ON z.queue = q.queue
ORDER BY q.queue;
