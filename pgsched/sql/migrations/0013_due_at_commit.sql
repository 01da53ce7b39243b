-- 0013: a job enqueued through the caller's connection without an execution_time is due
-- at its transaction's commit, not at its start (issue 13's review): before, one whose
-- transaction ran longer than its misfire grace expired without running.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
-- In one transaction: a column with a constant default (no table rewrite), a function
-- and a trigger; no index is built on jobs.

-- Set only by insert_jobs_given/replace_jobs_given (sql/job_control.sql) on a job due
-- now; the trigger below clears it when the transaction commits. Every other path
-- leaves it false, so their rows never enter the deferred trigger queue.
ALTER TABLE {schema}.jobs ADD COLUMN due_at_commit boolean NOT NULL DEFAULT false;

-- Runs at commit (deferred): the job is due from that moment, so its misfire grace counts
-- from when workers can first see it. clock_timestamp(): now() is the transaction's start.
CREATE FUNCTION {schema}.due_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.jobs SET execution_time = clock_timestamp(), due_at_commit = false
    WHERE id = NEW.id AND due_at_commit;
    RETURN NULL;
END
$$;

-- The WHEN test is made when the row is written, not at commit: rows without the flag
-- (every insert of schedule(), COPY bulk, a claim, a heartbeat) cost one boolean test on
-- insert and nothing on update (UPDATE OF names a column only the caller's path sets).
CREATE CONSTRAINT TRIGGER jobs_due_at_commit
    AFTER INSERT OR UPDATE OF due_at_commit ON {schema}.jobs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.due_at_commit)
    EXECUTE FUNCTION {schema}.due_at_commit();
