-- 0010: snoozes (a task's `raise Retry(...)`), and the completion wake-up of waited-on
-- jobs (Scheduler.wait, `pgsched add --wait`).
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.

-- How often the job ran again at its task's request (snooze_job): not failures, so they
-- leave the retry budget alone, but capped by the task's max_snoozes. Reset where
-- failures is (replace, `pgsched retry`). A constant default: no table rewrite.
ALTER TABLE {schema}.jobs ADD COLUMN snoozes integer NOT NULL DEFAULT 0;

-- Set by a waiter (mark_awaited) before it reads the job; only such rows notify when
-- they finish, so jobs nobody waits for cost the trigger one boolean test.
ALTER TABLE {schema}.jobs ADD COLUMN awaited boolean NOT NULL DEFAULT false;

-- The channel is 'pgsched_done_<schema>', or, past PostgreSQL's 63-byte limit, its first
-- 54 bytes, '_' and 8 hex digits of the schema's SHA-256 (store.done_channel_name says
-- the same). The payload is the job id: a hint only, the waiter reads the row.
CREATE FUNCTION {schema}.notify_job_finished() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    channel text := 'pgsched_done_' || TG_TABLE_SCHEMA;
BEGIN
    IF octet_length(channel) > 63 THEN
        channel := left(channel, 54) || '_'
            || left(encode(sha256(convert_to(TG_TABLE_SCHEMA, 'UTF8')), 'hex'), 8);
    END IF;
    PERFORM pg_notify(channel, NEW.id);
    RETURN NULL;
END
$$;

-- Every way a job ends (a worker's outcome, a task's own complete(), a cancel, an
-- expiry, a recovery's verdict) is an UPDATE of status: one trigger covers them all,
-- and the NOTIFY is sent when that transaction commits, never for one rolled back.
CREATE TRIGGER jobs_notify_finished
    AFTER UPDATE OF status ON {schema}.jobs
    FOR EACH ROW
    WHEN (NEW.awaited AND NEW.status IN ('completed', 'failed', 'cancelled', 'expired')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION {schema}.notify_job_finished();
