-- 0012: global limits per queue, enforced by the claim, and dependencies between jobs.
-- {schema} is replaced by the quoted schema identifier; literal braces are doubled.
-- In one transaction: new tables and their indexes, nullable columns without defaults
-- (no table rewrite), functions and a trigger; no index is built on jobs.

-- Global limits: at most global_concurrency jobs of the queue running in the whole
-- cluster, and at most rate_jobs started in any rate_period_seconds. Written by
-- `pgsched queue limit` and by a worker whose [queues.NAME] sets them; read by every
-- claim, so all workers agree. A queue without a row has no global limit. The window
-- holds the recent starts counted against the rate: bucket end times (a 64th of the
-- period) and how many jobs started in each; only claims write it (claim_jobs).
CREATE TABLE {schema}.queue_limits (
    queue               text PRIMARY KEY,
    global_concurrency  integer CHECK (global_concurrency >= 1),
    rate_jobs           integer CHECK (rate_jobs >= 1),
    rate_period_seconds double precision
        CHECK (rate_period_seconds BETWEEN 1 AND 604800),
    window_at           timestamptz[] NOT NULL DEFAULT '{{}}',
    window_jobs         integer[] NOT NULL DEFAULT '{{}}',
    set_at              timestamptz NOT NULL DEFAULT now(),
    set_by              text,
    CHECK ((rate_jobs IS NULL) = (rate_period_seconds IS NULL))
);

-- How many more jobs of each given queue may start now, for the claim. Called by
-- claim_jobs only for served queues that have a row here, so a claim without limits
-- never calls it (STRICT: a NULL list returns no row).
--
-- Serialises claims per limited queue: the queue's row is locked (held until the
-- claim commits) before anything is counted, and the count is a second statement, so
-- it runs on a snapshot taken after the lock (a VOLATILE function takes one per
-- statement): it sees every job the previous holder claimed. Counting inside the
-- claim's own snapshot would miss a claim that committed while this one started.
-- SKIP LOCKED: a row another claimer holds gives room 0 for this claim instead of a
-- wait, so a worker's other queues are never held up by a limited one; the claim tries
-- again at recheck_at.
--
-- room: NULL when the queue has no row any more (no limit), else the smaller of
-- global_concurrency less the running jobs of the queue and rate_jobs less the starts
-- in the window, never below 0. recheck_at: set when the limit holds back jobs due now
-- (room below the claim's cap for the queue, `caps`, and more jobs due than room): when
-- room may come back. For the rate, when the oldest counted bucket leaves the window;
-- otherwise after `recheck` seconds (nothing tells a worker that another worker's job
-- finished). A queue at its limit with nothing more due wakes nobody.
CREATE FUNCTION {schema}.claim_room(
    queues text[], caps integer[], priorities smallint[], recheck double precision
) RETURNS TABLE (queue text, room integer, recheck_at timestamptz)
LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    locked text[];
BEGIN
    SELECT coalesce(array_agg(l.queue), '{{}}') INTO locked FROM (
        SELECT ql.queue FROM {schema}.queue_limits ql
        WHERE ql.queue = ANY(queues) ORDER BY ql.queue
        FOR UPDATE SKIP LOCKED) l;
    RETURN QUERY
    SELECT x.name, x.room,
           CASE WHEN x.room < x.cap AND x.room < (
                    SELECT count(*) FROM (
                        SELECT 1 FROM unnest(priorities) AS p(priority)
                        CROSS JOIN LATERAL (
                            SELECT 1 FROM {schema}.jobs j
                            WHERE j.status = 'pending' AND j.queue = x.name
                              AND j.priority = p.priority AND j.execution_time <= now()
                            LIMIT x.room::bigint + 1) d
                        LIMIT x.room::bigint + 1) due)
                THEN x.recheck_at END
    FROM (
        SELECT q.name, q.cap,
               CASE WHEN l.queue IS NULL THEN NULL
                    WHEN NOT (l.queue = ANY(locked)) THEN 0
                    ELSE greatest(0, least(
                        coalesce(l.global_concurrency - r.running, 2147483647),
                        coalesce(l.rate_jobs - w.started, 2147483647)))::integer END AS room,
               CASE WHEN l.queue = ANY(locked) AND l.rate_jobs - w.started
                             < coalesce(l.global_concurrency - r.running, 2147483647)
                    THEN greatest(w.oldest + make_interval(secs => l.rate_period_seconds),
                                  clock_timestamp())
                    ELSE clock_timestamp() + make_interval(secs => recheck) END AS recheck_at
        FROM unnest(queues, caps) AS q(name, cap)
        LEFT JOIN {schema}.queue_limits l ON l.queue = q.name
        LEFT JOIN LATERAL (
            -- jobs_running_idx (0009): the running rows, then those of this queue
            SELECT count(*) AS running FROM {schema}.jobs j
            WHERE j.worker_id IS NOT NULL AND j.finished_at IS NULL AND j.status = 'running'
              AND j.queue = l.queue AND l.global_concurrency IS NOT NULL
        ) r ON true
        LEFT JOIN LATERAL (
            SELECT coalesce(sum(b.jobs), 0) AS started, min(b.at) AS oldest
            FROM unnest(l.window_at, l.window_jobs) AS b(at, jobs)
            WHERE b.at > now() - make_interval(secs => l.rate_period_seconds)
        ) w ON true
    ) x;
END
$$;

-- Count the starts of a claim in the rate windows of its queues: `queues` holds the
-- queue of each job it started, in the rate-limited queues whose rows it locked
-- (claim_room). Called by claim_jobs after its UPDATE; returns how many were counted.
CREATE FUNCTION {schema}.count_starts(queues text[])
RETURNS integer LANGUAGE plpgsql VOLATILE STRICT AS $$
BEGIN
    UPDATE {schema}.queue_limits AS l
    SET (window_at, window_jobs) = (
        SELECT w.new_at, w.new_jobs FROM {schema}.rate_window_add(
            l.window_at, l.window_jobs, now(), c.jobs, l.rate_period_seconds) w)
    FROM (SELECT q.name, count(*)::integer AS jobs FROM unnest(queues) AS q(name)
          GROUP BY q.name) c
    WHERE l.queue = c.name AND l.rate_jobs IS NOT NULL;
    RETURN cardinality(queues);
END
$$;

-- The rate window after a claim started `jobs` at `started`: the start counted in the
-- bucket that ends at or after it (a 64th of the period: a start is counted from its
-- time to at most a 64th of a period longer than the period, never shorter), buckets
-- older than two periods dropped (one period of slack for claims that reach the lock
-- out of their start order). At most about 130 buckets, whatever the rate.
CREATE FUNCTION {schema}.rate_window_add(
    window_at timestamptz[], window_jobs integer[], started timestamptz, jobs integer,
    period double precision
) RETURNS TABLE (new_at timestamptz[], new_jobs integer[])
LANGUAGE sql IMMUTABLE AS $$
    SELECT array_agg(b.at ORDER BY b.at), array_agg(b.jobs ORDER BY b.at)
    FROM (
        SELECT k.at, least(sum(k.jobs), 2147483647)::integer AS jobs
        FROM (
            SELECT w.at, w.jobs FROM unnest(window_at, window_jobs) AS w(at, jobs)
            WHERE w.at > started - make_interval(secs => 2 * period)
            UNION ALL
            SELECT to_timestamp(ceil(extract(epoch FROM started) * 64 / period) * period / 64),
                   jobs
        ) k
        GROUP BY k.at
    ) b
$$;

-- Dependencies. due_after_dependencies: set exactly while a job waits for its
-- dependencies; the job then is pending with execution_time 9999-12-31 (never due, so
-- the claim never walks it) and this column holds the due time it gets back when its
-- last dependency completes. has_dependents: set on a job when another is scheduled to
-- wait for it, so that only such jobs fire the trigger below when they end.
ALTER TABLE {schema}.jobs ADD COLUMN due_after_dependencies timestamptz;
ALTER TABLE {schema}.jobs ADD COLUMN has_dependents boolean;

-- Which job waits for which (kept after the wait, so `show` can tell what a job waited
-- for). A table of its own rather than an array column on jobs: its indexes are made
-- with an empty table, never built over jobs under a lock. No foreign keys: jobs are vacuumed
-- independently of each other, and an edge whose dependency is gone means "gone".
CREATE TABLE {schema}.job_dependencies (
    job_id         text NOT NULL,
    dependency_id  text NOT NULL,
    PRIMARY KEY (job_id, dependency_id),
    -- the dependents of a job, for the trigger (a constraint: its index comes with the
    -- new table, and no index is built on an existing one)
    UNIQUE (dependency_id, job_id)
);

-- Decide the given waiting jobs: released (due again) once every dependency completed,
-- cancelled with the reason once one failed, was cancelled, expired or is gone, else
-- left waiting. Each job is locked first and then judged in a second statement, on a
-- snapshot taken after the lock: two dependencies completing at once in two
-- transactions each lock the dependent in turn, and the second sees the first's
-- completion (judged in the first's snapshot it would wait for ever). Callers that did
-- not end a dependency themselves lock the dependencies first (lock_dependencies), so
-- that a completion in flight is seen. Returns the jobs released and their due times
-- (the caller wakes workers).
CREATE FUNCTION {schema}.settle_waiting(ids text[])
RETURNS TABLE (released text, due timestamptz) LANGUAGE plpgsql VOLATILE STRICT AS $$
DECLARE
    locked text[];
BEGIN
    SELECT coalesce(array_agg(w.id), '{{}}') INTO locked FROM (
        SELECT j.id FROM {schema}.jobs j
        WHERE j.id = ANY(ids) AND j.status = 'pending'
          AND j.due_after_dependencies IS NOT NULL
        ORDER BY j.id FOR UPDATE) w;
    -- A dependency that ended otherwise than completed (or is gone) cancels the job; the
    -- cancel fires this trigger for the job's own dependents in turn (transitively).
    UPDATE {schema}.jobs AS j SET
        status = 'cancelled', finished_at = now(), due_after_dependencies = NULL,
        last_error = 'cancelled: dependency ' || b.dependency_id || ' ' || b.why
    FROM (
        SELECT DISTINCT ON (e.job_id) e.job_id, e.dependency_id,
               CASE WHEN d.status IS NULL THEN 'no longer exists'
                    ELSE d.status::text || coalesce(': ' || left(d.last_error, 500), '') END
                   AS why
        FROM {schema}.job_dependencies e
        LEFT JOIN {schema}.jobs d ON d.id = e.dependency_id
        WHERE e.job_id = ANY(locked)
          AND (d.id IS NULL OR d.status IN ('failed', 'cancelled', 'expired'))
        ORDER BY e.job_id, e.dependency_id
    ) b
    WHERE j.id = b.job_id;
    RETURN QUERY
    UPDATE {schema}.jobs AS j SET
        execution_time = greatest(j.due_after_dependencies, now()),
        due_after_dependencies = NULL
    WHERE j.id = ANY(locked) AND j.status = 'pending'
      AND j.due_after_dependencies IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM {schema}.job_dependencies e
          LEFT JOIN {schema}.jobs d ON d.id = e.dependency_id
          WHERE e.job_id = j.id AND d.status IS DISTINCT FROM 'completed')
    RETURNING j.id, j.execution_time;
END
$$;

-- When a job that others wait for ends (whichever statement ends it: a completion, a
-- failure, a cancel, an expiry, orphan recovery), its waiting dependents are settled in
-- the same transaction. Only rows with has_dependents fire it: other jobs pay for the
-- WHEN test alone. Released dependents wake idle workers like an enqueue does, on the
-- schema's channel (store.channel_name, computed alike).
CREATE FUNCTION {schema}.job_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    earliest timestamptz;
    channel text := 'pgsched_' || TG_TABLE_SCHEMA;
BEGIN
    SELECT min(s.due) INTO earliest
    FROM {schema}.settle_waiting(ARRAY(
        SELECT e.job_id FROM {schema}.job_dependencies e WHERE e.dependency_id = NEW.id
    )) AS s;
    IF earliest IS NOT NULL THEN
        IF octet_length(channel) > 63 THEN
            channel := left(channel, 54) || '_' || left(encode(
                sha256(convert_to(TG_TABLE_SCHEMA, 'UTF8')), 'hex'), 8);
        END IF;
        PERFORM pg_notify(channel, extract(epoch FROM earliest)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_dependents_settle AFTER UPDATE OF status ON {schema}.jobs
    FOR EACH ROW
    WHEN (NEW.has_dependents AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('completed', 'failed', 'cancelled', 'expired'))
    EXECUTE FUNCTION {schema}.job_ended();
