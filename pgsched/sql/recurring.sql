-- Recurring schedules: the statements behind @periodic, the planner and the schedule CLI.
--
-- Same conventions as queries.sql: `-- name: NAME` plus a one-line description, {schema}
-- for the quoted schema, %(name)s parameters. A statement that changes when schedules fire
-- sends NOTIFY '<channel>', 'schedules' so sleeping planners look again; a statement that
-- inserts jobs sends the usual epoch payload so fetchers wake.
--
-- Time is the database clock. Queries the planner runs accept %(now)s (NULL: now()) so
-- tests can step through a DST night without waiting for one.

-- name: db_now
-- The database clock: a schedule's first fire time, a bulk retry's cut-off, the
-- reference for ages shown by status/top.
SELECT now() AS now;

-- name: sync_code_schedules
-- Upsert this worker's @periodic schedules and disable code schedules it no longer
-- defines; CLI-made schedules are never touched. A changed definition, or a schedule
-- enabled again, restarts at the given next_fire_at; an unchanged one keeps its place, so
-- a restart neither skips nor repeats a window. Returns each schedule affected and how.
WITH given AS (
    SELECT * FROM unnest(
        %(ids)s::text[], %(tasks)s::text[], %(crons)s::text[], %(tzs)s::text[],
        %(everys)s::interval[], %(anchors)s::timestamptz[], %(args)s::jsonb[],
        %(kwargs)s::jsonb[], %(priorities)s::smallint[], %(max_retries)s::int[],
        %(timeouts)s::float8[], %(queues)s::text[], %(catch_ups)s::text[],
        %(enableds)s::bool[], %(next_fire_ats)s::timestamptz[], %(overlaps)s::bool[])
    AS g(id, task, cron, tz, every, anchor, args, kwargs, priority, max_retries,
         timeout_seconds, queue, catch_up, enabled, next_fire_at, overlap)
),
upserted AS (
    INSERT INTO {schema}.schedules AS s
        (id, task, cron, tz, every, anchor, args, kwargs, priority, max_retries,
         timeout_seconds, queue, catch_up, enabled, next_fire_at, overlap, origin)
    -- Sorted, so replicas starting together lock rows in the same order.
    SELECT g.*, 'code' FROM given g ORDER BY g.id
    ON CONFLICT (id) DO UPDATE SET
        task = excluded.task, cron = excluded.cron, tz = excluded.tz, every = excluded.every,
        anchor = excluded.anchor, args = excluded.args, kwargs = excluded.kwargs,
        priority = excluded.priority, max_retries = excluded.max_retries,
        timeout_seconds = excluded.timeout_seconds, queue = excluded.queue,
        catch_up = excluded.catch_up, enabled = excluded.enabled, overlap = excluded.overlap,
        next_fire_at = CASE
            WHEN NOT s.enabled OR (s.cron, s.tz, s.every, s.anchor)
                IS DISTINCT FROM (excluded.cron, excluded.tz, excluded.every, excluded.anchor)
            THEN excluded.next_fire_at ELSE s.next_fire_at END,
        updated_at = now()
    WHERE s.origin = 'code'
      AND (s.task, s.cron, s.tz, s.every, s.anchor, s.args, s.kwargs, s.priority,
           s.max_retries, s.timeout_seconds, s.queue, s.catch_up, s.enabled, s.overlap)
          IS DISTINCT FROM
          (excluded.task, excluded.cron, excluded.tz, excluded.every, excluded.anchor,
           excluded.args, excluded.kwargs, excluded.priority, excluded.max_retries,
           excluded.timeout_seconds, excluded.queue, excluded.catch_up, excluded.enabled,
           excluded.overlap)
    RETURNING s.id, CASE WHEN s.xmax = 0 THEN 'created' ELSE 'updated' END AS change
),
disabled AS (
    UPDATE {schema}.schedules SET enabled = false, updated_at = now()
    WHERE origin = 'code' AND enabled AND id <> ALL(%(ids)s::text[])
    RETURNING id, 'disabled' AS change
),
cli_owned AS (
    SELECT id, 'cli_owned' AS change FROM {schema}.schedules
    WHERE origin = 'cli' AND id = ANY(%(ids)s::text[])
),
changes AS (
    SELECT * FROM upserted UNION ALL SELECT * FROM disabled UNION ALL SELECT * FROM cli_owned
),
wake AS (
    SELECT pg_notify(%(channel)s, 'schedules')
    WHERE EXISTS (SELECT FROM upserted) OR EXISTS (SELECT FROM disabled)
)
SELECT changes.* FROM changes LEFT JOIN wake ON true ORDER BY changes.id;

-- name: insert_schedule
-- Create a schedule from the CLI. With %(replace)s an existing CLI schedule gets the new
-- definition (its paused flag stays; a changed timing restarts at the given next_fire_at);
-- otherwise, and always for a schedule defined in code, the existing row is left alone.
-- Returns the id when something was written.
WITH written AS (
    INSERT INTO {schema}.schedules AS s
        (id, task, cron, tz, every, anchor, args, kwargs, priority, max_retries,
         timeout_seconds, queue, catch_up, next_fire_at, overlap, origin)
    VALUES (%(id)s, %(task)s, %(cron)s, %(tz)s, %(every)s, %(anchor)s, %(args)s, %(kwargs)s,
            %(priority)s, %(max_retries)s, %(timeout)s, %(queue)s, %(catch_up)s,
            %(next_fire_at)s, %(overlap)s, 'cli')
    ON CONFLICT (id) DO UPDATE SET
        task = excluded.task, cron = excluded.cron, tz = excluded.tz, every = excluded.every,
        anchor = excluded.anchor, args = excluded.args, kwargs = excluded.kwargs,
        priority = excluded.priority, max_retries = excluded.max_retries,
        timeout_seconds = excluded.timeout_seconds, queue = excluded.queue,
        catch_up = excluded.catch_up, overlap = excluded.overlap,
        next_fire_at = CASE
            WHEN (s.cron, s.tz, s.every, s.anchor)
                IS DISTINCT FROM (excluded.cron, excluded.tz, excluded.every, excluded.anchor)
            THEN excluded.next_fire_at ELSE s.next_fire_at END,
        updated_at = now()
    WHERE %(replace)s AND s.origin = 'cli'
    RETURNING s.id
),
wake AS (SELECT pg_notify(%(channel)s, 'schedules') FROM written)
SELECT written.id FROM written LEFT JOIN wake ON true;

-- name: limit_idle_transaction
-- For the planner's transaction only: end the session if it idles mid-transaction longer
-- than %(ms)s milliseconds, so a frozen planner cannot keep schedules locked.
SELECT set_config('idle_in_transaction_session_timeout', %(ms)s, true);

-- name: lock_due_schedules
-- The planner's first step: lock up to %(limit)s due, active schedules for the rest of its
-- transaction. SKIP LOCKED lets replicas split the due schedules between them instead of
-- queueing on the same rows; a planner that dies mid-transaction releases its rows.
-- Due: next_fire_at has come, or it comes within %(lookahead)s seconds and the window may
-- be planned ahead (plannable_ahead below): the schedule's previous window has come, so
-- at most one window of a schedule is ever planned ahead, and for overlap = false no run
-- of it is pending or running (whether that run ends in time is known only at the fire
-- time, so the window waits for it and is decided then, as it always was).
-- args_unreadable: arguments the API would have refused and a worker could not decode
-- (written with SQL): nested beyond %(too_deep)s, or an integer of thousands of digits.
-- The planner skips such a schedule instead of making a poisoned job every window. A
-- schedule whose times a Python datetime or timedelta cannot hold ('-infinity', an
-- `every` of a hundred million years; written with SQL) is never due: loading it would
-- fail every pass, and so every other schedule.
SELECT id, cron, tz, every, anchor, catch_up, next_fire_at,
       coalesce(%(now)s::timestamptz, now()) AS db_now,
       jsonb_path_exists(args, %(too_deep)s::jsonpath)
           OR jsonb_path_exists(kwargs, %(too_deep)s::jsonpath)
           OR jsonb_path_exists(args, %(too_long)s::jsonpath)
           OR jsonb_path_exists(kwargs, %(too_long)s::jsonpath) AS args_unreadable
FROM {schema}.schedules
WHERE enabled AND NOT paused AND next_fire_at > '0001-01-03Z'
  AND (next_fire_at <= coalesce(%(now)s::timestamptz, now())
       OR next_fire_at <= coalesce(%(now)s::timestamptz, now())
                          + make_interval(secs => %(lookahead)s)
          AND coalesce(last_fire_at <= coalesce(%(now)s::timestamptz, now()), true)
          AND (overlap OR NOT EXISTS (
              SELECT FROM {schema}.jobs r  -- jobs_schedule_active_idx (0011)
              WHERE r.schedule_id = schedules.id AND r.status IN ('pending', 'running'))))
  AND anchor BETWEEN '0001-01-03Z' AND '9999-12-30Z'
  AND (every IS NULL OR every < interval '1000000 years')
ORDER BY next_fire_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: advance_schedules
-- The planner's second step, one statement for the batch: move each schedule's
-- next_fire_at on and insert its windows' jobs. The update is a compare-and-set on the
-- next_fire_at the planner read, and jobs are inserted only for schedules it moved, so
-- the move and the jobs commit together or not at all. The unique index on
-- (schedule_id, fire_time) makes a second job for a window impossible even if two
-- planners ever computed it.
--
-- A schedule with overlap = false runs a window only if no job of that schedule is
-- pending or running (as this statement sees them, holding the schedule's row lock, so
-- no other planner decides for it meanwhile) and it is the first window of this pass
-- (the later ones would queue behind it). Any other window of it is recorded, not run:
-- its job is written as cancelled with a 'skipped: ...' error naming the run it would
-- have overlapped, under the same unique (schedule_id, fire_time) key as a run, so a
-- window is either run or skipped, once, and commits with the move of next_fire_at.
-- A window planned ahead (its fire time after now) of an overlap = false schedule is
-- planned only if still no run of it is pending or running; otherwise the schedule is
-- left as it was, to be decided at the fire time (lock_due_schedules then passes it over
-- until then). Runs of the schedule's own later windows never count as runs in progress.
-- A window whose job was withdrawn as cancelled (0016) takes that job over (revived).
-- Returns the jobs inserted or taken over, each with its status (pending, or cancelled
-- when skipped).
WITH plan AS (
    SELECT * FROM unnest(
        %(ids)s::text[], %(expected)s::timestamptz[], %(next_fire_ats)s::timestamptz[],
        %(last_fire_ats)s::timestamptz[], %(last_job_ids)s::text[])
    AS p(id, expected, next_fire_at, last_fire_at, last_job_id)
),
advanced AS (
    UPDATE {schema}.schedules AS s SET
        next_fire_at = p.next_fire_at,
        last_fire_at = coalesce(p.last_fire_at, s.last_fire_at),
        last_job_id = coalesce(p.last_job_id, s.last_job_id)
    FROM plan p
    WHERE s.id = p.id AND s.next_fire_at = p.expected AND s.enabled AND NOT s.paused
      AND (s.overlap OR p.expected <= coalesce(%(now)s::timestamptz, now()) OR NOT EXISTS (
          SELECT FROM {schema}.jobs r
          WHERE r.schedule_id = s.id AND r.status IN ('pending', 'running')))
    RETURNING s.id, s.task, s.queue, s.args, s.kwargs, s.priority, s.max_retries,
              s.timeout_seconds, s.catch_up, s.overlap
),
windows AS (
    SELECT * FROM unnest(
        %(window_job_ids)s::text[], %(window_schedule_ids)s::text[],
        %(window_fire_times)s::timestamptz[])
    AS w(job_id, schedule_id, fire_time)
),
decided AS (
    SELECT w.job_id, w.fire_time, a.*,
           CASE WHEN NOT a.overlap THEN coalesce(
               (SELECT r.id FROM {schema}.jobs r  -- jobs_schedule_active_idx (0011)
                WHERE r.schedule_id = a.id AND r.status IN ('pending', 'running')
                  AND (r.fire_time IS NULL OR r.fire_time < w.fire_time)
                ORDER BY r.created_at, r.id LIMIT 1),
               (SELECT f.job_id FROM windows f
                WHERE f.schedule_id = a.id AND f.fire_time < w.fire_time
                ORDER BY f.fire_time LIMIT 1)) END AS overlaps
    FROM windows w JOIN advanced a ON a.id = w.schedule_id
),
made AS (
    -- execution_time is the window's fire time, so lateness shows. Only `skip` windows
    -- expire: the catch-up mode, not the misfire grace, decides which late windows run.
    SELECT d.job_id AS id, d.task, d.queue, d.args, d.kwargs, d.priority,
           d.fire_time AS execution_time,
           CASE WHEN d.catch_up = 'skip' THEN %(skip_grace_seconds)s::float8 END
               AS misfire_grace_seconds,
           d.max_retries, d.timeout_seconds, d.id AS schedule_id, d.fire_time,
           CASE WHEN d.overlaps IS NULL THEN 'pending' ELSE 'cancelled' END
               ::{schema}.job_status AS status,
           CASE WHEN d.overlaps IS NOT NULL THEN now() END AS finished_at,
           'skipped: ' || d.overlaps || ' was still pending or running (overlap is off)'
               AS last_error,
           CASE WHEN d.overlaps IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(
               jsonb_build_object('attempt', 0, 'at', now(), 'outcome', 'skipped',
                                  'error', 'overlaps ' || d.overlaps)) END AS errors
    FROM decided d
),
-- A window whose job was withdrawn awaited (cancelled by 0016's trigger when a pause, a
-- new timing or a removal took the window away, or by withdrawn_overlap_window when a
-- run came first) and that comes again (a resume, a timing that has it too, the schedule
-- added again, its fire time) takes that job over: its id and key are the
-- window's, and the insert below would keep the cancelled job and lose the window.
-- Only the withdrawal's cancel is taken over: a job never claimed nor retried (attempts,
-- errors), since a retry keeps last_error and a later `pgsched cancel` writes none, and
-- an operator's cancel must hold. Its waits ended with the cancel: it is watched again
-- only by a new one. has_dependents stays (it only ever says a job may have some): a
-- dependent retried to wait on it again needs its end to fire the settling trigger.
-- `made` holds a row a window: with cancelled jobs many, the join probes jobs by the
-- window key (jobs_schedule_window_idx) rather than read them.
revived AS (
    UPDATE {schema}.jobs AS j SET
        task = m.task, queue = m.queue, args = m.args, kwargs = m.kwargs,
        priority = m.priority, execution_time = m.execution_time,
        misfire_grace_seconds = m.misfire_grace_seconds, max_retries = m.max_retries,
        timeout_seconds = m.timeout_seconds, status = m.status,
        finished_at = m.finished_at, last_error = m.last_error, errors = m.errors,
        awaited = false
    FROM made m
    WHERE j.id = m.id AND j.schedule_id = m.schedule_id AND j.fire_time = m.fire_time
      AND j.status = 'cancelled'
      AND j.last_error IN ('cancelled: its schedule changed before the window came',
                           'cancelled: withdrawn for a run that came first (overlap is off)')
      AND j.attempts = 0 AND j.errors = '[]'::jsonb
    RETURNING j.id, j.schedule_id, j.fire_time, j.execution_time, j.status
),
new AS (
    INSERT INTO {schema}.jobs
        (id, task, queue, args, kwargs, priority, execution_time, misfire_grace_seconds,
         max_retries, timeout_seconds, schedule_id, fire_time, status, finished_at,
         last_error, errors)
    SELECT * FROM made
    ON CONFLICT DO NOTHING
    RETURNING id, schedule_id, fire_time, execution_time, status
),
planned AS (SELECT * FROM new UNION ALL SELECT * FROM revived),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM planned WHERE status = 'pending' HAVING count(*) > 0
)
SELECT planned.id, planned.schedule_id, planned.fire_time, planned.status::text AS status
FROM planned LEFT JOIN wake ON true;

-- name: next_schedule_fire
-- When the planner must look again: the earliest moment an active schedule becomes due
-- in lock_due_schedules' sense (%(lookahead)s seconds before next_fire_at, but not before
-- its previous window, when it may be planned ahead; else next_fire_at), and the
-- database clock to turn it into a delay. An overlap = false schedule with a run still
-- active is looked at when it could first be planned ahead all the same, if that is
-- still to come (the run may be over by then: nothing else wakes the planner when it
-- ends), and at next_fire_at once it has passed (no pass before then could plan it, so
-- the planner does not spin). Times a Python datetime cannot hold (a row written by SQL
-- may say 'infinity') are left out or cut, as in lock_due_schedules.
SELECT least(min(CASE
           WHEN overlap OR NOT EXISTS (
               SELECT FROM {schema}.jobs r
               WHERE r.schedule_id = schedules.id AND r.status IN ('pending', 'running'))
               OR greatest(next_fire_at - make_interval(secs => %(lookahead)s),
                           last_fire_at) > now()
           THEN least(next_fire_at, greatest(
               next_fire_at - make_interval(secs => %(lookahead)s), last_fire_at))
           ELSE next_fire_at END), '9999-12-30Z') AS next_fire_at,
       now() AS db_now
FROM {schema}.schedules WHERE enabled AND NOT paused
  AND next_fire_at > '0001-01-03Z' AND anchor BETWEEN '0001-01-03Z' AND '9999-12-30Z'
  AND (every IS NULL OR every < interval '1000000 years');

-- name: list_schedules
-- Schedules (one, when %(id)s is given) with the last job each made: when it was due
-- (a window's fire time, or a trigger's time) and its status ('skipped' for a window
-- that overlap = false skipped). A window planned ahead of its fire time (the planner's
-- lookahead: last_fire_at is still to come) is shown as the next window, not as the last
-- run: next_fire_at is its fire time, and last_* describe the latest window before it, or
-- a triggered run made since it was planned (last_job_id then names that run, and the
-- window stays the next one). The same holds once a triggered run sent the window back
-- to be decided at its fire time (trigger_schedule), its job deleted or cancelled.
SELECT s.id, s.task, s.cron, s.tz, s.every, s.anchor, s.args, s.kwargs, s.priority,
       s.max_retries, s.timeout_seconds, s.queue, s.catch_up, s.enabled, s.paused, s.origin,
       s.overlap, s.created_at, s.updated_at,
       CASE WHEN a.ahead THEN s.last_fire_at ELSE s.next_fire_at END AS next_fire_at,
       CASE WHEN a.ahead THEN before.fire_time ELSE s.last_fire_at END AS last_fire_at,
       shown.id AS last_job_id,
       j.execution_time AS last_run_at,
       -- a window skipped because its previous run was still active (advance_schedules)
       CASE WHEN j.status = 'cancelled' AND j.fire_time IS NOT NULL
                 AND j.last_error LIKE 'skipped: %%' THEN 'skipped'
            ELSE j.status::text END AS last_status
FROM {schema}.schedules s
-- the job of the latest window: pending, or withdrawn by a triggered run (gone, or
-- cancelled as awaited: withdrawn_overlap_window; the planner decides it at its fire
-- time), while that window is still to come, it is ahead (a window skipped or cancelled
-- otherwise has been decided)
LEFT JOIN LATERAL (
    SELECT w.status, w.last_error FROM {schema}.jobs w  -- jobs_schedule_window_idx (0002)
    WHERE w.schedule_id = s.id AND w.fire_time = s.last_fire_at
) latest ON true
CROSS JOIN LATERAL (
    SELECT coalesce(s.last_fire_at > now() AND (
        latest.status IS NULL OR latest.status = 'pending'
        OR latest.status = 'cancelled' AND latest.last_error
            = 'cancelled: withdrawn for a run that came first (overlap is off)'), false) AS ahead
) a
LEFT JOIN {schema}.jobs last ON last.id = s.last_job_id
LEFT JOIN LATERAL (
    SELECT b.id, b.fire_time FROM {schema}.jobs b  -- jobs_schedule_window_idx (0002)
    WHERE a.ahead AND b.schedule_id = s.id AND b.fire_time < s.last_fire_at
    ORDER BY b.fire_time DESC LIMIT 1
) before ON true
-- a window job as the last while one is ahead is that window (or was: withdrawn by a
-- retry): show the one before it
CROSS JOIN LATERAL (SELECT CASE WHEN a.ahead AND (last.id IS NULL OR last.fire_time IS NOT NULL)
                                THEN before.id ELSE s.last_job_id END AS id) shown
LEFT JOIN {schema}.jobs j ON j.id = shown.id
WHERE %(id)s::text IS NULL OR s.id = %(id)s
ORDER BY s.id;

-- name: pause_schedule
-- Stop a schedule firing until it is resumed (a window planned ahead is withdrawn: 0016).
-- Returns the row and whether it was paused already, or nothing if unknown.
UPDATE {schema}.schedules AS s SET paused = true, updated_at = now()
FROM (SELECT id, paused FROM {schema}.schedules WHERE id = %(id)s FOR UPDATE) AS before
WHERE s.id = before.id
RETURNING s.id, s.enabled, before.paused AS was_paused;

-- name: resume_schedule
-- Let a paused schedule fire again from now on: windows missed while paused are not
-- caught up. next_fire_at becomes now, and the planner (woken by the NOTIFY) moves it to
-- the first window at or after that. Returns the row, or nothing if unknown.
WITH before AS (
    SELECT id, paused FROM {schema}.schedules WHERE id = %(id)s FOR UPDATE
),
resumed AS (
    UPDATE {schema}.schedules AS s SET
        next_fire_at = CASE WHEN s.paused THEN now() ELSE s.next_fire_at END,
        paused = false, updated_at = now()
    FROM before WHERE s.id = before.id
    RETURNING s.id, s.enabled, before.paused AS was_paused
),
wake AS (SELECT pg_notify(%(channel)s, 'schedules') FROM resumed)
SELECT resumed.* FROM resumed LEFT JOIN wake ON true;

-- name: trigger_schedule
-- Run a schedule's task now as one extra job, with the schedule's arguments and options.
-- Its windows do not change (the job has no fire_time); it becomes the "last run".
-- With overlap = false, a window planned ahead (its job pending, its fire time to come)
-- was decided before this run existed: it is withdrawn and decided again at its fire
-- time (next_fire_at goes back to it; last_fire_at stays, so it is not planned ahead
-- again), when this run may still be active. Returns the job id, or nothing if the
-- schedule is unknown.
WITH runs AS (
    INSERT INTO {schema}.jobs
        (id, task, queue, args, kwargs, priority, execution_time, max_retries,
         timeout_seconds, schedule_id)
    SELECT %(job_id)s, task, queue, args, kwargs, priority, now(), max_retries,
           timeout_seconds, id
    FROM {schema}.schedules WHERE id = %(id)s
    RETURNING id, schedule_id, execution_time
),
-- include: withdrawn_overlap_window
touched AS (
    UPDATE {schema}.schedules s SET last_job_id = runs.id,
        next_fire_at = least(s.next_fire_at, (SELECT min(fire_time) FROM withdrawn))
    FROM runs WHERE s.id = runs.schedule_id
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM execution_time)::text) FROM runs
)
SELECT runs.id FROM runs LEFT JOIN wake ON true LEFT JOIN replan ON true;

-- name: withdrawn_overlap_window
-- Part of a statement that made new runs (a CTE `runs` with their schedule_id): the
-- window planned ahead of each overlap = false schedule among them (pending, its fire
-- time to come) was decided before the run existed, so it is withdrawn (`withdrawn`:
-- schedule_id, fire_time) for the statement to send next_fire_at back to it, and the
-- planners, asleep until the window after it, are woken to decide it at its time
-- (trigger_schedule, ops_retry_jobs). One a job waits for stays planned: deleted, it
-- would cut that job loose, and cancelled, it would cancel it. has_dependents is never
-- cleared, so a job still waiting is looked up (as vacuum_jobs does): one taken over
-- after its withdrawal cancelled its dependents is awaited by nobody. One only a waiter
-- marked (awaited: a Scheduler.wait(), perhaps long over, since nothing clears the mark)
-- is cancelled instead of deleted, so that a wait still under way returns it; at its
-- fire time the planner takes it over (`revived`) and decides the window then, as for
-- any other. A job a worker claimed or an operator retried is a run, not a plan
-- (attempts, errors; 0021 says why now() alone does not tell).
-- Locks: the schedules first (id order), then their windows' jobs, the order of a
-- schedule change (0021's trigger runs under the schedule's row lock) and of the planner
-- (lock_due_schedules, then advance_schedules); the jobs first deadlocked with a change
-- made meanwhile (a pause between pause_schedule's lock and its update). Only a schedule
-- with a window planned ahead is locked, whichever way the plan reads these CTEs: a
-- retry holding a withdrawn window's job (picked, by a bulk `pgsched retry`) and then
-- waiting for the schedule would deadlock with the planner taking that job over under
-- the schedule's lock. The window's job is read locked (FOR UPDATE returns its latest
-- version), so a wait that marked it while this statement waited for it is seen: read
-- from the statement's snapshot, the DELETE found it awaited as locked and the UPDATE
-- not awaited as read, and it stayed planned beside the run.
withdrawing AS (
    SELECT s.id FROM {schema}.schedules s
    WHERE s.id IN (SELECT schedule_id FROM runs) AND NOT s.overlap
      AND EXISTS (SELECT FROM {schema}.jobs p  -- jobs_schedule_window_idx (0002)
                  WHERE p.schedule_id = s.id AND p.fire_time > now()
                    AND p.status = 'pending')
    ORDER BY s.id
    FOR NO KEY UPDATE
),
withdrawable AS (
    SELECT w.id, w.awaited
    FROM {schema}.jobs w JOIN withdrawing s ON w.schedule_id = s.id
    WHERE w.fire_time > now() AND w.status = 'pending'
      AND w.attempts = 0 AND w.errors = '[]'
      AND NOT (w.has_dependents AND EXISTS (
          SELECT 1 FROM {schema}.job_dependencies e
          JOIN {schema}.jobs d ON d.id = e.job_id AND d.due_after_dependencies IS NOT NULL
          WHERE e.dependency_id = w.id))
    FOR UPDATE OF w
),
withdrawn_deleted AS (
    DELETE FROM {schema}.jobs w USING withdrawable c
    WHERE w.id = c.id AND NOT c.awaited
      AND w.status = 'pending' AND w.attempts = 0 AND w.errors = '[]' AND NOT w.awaited
    RETURNING w.schedule_id, w.fire_time
),
withdrawn_cancelled AS (
    UPDATE {schema}.jobs w SET status = 'cancelled', finished_at = now(),
        last_error = 'cancelled: withdrawn for a run that came first (overlap is off)'
    FROM withdrawable c
    WHERE w.id = c.id AND c.awaited
      AND w.status = 'pending' AND w.attempts = 0 AND w.errors = '[]'
    RETURNING w.schedule_id, w.fire_time
),
withdrawn AS (
    SELECT * FROM withdrawn_deleted UNION ALL SELECT * FROM withdrawn_cancelled
),
replan AS (
    SELECT pg_notify(%(channel)s, 'schedules') WHERE EXISTS (SELECT FROM withdrawn)
),

-- name: remove_schedule
-- Delete a schedule. Jobs of windows that came stay (cancel them with `pgsched cancel`); a
-- window planned ahead is withdrawn by the trigger of migration 0016.
-- Returns the row, or nothing if unknown.
DELETE FROM {schema}.schedules WHERE id = %(id)s RETURNING id, origin;
