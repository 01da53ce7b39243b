-- Every statement pgsched runs, one named block each, loaded by pgsched/store.py.
--
-- A block starts with `-- name: NAME` and a one-line description. {schema} is replaced
-- by the quoted schema identifier, so literal braces are doubled. Parameters use
-- psycopg's %(name)s style. Time always comes from the database clock (now()), so
-- workers with skewed clocks agree on leases and due times.

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
-- priority, execution_time, id) (jobs_pending_ordinary_queue_idx), and each (queue,
-- priority) pair is walked on its own, over its due rows only. A single `ORDER BY
-- priority, execution_time` scan filtered by queue would wade through the due backlog of
-- every paused queue and of queues left to other workers, and through every future job of
-- a priority when few are due (200,000 jobs due next week cost milliseconds per claim).
-- The queues come from the worker's list, or, for a worker that serves every queue, from
-- a loose index scan (one index probe per distinct queue with pending jobs); the
-- priorities are those of 0-9 the queue has pending rows of (served_priorities). Within a
-- queue the walks run in priority order and the LIMIT stops them at the queue's cap (a
-- nested loop preserves the order in which the loose scan found the priorities). Across
-- queues the candidates are sorted by priority and due time and cut to `limit`: when
-- several queues have jobs due at once a claim locks up to its limit in each of them and
-- lets the surplus go at commit, milliseconds later. This costs about 20 us per queue
-- with pending jobs. Concurrent claimers skip those rows (SKIP LOCKED) and never wait,
-- so one may come back short and go to sleep with them due: a claim that lets rows go
-- therefore wakes the workers of their queues (let_go, a NOTIFY sent at its commit,
-- after the locks are gone). Locking only what is taken would need the merge of the
-- walks to lock as it goes: a Merge Append of locking walks still locks the head of each
-- (queue, priority) walk before it compares them, and locking after the merge
-- (candidates read unlocked, then locked in order) makes concurrent claimers pick the
-- same candidates, so all but one come back short of a backlog.
--
-- The flat walk (claim_jobs_flat), for a worker that serves every queue with no per-queue
-- caps (the store sends it only then, however many queues have pending jobs), serving
-- nothing when a global limit exists or a paused queue has jobs due. It walks
-- jobs_pending_ordinary_due_idx (priority, execution_time, id; migrations 0014 and 0020)
-- once per priority 0-9, over due rows only, locks as it goes and stops at `limit`: it
-- locks only what it takes, and costs the same with 1 or 1,000 queues (a priority without
-- due jobs costs one index probe). What it relies on:
-- - Nothing is waded through: no queue is left to other workers, no cap stops a queue,
--   and (flat, same snapshot) no paused queue has a due row in the walk's path; paused
--   queues' future rows lie beyond now() and are never read.
-- - It takes nothing it must not: each row it locks passes, in its locked version, the
--   walk's own tests (pending, due, not of a paused queue; a queue paused after this
--   snapshot began is missed, as by the per-queue walks).
-- - It skips no due job it should take: every due pending row of a queue that is not
--   paused, but suspects, is in the index, and the walk reads each priority's due rows in
--   order until `limit` rows are locked; only rows another claim holds are skipped (SKIP
--   LOCKED).
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
-- jobs_pending_ordinary_due_idx, pending_rows below) count at least PREPARED_CLAIM_ROWS
-- pending rows, the rows the walks read, not the table's: with 60 pending among 20,000
-- finished the generic plan expected two due rows a priority, fetched them by a bitmap
-- scan and a sort, and sorted 16,666 a claim after a burst
-- (tests/test_claim_flat_review.py). With enough pending rows in the statistics every
-- claim statement finds its due rows, and the claimed ones, by walking an index, and
-- stays so however the table grows; the statistics change only with the ANALYZE, VACUUM
-- or TRUNCATE that also makes PostgreSQL plan again. Below that, each claim is planned
-- for the table as it is (while jobs is small, prepared all the same, so parsed once per
-- connection, on a session that plans every run for its parameters: store._PLAN_CUSTOM).
--
-- Rows are locked inside the walks so that a claimer skips what another is taking and
-- walks on, instead of ending up with the same candidates.
--
-- Suspects (jobs of a crash shared by several jobs, recover_orphans; migration 0019) run
-- alone: {suspect} is `NOT suspect` in the three statements, next to every `status =
-- 'pending'` of the walks, the loose scans and next_due, so that PostgreSQL proves the
-- predicate of the pending indexes they walk, which leave suspects out (migration 0020:
-- jobs_pending_ordinary_queue_idx, jobs_pending_ordinary_due_idx). Suspects are near the
-- front of every walk (their due time is that of their first attempt): as a filter on
-- indexes that held them, 2,000 due suspects made every ordinary claim read 2,033 rows
-- instead of 32 (tests/faults/test_suspects.py). A suspect is always due (it was
-- running), so next_due does not miss one; suspect_due reports it. A suspect claim
-- (Store.claim_jobs(suspects=True), a worker that holds no job, with limit 1) is
-- claim_jobs or claim_jobs_unlimited with `suspect` in its place, which PostgreSQL serves
-- from jobs_pending_suspect_idx, so it keeps every rule of those walks (served, paused,
-- capped and limited queues); never the flat walk, which would wade through every due job
-- to find one. A claim clears the mark: a suspect that fails is retried as any job.
-- suspect_due tells the worker when one is due.
WITH RECURSIVE
-- for: claim_jobs, claim_jobs_unlimited
pending_queues AS (
    (SELECT queue FROM {schema}.jobs WHERE status = 'pending' AND {suspect}
     ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {schema}.jobs j
            WHERE j.status = 'pending' AND {suspect} AND j.queue > q.queue
            ORDER BY j.queue LIMIT 1)
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
             WHERE status = 'pending' AND {suspect} AND queue = s.queue
             ORDER BY priority LIMIT 1)
            UNION ALL
            SELECT (SELECT j.priority FROM {schema}.jobs j
                    WHERE j.status = 'pending' AND {suspect} AND j.queue = s.queue
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
        WHERE status = 'pending' AND {suspect}
          AND queue = sp.queue AND priority = sp.priority
          AND execution_time > now()
        ORDER BY execution_time LIMIT 1
    ) f
),
locked AS (
    SELECT s.queue, c.*
    FROM served s
    CROSS JOIN LATERAL (
        SELECT w.* FROM served_priorities p
        CROSS JOIN LATERAL (
            SELECT id, priority, execution_time, misfire_grace_seconds, started_at
            FROM {schema}.jobs
            WHERE status = 'pending' AND {suspect}
              AND queue = s.queue AND priority = p.priority
              AND execution_time <= now() AND attempts < 2147483647
            ORDER BY execution_time, id
            LIMIT s.cap
            FOR UPDATE SKIP LOCKED
        ) w
        WHERE p.queue = s.queue
        LIMIT s.cap
    ) c
),
walked AS (
    SELECT * FROM locked
    ORDER BY priority, execution_time, id
    LIMIT %(limit)s
),
-- for: claim_jobs_flat
-- Whether the flat walk may serve this claim: no global limit (as in
-- claim_jobs_unlimited) and no paused queue with a job due, whose rows would lie in the
-- walk's path (the index has no queue column to skip them by). One probe per paused
-- queue, and ten (one per priority) for each paused queue that has pending jobs: cheap
-- while few queues are paused. With more than 8 paused queues holding pending jobs the
-- walk is refused outright (the probes would cost more than the per-queue walks they
-- spare: 11,029 index probes against 1,024 with 1,000 paused tenants), so the check stops
-- at the 9th. Each probe is ordered along jobs_pending_ordinary_queue_idx so that only
-- that index serves it: unordered (LIMIT 1 alone), PostgreSQL planned probes as scans of
-- jobs expected to stop at an early match (with few queues and priorities in its
-- statistics it expects many), so a paused queue without pending or due jobs read the
-- whole table, history too, once per probe and claim.
paused_pending AS (
    SELECT queue FROM {schema}.paused_queues p
    WHERE (SELECT 1 FROM {schema}.jobs j
           WHERE j.status = 'pending' AND {suspect} AND j.queue = p.queue
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
                      WHERE j.status = 'pending' AND {suspect} AND j.queue = p.queue
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
        WHERE status = 'pending' AND {suspect}
          AND priority = p.priority AND execution_time > now()
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
            WHERE status = 'pending' AND {suspect} AND priority = p.priority
              AND execution_time <= now() AND attempts < 2147483647
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
                 WHERE oid = to_regclass('{schema}.jobs_pending_ordinary_due_idx')), -1)
           AS pending_rows,
       -- And how many rows of any status (the table complete_jobs looks ids up in): whether
       -- the store may prepare its completions (store.PREPARED_COMPLETE_ROWS). -1 before
       -- the table's first ANALYZE or VACUUM.
       coalesce((SELECT reltuples FROM pg_class
                 WHERE oid = to_regclass('{schema}.jobs')), -1) AS job_rows,
       EXISTS (SELECT 1 FROM {schema}.queue_limits) AS limits_exist,
       -- Whether a suspect of a queue this worker may claim from (served, not paused) is
       -- due: a read of jobs_pending_suspect_idx (migration 0019), which is almost always
       -- empty. The worker then claims it alone (fetcher.py). Caps and global limits are
       -- left to that suspect claim, which may then find nothing. Not `listed`: for a
       -- worker of every queue it holds the queues with ordinary jobs pending, which a
       -- queue with only suspects pending is not.
-- for: claim_jobs, claim_jobs_unlimited
       -- Rows locked and not taken (a claim from several queues): the workers of their
       -- queues are woken at commit, when the rows are free again: 'let_go:' and the
       -- queues, space-separated (a queue name has no space), which a worker of other
       -- queues ignores (listener.py). Sent to every worker, a backlog of two queues
       -- drained a slot at a time, which lets a row go at every claim, made each idle
       -- worker of a third queue claim, empty, at every claim (tests/test_locked_wakeups.py).
       -- A list too long for a payload (8,000 bytes) wakes every worker with a due time
       -- instead. NULL when no row was let go (no NOTIFY).
       (SELECT pg_notify(%(channel)s, CASE WHEN octet_length(g.queues) <= 7900
                                           THEN 'let_go:' || g.queues
                                           ELSE extract(epoch FROM now())::text END)::text
        FROM (SELECT string_agg(DISTINCT l.queue, ' ' ORDER BY l.queue) AS queues
              FROM locked l WHERE l.id NOT IN (SELECT id FROM walked)) g
        WHERE g.queues IS NOT NULL) AS let_go,
       EXISTS (SELECT 1 FROM {schema}.jobs s
               WHERE s.status = 'pending' AND s.suspect AND s.execution_time <= now()
                 AND (%(queues)s::text[] IS NULL OR s.queue = ANY(%(queues)s::text[]))
                 AND s.queue NOT IN (SELECT queue FROM {schema}.paused_queues))
           AS suspect_due,
-- for: claim_jobs_flat
       EXISTS (SELECT 1 FROM {schema}.jobs s
               WHERE s.status = 'pending' AND s.suspect AND s.execution_time <= now()
                 AND s.queue NOT IN (SELECT queue FROM {schema}.paused_queues)) AS suspect_due,
-- end
       claimed.*
FROM next_due n LEFT JOIN claimed ON true;

-- name: heartbeat_jobs
-- Renew the leases of the jobs this worker runs. Returns the (id, attempt) pairs still
-- held, each with whether a cancel was requested (the fallback when the NOTIFY was
-- missed): any pair missing from the result was lost (recovered or replaced) and must
-- stop. The lease ends a lease after the write, not after the transaction began: a
-- heartbeat that waited behind a table lock must not commit a lease that is already over.
-- A row another transaction holds locked (its outcome or release being written, a cancel
-- request) is skipped, not waited for: one slow write must not hold up the renewal of
-- every other lease. It comes back unrenewed, as still held by what this statement saw
-- (cancel_requested false); the next beat tries it again and tells if it was lost.
WITH renewable AS (
    SELECT j.id FROM {schema}.jobs AS j
    JOIN unnest(%(ids)s::text[], %(attempts)s::int[]) AS h(id, attempt)
        ON j.id = h.id AND j.attempts = h.attempt
    WHERE j.worker_id = %(worker_id)s AND j.status = 'running'
    FOR UPDATE OF j SKIP LOCKED
),
renewed AS (
    UPDATE {schema}.jobs AS j SET
        lease_until = clock_timestamp() + make_interval(secs => %(lease_seconds)s),
        heartbeat_at = clock_timestamp()
    FROM renewable r
    WHERE j.id = r.id
    RETURNING j.id, j.attempts, j.cancel_requested_at IS NOT NULL AS cancel_requested
)
SELECT id, attempts, cancel_requested FROM renewed
UNION ALL
SELECT j.id, j.attempts, false FROM {schema}.jobs AS j
JOIN unnest(%(ids)s::text[], %(attempts)s::int[]) AS h(id, attempt)
    ON j.id = h.id AND j.attempts = h.attempt
WHERE j.worker_id = %(worker_id)s AND j.status = 'running'
  AND j.id NOT IN (SELECT id FROM renewed);

-- name: complete_jobs
-- Record successful attempts in one statement. Fenced on owner, attempt and status, so a
-- worker that lost its lease changes nothing. Returns the (id, attempt) pairs completed.
UPDATE {schema}.jobs AS j SET
    status = 'completed', result = c.result, finished_at = now(), lease_until = NULL
FROM unnest(%(ids)s::text[], %(attempts)s::int[], %(results)s::jsonb[])
    AS c(id, attempt, result)
WHERE j.id = c.id AND j.attempts = c.attempt
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
RETURNING j.id, j.attempts;

-- name: outcome_states
-- Where the outcomes a write left unwritten stand, each (id, attempt) with a state:
-- 'free' (still this worker's running attempt, its row locked by no one: write it now),
-- 'running' (still this worker's, but another transaction holds its row locked: an
-- application's SELECT ... FOR UPDATE, or an abandoned write of ours whose server stopped
-- answering; try later), another status (this worker's attempt ended by a write of its
-- own: an abandoned write that committed after all), or NULL (the lease was lost). The
-- row lock is tried without waiting (SKIP LOCKED) and let go when the statement ends
-- (autocommit): this tells a locked row from a lost lease without waiting on the lock.
-- An attempt's own end keeps its worker_id unless it put the job back (a retry, snooze
-- or deferral clears it, as recovery does): then the attempt's `errors` entry tells
-- whose it was, 'pending' when this worker's (recovery's entry, outcome
-- 'lease_expired', names the worker it took the job from). `due`: when the job put back
-- is due, unless it was claimed again since.
WITH free AS (
    SELECT j.id, j.attempts FROM {schema}.jobs AS j
    JOIN unnest(%(ids)s::text[], %(attempts)s::int[]) AS h(id, attempt)
        ON j.id = h.id AND j.attempts = h.attempt
    WHERE j.worker_id = %(worker_id)s AND j.status = 'running'
    FOR NO KEY UPDATE OF j SKIP LOCKED
)
SELECT h.id, h.attempt,
       CASE WHEN (h.id, h.attempt) IN (SELECT id, attempts FROM free) THEN 'free'
            WHEN j.attempts = h.attempt AND j.worker_id = %(worker_id)s THEN j.status::text
            -- Read as untrusted: `errors` may be anything SQL wrote (not an array,
            -- entries of any type); this query must not fail on one row, or no parked
            -- outcome is looked at again.
            WHEN EXISTS (SELECT 1 FROM jsonb_array_elements(
                             CASE WHEN jsonb_typeof(j.errors) = 'array' THEN j.errors END) AS e
                         WHERE e ->> 'worker_id' = %(worker_id)s
                           AND e ->> 'attempt' = h.attempt::text
                           AND e ->> 'outcome' IS DISTINCT FROM 'lease_expired')
            THEN 'pending' END AS state,
       CASE WHEN j.attempts = h.attempt AND j.status = 'pending'
            THEN j.execution_time END AS due
FROM unnest(%(ids)s::text[], %(attempts)s::int[]) AS h(id, attempt)
LEFT JOIN {schema}.jobs AS j ON j.id = h.id;

-- name: fail_job
-- Record a failed attempt (an exception or a timeout): back to pending at
-- now() + %(retry_delay_seconds)s while the retry budget lasts, else failed; cancelled,
-- never retried, when a cancel was requested meanwhile. Fenced like complete_jobs;
-- returns the new status, or no row when the lease was lost.
UPDATE {schema}.jobs AS j SET
    failures = j.failures + 1,
    status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                  WHEN j.failures + 1 <= j.max_retries THEN 'pending' ELSE 'failed' END
             ::{schema}.job_status,
    execution_time = CASE WHEN j.failures + 1 <= j.max_retries AND j.cancel_requested_at IS NULL
        THEN now() + make_interval(secs => %(retry_delay_seconds)s) ELSE j.execution_time END,
    finished_at = CASE WHEN j.failures + 1 <= j.max_retries AND j.cancel_requested_at IS NULL
        THEN NULL ELSE now() END,
    worker_id = CASE WHEN j.failures + 1 <= j.max_retries AND j.cancel_requested_at IS NULL
        THEN NULL ELSE j.worker_id END,
    lease_until = NULL,
    last_error = %(error)s,
    errors = {schema}.append_error(j.errors, jsonb_build_object(
        'attempt', j.attempts, 'worker_id', j.worker_id, 'started_at', j.started_at,
        'at', now(), 'outcome', 'failed', 'error', %(error)s::text,
        'traceback', %(traceback)s::text), %(errors_first)s, %(errors_last)s)
WHERE j.id = %(id)s AND j.attempts = %(attempt)s
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
RETURNING j.status, j.execution_time;

-- name: defer_job
-- Put back a job whose task this worker does not know (a rolling deploy: only newer code
-- has it): pending again after %(base_delay_seconds)s, doubling with each deferral up to
-- %(max_delay_seconds)s, without counting a failure. Each deferral is an `errors` entry
-- with outcome 'task_unknown'; once the first one since the job was last retried by an
-- operator (a 'retried' entry) is %(give_up_seconds)s old the job fails (cancelled
-- instead, if a cancel was requested). Fenced like fail_job; returns the new status, or
-- no row when the lease was lost.
WITH history AS (
    SELECT e ->> 'outcome' AS outcome, (e ->> 'at')::timestamptz AS at
    FROM {schema}.jobs AS d, jsonb_array_elements(d.errors) AS e
    WHERE d.id = %(id)s
),
prior AS (
    SELECT count(*) AS deferrals, min(at) AS first_at FROM history
    WHERE outcome = 'task_unknown' AND at > coalesce(
        (SELECT max(at) FROM history WHERE outcome = 'retried'), '-infinity')
),
decision AS (
    SELECT CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN p.first_at < now() - make_interval(secs => %(give_up_seconds)s)
                THEN 'failed' ELSE 'pending' END AS status,
           least(%(max_delay_seconds)s,
                 %(base_delay_seconds)s * 2.0 ^ least(p.deferrals, 30)) AS delay
    FROM {schema}.jobs AS j, prior AS p
    WHERE j.id = %(id)s
)
UPDATE {schema}.jobs AS j SET
    status = d.status::{schema}.job_status,
    failures = j.failures + CASE WHEN d.status = 'failed' THEN 1 ELSE 0 END,
    execution_time = CASE WHEN d.status = 'pending'
        THEN now() + make_interval(secs => d.delay) ELSE j.execution_time END,
    finished_at = CASE WHEN d.status = 'pending' THEN NULL ELSE now() END,
    worker_id = CASE WHEN d.status = 'pending' THEN NULL ELSE j.worker_id END,
    lease_until = NULL, heartbeat_at = NULL,
    last_error = CASE WHEN d.status = 'failed'
        THEN 'gave up: ' || %(error)s || ' (for ' || %(give_up_seconds)s || 's)'
        ELSE %(error)s END,
    errors = j.errors || jsonb_build_object(
        'attempt', j.attempts, 'worker_id', j.worker_id, 'started_at', j.started_at,
        'at', now(), 'outcome', 'task_unknown', 'error', %(error)s::text)
FROM decision AS d
WHERE j.id = %(id)s AND j.attempts = %(attempt)s
  AND j.worker_id = %(worker_id)s AND j.status = 'running'
RETURNING j.status, j.execution_time;

-- name: reserve_suspect
-- Reserve a due suspect for %(seconds)s (jobs.reserved_until, migration 0022): the one
-- named %(id)s, still pending, due and a suspect (a renewal, by the worker that reserved
-- it), or with %(id)s NULL the first in claim order that no one has reserved and that
-- its global limit lets this worker claim once alone, of a queue the worker serves
-- (%(queues)s, NULL for every queue) that is not paused. Returns its id, or no row: the
-- suspect was claimed, cancelled or paused meanwhile, or (a new reservation) every due
-- one is reserved already or held back. SKIP LOCKED: a suspect another session holds is
-- being claimed or changed; waiting for it would only tell the same.
UPDATE {schema}.jobs SET reserved_until = now() + make_interval(secs => %(seconds)s)
WHERE id = (
    SELECT s.id FROM {schema}.jobs s
    WHERE s.status = 'pending' AND s.suspect AND s.execution_time <= now()
      -- As the claim walks: one more attempt must be countable (written with SQL, it is
      -- not), or no claim ever takes it.
      AND s.attempts < 2147483647
      -- A reservation further ahead than two would last was not written by a worker (a
      -- hand-made or poisoned value): it reserves nothing. Two, not one: a reservation
      -- committed by a statement that began after this one ends later than this one's
      -- now() plus one, and must still count.
      AND CASE WHEN %(id)s::text IS NULL
               THEN (s.reserved_until IS NULL OR s.reserved_until <= now()
                     OR s.reserved_until > now() + make_interval(secs => 2 * %(seconds)s))
                    -- Its queue's global limit leaves it room once this worker
                    -- (%(worker_id)s) is alone: fewer running elsewhere than the
                    -- concurrency, fewer starts in the rate window than the rate (as
                    -- claim_room counts them). A busy worker that reserved one a spent
                    -- rate holds back stopped claiming, found none once alone, and did so
                    -- again at each reservation.
                    AND NOT EXISTS (
                        SELECT 1 FROM {schema}.queue_limits l
                        WHERE l.queue = s.queue
                          AND (l.global_concurrency <= (
                                   SELECT count(*) FROM {schema}.jobs j
                                   WHERE j.worker_id IS NOT NULL AND j.finished_at IS NULL
                                     AND j.status = 'running' AND j.queue = l.queue
                                     AND j.worker_id <> %(worker_id)s)
                               OR l.rate_jobs <= (
                                   SELECT coalesce(sum(b.jobs), 0)
                                   FROM unnest(l.window_at, l.window_jobs) AS b(at, jobs)
                                   WHERE b.at > now()
                                                - make_interval(secs => l.rate_period_seconds))))
               ELSE s.id = %(id)s::text END
      AND (%(queues)s::text[] IS NULL OR s.queue = ANY(%(queues)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM {schema}.paused_queues p WHERE p.queue = s.queue)
    ORDER BY s.priority, s.execution_time, s.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: release_jobs
-- Put jobs this worker gives up on at shutdown back to pending, due again at their due
-- time (so already due), without counting a failure (cancelled instead, if a cancel was
-- requested). Fenced like complete_jobs. Wakes idle workers elsewhere with the earliest
-- due time, as insert_job does. A job claimed as a suspect (%(suspects)s) is one again:
-- its run alone was interrupted before it told a pill from an innocent job.
WITH released AS (
    UPDATE {schema}.jobs AS j SET
        status = CASE WHEN j.cancel_requested_at IS NULL THEN 'pending' ELSE 'cancelled' END
                 ::{schema}.job_status,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        worker_id = NULL, lease_until = NULL, heartbeat_at = NULL,
        suspect = j.id = ANY(%(suspects)s::text[])
    FROM unnest(%(ids)s::text[], %(attempts)s::int[]) AS r(id, attempt)
    WHERE j.id = r.id AND j.attempts = r.attempt
      AND j.worker_id = %(worker_id)s AND j.status = 'running'
    RETURNING j.id, j.status, j.execution_time
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM released WHERE status = 'pending' HAVING count(*) > 0
)
SELECT released.id FROM released LEFT JOIN wake ON true;

-- name: recover_orphans
-- Return running jobs whose lease expired and whose worker is silent to pending (or fail
-- them as poison pills; or cancel them when a cancel was requested, since their worker
-- can no longer do it), and wake idle workers for them.
--
-- Silent: the worker is gone from the registry, or its registry heartbeat (the workers
-- table, which no job DDL locks) is older than one of its leases AND its registry row is
-- not locked. A live worker whose job heartbeats are only delayed (a table lock on jobs)
-- keeps its jobs: its lease comes back with its next heartbeat. The lease length is the
-- job's own (lease_until - heartbeat_at, both written together), so workers with
-- different settings are judged by theirs.
--
-- Why a locked registry row counts as alive: someone holding the row (a long
-- SELECT ... FOR UPDATE) keeps the worker from writing its heartbeat however alive it
-- is, and when they let go the heartbeat and, if its job rows were held too, the leases
-- are all stale at once: the worker and this statement race, and only the database can
-- tell who is first. Invariant: while a worker is alive and connected, its heartbeater
-- is queued for its registry row whenever that row is locked (after a beat that gave up
-- on lock_timeout it queues again at once: heartbeat.py), and a queued UPDATE holds the
-- row's tuple lock, which FOR NO KEY UPDATE SKIP LOCKED below sees. So the row stays "locked"
-- from the lock's start through the worker's own heartbeat write, which then commits
-- before any recovery can lock the row, and recovery finds a fresh heartbeat. A dead
-- worker queues nothing: its row is free, and its jobs go a lease after its last beat,
-- as before. FOR NO KEY UPDATE: it conflicts with exactly the locks that keep the
-- heartbeat's UPDATE (a NO KEY UPDATE) waiting, FOR SHARE included. FOR SHARE here would
-- not: a share request beside a share holder is granted without looking at the queued
-- UPDATE, so a live worker queued behind someone's FOR SHARE was found silent. A FOR KEY
-- SHARE holder (a foreign key check) keeps nobody waiting, and is not taken for a beat.
-- Held only for this statement; a registry beat waits for it at most that long.
--
-- Seen twice: the queue has two gaps: the few milliseconds between a registry beat that
-- gave up on lock_timeout and the next (the lease renewal runs in between), and the
-- wake-up of the queued beat once the holder lets go (a row whose locker has ended can
-- be locked by whoever asks before the woken UPDATE gets to it). So the
-- worker's own loop (maintenance.py) recovers a registered worker's jobs only when it
-- has found that worker silent with the same registry heartbeat on its previous pass too
-- (%(sighted_workers)s / %(sighted_beats)s, with %(seen_twice)s): a live worker found
-- silent in a gap writes its heartbeat within milliseconds, long before the next pass,
-- which then finds another heartbeat (or a locked row) and starts over. (Relied on: a
-- live worker not queued when the row is let go writes within one pass; not so if its
-- beat connection had just been dropped, see heartbeat.py's Failure.) A worker gone
-- from the registry has nothing to write and is not waited for. Every statement returns
-- the silent workers it saw (rows with silent_worker set, id NULL) for the next pass.
-- Without %(seen_twice)s (an operator's or a test's one-off pass) the first sight is
-- enough, as it was before.
--
-- Blame: a crash orphans every job its worker held. It is counted against a job only
-- when that job was the only one its worker ran: then that job moves towards
-- %(max_recoveries)s and the poison-pill verdict. A crash with several jobs running is
-- shared and counts against none of them: no order tells a pill from the innocent jobs
-- that were in every crash with it (jobs claimed in one batch even share started_at).
-- Every recovered job becomes a suspect (jobs.suspect, migration 0019) and runs alone
-- (claim_jobs leaves suspects to a suspect claim, which a worker with nothing running
-- makes, and claims nothing beside it: fetcher.py), so a pill crashes alone next time
-- and is counted, and an innocent one completes. Every recovery is in `errors`
-- ('counted': whether it was counted).
--
-- Invariant: one crash of one worker is judged once, and counted at most once, however
-- its jobs are split between passes: a job claimed after the last heartbeat expires a
-- pass later, a job another recovery holds is skipped (SKIP LOCKED), jobs past
-- %(limit)s wait for the next batch, and a registered worker's jobs wait while another
-- recovery holds its registry row. Two rules give it:
-- - Whether the crash is shared is judged among ALL the jobs the worker still runs
--   (`judged`), not only those this pass recovers, so every pass judges it the same; a
--   crash of one job is counted only by the pass that recovers that job. Only the
--   recovery that locked the job's row can count: two cannot lock it both, and one that
--   locks it after the other committed finds it no longer running and writes nothing.
-- - The pass that judges a crash records it in worker_crashes (migration 0018; job_id
--   NULL for a shared crash), in the same statement; the worker's jobs recovered later
--   are the same crash, are not counted and are suspects, unless the worker has shown
--   life since: a job heartbeat (every claim writes one) after counted_at, or a
--   registry heartbeat other than the one it was judged by (NULL, gone from the
--   registry, is no sign: pruning is not a heartbeat). A worker judged dead that came
--   back (a frozen loop that thawed) and falls silent again has crashed again and is
--   judged again, so a job that keeps freezing the workers it runs alone on still ends
--   as a poison pill. A pass's judgment is read in its snapshot, so a record committed
--   after it started is not seen; that takes two passes recovering jobs of one crash at
--   once: a crash of one job is one row, which only one of them can lock, and a shared
--   crash counts nothing however often it is judged.
--   counted_at is clock_timestamp(), after every claim this statement sees committed.
-- A worker that kept running jobs after it was judged silent is counted again only if
-- it writes; one that was frozen and never wrote again is one crash. A job heartbeat
-- dated ahead of the database clock is no write since, and a record dated ahead is no
-- record for a worker gone from the registry (SQL wrote them, or the clock was stepped
-- back): neither counts a crash twice nor keeps one from being counted for ever.
--
-- The lease test is repeated in the UPDATE itself, so a completion that commits after
-- the scan wins: the row no longer matches. clock_timestamp(), not now(): a statement
-- that waited for a lock judges leases at the time it runs.
WITH silent AS (
    -- Expired jobs of silent workers, with the registry heartbeat each worker was judged
    -- by (NULL: gone from the registry), and that heartbeat as the next pass gets it back
    -- (sighted_beat): clamped to what a Python datetime holds, or a beat written as
    -- 'infinity' would come back as another time and never be seen twice.
    SELECT j.id, j.worker_id, j.started_at, j.lease_until, w.heartbeat_at AS registry_beat,
           least(greatest(w.heartbeat_at, '0001-01-03Z'), '9999-12-30Z') AS sighted_beat
    FROM {schema}.jobs j LEFT JOIN {schema}.workers w ON w.id = j.worker_id
    WHERE j.worker_id IS NOT NULL AND j.finished_at IS NULL  -- jobs_running_idx (0009)
      -- A running row without a lease (written by SQL) has none left.
      AND j.status = 'running' AND coalesce(j.lease_until, '-infinity') < clock_timestamp()
      AND (w.id IS NULL OR EXISTS (
               SELECT 1 FROM {schema}.workers l
               WHERE l.id = w.id
                 AND (l.heartbeat_at + (j.lease_until - j.heartbeat_at) <= clock_timestamp()
                      -- A beat more than a lease ahead of the clock that wrote it is no
                      -- proof of life (a poisoned row): a live worker would have written
                      -- over it. A clock stepped back moves the job's lease too, so a live
                      -- worker's jobs are not expired here.
                      OR l.heartbeat_at - (j.lease_until - j.heartbeat_at) > clock_timestamp())
               FOR NO KEY UPDATE SKIP LOCKED))
),
records AS (
    -- The crash records of the silent workers, locked for the count's upsert below. A
    -- record someone else holds (a session's FOR UPDATE) would keep that upsert waiting
    -- until lock_timeout failed the whole pass, every pass: its worker's jobs wait
    -- instead, as those of a worker whose registry row is locked do.
    SELECT c.worker_id FROM {schema}.worker_crashes c
    WHERE c.worker_id IN (SELECT worker_id FROM silent)
    FOR NO KEY UPDATE SKIP LOCKED
),
expired AS (
    SELECT j.id, s.worker_id, s.registry_beat
    FROM silent s JOIN {schema}.jobs j ON j.id = s.id
    WHERE (NOT %(seen_twice)s OR s.registry_beat IS NULL
           OR (s.worker_id, s.sighted_beat) IN (
                  SELECT * FROM unnest(%(sighted_workers)s::text[],
                                       %(sighted_beats)s::timestamptz[])))
      AND (s.worker_id IN (SELECT worker_id FROM records)
           OR NOT EXISTS (SELECT 1 FROM {schema}.worker_crashes c
                          WHERE c.worker_id = s.worker_id))
      -- One pass at a time takes a worker's jobs: every pass that judges a crash writes
      -- its record, and a second one would wait on the first's uncommitted insert (the
      -- key of worker_crashes) until lock_timeout failed the whole pass. The others
      -- leave that worker's jobs to a later pass, as they do those of a worker whose
      -- registry row or crash record is held. (Taken for rows the LIMIT may then drop:
      -- that only defers those workers by a pass.)
      AND pg_try_advisory_xact_lock(hashtext('pgsched.recover_orphans'),
                                    hashtext(s.worker_id))
    ORDER BY s.lease_until
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
),
judged AS (
    -- Per worker of this pass whose crash is still to be judged: the job it ran, when it
    -- ran only one among all it runs (jobs_running_idx); NULL for a shared crash.
    SELECT e.worker_id,
           (SELECT CASE WHEN count(*) = 1 THEN min(r.id) END
            FROM (SELECT r.id FROM {schema}.jobs r
                  WHERE r.worker_id = e.worker_id AND r.finished_at IS NULL
                    AND r.status = 'running'
                  LIMIT 2) r) AS culprit
    FROM (SELECT DISTINCT worker_id, registry_beat FROM expired) e
    WHERE NOT EXISTS (
        SELECT 1 FROM {schema}.worker_crashes c
        WHERE c.worker_id = e.worker_id
          AND (e.registry_beat IS NULL OR e.registry_beat = c.registry_beat)
          -- A record dated ahead of the clock (written by SQL, or counted while the
          -- clock was fast) would outdate every heartbeat of a worker gone from the
          -- registry, for ever: for one it is no record. A registered worker's crash is
          -- told by its registry heartbeat, which the date does not outweigh.
          AND (c.counted_at <= clock_timestamp() OR e.registry_beat IS NOT NULL)
          AND NOT EXISTS (
                  SELECT 1 FROM {schema}.jobs r
                  WHERE r.worker_id = e.worker_id AND r.finished_at IS NULL
                    AND r.status = 'running' AND r.heartbeat_at > c.counted_at
                    -- One dated ahead of the clock is no write since (SQL wrote it, or a
                    -- clock since stepped back): each batch would blame another job.
                    AND r.heartbeat_at <= clock_timestamp()))
),
orphans AS (
    SELECT e.id, e.worker_id, e.registry_beat, coalesce(c.culprit = e.id, false) AS blamed,
           c.worker_id IS NOT NULL AS judged
    FROM expired e LEFT JOIN judged c ON c.worker_id = e.worker_id
),
recovered AS (
    UPDATE {schema}.jobs AS j SET
        -- Counted without overflow: a count written with SQL must not fail every recovery.
        recoveries = least(j.recoveries, 2147483646) + o.blamed::int,
        status = CASE WHEN j.cancel_requested_at IS NOT NULL THEN 'cancelled'
                      WHEN o.blamed AND j.recoveries >= %(max_recoveries)s - 1 THEN 'failed'
                      ELSE 'pending' END::{schema}.job_status,
        finished_at = CASE WHEN j.cancel_requested_at IS NOT NULL
                             OR (o.blamed AND j.recoveries >= %(max_recoveries)s - 1)
                           THEN now() END,
        worker_id = NULL, lease_until = NULL, suspect = true,
        last_error = CASE
            WHEN j.cancel_requested_at IS NOT NULL
            THEN 'cancelled: the cancel was requested while worker ' || o.worker_id
                 || ' ran it, and its lease expired'
            WHEN o.blamed AND j.recoveries >= %(max_recoveries)s - 1
            THEN 'poison pill: lease expired ' || (j.recoveries::bigint + 1) || ' times (worker '
                 || o.worker_id || ' last); the job may crash or hang its worker'
            WHEN o.blamed
            THEN 'lease expired: worker ' || o.worker_id || ' stopped heartbeating while it '
                 || 'ran this job alone (' || (j.recoveries::bigint + 1) || ' of '
                 || %(max_recoveries)s || ' before a poison-pill verdict); it runs alone'
            ELSE 'lease expired: worker ' || o.worker_id || ' stopped heartbeating while it '
                 || 'ran other jobs too (not counted); it runs alone before it is judged' END,
        errors = {schema}.append_error(j.errors, jsonb_build_object(
            'attempt', j.attempts, 'worker_id', o.worker_id, 'started_at', j.started_at,
            'at', now(), 'outcome', 'lease_expired', 'counted', o.blamed,
            'error', 'lease expired (worker crashed, hung or lost its connection)'),
            %(errors_first)s, %(errors_last)s)
    FROM orphans o
    WHERE j.id = o.id AND j.status = 'running'
      AND coalesce(j.lease_until, '-infinity') < clock_timestamp()
    RETURNING j.id, j.task, j.queue, j.status, j.attempts, j.execution_time,
              o.worker_id AS previous_worker, o.blamed, o.judged, o.registry_beat
),
counted AS (
    INSERT INTO {schema}.worker_crashes AS c (worker_id, job_id, registry_beat, counted_at)
    SELECT DISTINCT ON (previous_worker) previous_worker, CASE WHEN blamed THEN id END,
           registry_beat, clock_timestamp()
    FROM recovered WHERE judged
    ORDER BY previous_worker, blamed DESC
    ON CONFLICT (worker_id) DO UPDATE SET job_id = excluded.job_id,
        registry_beat = excluded.registry_beat, counted_at = excluded.counted_at
),
wake AS (
    SELECT pg_notify(%(channel)s, extract(epoch FROM min(execution_time))::text)
    FROM recovered WHERE status = 'pending' HAVING count(*) > 0
)
SELECT recovered.id, recovered.task, recovered.queue, recovered.status, recovered.attempts,
       recovered.previous_worker, NULL::text AS silent_worker,
       NULL::timestamptz AS registry_beat
FROM recovered LEFT JOIN wake ON true
UNION ALL
SELECT DISTINCT NULL::text, NULL::text, NULL::text, NULL::{schema}.job_status, NULL::int,
       NULL::text, s.worker_id, s.sighted_beat
FROM silent s WHERE s.registry_beat IS NOT NULL;

-- name: cancel_jobs
-- Cancel pending jobs. Returns the ids cancelled.
UPDATE {schema}.jobs SET status = 'cancelled', finished_at = now()
WHERE id = ANY(%(ids)s) AND status = 'pending'
RETURNING id;

-- name: job_statuses
-- The status of each of the given ids that exists (to explain why a cancel did nothing).
SELECT id, status::text FROM {schema}.jobs WHERE id = ANY(%(ids)s);

-- name: get_job
-- One job, every column, with its dependencies (each id and status, NULL when gone) and,
-- while it waits for them, those not completed yet (dependencies.sql).
SELECT j.*,
       (SELECT jsonb_agg(jsonb_build_object('id', e.dependency_id, 'status', d.status)
                         ORDER BY e.dependency_id)
        FROM {schema}.job_dependencies e LEFT JOIN {schema}.jobs d ON d.id = e.dependency_id
        WHERE e.job_id = j.id) AS depends_on,
       CASE WHEN j.due_after_dependencies IS NOT NULL AND j.status = 'pending'
            THEN ARRAY(SELECT e.dependency_id FROM {schema}.job_dependencies e
                       LEFT JOIN {schema}.jobs d ON d.id = e.dependency_id
                       WHERE e.job_id = j.id AND d.status IS DISTINCT FROM 'completed'
                       ORDER BY 1) END AS waiting_for
FROM {schema}.jobs j WHERE j.id = %(id)s;

-- name: list_jobs
-- Jobs filtered by status, task, queue and creation time, newest first; with %(before_created)s
-- and %(before_id)s (the last row of the previous page) the page after it (keyset
-- paging). Walks jobs_created_idx or jobs_task_created_idx (migration 0008) backwards,
-- so a page costs its rows, however deep and however big the table.
-- waiting_for as in get_job, read only for the waiting rows of the page.
-- A status filter is one term per status, `status = 'x' AND 'x' = ANY(%(statuses)s)`:
-- with the values known each term folds to `status = 'x'` or to nothing, so the planner
-- knows how many rows match and can read a rare status from its partial index and sort
-- it (running rows through jobs_running_idx, whose predicate the running term repeats:
-- true of every running row, migration 0009), where walking jobs_created_idx backwards
-- for 50 of 500 running rows in 5M read half a million rows (`status::text = ANY(...)`,
-- before, hid the column from every index and from the statistics).
SELECT j.*,
       CASE WHEN j.due_after_dependencies IS NOT NULL AND j.status = 'pending'
            THEN ARRAY(SELECT e.dependency_id FROM {schema}.job_dependencies e
                       LEFT JOIN {schema}.jobs d ON d.id = e.dependency_id
                       WHERE e.job_id = j.id AND d.status IS DISTINCT FROM 'completed'
                       ORDER BY 1) END AS waiting_for
FROM {schema}.jobs j
WHERE (%(statuses)s::text[] IS NULL
       OR (status = 'pending' AND 'pending' = ANY(%(statuses)s::text[]))
       OR (status = 'running' AND 'running' = ANY(%(statuses)s::text[])
           AND worker_id IS NOT NULL AND finished_at IS NULL)
       OR (status = 'completed' AND 'completed' = ANY(%(statuses)s::text[]))
       OR (status = 'failed' AND 'failed' = ANY(%(statuses)s::text[]))
       OR (status = 'cancelled' AND 'cancelled' = ANY(%(statuses)s::text[]))
       OR (status = 'expired' AND 'expired' = ANY(%(statuses)s::text[])))
  AND (%(task)s::text IS NULL OR task = %(task)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(before_created)s::timestamptz IS NULL
       OR (created_at, id) < (%(before_created)s, %(before_id)s::text))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: vacuum_jobs
-- Delete up to %(limit)s finished jobs of one status older than the retention, with what
-- they depended on (job_dependencies); called in a loop so no statement holds locks on
-- many rows. A completed job that a waiting job still waits on is kept: settle_waiting
-- reads a dependency that is gone as one that did not complete, and would cancel the
-- waiting job when its last other dependency completes.
WITH doomed AS (
    SELECT id FROM {schema}.jobs d
    WHERE status = %(status)s::{schema}.job_status
      AND finished_at < now() - make_interval(secs => %(older_than_seconds)s)
      AND NOT (d.has_dependents AND EXISTS (
          SELECT 1 FROM {schema}.job_dependencies e
          JOIN {schema}.jobs w ON w.id = e.job_id AND w.due_after_dependencies IS NOT NULL
          WHERE e.dependency_id = d.id))
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
edges AS (
    DELETE FROM {schema}.job_dependencies AS e USING doomed WHERE e.job_id = doomed.id
)
DELETE FROM {schema}.jobs AS j USING doomed WHERE j.id = doomed.id;

-- name: count_vacuumable
-- What vacuum_jobs would delete for one status (for --dry-run).
SELECT count(*) FROM {schema}.jobs d
WHERE status = %(status)s::{schema}.job_status
  AND finished_at < now() - make_interval(secs => %(older_than_seconds)s)
  AND NOT (d.has_dependents AND EXISTS (
      SELECT 1 FROM {schema}.job_dependencies e
      JOIN {schema}.jobs w ON w.id = e.job_id AND w.due_after_dependencies IS NOT NULL
      WHERE e.dependency_id = d.id));

-- name: flush_statistics
-- This session's table statistics go to the shared ones as soon as it is idle, instead of
-- within a second or at its end: reclaim_jobs runs it first, or the dead versions its
-- deletes counted would land after VACUUM's count and show rows VACUUM already removed.
SELECT pg_stat_force_next_flush();

-- name: reclaim_jobs
-- After vacuum_jobs deleted many rows: remove their dead versions and the index entries
-- that point at them now, and refresh the statistics, instead of leaving both to
-- autovacuum. Until a vacuum removes them, every claim steps over the pending index's
-- entries of jobs long finished (measured: claim p50 1.5 -> 22 ms over 400,000 jobs
-- deleted in batches, docs/pgbouncer.md's "Table health"); autovacuum visits a database
-- once per autovacuum_naptime (a minute) at most. Needs an autocommit connection (VACUUM
-- runs outside a transaction) and a role that owns the table: any other gets a WARNING
-- and the table is skipped.
VACUUM (ANALYZE) {schema}.jobs;

-- name: pending_statistics
-- Whether the planner's statistics have fallen behind the pending rows (store.
-- statistics_behind decides): analysed while no job was pending (a drained table that
-- keeps its history), PostgreSQL expects about one pending row, and after a burst every
-- claim, planned or prepared, reads a pending index whole and sorts it (550,010 rows for
-- a claim of 10 at 50,000 pending, tests/test_claim_flat_review.py) until the next
-- ANALYZE. pending counts live pending rows but suspects (those of
-- jobs_pending_ordinary_due_idx, migration 0020) up to %(limit)s (an index scan that
-- stops there, whatever the statistics say); counted is what the statistics hold (as the
-- claim reports it, -1 before any ANALYZE; NULL without the index, whose count no ANALYZE
-- would then change, so that the check would analyse after every change); changed is the
-- rows written since the last ANALYZE, by anyone (autovacuum's included), as the sessions
-- that wrote them have reported (a second or so after each goes idle). Tried instead:
-- per-table autovacuum settings (0009 already analyses after a hundredth; the wait is
-- autovacuum_naptime, a server setting); a claim shape the planner cannot misjudge (with
-- one pending row expected every path costs about the same, see claim_jobs); enable_sort
-- = off on the worker's connections, which kept these claims on the indexes (20 and 1,130
-- rows read) but would bend the plan of every other statement on them, and PgBouncer
-- drops session settings. Statistics counting 600 pending rows or more kept both claims
-- on the indexes after 200,000 more came (20 and 140 rows).
SELECT (SELECT count(*) FROM (SELECT 1 FROM {schema}.jobs
                              WHERE status = 'pending' AND NOT suspect
                              LIMIT %(limit)s) p) AS pending,
       (SELECT reltuples FROM pg_class
        WHERE oid = to_regclass('{schema}.jobs_pending_ordinary_due_idx')) AS counted,
       pg_stat_get_mod_since_analyze(to_regclass('{schema}.jobs')) AS changed;

-- name: analyze_turn
-- Whether this transaction may check the statistics again and analyse jobs
-- (Store.refresh_pending_statistics): a transaction-level advisory lock on the schema's
-- name, let go at commit, so one worker at a time does, and the next one to get it sees
-- the statistics the last ANALYZE committed. Never waits: a worker that does not get it
-- tries at its next maintenance pass.
SELECT pg_try_advisory_xact_lock(hashtext('pgsched.analyze.' || %(schema)s));

-- name: analyze_jobs
-- Refresh the statistics of jobs (Store.refresh_pending_statistics) through the function
-- of migration 0017, which runs ANALYZE (SKIP_LOCKED) as the table's owner: while
-- another ANALYZE, a VACUUM or a migration holds the table PostgreSQL skips it with a
-- WARNING (55P03) at once instead of waiting; a lock SKIP_LOCKED does not cover (jobs'
-- pg_class row, updated by a GRANT not yet committed) fails it with 55P03 after the
-- function's lock_timeout of 100 ms. Claims, inserts and updates never wait for
-- it (ANALYZE's SHARE UPDATE EXCLUSIVE lock does not conflict with their ROW EXCLUSIVE).
SELECT {schema}.analyze_jobs();

-- name: register_worker
-- Add this worker process to the registry (or refresh it after a reconnect).
INSERT INTO {schema}.workers (id, host, pid, version, concurrency, queues)
VALUES (%(id)s, %(host)s, %(pid)s, %(version)s, %(concurrency)s, %(queues)s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp();

-- name: heartbeat_worker
-- Mark this worker alive; returns no row if it was pruned (it then registers again).
-- Orphan recovery spares the jobs of a worker alive by this heartbeat (recover_orphans).
-- Also returns its peers: the workers that heartbeated within `alive_seconds` and serve
-- the same set of queues (NULL: every queue), by id, with which it takes turns to claim
-- for a notification (worker/turns.py). A read of the registry, a row per worker.
UPDATE {schema}.workers AS me SET heartbeat_at = clock_timestamp() WHERE id = %(id)s
RETURNING id, ARRAY(
    SELECT w.id FROM {schema}.workers w
    WHERE w.heartbeat_at > now() - make_interval(secs => %(alive_seconds)s)
      AND (w.queues IS NULL) = (me.queues IS NULL)
      AND (me.queues IS NULL OR (w.queues @> me.queues AND w.queues <@ me.queues))
    ORDER BY w.id LIMIT 1000) AS peers;

-- name: unregister_worker
-- Remove this worker from the registry at shutdown.
DELETE FROM {schema}.workers WHERE id = %(id)s;

-- name: prune_workers
-- Forget workers that have not heartbeated for %(older_than_seconds)s, and the crashes
-- counted for workers that hold no running job any more (recover_orphans): any job such a
-- worker runs later it claims after the count, which makes its next silence a new crash
-- anyway. Only crashes counted as long ago: one counted by a recovery this DELETE waited
-- for is judged by this statement's older snapshot of jobs, which may not show the
-- worker's jobs of that crash yet.
WITH settled AS (
    DELETE FROM {schema}.worker_crashes c
    WHERE c.worker_id IN (
        SELECT l.worker_id FROM {schema}.worker_crashes l
        WHERE (l.counted_at < now() - make_interval(secs => %(older_than_seconds)s)
               AND NOT EXISTS (SELECT 1 FROM {schema}.jobs r
                               WHERE r.worker_id = l.worker_id AND r.finished_at IS NULL
                                 AND r.status = 'running'))
           -- Dated that far ahead (SQL wrote it, or a clock that far off) nothing else
           -- would ever prune it; recovery trusts no such date for a worker gone.
           OR l.counted_at > now() + make_interval(secs => %(older_than_seconds)s)
        -- A record someone holds is left for the next prune, which then does not wait.
        FOR UPDATE SKIP LOCKED)
)
DELETE FROM {schema}.workers
WHERE heartbeat_at < now() - make_interval(secs => %(older_than_seconds)s)
RETURNING id;

-- name: wake_workers
-- After a transaction that held pending jobs locked failed (a lock_timeout, a deadlock or
-- a cancel on a later row; insert_waiting_job, ops_retry_jobs with lock_dependencies): its
-- own NOTIFY was rolled back with it, and a claim meanwhile skipped the rows it held. Idle
-- workers claim now, and their claim finds the next due time again.
SELECT pg_notify(%(channel)s, extract(epoch FROM now())::text);

-- name: notify
-- A message to every worker: a worker's `took:` after a short claim (worker/turns.py).
SELECT pg_notify(%(channel)s, %(payload)s);

-- name: custom_plans
-- Plan this session's prepared statements at every run (store._PLAN_CUSTOM), only if the
-- session is this connection's own: the backend pid the server reports is the one the
-- connection got at start-up (%(pid)s). A pooler hands its clients keys of its own, and
-- behind it the setting would stay on the server connection for its next client: NULL
-- then, and nothing set.
SELECT CASE WHEN pg_backend_pid() = %(pid)s
            THEN set_config('plan_cache_mode', 'force_custom_plan', false) END
