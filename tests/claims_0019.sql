-- The claim statements (block claim_jobs of pgsched/sql/queries.sql) as the release before
-- migration 0020 sends them: a worker of that version still claims with these during a
-- rolling deploy, after the first new worker has migrated (a worker migrates at start).
-- Read by tests/test_upgrade_0020.py; never edited but to add a release.
-- name: claim_jobs
-- Claim up to `limit` due jobs for one worker from the queues it serves (`queues`, or
-- every queue when NULL) that are not paused, taking at most `capped_free` from each
-- queue in `capped_queues` (per-queue concurrency) and no more than a queue's global
-- limits allow (queue_limits); expire jobs past their misfire grace; report when the next
-- pending job of those queues falls due, or when a global limit that held jobs back may
-- let them go. Always returns at least one row: the job columns are NULL when nothing
-- was claimed. Three statements come from this block (store._variants): claim_jobs, with
-- the `if limits` parts, claim_jobs_unlimited, with the `else` parts, and claim_jobs_flat.
-- Each serves only what it can serve correctly and says when it served nothing for that
-- reason (limits_exist, flat_refused), in the snapshot it ran in, so the store's choice
-- among them (Store.claim_jobs) can only cost a second statement, never a wrong claim.
--
-- The per-queue walks (claim_jobs, claim_jobs_unlimited). The pending index is (queue,
-- priority, execution_time, id), and each (queue, priority) pair is walked on its own,
-- over its due rows only. A single `ORDER BY priority, execution_time` scan filtered by
-- queue would wade through the due backlog of every paused queue and of queues left to
-- other workers, and through every future job of a priority when few are due (200,000
-- jobs due next week cost milliseconds per claim). The queues come from the worker's
-- list, or, for a worker that serves every queue, from a loose index scan (one index
-- probe per distinct queue with pending jobs); the priorities are those of 0-9 the queue
-- has pending rows of (served_priorities). Within a queue the walks run in priority order
-- and the LIMIT stops them at the queue's cap (a nested loop preserves the order in which
-- the loose scan found the priorities). Across queues the candidates are sorted by
-- priority and due time and cut to `limit`: when several queues have jobs due at once
-- a claim locks up to its limit in each of them and lets the surplus go at commit,
-- milliseconds later; concurrent claimers skip those rows (SKIP LOCKED) and never wait,
-- so one may come back short. This costs about 20 us per queue with pending jobs.
--
-- The flat walk (claim_jobs_flat), for a worker that serves every queue with no
-- per-queue caps (the store sends it only then, however many queues have pending jobs),
-- serving nothing when a global limit exists or a paused queue has jobs due. It walks
-- jobs_pending_due_idx (priority, execution_time, id, migration 0014) once per priority
-- 0-9, over due rows only, locks as it goes and stops
-- at `limit`: it locks only what it takes, and costs the same with 1 or 1,000 queues (a
-- priority without due jobs costs one index probe). What it relies on:
-- - Nothing is waded through: no queue is left to other workers, no cap stops a queue,
--   and (flat, same snapshot) no paused queue has a due row in the walk's path; paused
--   queues' future rows lie beyond now() and are never read.
-- - It takes nothing it must not: each row it locks passes, in its locked version, the
--   walk's own tests (pending, due, not of a paused queue; a queue paused after this
--   snapshot began is missed, as by the per-queue walks).
-- - It skips no due job it should take: every due pending row of a queue that is not
--   paused is in the index, and the walk reads each priority's due rows in order until
--   `limit` rows are locked; only rows another claim holds are skipped (SKIP LOCKED).
-- - next_due is never late: it is the earliest future pending job of any queue, paused
--   ones included (early is harmless: the worker claims, finds nothing, and sleeps on).
-- - Order: priorities in ascending order from a nested loop over a fixed list, due rows
--   in index order within each; the limit cuts that sequence, as the per-queue walks' sort.
-- - The walk bound, the LIMIT of each priority's walk and of the walk as a whole, is at
--   least `limit` (store.walk_bound), so only the outer LIMIT stops the walk: with the
--   bound below `limit`, a priority with more due rows than the bound would give way to
--   the next one too early.
--
-- Prepared or planned at each claim (store.PREPARED_CLAIM_ROWS): PostgreSQL keeps the
-- generic plan of a prepared statement until jobs is analysed again, and the plan it
-- makes for a table of a few hundred rows (or none) scans the table, or an index by a
-- column it does not lead with, to find the claimed rows and the due ones (a claim read
-- 2.2M rows at 200,000 rows, tests/test_claim_flat_adversary.py). No shape of statement
-- prevents that: for a table of one page every path costs about the same. So the store
-- prepares its claims only while the planner's statistics (pg_class.reltuples of
-- jobs_pending_due_idx, pending_rows below) count at least PREPARED_CLAIM_ROWS pending
-- rows, the rows the walks read, not the table's: with 60 pending among 20,000 finished
-- the generic plan expected two due rows a priority, fetched them by a bitmap scan and a
-- sort, and sorted 16,666 a claim after a burst (tests/test_claim_flat_review.py). With
-- enough pending rows in the statistics every claim statement finds its
-- due rows, and the claimed ones, by walking an index, and stays so however the table
-- grows; the statistics change only with the ANALYZE, VACUUM or TRUNCATE that also makes
-- PostgreSQL plan again. Below that, each claim is planned for the table as it is.
--
-- Rows are locked inside the walks so that a claimer skips what another is taking and
-- walks on, instead of ending up with the same candidates.
--
-- Suspects (jobs of a crash shared by several jobs, recover_orphans; migration 0019) run
-- alone: the walks' {suspect} is `NOT suspect` in the three statements, so they step over
-- suspects (few, and near the front of each walk: their due time is that of their first
-- attempt). A suspect claim (Store.claim_jobs(suspects=True), a worker that holds no job,
-- with limit 1) is claim_jobs or claim_jobs_unlimited with `suspect` in its place, which
-- PostgreSQL serves from jobs_pending_suspect_idx, so it keeps every rule of those walks
-- (served, paused, capped and limited queues); never the flat walk, which would wade
-- through every due job to find one. A claim clears the mark: a suspect that fails is
-- retried as any job. suspect_due tells the worker when one is due.
WITH RECURSIVE
-- for: claim_jobs, claim_jobs_unlimited
pending_queues AS (
    (SELECT queue FROM {schema}.jobs WHERE status = 'pending' ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {schema}.jobs j
            WHERE j.status = 'pending' AND j.queue > q.queue ORDER BY j.queue LIMIT 1)
    FROM pending_queues q WHERE q.queue IS NOT NULL
),
listed AS (
    SELECT s.queue, least(%(limit)s, coalesce(c.free, %(limit)s)) AS cap
    FROM (
        SELECT queue FROM pending_queues
        WHERE queue IS NOT NULL AND %(queues)s::text[] IS NULL
        UNION ALL
        SELECT unnest(%(queues)s::text[])
    ) s
    LEFT JOIN unnest(%(capped_queues)s::text[], %(capped_free)s::int[]) AS c(queue, free)
        ON c.queue = s.queue
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.paused_queues p WHERE p.queue = s.queue)
),
-- if limits
-- Global limits (migration 0012): claim_room locks the limited queues' rows until this
-- claim commits, so claims of a limited queue run one after another and each counts
-- what the previous one started. It is called only when a served queue has a row in
-- queue_limits (STRICT, and array_agg of nothing is NULL): a claim without limits pays
-- one probe of that table per queue. A limit set after this statement began applies
-- from the next claim. The limit logic sits in functions so that this statement, planned
-- at every claim, stays as cheap to plan as it was without it. claim_room looks for due
-- jobs at every priority (0-9) of a limited queue, to know whether the limit held any back.
limited AS (
    SELECT r.queue, r.room, r.recheck_at
    FROM (SELECT array_agg(l.queue) AS queues, array_agg(l.cap) AS caps FROM listed l
          WHERE EXISTS (SELECT 1 FROM {schema}.queue_limits g WHERE g.queue = l.queue)) a
    CROSS JOIN LATERAL {schema}.claim_room(
        a.queues, a.caps, ARRAY[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]::smallint[], %(limit_recheck_seconds)s) r
),
served AS (
    SELECT s.queue, least(s.cap, coalesce(r.room, s.cap)) AS cap
    FROM listed s LEFT JOIN limited r ON r.queue = s.queue
),
-- else: claim_jobs_unlimited
-- No queue has a global limit (queue_limits is empty in this statement's snapshot, the
-- same one a claim_room call would read): claim_jobs_unlimited, the statement a worker
-- runs until a limit appears, is this much cheaper to plan (0.15 ms a claim, a sixth of
-- the server's CPU per job at the default concurrency). When a limit exists it serves
-- nothing and says so (limits_exist): the worker claims again at once with claim_jobs.
served AS (
    SELECT queue, cap FROM listed
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.queue_limits)
),
-- for: claim_jobs, claim_jobs_unlimited
-- The priorities each served queue has pending rows of, lowest first: a loose index scan,
-- one probe per priority present plus one that finds none. With the jobs of a queue at
-- one or two priorities this costs what walking the two JobPriority values did, however
-- many of 0-9 exist. Materialised once, for next_due and candidates. (A fixed 0-9 array
-- plans faster, but with 100 queues of due jobs a claim took 7.5 ms against 4.0.)
served_priorities AS (
    SELECT s.queue, p.priority
    FROM served s
    CROSS JOIN LATERAL (
        WITH RECURSIVE present AS (
            (SELECT priority FROM {schema}.jobs
             WHERE status = 'pending' AND queue = s.queue ORDER BY priority LIMIT 1)
            UNION ALL
            SELECT (SELECT j.priority FROM {schema}.jobs j
                    WHERE j.status = 'pending' AND j.queue = s.queue
                      AND j.priority > present.priority
                    ORDER BY j.priority LIMIT 1)
            FROM present WHERE present.priority IS NOT NULL
        )
        SELECT priority FROM present WHERE priority IS NOT NULL
    ) p
),
next_due AS (
    SELECT min(f.execution_time) AS at
    FROM served_priorities sp
    CROSS JOIN LATERAL (
        SELECT execution_time FROM {schema}.jobs
        WHERE status = 'pending' AND queue = sp.queue AND priority = sp.priority
          AND execution_time > now()
        ORDER BY execution_time LIMIT 1
    ) f
),
walked AS (
    SELECT c.*
    FROM served s
    CROSS JOIN LATERAL (
        SELECT w.* FROM served_priorities p
        CROSS JOIN LATERAL (
            SELECT id, priority, execution_time, misfire_grace_seconds, started_at
            FROM {schema}.jobs
            WHERE status = 'pending' AND queue = s.queue AND priority = p.priority
              AND execution_time <= now() AND attempts < 2147483647 AND {suspect}
            ORDER BY execution_time, id
            LIMIT s.cap
            FOR UPDATE SKIP LOCKED
        ) w
        WHERE p.queue = s.queue
        LIMIT s.cap
    ) c
    ORDER BY c.priority, c.execution_time, c.id
    LIMIT %(limit)s
),
-- for: claim_jobs_flat
-- Whether the flat walk may serve this claim: no global limit (as in claim_jobs_unlimited)
-- and no paused queue with a job due, whose rows would lie in the walk's path (the index
-- has no queue column to skip them by). One probe per paused queue, and ten (one per
-- priority) for each paused queue that has pending jobs: cheap while few queues are
-- paused. With more than 8 paused queues holding pending jobs the walk is refused
-- outright (the probes would cost more than the per-queue walks they spare: 11,029 index
-- probes against 1,024 with 1,000 paused tenants), so the check stops at the 9th.
-- Each probe is ordered along jobs_pending_queue_idx so that only that index serves it:
-- unordered (LIMIT 1 alone), PostgreSQL planned probes as scans of jobs expected to stop
-- at an early match (with few queues and priorities in its statistics it expects many),
-- so a paused queue without pending or due jobs read the whole table, history too, once
-- per probe and claim.
paused_pending AS (
    SELECT queue FROM {schema}.paused_queues p
    WHERE (SELECT 1 FROM {schema}.jobs j
           WHERE j.status = 'pending' AND j.queue = p.queue
           ORDER BY j.priority LIMIT 1) IS NOT NULL
    LIMIT 9
),
flat AS (
    SELECT NOT EXISTS (SELECT 1 FROM {schema}.queue_limits)
           AND (SELECT count(*) FROM paused_pending) <= 8
           AND NOT EXISTS (
               SELECT 1
               FROM paused_pending p
               CROSS JOIN unnest(ARRAY[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]::smallint[]) AS pr(priority)
               WHERE (SELECT 1 FROM {schema}.jobs j
                      WHERE j.status = 'pending' AND j.queue = p.queue
                        AND j.priority = pr.priority AND j.execution_time <= now()
                      ORDER BY j.execution_time LIMIT 1) IS NOT NULL)
           AS chosen
),
-- The priorities to walk, lowest first: all of 0-9, or none when the walk is refused. A
-- priority without due jobs costs one index probe; a fixed list plans faster than a loose
-- scan of the priorities present.
flat_priorities AS (
    SELECT priority FROM unnest(ARRAY[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]::smallint[]) AS p(priority)
    WHERE (SELECT chosen FROM flat)
),
-- The first future job of each priority, paused queues' included: one of those can make
-- the worker wake early and claim nothing, never late; once it is due, the claims take
-- the per-queue walks (flat refuses), which leave paused queues out of next_due.
next_due AS (
    SELECT min(f.execution_time) AS at
    FROM flat_priorities p
    CROSS JOIN LATERAL (
        SELECT execution_time FROM {schema}.jobs
        WHERE status = 'pending' AND priority = p.priority AND execution_time > now()
        ORDER BY execution_time LIMIT 1
    ) f
),
-- Priorities in order (a nested loop keeps the list's order), due rows in index order
-- within each; the outer LIMIT stops pulling, and so locking, at the claim's limit (a
-- LIMIT reads no row ahead). The two inner ones are a constant, the walk bound, not
-- `limit`: a generic plan cannot know `limit` and takes it for a tenth of the rows it
-- limits: with `limit` in their place that was 500 of each priority's 5,000 due jobs,
-- which made PostgreSQL price the generic plan above planning each claim (0.6 ms), and
-- plan every claim. Now the generic plan expects a tenth of the bound, no more than a
-- claim takes, however far apart the claim and its bound are (a bound twice a claim of 2
-- priced it above planning where finished jobs outnumber pending ones 99 to 1). The
-- paused test repeats flat's for a row whose newer version, read when it is locked, has
-- become due since the snapshot. It is written NOT IN (a hashed subplan, estimated to keep
-- half the rows; paused_queues.queue is the primary key, never NULL) on purpose: a
-- correlated subquery is estimated to keep one row in 200, and with that estimate the
-- planner sorts every due row of a priority instead of walking the index
-- (tests/test_claim_flat.py reads the plan).
walked AS (
    SELECT * FROM (
        SELECT w.* FROM flat_priorities p
        CROSS JOIN LATERAL (
            SELECT id, priority, execution_time, misfire_grace_seconds, started_at
            FROM {schema}.jobs j
            WHERE status = 'pending' AND priority = p.priority
              AND execution_time <= now() AND attempts < 2147483647 AND {suspect}
              AND j.queue NOT IN (SELECT queue FROM {schema}.paused_queues)
            ORDER BY execution_time, id
            LIMIT {walk_bound}
            FOR UPDATE SKIP LOCKED
        ) w
        LIMIT {walk_bound}
    ) bounded
    LIMIT %(limit)s
),
-- end
-- Only a job that could not start in time expires. One put back by orphan recovery or a
-- shutdown started in time (its last attempt started at or after its due time, which
-- neither changes) and must run again, however late; a retry (due again later than its
-- last start) keeps its grace from the retry time; a new, replaced or `pgsched retry`-ed
-- job has not started. Read from the walks, which return each row as it was locked.
-- Lateness is compared in seconds, not as an interval: a grace written with SQL
-- ('Infinity', 1e300) must not make interval arithmetic fail the whole claim. A job
-- whose attempts cannot count up any more (written with SQL) is left by the walks.
candidates AS (
    SELECT id, (misfire_grace_seconds IS NOT NULL
                AND (started_at IS NULL OR started_at < execution_time)
                AND extract(epoch FROM now()) - extract(epoch FROM execution_time)
                    > misfire_grace_seconds) AS expired
    FROM walked
),
claimed AS (
    UPDATE {schema}.jobs AS j SET
        status = CASE WHEN c.expired THEN 'expired' ELSE 'running' END::{schema}.job_status,
        attempts = j.attempts + CASE WHEN c.expired THEN 0 ELSE 1 END,
        worker_id = CASE WHEN c.expired THEN NULL ELSE %(worker_id)s END,
        lease_until = CASE WHEN c.expired THEN NULL
                           ELSE clock_timestamp() + make_interval(secs => %(lease_seconds)s) END,
        heartbeat_at = CASE WHEN c.expired THEN NULL ELSE clock_timestamp() END,
        started_at = CASE WHEN c.expired THEN j.started_at ELSE now() END,
        finished_at = CASE WHEN c.expired THEN now() END,
        cancel_requested_at = NULL, suspect = false,
        last_error = CASE WHEN c.expired
            THEN 'expired: not started within its misfire grace of '
                 || j.misfire_grace_seconds || 's after ' || j.execution_time
            ELSE j.last_error END
    FROM candidates c
    -- = ANY: the rows to update are found by the primary key at any estimate of how many
    -- the walks return (a generic plan's can be a tenth of the table; joined by the id
    -- alone, such a plan hashed a scan of jobs).
    WHERE j.id = c.id AND j.id = ANY(ARRAY(SELECT id FROM candidates))
    -- args and kwargs as text: the worker decodes them job by job, so one row it cannot
    -- decode (nested too deeply) fails that job instead of the whole claim.
    -- Times clamped to what a Python datetime holds: a row due at '-infinity' (written by
    -- SQL) runs like any due job instead of failing the claim that took it. A NaN timeout
    -- (written by SQL) is no length of time: none. Given to asyncio it would put a NaN
    -- timer on the worker's loop, whose timer heap NaN breaks (other timers stop firing).
    RETURNING j.id, j.task, j.queue, j.args::text AS args, j.kwargs::text AS kwargs,
              j.priority, greatest(j.execution_time, '0001-01-03Z') AS execution_time,
              j.attempts, j.failures, j.max_retries,
              nullif(j.timeout_seconds, 'NaN') AS timeout_seconds, c.expired,
              -- current_job()'s schedule window (None for one-off jobs), clamped likewise
              j.schedule_id, CASE WHEN j.fire_time IS NOT NULL
                  THEN least(greatest(j.fire_time, '0001-01-03Z'), '9999-12-30Z') END AS fire_time
)
-- if limits
-- The starts of this claim in the rate windows of the limited queues it took from
-- (count_starts; only rows claim_room locked, whose room is not NULL). With no limited
-- queue the array is NULL and the STRICT function is not called.
, counted AS (
    SELECT {schema}.count_starts(array_agg(c.queue)) AS jobs
    FROM claimed c JOIN limited r ON r.queue = c.queue AND r.room IS NOT NULL
    WHERE NOT c.expired
)
-- A queue a global limit held back wakes the worker again at recheck_at: no NOTIFY says
-- when room comes back.
SELECT least(n.at, (SELECT min(recheck_at) FROM limited), '9999-12-30Z') AS next_due,
       now() AS db_now, (SELECT jobs FROM counted) AS rate_counted,
-- for: claim_jobs_unlimited, claim_jobs_flat
SELECT least(n.at, '9999-12-30Z') AS next_due, now() AS db_now, NULL::integer AS rate_counted,
-- for: claim_jobs_flat
       NOT (SELECT chosen FROM flat) AS flat_refused,
-- end
       -- How many pending rows the planner's statistics count (those of the pending index
       -- the flat walk reads): whether the store may prepare its next claim
       -- (store.PREPARED_CLAIM_ROWS). to_regclass: without the index (dropped by hand, or
       -- between the DROP and the CREATE of its migration run again) -1, planned claims.
       coalesce((SELECT reltuples FROM pg_class
                 WHERE oid = to_regclass('{schema}.jobs_pending_due_idx')), -1) AS pending_rows,
       -- And how many rows of any status (the table complete_jobs looks ids up in): whether
       -- the store may prepare its completions (store.PREPARED_COMPLETE_ROWS). -1 before
       -- the table's first ANALYZE or VACUUM.
       coalesce((SELECT reltuples FROM pg_class
                 WHERE oid = to_regclass('{schema}.jobs')), -1) AS job_rows,
       EXISTS (SELECT 1 FROM {schema}.queue_limits) AS limits_exist,
       -- Whether a suspect of a queue this worker may claim from (served, not paused) is
       -- due: a read of jobs_pending_suspect_idx (migration 0019), which is almost always
       -- empty. The worker then claims it alone (fetcher.py). Caps and global limits are
       -- left to that suspect claim, which may then find nothing.
-- for: claim_jobs, claim_jobs_unlimited
       EXISTS (SELECT 1 FROM {schema}.jobs s
               WHERE s.status = 'pending' AND s.suspect AND s.execution_time <= now()
                 AND s.queue IN (SELECT queue FROM listed)) AS suspect_due,
-- for: claim_jobs_flat
       EXISTS (SELECT 1 FROM {schema}.jobs s
               WHERE s.status = 'pending' AND s.suspect AND s.execution_time <= now()
                 AND s.queue NOT IN (SELECT queue FROM {schema}.paused_queues)) AS suspect_due,
-- end
       claimed.*
FROM next_due n LEFT JOIN claimed ON true;

