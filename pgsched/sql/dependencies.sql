-- Dependencies between jobs (migration 0012): scheduling a job that waits for others,
-- settling waiting jobs, and what a job waits for. Named blocks loaded by
-- pgsched/store.py (see queries.sql for the conventions).
--
-- A waiting job is pending with execution_time 9999-12-31 and due_after_dependencies
-- set; the claim never reaches it. It is released (due again) or cancelled by
-- settle_waiting, which the trigger jobs_dependents_settle runs in the transaction that
-- ends one of its dependencies, and which the statements here run after writing one.

-- name: insert_waiting_job
-- Insert one job that waits for %(depends_on)s, unless its id exists, one of them does
-- not, one of them waits (transitively) for it, or it would end too long a chain. The dependencies are locked first (in
-- id order, so that two such inserts cannot deadlock), which waits for a completion in
-- flight: settle_waiting, run next in the same transaction, then sees their last word.
-- Marks them has_dependents (if it inserted the job), so their end fires the trigger.
-- Returns the dependencies found, whether a cycle was found, whether the chain is too
-- deep, and whether the job was inserted; writes nothing unless all were found and
-- neither was.
--
-- A claim skips a row locked at that moment (SKIP LOCKED), and leaves it out of its next
-- due time as well: a pending dependency that is or falls due while this lock is held
-- would wait for the workers' safety poll. So the statement wakes them for the earliest
-- pending one (a NOTIFY is delivered at commit, once the lock is gone), even when it
-- refuses the job: the caller commits a refusal too (it wrote nothing).
WITH RECURSIVE deps AS (
    SELECT id, status, execution_time, due_after_dependencies
    FROM {schema}.jobs WHERE id = ANY(%(depends_on)s::text[])
    ORDER BY id FOR UPDATE
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM deps WHERE status = 'pending' AND due_after_dependencies IS NULL
    HAVING count(*) > 0
),
upstream AS (
    -- what the dependencies wait for, and so on up: only waiting jobs can close a cycle.
    -- depth: how many waiting jobs lead from the new job's dependencies to it. Walked no
    -- deeper than %(max_chain)s: a chain that long is refused anyway (too_deep).
    SELECT e.dependency_id AS id, 1 AS depth FROM {schema}.job_dependencies e
    JOIN {schema}.jobs w ON w.id = e.job_id AND w.due_after_dependencies IS NOT NULL
    WHERE e.job_id = ANY(%(depends_on)s::text[])
    UNION
    SELECT e.dependency_id, u.depth + 1 FROM upstream u
    JOIN {schema}.job_dependencies e ON e.job_id = u.id
    JOIN {schema}.jobs w ON w.id = e.job_id AND w.due_after_dependencies IS NOT NULL
    WHERE u.depth < %(max_chain)s
),
verdict AS (
    -- too_deep: the new job would end a chain of more than %(max_chain)s waiting jobs.
    -- The end of the chain's first job settles them in nested triggers (a cancel fires
    -- the next one's), and PostgreSQL's stack (max_stack_depth, 2 MB by default) ran out
    -- at about 400: the ending statement failed, whichever worker or command ran it.
    SELECT (SELECT count(*) FROM deps) = cardinality(%(depends_on)s::text[]) AS known,
           EXISTS (SELECT 1 FROM upstream WHERE id = %(id)s) AS cycle,
           EXISTS (SELECT 1 FROM upstream WHERE depth >= %(max_chain)s) AS too_deep
),
marked AS (
    -- only for a job inserted: one whose id was taken waits for nothing here
    UPDATE {schema}.jobs AS j SET has_dependents = true
    FROM deps
    WHERE j.id = deps.id AND EXISTS (SELECT 1 FROM new) AND j.has_dependents IS NOT TRUE
),
new AS (
    INSERT INTO {schema}.jobs
        (id, task, queue, args, kwargs, priority, execution_time,
         misfire_grace_seconds, max_retries, timeout_seconds, due_after_dependencies)
    SELECT %(id)s, %(task)s, %(queue)s, %(args)s::jsonb, %(kwargs)s::jsonb, %(priority)s,
           '9999-12-31Z', %(misfire_grace_seconds)s, %(max_retries)s, %(timeout_seconds)s,
           coalesce(%(execution_time)s::timestamptz, now())
    FROM verdict WHERE verdict.known AND NOT verdict.cycle AND NOT verdict.too_deep
    ON CONFLICT (id) DO NOTHING
    RETURNING id
),
edges AS (
    INSERT INTO {schema}.job_dependencies (job_id, dependency_id)
    SELECT new.id, d.id FROM new CROSS JOIN deps d
    ON CONFLICT DO NOTHING
)
SELECT ARRAY(SELECT id FROM deps) AS found, verdict.cycle, verdict.too_deep,
       (SELECT count(*) FROM new) > 0 AS inserted
FROM verdict LEFT JOIN wake ON true;

-- name: lock_dependencies
-- Lock the dependencies of the given waiting jobs against being ended (a completion in
-- flight is waited for), before settle_waiting judges them: `pgsched retry` of a
-- dependent, which does not end a dependency itself. Id order, like insert_waiting_job.
SELECT d.id FROM {schema}.jobs d
WHERE d.id IN (SELECT dependency_id FROM {schema}.job_dependencies
               WHERE job_id = ANY(%(ids)s::text[]))
ORDER BY d.id
FOR SHARE;

-- name: settle_waiting
-- Release or cancel the given waiting jobs as their dependencies say (settle_waiting in
-- 0012), and wake idle workers for those released.
WITH released AS (
    SELECT s.released, s.due FROM {schema}.settle_waiting(%(ids)s::text[]) s
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(due))::text)
    FROM released HAVING count(*) > 0
)
SELECT released.released AS id FROM released LEFT JOIN wake ON true;

-- name: cancel_waiting_cycles
-- Cancel those of the given waiting jobs that wait (transitively) for themselves: a cycle
-- that scheduling refuses can still close when `pgsched retry` puts back a job whose
-- dependency records point at an id that was vacuumed and scheduled again since (to wait
-- for it), and then every job on it would wait for ever. The cancel fires the trigger,
-- which cancels the jobs waiting for it, the rest of the cycle among them.
WITH RECURSIVE reach AS (
    SELECT e.job_id AS start, e.dependency_id AS id FROM {schema}.job_dependencies e
    JOIN {schema}.jobs w ON w.id = e.job_id AND w.due_after_dependencies IS NOT NULL
    WHERE e.job_id = ANY(%(ids)s::text[])
    UNION
    SELECT r.start, e.dependency_id FROM reach r
    JOIN {schema}.job_dependencies e ON e.job_id = r.id
    JOIN {schema}.jobs w ON w.id = e.job_id AND w.due_after_dependencies IS NOT NULL
)
UPDATE {schema}.jobs AS j SET
    status = 'cancelled', finished_at = now(), due_after_dependencies = NULL,
    last_error = 'cancelled: it waits for itself (a dependency cycle closed when it was '
                 'retried)'
WHERE j.id IN (SELECT start FROM reach WHERE id = start)
  AND j.status = 'pending' AND j.due_after_dependencies IS NOT NULL
RETURNING j.id;
