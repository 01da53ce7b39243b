-- Adding jobs: schedule() writes one row in one statement, schedule_bulk() streams rows
-- with COPY. Loaded by pgsched/store.py like every sql/*.sql file; same conventions as
-- queries.sql ({schema} is the quoted schema identifier, %(name)s are parameters).
--
-- Why two shapes: psycopg adapts list parameters in Python, element by element, so the
-- unnest-of-arrays insert cost more client CPU than the insert itself: about 120 us more
-- per schedule() than scalar parameters, and 9.5 us per row in bulk against 2.2 us for
-- COPY (measured on the benchmark machine, see docs/README-performance.md).
--
-- Every path wakes idle workers with one NOTIFY per statement, carrying the earliest due
-- time as epoch seconds, never one per row. A NULL execution_time is "due now" on the
-- database clock (a client whose clock is behind must not enqueue a job already past its
-- misfire grace); the COPY paths write it as `now`, which PostgreSQL reads as the
-- transaction's start, now().

-- name: insert_job
-- Insert one job unless its id exists; one row when it was inserted, none otherwise
-- (the caller reads the row count). The NOTIFY sits in RETURNING, which runs once per row
-- written: no CTE to plan, no join, no id sent back.
INSERT INTO {schema}.jobs
    (id, task, queue, args, kwargs, priority, execution_time,
     misfire_grace_seconds, max_retries, timeout_seconds)
VALUES (%(id)s, %(task)s, %(queue)s, %(args)s::jsonb, %(kwargs)s::jsonb,
        %(priority)s, coalesce(%(execution_time)s::timestamptz, now()),
        %(misfire_grace_seconds)s, %(max_retries)s, %(timeout_seconds)s)
ON CONFLICT (id) DO NOTHING
RETURNING pg_notify(%(channel)s, extract(epoch FROM execution_time)::text);

-- name: replaced_job
-- The SET list of every REPLACE (replace_job, replace_staged, and replace_jobs_given in
-- job_control.sql), included where each says `-- include: replaced_job` (store.py), so
-- that the three cannot drift apart: the new job's own values, and everything else as a
-- new job has it.
task = excluded.task, queue = excluded.queue, args = excluded.args,
kwargs = excluded.kwargs, priority = excluded.priority,
execution_time = excluded.execution_time, due_at_commit = excluded.due_at_commit,
misfire_grace_seconds = excluded.misfire_grace_seconds,
max_retries = excluded.max_retries, timeout_seconds = excluded.timeout_seconds,
-- attempts is kept: it fences every write of a claim, so a run of the job
-- before the replace can never record an outcome for the new one.
status = 'pending', failures = 0, recoveries = 0, snoozes = 0, worker_id = NULL, suspect = false,
lease_until = NULL, heartbeat_at = NULL, result = NULL, last_error = NULL,
errors = '[]', created_at = now(), started_at = NULL, finished_at = NULL,
-- The new job is not a unique one (insert_unique_job), whatever the old one was,
unique_key = NULL, unique_until = NULL,
-- and waits for nothing (dependencies.sql).
due_after_dependencies = NULL

-- name: replace_job
-- Insert one job, or overwrite the existing one unless it is running (a finished job is
-- scheduled again from scratch). One row when it was written (as insert_job).
INSERT INTO {schema}.jobs AS j
    (id, task, queue, args, kwargs, priority, execution_time,
     misfire_grace_seconds, max_retries, timeout_seconds)
VALUES (%(id)s, %(task)s, %(queue)s, %(args)s::jsonb, %(kwargs)s::jsonb,
        %(priority)s, coalesce(%(execution_time)s::timestamptz, now()),
        %(misfire_grace_seconds)s, %(max_retries)s, %(timeout_seconds)s)
ON CONFLICT (id) DO UPDATE SET
    -- include: replaced_job
WHERE j.status <> 'running'
RETURNING pg_notify(%(channel)s, extract(epoch FROM j.execution_time)::text);

-- name: copy_jobs
-- Stream new jobs straight into the table: the fast path of schedule_bulk(). An id that
-- exists already fails the whole COPY (unique violation); the caller then undoes it and
-- goes through the staging table below.
COPY {schema}.jobs
    (id, task, queue, args, kwargs, priority, execution_time,
     misfire_grace_seconds, max_retries, timeout_seconds)
FROM STDIN;

-- name: notify_due
-- Wake idle workers after copy_jobs (COPY cannot notify) with the earliest due time of
-- the rows copied: %(at)s, the earliest one given (NULL if none was), or now() when
-- %(due_now)s says some had none (copied as `now`, the transaction's start); least()
-- skips a NULL.
SELECT pg_notify(%(channel)s, extract(epoch FROM least(
    %(at)s::timestamptz, CASE WHEN %(due_now)s THEN now() END))::text);

-- name: create_staging
-- The session's staging table for schedule_bulk() calls with clashing ids or REPLACE.
-- Emptied at each commit; the same for every schema, since it holds only the new rows.
CREATE TEMP TABLE IF NOT EXISTS pgsched_new_jobs (
    id text, task text, queue text, args jsonb, kwargs jsonb, priority smallint,
    execution_time timestamptz, misfire_grace_seconds float8, max_retries integer,
    timeout_seconds float8
) ON COMMIT DELETE ROWS;

-- name: copy_staging
-- Stream jobs into the staging table (never fails on ids: it has no constraints).
COPY pg_temp.pgsched_new_jobs FROM STDIN;

-- name: insert_staged
-- Insert the staged jobs whose ids do not exist yet. Returns one row: the ids that were
-- skipped (usually none, so a large call does not ship every id back). `wake` is read in
-- a scalar subquery so that it runs even when nothing was skipped: a CTE that only
-- reads is evaluated only if something reads it.
WITH new AS (
    INSERT INTO {schema}.jobs
        (id, task, queue, args, kwargs, priority, execution_time,
         misfire_grace_seconds, max_retries, timeout_seconds)
    SELECT * FROM pg_temp.pgsched_new_jobs
    ON CONFLICT (id) DO NOTHING
    RETURNING id, execution_time
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM new HAVING count(*) > 0
)
SELECT (SELECT count(*) FROM wake) AS notified,
       ARRAY(SELECT s.id FROM pg_temp.pgsched_new_jobs s
             WHERE NOT EXISTS (SELECT 1 FROM new WHERE new.id = s.id)) AS skipped;

-- name: replace_staged
-- Insert the staged jobs, or overwrite existing ones that are not running. Returns one
-- row like insert_staged: the ids that were skipped (running jobs).
WITH new AS (
    INSERT INTO {schema}.jobs AS j
        (id, task, queue, args, kwargs, priority, execution_time,
         misfire_grace_seconds, max_retries, timeout_seconds)
    SELECT * FROM pg_temp.pgsched_new_jobs
    ON CONFLICT (id) DO UPDATE SET
        -- include: replaced_job
    WHERE j.status <> 'running'
    RETURNING id, execution_time
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM new HAVING count(*) > 0
)
SELECT (SELECT count(*) FROM wake) AS notified,
       ARRAY(SELECT s.id FROM pg_temp.pgsched_new_jobs s
             WHERE NOT EXISTS (SELECT 1 FROM new WHERE new.id = s.id)) AS skipped;

-- name: insert_unique_job
-- Insert one unique job (schedule(..., unique_for=...)) unless a pending or running job
-- has its key in the same period bucket, or its id exists. Returns one row per outcome
-- found: ('inserted', id) with a NOTIFY like insert_job; ('duplicate', id of the job
-- holding the key); ('id_taken', id) when only the id clashed. No row at all when the
-- holder committed after this statement's snapshot was taken (ON CONFLICT waited for it,
-- but the SELECTs cannot see it): the caller runs the statement again.
--
-- The key is the caller's %(unique_key)s, else the task and a hash of the canonical text
-- of the arguments (jsonb's: keys sorted, duplicates and whitespace gone), so equal
-- arguments written differently are the same key. The bucket is the period-long slice
-- of the database clock since the epoch that now() falls in, named by its end:
-- concurrent callers with one period agree on it without talking to each other, and the
-- unique index jobs_unique_active_idx (migration 0011) does the rest.
WITH wanted AS (
    SELECT coalesce(%(unique_key)s::text,
                    %(task)s || ':' || encode(sha256(convert_to(
                        %(args)s::jsonb::text || ' ' || %(kwargs)s::jsonb::text, 'UTF8')),
                        'hex')) AS unique_key,
           to_timestamp((floor(extract(epoch FROM now()) / %(unique_seconds)s::numeric) + 1)
                        * %(unique_seconds)s::numeric) AS unique_until
),
new AS (
    INSERT INTO {schema}.jobs
        (id, task, queue, args, kwargs, priority, execution_time,
         misfire_grace_seconds, max_retries, timeout_seconds, unique_key, unique_until)
    SELECT %(id)s, %(task)s, %(queue)s, %(args)s::jsonb, %(kwargs)s::jsonb,
           %(priority)s, coalesce(%(execution_time)s::timestamptz, now()),
           %(misfire_grace_seconds)s, %(max_retries)s, %(timeout_seconds)s,
           w.unique_key, w.unique_until
    FROM wanted w
    ON CONFLICT DO NOTHING
    RETURNING id, pg_notify(%(channel)s, extract(epoch FROM execution_time)::text)
)
SELECT 'inserted' AS outcome, id FROM new
UNION ALL
SELECT 'duplicate', j.id FROM {schema}.jobs j, wanted w
WHERE j.unique_key = w.unique_key AND j.unique_until = w.unique_until
  AND j.status IN ('pending', 'running') AND NOT EXISTS (SELECT FROM new)
UNION ALL
SELECT 'id_taken', j.id FROM {schema}.jobs j
WHERE j.id = %(id)s AND NOT EXISTS (SELECT FROM new);
