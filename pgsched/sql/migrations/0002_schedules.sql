-- 0002: recurring schedules, and the key that makes each of their windows one job.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.

CREATE TABLE {schema}.schedules (
    -- letters, digits, '_', '.', ':' and '-' (never '@': window job ids are id@fire_time)
    id              text PRIMARY KEY,
    task            text NOT NULL,
    -- exactly one of: a cron expression read in tz, or an interval aligned to anchor
    cron            text,
    tz              text,
    every           interval CHECK (every >= interval '1 second'),
    anchor          timestamptz NOT NULL DEFAULT '1970-01-01 00:00:00+00',
    args            jsonb NOT NULL DEFAULT '[]',
    kwargs          jsonb NOT NULL DEFAULT '{{}}',
    priority        smallint NOT NULL DEFAULT 5,
    max_retries     integer NOT NULL DEFAULT 0 CHECK (max_retries >= 0),
    timeout_seconds double precision CHECK (timeout_seconds > 0),
    queue           text NOT NULL DEFAULT 'default',
    catch_up        text NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('latest', 'skip', 'all')),
    -- enabled belongs to the code (@periodic(enabled=...), or false once the decorator is
    -- gone); paused belongs to the operator (pgsched pause/resume). A schedule fires only
    -- when enabled and not paused, so a deploy never undoes a pause and vice versa.
    enabled         boolean NOT NULL DEFAULT true,
    paused          boolean NOT NULL DEFAULT false,
    origin          text NOT NULL CHECK (origin IN ('code', 'cli')),
    -- the first window not yet enqueued (UTC instant); the planner moves it forward in
    -- the same statement that inserts the windows' jobs
    next_fire_at    timestamptz NOT NULL,
    last_fire_at    timestamptz,
    last_job_id     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every IS NULL)),
    CHECK ((cron IS NULL) = (tz IS NULL))
);

-- The planner's only question: which active schedules are due, and when is the next one.
CREATE INDEX schedules_due_idx ON {schema}.schedules (next_fire_at)
    WHERE enabled AND NOT paused;

-- A job made by a schedule names it and, for a window, the window's fire time. NULL for
-- one-off jobs and for `pgsched trigger` runs, which are extra runs, not windows.
ALTER TABLE {schema}.jobs ADD COLUMN schedule_id text, ADD COLUMN fire_time timestamptz;

-- Exactly one job per (schedule, fire time), however many planners race for a window.
-- Partial, so one-off jobs cost the index nothing. No foreign key: a job's history
-- outlives a removed schedule.
CREATE UNIQUE INDEX jobs_schedule_window_idx ON {schema}.jobs (schedule_id, fire_time)
    WHERE fire_time IS NOT NULL;
