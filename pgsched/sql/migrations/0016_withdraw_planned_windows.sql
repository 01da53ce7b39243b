-- 0016: the planner may enqueue a window a few seconds before its fire time (issue 11,
-- "Recurring at scale"; worker/planner.py LOOKAHEAD). A schedule changed, paused,
-- disabled or removed after that must not run the old plan: the triggers below withdraw
-- the window's job, whichever statement made the change (the CLI, the Python API, the
-- web API, a worker's @periodic sync, or plain SQL).
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
-- In one transaction: two functions and three triggers on schedules; nothing is built on jobs.

-- Withdraw the schedule's windows planned ahead: its jobs with a fire time still to come
-- that no worker has claimed (a claimed one is running: its window has come, and a change
-- now affects the next window, as without planning ahead). Such a job is deleted, so the
-- window's (schedule_id, fire_time) key and its job id are free again; one that another
-- job waits for (depends_on) is cancelled instead, which settles its dependents. On an
-- update, a window withdrawn under an unchanged timing is planned again (next_fire_at goes
-- back to it), now with the new definition; a new timing has set next_fire_at itself.
-- last_fire_at and last_job_id go back to the latest window left.
CREATE FUNCTION {schema}.withdraw_planned_windows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    first_withdrawn timestamptz;
    -- store.channel_name, computed as migration 0010 computes the done channel
    channel text := 'pgsched_' || TG_TABLE_SCHEMA;
BEGIN
    WITH gone AS (
        DELETE FROM {schema}.jobs
        WHERE schedule_id = OLD.id AND fire_time > now() AND status = 'pending'
          AND has_dependents IS NOT TRUE
        RETURNING fire_time
    ), cancelled AS (
        UPDATE {schema}.jobs SET status = 'cancelled', finished_at = now(),
            last_error = 'cancelled: its schedule changed before the window came'
        WHERE schedule_id = OLD.id AND fire_time > now() AND status = 'pending'
          AND has_dependents
        RETURNING fire_time
    )
    SELECT min(fire_time) INTO first_withdrawn
    FROM (SELECT fire_time FROM gone UNION ALL SELECT fire_time FROM cancelled) w;
    IF TG_OP = 'DELETE' OR first_withdrawn IS NULL THEN
        RETURN NEW;
    END IF;
    IF (NEW.cron, NEW.tz, NEW.every, NEW.anchor)
        IS NOT DISTINCT FROM (OLD.cron, OLD.tz, OLD.every, OLD.anchor) THEN
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

-- Only a change to what a window's job is made of, or to whether the schedule fires,
-- runs the function: the planner's own updates (next_fire_at, last_*) pay for the WHEN
-- test alone. A new id (SQL only) counts: the window planned under the old id would
-- otherwise run as an orphan, even after the renamed schedule is removed.
CREATE TRIGGER schedules_withdraw_on_change
    BEFORE UPDATE ON {schema}.schedules
    FOR EACH ROW
    WHEN ((OLD.id, OLD.task, OLD.cron, OLD.tz, OLD.every, OLD.anchor, OLD.args, OLD.kwargs,
           OLD.priority, OLD.max_retries, OLD.timeout_seconds, OLD.queue, OLD.catch_up,
           OLD.overlap, OLD.enabled, OLD.paused)
          IS DISTINCT FROM
          (NEW.id, NEW.task, NEW.cron, NEW.tz, NEW.every, NEW.anchor, NEW.args, NEW.kwargs,
           NEW.priority, NEW.max_retries, NEW.timeout_seconds, NEW.queue, NEW.catch_up,
           NEW.overlap, NEW.enabled, NEW.paused))
    EXECUTE FUNCTION {schema}.withdraw_planned_windows();

CREATE TRIGGER schedules_withdraw_on_delete
    AFTER DELETE ON {schema}.schedules
    FOR EACH ROW
    EXECUTE FUNCTION {schema}.withdraw_planned_windows();

-- TRUNCATE fires no row trigger: without this, the windows planned ahead of every schedule
-- would run as orphans. Statement-level, so it reads jobs once; TRUNCATE is rare.
CREATE FUNCTION {schema}.withdraw_all_planned_windows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM {schema}.jobs
    WHERE fire_time > now() AND status = 'pending' AND has_dependents IS NOT TRUE;
    UPDATE {schema}.jobs SET status = 'cancelled', finished_at = now(),
        last_error = 'cancelled: its schedule changed before the window came'
    WHERE fire_time > now() AND status = 'pending' AND has_dependents;
    RETURN NULL;
END
$$;

CREATE TRIGGER schedules_withdraw_on_truncate
    AFTER TRUNCATE ON {schema}.schedules
    FOR EACH STATEMENT
    EXECUTE FUNCTION {schema}.withdraw_all_planned_windows();
