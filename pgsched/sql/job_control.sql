-- Job control from inside a task and from the caller's transaction (issue 13): snoozes,
-- failing at once, a task's own completion, waiting for an outcome, enqueueing through
-- the caller's connection. Loaded by pgsched/store.py like every sql/*.sql file; same
-- conventions as queries.sql. Every write after a claim is fenced on (id, attempt,
-- worker_id, status 'running'), like complete_jobs.

-- name: snooze_job
-- A task raised Retry(delay): pending again at now() + %(delay_seconds)s without counting
-- a failure, unless the job has snoozed %(max_snoozes)s times already (then it fails, with
-- the cap in its error) or a cancel was requested (cancelled). Each snooze is an `errors`
-- entry with outcome 'snoozed', so `show` tells it from an interrupted attempt. Returns
-- the new status and due time, or no row when the lease was lost. The decision locks the
-- row (FOR UPDATE), so it reads the row's latest version: a cancel committed while this
-- statement waited on the lock is seen, not the statement's older snapshot.
WITH decision AS (
    SELECT CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN j.snoozes >= %(max_snoozes)s THEN 'failed'
                ELSE 'pending' END AS status
    FROM {schema}.jobs AS j
    WHERE j.id = %(id)s
    FOR UPDATE
)
UPDATE {schema}.jobs AS j SET
    status = d.status::{schema}.job_status,
    snoozes = j.snoozes + CASE WHEN d.status = 'pending' THEN 1 ELSE 0 END,
    failures = j.failures + CASE WHEN d.status = 'failed' THEN 1 ELSE 0 END,
    execution_time = CASE WHEN d.status = 'pending'
        THEN now() + make_interval(secs => %(delay_seconds)s) ELSE j.execution_time END,
    finished_at = CASE WHEN d.status = 'pending' THEN NULL ELSE now() END,
    worker_id = CASE WHEN d.status = 'pending' THEN NULL ELSE j.worker_id END,
    lease_until = NULL, heartbeat_at = NULL,
    last_error = CASE WHEN d.status = 'failed'
        THEN 'snoozed ' || j.snoozes || ' times, the task''s max_snoozes: raise Retry less '
             || 'often, or raise max_snoozes in @task'
        ELSE j.last_error END,
    errors = {schema}.append_error(j.errors, jsonb_build_object(
        'attempt', j.attempts, 'worker_id', j.worker_id, 'started_at', j.started_at,
        'at', now(), 'outcome', CASE WHEN d.status = 'failed' THEN 'failed' ELSE 'snoozed' END,
        'error', CASE WHEN d.status = 'failed' THEN 'too many snoozes (' || j.snoozes || ')'
                      ELSE 'snoozed for ' || %(delay_seconds)s || 's' END),
        %(errors_first)s, %(errors_last)s)
FROM decision AS d
WHERE j.id = %(id)s AND j.attempts = %(attempt)s
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
RETURNING j.status, j.execution_time;

-- name: fail_job_now
-- A failed attempt that gets no retry (the task raised Fail, or an exception outside its
-- retry_on): failed at once whatever budget is left (cancelled, if a cancel was
-- requested). Fenced and returning like fail_job.
UPDATE {schema}.jobs AS j SET
    failures = j.failures + 1,
    status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE 'failed' END
             ::{schema}.job_status,
    finished_at = now(),
    lease_until = NULL,
    last_error = %(error)s,
    errors = {schema}.append_error(j.errors, jsonb_build_object(
        'attempt', j.attempts, 'worker_id', j.worker_id, 'started_at', j.started_at,
        'at', now(), 'outcome', 'failed', 'error', %(error)s::text,
        'traceback', %(traceback)s::text), %(errors_first)s, %(errors_last)s)
WHERE j.id = %(id)s AND j.attempts = %(attempt)s
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
RETURNING j.status, j.execution_time;

-- name: complete_in_transaction
-- current_job().complete(conn, result): the task completes its own job on its own
-- connection, in its own transaction. Fenced like complete_jobs; one row when written.
UPDATE {schema}.jobs AS j SET
    status = 'completed', result = %(result)s::jsonb, finished_at = now(), lease_until = NULL
WHERE j.id = %(id)s AND j.attempts = %(attempt)s
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
RETURNING j.id;

-- name: completed_by
-- Whether this attempt's own completion (complete_in_transaction) committed: the worker
-- then writes nothing for it. A read only: what follows it is fenced anyway.
SELECT count(*) > 0 AS committed FROM {schema}.jobs
WHERE id = %(id)s AND attempts = %(attempt)s AND worker_id = %(worker_id)s
  AND status = 'completed';

-- name: mark_awaited
-- A waiter (Scheduler.wait) asks to be told when the job ends, and reads it in the same
-- statement: a job that finished before has its row returned finished, one that finishes
-- after notifies (the jobs_notify_finished trigger, migration 0010). The row lock this
-- takes makes a finishing transaction either come first (its row is returned) or see
-- the flag. No row: no such job.
-- That lock is brief, but a claim skips the row while it is held (SKIP LOCKED) and leaves
-- it out of its next due time: a pending job that is or falls due meanwhile would wait
-- for the workers' safety poll. So a pending job wakes them, at commit (as an enqueue).
WITH marked AS (
    UPDATE {schema}.jobs SET awaited = true WHERE id = %(id)s
    RETURNING *
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM execution_time)::text)
    FROM marked WHERE status = 'pending' AND due_after_dependencies IS NULL
)
SELECT marked.* FROM marked LEFT JOIN wake ON true;

-- name: replace_jobs_given
-- schedule()/schedule_bulk() through the caller's connection (connection=...), in the
-- caller's transaction: one statement for both, the jobs as arrays. Inserts those whose
-- ids are free; a clash is skipped without a lock (the caller's transaction may be long).
-- With require_all the caller's savepoint undoes what was written. Returns the ids
-- written. The NOTIFY is delivered when the caller commits, and never when it rolls
-- back: no worker wakes for a job that does not exist. A job given no execution_time is
-- due at the commit (due_at_commit: migration 0013's deferred trigger), not at now(), the
-- transaction's start; the NOTIFY's due time, now(), is no later, so it wakes workers
-- at once.
-- With conflict_resolution REPLACE (replace_jobs_given; insert_jobs_given is the same
-- statement without it: store._variants), an existing job that is not running is
-- overwritten as replace_job does (it stays locked until the caller commits).
WITH given AS (
    SELECT * FROM unnest(%(ids)s::text[], %(tasks)s::text[], %(queues)s::text[],
                         %(args)s::jsonb[], %(kwargs)s::jsonb[], %(priorities)s::smallint[],
                         %(execution_times)s::timestamptz[], %(graces)s::float8[],
                         %(max_retries)s::int[], %(timeouts)s::float8[])
        AS g(id, task, queue, args, kwargs, priority, execution_time, misfire_grace_seconds,
             max_retries, timeout_seconds)
),
new AS (
    INSERT INTO {schema}.jobs AS j
        (id, task, queue, args, kwargs, priority, execution_time, due_at_commit,
         misfire_grace_seconds, max_retries, timeout_seconds)
    SELECT id, task, queue, args, kwargs, priority, coalesce(execution_time, now()),
           execution_time IS NULL, misfire_grace_seconds, max_retries, timeout_seconds
    FROM given
-- if replace
    ON CONFLICT (id) DO UPDATE SET
        -- include: replaced_job
    WHERE j.status <> 'running'
-- else: insert_jobs_given
    ON CONFLICT (id) DO NOTHING
-- end
    RETURNING id, execution_time
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM new HAVING count(*) > 0
)
SELECT ARRAY(SELECT id FROM new) AS written, (SELECT count(*) FROM wake) AS notified;
