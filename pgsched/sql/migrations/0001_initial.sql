-- 0001: jobs and the worker registry.
-- {schema} is replaced by the quoted schema identifier (psycopg.sql.Identifier); literal
-- braces must therefore be doubled ('{{}}').

CREATE TYPE {schema}.job_status AS ENUM
    ('pending', 'running', 'completed', 'failed', 'cancelled', 'expired');

CREATE TABLE {schema}.jobs (
    id              text PRIMARY KEY,
    task            text NOT NULL,
    queue           text NOT NULL DEFAULT 'default',
    args            jsonb NOT NULL DEFAULT '[]',
    kwargs          jsonb NOT NULL DEFAULT '{{}}',
    status          {schema}.job_status NOT NULL DEFAULT 'pending',
    -- lower runs first: CRITICAL = 1, NORMAL = 5 (pg-scheduler's value)
    priority        smallint NOT NULL DEFAULT 5,
    execution_time  timestamptz NOT NULL,
    -- NULL: never expires; otherwise a job claimed later than execution_time + this is expired
    misfire_grace_seconds double precision,
    max_retries     integer NOT NULL DEFAULT 0 CHECK (max_retries >= 0),
    timeout_seconds double precision CHECK (timeout_seconds > 0),
    -- attempts counts claims and fences every write after one; failures counts attempts
    -- that raised or timed out (the retry budget); recoveries counts orphaned leases.
    attempts        integer NOT NULL DEFAULT 0,
    failures        integer NOT NULL DEFAULT 0,
    recoveries      integer NOT NULL DEFAULT 0,
    worker_id       text,
    lease_until     timestamptz,
    heartbeat_at    timestamptz,
    result          jsonb,
    last_error      text,
    -- one object per failed or recovered attempt: {{attempt, worker_id, at, error, traceback}}
    errors          jsonb NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);

-- The claim path: only pending rows are indexed, so finished history never slows it down.
-- Claims walk it once per priority value (see claim_jobs in queries.sql).
CREATE INDEX jobs_pending_idx ON {schema}.jobs (priority, execution_time, id)
    WHERE status = 'pending';

-- Orphan recovery scans only running rows.
CREATE INDEX jobs_running_lease_idx ON {schema}.jobs (lease_until) WHERE status = 'running';

-- Vacuum and `ls --status` look up finished rows by age.
CREATE INDEX jobs_finished_idx ON {schema}.jobs (status, finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled', 'expired');

CREATE TABLE {schema}.workers (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    version       text NOT NULL,
    concurrency   integer NOT NULL,
    queues        text[],
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
