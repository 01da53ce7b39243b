-- 0021: a window planned ahead that is awaited (another job waits for it, has_dependents,
-- or a Scheduler.wait watches it, awaited) is rewritten in place, not withdrawn, when its
-- schedule's definition changes under an unchanged timing.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
-- In one transaction: two functions replaced; nothing is built on jobs.
--
-- Before, 0016 cancelled a job with dependents (to settle them) and sent next_fire_at
-- back to its fire time to plan it again; the new plan's job has the cancelled job's id
-- and (schedule_id, fire_time) key, so advance_schedules' ON CONFLICT DO NOTHING dropped
-- it and the window never ran. A watched job was deleted: its waiter found no job and
-- raised JobNotFound, though the window ran later under the same id. Its window still
-- comes (same timing, same schedule, still firing), so the job stays: same id, so its
-- dependents and waiter wait on, and the same fire time and due time, with what it runs
-- (task, queue, arguments, priority, retries, timeout, misfire grace) taken from the new
-- definition. next_fire_at stays after it: it is not planned again. Only a pending job
-- is rewritten, so a worker that claimed it first keeps the version it claimed (the
-- UPDATE waits for the claim's row lock and then finds the job running, as 0016's DELETE
-- does); a claim that comes after the rewrite waits for the schedule's transaction (SKIP
-- LOCKED passes the row over until then) and runs the new version. Either way the window
-- runs once.
--
-- A window's job is only a plan while no worker claimed it and no operator retried it
-- (attempts = 0, errors = '[]'): now() is the change's transaction start, and a
-- transaction begun before a fire time can change the schedule after a worker ran that
-- window and it waits for a retry. 0016 deleted that job and planned the window again:
-- it ran twice, its history and retry budget lost.
--
-- The rest is 0016's: a job nobody awaits is deleted and planned again (the planner then
-- decides overlap = false anew); one whose window goes away with the change (a new
-- timing, a pause, a disable, a rename, a removal, a TRUNCATE) is cancelled when
-- awaited, which settles its dependents and ends its wait. If that window comes again,
-- advance_schedules takes the cancelled job over.
CREATE OR REPLACE FUNCTION {schema}.withdraw_planned_windows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    first_withdrawn timestamptz;
    same_timing boolean := TG_OP = 'UPDATE' AND (NEW.cron, NEW.tz, NEW.every, NEW.anchor)
        IS NOT DISTINCT FROM (OLD.cron, OLD.tz, OLD.every, OLD.anchor);
    -- the windows planned ahead still come, under the same schedule
    windows_stay boolean := same_timing AND NEW.id = OLD.id AND NEW.enabled
        AND NOT NEW.paused;
    -- store.channel_name, computed as migration 0010 computes the done channel
    channel text := 'pgsched_' || TG_TABLE_SCHEMA;
BEGIN
    -- Lock the planned jobs first: a wait marking one (mark_awaited) or a job made to
    -- depend on one commits before this reads them, and each statement below, with a
    -- snapshot of its own, sees the job as it is. Without it, the DELETE waited for the
    -- mark and then passed over an awaited job that the UPDATEs' snapshot, taken before
    -- the mark, did not see awaited either: the old plan stayed pending, paused or not.
    PERFORM FROM {schema}.jobs
    WHERE schedule_id = OLD.id AND fire_time > now() AND status = 'pending'
      AND attempts = 0 AND errors = '[]'
    FOR UPDATE;
    IF windows_stay THEN
        UPDATE {schema}.jobs SET task = NEW.task, queue = NEW.queue, args = NEW.args,
            kwargs = NEW.kwargs, priority = NEW.priority, max_retries = NEW.max_retries,
            timeout_seconds = NEW.timeout_seconds,
            -- advance_schedules' grace: 60 is planner.SKIP_TOLERANCE (a test holds them equal)
            misfire_grace_seconds = CASE WHEN NEW.catch_up = 'skip'
                                         THEN coalesce(misfire_grace_seconds, 60) END
        WHERE schedule_id = OLD.id AND fire_time > now() AND status = 'pending'
          AND attempts = 0 AND errors = '[]'
          AND (has_dependents OR awaited);
    END IF;
    WITH gone AS (
        DELETE FROM {schema}.jobs
        WHERE schedule_id = OLD.id AND fire_time > now() AND status = 'pending'
          AND attempts = 0 AND errors = '[]'
          AND has_dependents IS NOT TRUE AND NOT awaited
        RETURNING fire_time
    ), cancelled AS (
        UPDATE {schema}.jobs SET status = 'cancelled', finished_at = now(),
            last_error = 'cancelled: its schedule changed before the window came'
        WHERE schedule_id = OLD.id AND fire_time > now() AND status = 'pending'
          AND attempts = 0 AND errors = '[]'
          AND (has_dependents OR awaited) AND NOT windows_stay
        RETURNING fire_time
    )
    SELECT min(fire_time) INTO first_withdrawn
    FROM (SELECT fire_time FROM gone UNION ALL SELECT fire_time FROM cancelled) w;
    IF TG_OP = 'DELETE' OR first_withdrawn IS NULL THEN
        RETURN NEW;
    END IF;
    IF same_timing THEN
        NEW.next_fire_at := least(NEW.next_fire_at, first_withdrawn);
        -- Planners sleep until the window after the withdrawn one; wake them to plan it
        -- again (a change made with SQL sends no NOTIFY of its own).
        IF octet_length(channel) > 63 THEN
            channel := left(channel, 54) || '_'
                || left(encode(sha256(convert_to(TG_TABLE_SCHEMA, 'UTF8')), 'hex'), 8);
        END IF;
        PERFORM pg_notify(channel, 'schedules');
    END IF;
    IF NEW.last_fire_at >= first_withdrawn THEN
        SELECT id, fire_time INTO NEW.last_job_id, NEW.last_fire_at
        FROM {schema}.jobs
        WHERE schedule_id = OLD.id AND fire_time IS NOT NULL AND fire_time < first_withdrawn
        ORDER BY fire_time DESC LIMIT 1;
    END IF;
    RETURN NEW;
END
$$;

-- TRUNCATE: a window planned ahead that a waiter watches is cancelled, as one with
-- dependents, so that the wait ends with it instead of losing its job.
CREATE OR REPLACE FUNCTION {schema}.withdraw_all_planned_windows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM {schema}.jobs  -- as withdraw_planned_windows: see each job as it is
    WHERE fire_time > now() AND status = 'pending' AND attempts = 0 AND errors = '[]'
    FOR UPDATE;
    DELETE FROM {schema}.jobs
    WHERE fire_time > now() AND status = 'pending' AND attempts = 0 AND errors = '[]'
      AND has_dependents IS NOT TRUE AND NOT awaited;
    UPDATE {schema}.jobs SET status = 'cancelled', finished_at = now(),
        last_error = 'cancelled: its schedule changed before the window came'
    WHERE fire_time > now() AND status = 'pending' AND attempts = 0 AND errors = '[]'
      AND (has_dependents OR awaited);
    RETURN NULL;
END
$$;
