"""The only module that runs SQL: one method per named query in sql/queries.sql.

Owns: loading the named blocks and the numbered migrations, binding them to one schema
(validated, then quoted with psycopg.sql.Identifier), and running them on a connection
pool. Nothing outside this module imports psycopg, except the embedded-server and
notification helpers that must hold a raw connection.

Invariants:
- Every write after a claim is fenced on (id, attempt, worker_id, status = 'running'):
  the methods return what was actually written, so callers can tell a lost lease.
- Time comes from the database clock; callers pass durations, never timestamps of
  their own for leases.
- `migrate` runs under a transaction-scoped advisory lock, so concurrent migrations
  serialise and the second one finds nothing to do.

Failure: psycopg's OperationalError (connection lost) propagates so the worker loops can
back off and retry; constraint problems become pgsched errors.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.array import ListBinaryDumper
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from .errors import InvalidInput, JobConflict, PgschedError

IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
FINISHED_STATUSES = ("completed", "failed", "cancelled", "expired")
STATUSES = ("pending", "running", *FINISHED_STATUSES)
_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def validate_identifier(name: str, what: str = "schema name") -> str:
    if not isinstance(name, str) or not IDENTIFIER_RE.match(name):
        raise InvalidInput(
            f"invalid {what} {name!r}: use letters, digits and underscores, starting with a "
            "letter or underscore, at most 63 characters"
        )
    return name


def parse_named_blocks(text: str) -> dict[str, str]:
    """Split a .sql file into {name: statement} on `-- name: NAME` lines."""
    blocks: dict[str, str] = {}
    matches = list(_NAME_RE.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = text[match.end() : end].strip()
        blocks[match.group(1)] = body.rstrip(";").strip()
    return blocks


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in sql/migrations, in order."""
    folder = importlib.resources.files("pgsched").joinpath("sql", "migrations")
    found = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d{4})_(\w+)\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return sorted(found)


def _load_queries() -> dict[str, str]:
    """Named blocks of every sql/*.sql file (each area of pgsched owns one file)."""
    folder = importlib.resources.files("pgsched").joinpath("sql")
    queries: dict[str, str] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            for name, text in parse_named_blocks(entry.read_text("utf-8")).items():
                if name in queries:
                    raise RuntimeError(f"query {name} is defined twice in pgsched/sql")
                queries[name] = text
    return queries


_QUERIES = _load_queries()


def _bind(text: str, schema: str) -> str:
    return sql.SQL(text).format(schema=sql.Identifier(schema)).as_string(None)  # type: ignore[arg-type]


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a schema: workers of other schemas never wake for it."""
    return f"pgsched_{schema}"


class NewJob(NamedTuple):
    """One row to insert, already validated and JSON-encoded by the scheduler. A tuple in
    the column order of copy_jobs (sql/enqueue.sql), so COPY streams it as it is."""

    id: str
    task: str
    queue: str
    args: str
    kwargs: str
    priority: int
    execution_time: datetime | None  # None: due now, on the database clock
    misfire_grace_seconds: float | None
    max_retries: int
    timeout_seconds: float | None


@dataclass(frozen=True)
class NewSchedule:
    """One schedule to write, already validated and JSON-encoded (see recurring.py)."""

    id: str
    task: str
    cron: str | None
    tz: str | None
    every: timedelta | None
    anchor: datetime
    args: str
    kwargs: str
    priority: int
    max_retries: int
    timeout_seconds: float | None
    queue: str
    catch_up: str
    enabled: bool
    next_fire_at: datetime


@dataclass(frozen=True)
class ScheduleAdvance:
    """What the planner decided for one locked schedule: move next_fire_at from
    `expected` to `next_fire_at` and enqueue `windows` as (job id, fire time)."""

    id: str
    expected: datetime
    next_fire_at: datetime
    windows: Sequence[tuple[str, datetime]] = ()


class Store:
    """Runs pgsched's named queries against one schema through a psycopg async pool."""

    def __init__(self, pool: AsyncConnectionPool, schema: str = "pgsched"):
        self.pool = pool
        self.schema = validate_identifier(schema)
        self.channel = channel_name(schema)
        self._q = {name: _bind(text, self.schema) for name, text in _QUERIES.items()}

    # -- helpers -------------------------------------------------------------------------

    async def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.cursor(row_factory=dict_row).execute(self._q[name], params)
            return await cur.fetchall()

    async def _rowcount(self, name: str, params: dict[str, Any]) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._q[name], params)
            return cur.rowcount

    # -- schema --------------------------------------------------------------------------

    async def migrate(self, target: int | None = None, *, grant: Sequence[str] = ()) -> int:
        """Apply missing migrations (up to `target`), then grant each role in `grant` what a
        runtime role needs (security.sql), all in one transaction; returns the version."""
        roles = [validate_identifier(role, "role name") for role in grant]
        current = await self.schema_version()
        wanted = migrations()[-1][0] if target is None else target
        if not roles and current is not None and current >= wanted:
            # Up to date: no DDL at all, so a worker running as a runtime role (no CREATE
            # privilege) starts with its default --migrate.
            return current
        schema = sql.Identifier(self.schema)
        async with self.pool.connection() as conn, conn.transaction():
            # hashtext of the schema name: migrations of different schemas do not block
            # each other, two of the same schema run one after the other.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('pgsched.migrate.' || %s))", [self.schema]
            )
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(schema)
            )
            cur = await conn.execute(
                sql.SQL("SELECT version FROM {}.schema_migrations").format(schema)
            )
            applied = {row[0] for row in await cur.fetchall()}
            version = max(applied, default=0)
            for number, name, text in migrations():
                if number in applied or (target is not None and number > target):
                    continue
                await conn.execute(_bind(text, self.schema))
                await conn.execute(
                    sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)")
                    .format(schema),
                    [number, name],
                )
                version = max(version, number)
            for role in roles:
                await self._grant_runtime_role(conn, role)
            return version

    async def schema_version(self) -> int | None:
        """The applied version, or None when the schema was never migrated."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", [f'"{self.schema}".schema_migrations']
            )
            if not (await cur.fetchone())[0]:
                return None
            cur = await conn.execute(
                sql.SQL("SELECT max(version) FROM {}.schema_migrations").format(
                    sql.Identifier(self.schema)
                )
            )
            return (await cur.fetchone())[0]

    # -- least privilege (security.sql) ---------------------------------------------------

    async def _grant_runtime_role(self, conn: psycopg.AsyncConnection, role: str) -> None:
        def bind(name: str, **identifiers: str) -> sql.Composed:
            return sql.SQL(self._q[name]).format(
                **{key: sql.Identifier(value) for key, value in identifiers.items()})

        try:
            await conn.execute(bind("grant_runtime_role", role=role))
            cur = await conn.execute(self._q["schema_types"], {"schema": self.schema})
            for (type_name,) in await cur.fetchall():
                await conn.execute(bind("grant_type_usage", role=role, type=type_name))
        except psycopg.errors.UndefinedObject:
            raise PgschedError(
                f"role {role!r} does not exist: create it first (CREATE ROLE {role} LOGIN "
                "PASSWORD '...'); nothing was changed"
            ) from None

    # -- enqueue -------------------------------------------------------------------------

    async def insert_jobs(self, jobs: Sequence[NewJob], *, replace: bool = False) -> set[str]:
        """Insert (or with replace, overwrite non-running) jobs; returns the ids written.
        One job is one statement with scalar parameters (sql/enqueue.sql); more are copied."""
        if not jobs:
            return set()
        if len(jobs) > 1:
            return await self.copy_jobs(jobs, replace=replace, require_all=False)
        params = {**jobs[0]._asdict(), "channel": self.channel}
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._q["replace_job" if replace else "insert_job"], params)
            return {row[0] for row in await cur.fetchall()}

    async def copy_jobs(
        self, jobs: Iterable[NewJob], *, replace: bool, require_all: bool
    ) -> set[str]:
        """Write many jobs in one transaction with COPY; returns the ids written.

        Without replace they are streamed straight into the jobs table, as fast as the
        server ingests rows. If an id exists already that attempt is undone (a savepoint)
        and the rows go through a staging table and INSERT ... ON CONFLICT, which skips
        them (or with replace, overwrites those not running). With require_all a skipped id
        raises JobConflict and nothing is written. `jobs` may be a generator that validates
        as it goes, so that validation overlaps the server's work: whatever it raises rolls
        the transaction back, and nothing is written either.
        """
        copied: list[NewJob] = []
        async with self.pool.connection() as conn, conn.transaction():
            # A job without a due time is due now on the database clock, and now() is the
            # transaction's start: the value insert_job would give it, the same for all.
            now = (await (await conn.execute(self._q["db_now"])).fetchone())[0]
            rest = (job if job.execution_time is not None else job._replace(execution_time=now)
                    for job in jobs)
            if replace:
                copied.extend(rest)
            else:
                try:
                    async with conn.transaction():
                        await self._copy(conn, "copy_jobs", _collect(rest, copied))
                        if copied:
                            earliest = min(job.execution_time for job in copied)
                            await conn.execute(self._q["notify_due"],
                                               {"channel": self.channel, "at": earliest})
                    return {job.id for job in copied}
                except psycopg.errors.UniqueViolation:
                    copied.extend(rest)  # the COPY may have stopped before the end
            await conn.execute(self._q["create_staging"])
            await self._copy(conn, "copy_staging", copied)
            cur = await conn.execute(self._q["replace_staged" if replace else "insert_staged"],
                                     {"channel": self.channel})
            skipped = set((await cur.fetchone())[1])
            if require_all and skipped:
                clash = next(job.id for job in copied if job.id in skipped)
                raise JobConflict(
                    f"job {clash!r} already exists: nothing was scheduled; use "
                    "conflict_resolution IGNORE or REPLACE"
                )
        return {job.id for job in copied} - skipped

    async def _copy(self, conn: psycopg.AsyncConnection, name: str, jobs: Iterable[NewJob]
                    ) -> None:
        async with conn.cursor().copy(self._q[name]) as copy:
            for job in jobs:
                await copy.write_row(job)

    # -- the worker's path ---------------------------------------------------------------

    async def claim_jobs(
        self,
        *,
        worker_id: str,
        limit: int,
        lease_seconds: float,
        priorities: Sequence[int],
        queues: Sequence[str] | None = None,
        capped: tuple[Sequence[str], Sequence[int]] = ((), ()),
    ) -> tuple[list[dict[str, Any]], datetime | None, datetime]:
        """Claim due jobs: (claimed rows incl. expired ones, next future due time, db now).

        queues: the queues served (None: all); capped: (queues, free slots of each) for
        queues with a per-queue concurrency limit. Paused queues are never claimed from.
        """
        rows = await self._rows(
            "claim_jobs",
            {
                "worker_id": worker_id,
                "limit": limit,
                "lease_seconds": lease_seconds,
                "priorities": list(priorities),
                "queues": list(queues) if queues is not None else None,
                "capped_queues": list(capped[0]),
                "capped_free": list(capped[1]),
            },
        )
        claimed = [row for row in rows if row["id"] is not None]
        return claimed, rows[0]["next_due"], rows[0]["db_now"]

    async def heartbeat_jobs(
        self, *, worker_id: str, held: Sequence[tuple[str, int]], lease_seconds: float
    ) -> dict[str, bool]:
        """Renew leases; returns {id still held: whether a cancel was requested}."""
        if not held:
            return {}
        rows = await self._rows(
            "heartbeat_jobs",
            {
                "worker_id": worker_id,
                "ids": [job_id for job_id, _ in held],
                "attempts": [attempt for _, attempt in held],
                "lease_seconds": lease_seconds,
            },
        )
        return {row["id"]: row["cancel_requested"] for row in rows}

    async def complete_jobs(
        self, *, worker_id: str, done: Sequence[tuple[str, int, str]]
    ) -> set[str]:
        """done: (id, attempt, result as JSON text). Returns the ids actually completed."""
        if not done:
            return set()
        rows = await self._rows(
            "complete_jobs",
            {
                "worker_id": worker_id,
                "ids": [d[0] for d in done],
                "attempts": [d[1] for d in done],
                "results": [d[2] for d in done],
            },
        )
        return {row["id"] for row in rows}

    async def fail_job(
        self,
        *,
        worker_id: str,
        job_id: str,
        attempt: int,
        error: str,
        traceback: str | None,
        retry_delay_seconds: float,
    ) -> dict[str, Any] | None:
        """Record a failed attempt; returns {status, execution_time} or None if fenced out."""
        rows = await self._rows(
            "fail_job",
            {
                "worker_id": worker_id,
                "id": job_id,
                "attempt": attempt,
                "error": error,
                "traceback": traceback,
                "retry_delay_seconds": retry_delay_seconds,
            },
        )
        return rows[0] if rows else None

    async def release_jobs(self, *, worker_id: str, held: Sequence[tuple[str, int]]) -> set[str]:
        if not held:
            return set()
        rows = await self._rows(
            "release_jobs",
            {
                "worker_id": worker_id,
                "ids": [job_id for job_id, _ in held],
                "attempts": [attempt for _, attempt in held],
            },
        )
        return {row["id"] for row in rows}

    async def recover_orphans(
        self, *, max_recoveries: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        return await self._rows(
            "recover_orphans", {"max_recoveries": max_recoveries, "limit": limit}
        )

    # -- inspection and operations -------------------------------------------------------

    async def cancel_jobs(self, ids: Sequence[str]) -> set[str]:
        rows = await self._rows("cancel_jobs", {"ids": list(ids)})
        return {row["id"] for row in rows}

    async def job_statuses(self, ids: Sequence[str]) -> dict[str, str]:
        rows = await self._rows("job_statuses", {"ids": list(ids)})
        return {row["id"]: row["status"] for row in rows}

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        rows = await self._rows("get_job", {"id": job_id})
        return rows[0] if rows else None

    async def list_jobs(
        self, *, statuses: Sequence[str] | None = None, task: str | None = None, limit: int = 50,
        since: datetime | None = None, queue: str | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first; `before` is the (created_at, id) of the last row already shown."""
        before_at, before_id = before or (None, None)
        return await self._rows(
            "list_jobs",
            {"statuses": list(statuses) if statuses else None, "task": task, "limit": limit,
             "since": since, "queue": queue, "before_at": before_at, "before_id": before_id},
        )

    async def vacuum_jobs(self, *, status: str, older_than_seconds: float, limit: int) -> int:
        return await self._rowcount(
            "vacuum_jobs",
            {"status": status, "older_than_seconds": older_than_seconds, "limit": limit},
        )

    async def count_vacuumable(self, *, status: str, older_than_seconds: float) -> int:
        rows = await self._rows(
            "count_vacuumable", {"status": status, "older_than_seconds": older_than_seconds}
        )
        return rows[0]["count"]

    # -- recurring schedules (sql/recurring.sql; used by recurring.py and the planner) -----

    async def db_now(self) -> datetime:
        return (await self._rows("db_now", {}))[0]["now"]

    async def sync_code_schedules(self, schedules: Sequence[NewSchedule]) -> list[dict[str, Any]]:
        """Upsert code schedules, disable code schedules not given; returns {id, change}."""
        return await self._rows("sync_code_schedules", {
            "ids": [s.id for s in schedules],
            "tasks": [s.task for s in schedules],
            "crons": [s.cron for s in schedules],
            "tzs": [s.tz for s in schedules],
            "everys": [s.every for s in schedules],
            "anchors": [s.anchor for s in schedules],
            "args": [s.args for s in schedules],
            "kwargs": [s.kwargs for s in schedules],
            "priorities": [s.priority for s in schedules],
            "max_retries": [s.max_retries for s in schedules],
            "timeouts": [s.timeout_seconds for s in schedules],
            "queues": [s.queue for s in schedules],
            "catch_ups": [s.catch_up for s in schedules],
            "enableds": [s.enabled for s in schedules],
            "next_fire_ats": [s.next_fire_at for s in schedules],
            "channel": self.channel,
        })

    async def insert_schedule(self, schedule: NewSchedule, *, replace: bool) -> bool:
        """Create a CLI schedule (or with replace, redefine a CLI one); True if written."""
        params = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}
        params.update(timeout=schedule.timeout_seconds, replace=replace, channel=self.channel)
        return bool(await self._rows("insert_schedule", params))

    async def fire_due_schedules(
        self,
        *,
        plan: Callable[[dict[str, Any]], ScheduleAdvance],
        limit: int,
        skip_grace_seconds: float,
        idle_timeout_seconds: float,
        now: datetime | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Lock up to `limit` due schedules, let `plan` decide each, apply the decisions.

        One transaction: a planner that dies before it commits moves nothing and inserts
        nothing, and its row locks go with its session. Returns (schedules locked, jobs
        inserted as {id, schedule_id, fire_time}).
        """
        try:
            async with self.pool.connection() as conn, conn.transaction():
                return await self._fire_due_schedules(
                    conn, plan, limit, skip_grace_seconds, idle_timeout_seconds, now)
        except psycopg.errors.IdleInTransactionSessionTimeout as exc:
            # The server ended the session of a planner that stalled mid-transaction (and
            # rolled it back): a lost connection, as far as the caller is concerned.
            raise psycopg.OperationalError(str(exc).strip()) from exc

    async def _fire_due_schedules(
        self,
        conn: psycopg.AsyncConnection,
        plan: Callable[[dict[str, Any]], ScheduleAdvance],
        limit: int,
        skip_grace_seconds: float,
        idle_timeout_seconds: float,
        now: datetime | None,
    ) -> tuple[int, list[dict[str, Any]]]:
        # A planner frozen mid-transaction (SIGSTOP, a stalled VM) would hold its rows for
        # ever; the server ends such a session instead, and others take over.
        await conn.execute(self._q["limit_idle_transaction"],
                           {"ms": str(round(idle_timeout_seconds * 1000))})
        cur = conn.cursor(row_factory=dict_row)
        due = await (await cur.execute(
            self._q["lock_due_schedules"], {"limit": limit, "now": now})).fetchall()
        if not due:
            return 0, []
        advances = [plan(row) for row in due]
        windows = [(a.id, job_id, fire) for a in advances for job_id, fire in a.windows]
        await cur.execute(self._q["advance_schedules"], {
            "ids": [a.id for a in advances],
            "expected": [a.expected for a in advances],
            "next_fire_ats": [a.next_fire_at for a in advances],
            "last_fire_ats": [a.windows[-1][1] if a.windows else None for a in advances],
            "last_job_ids": [a.windows[-1][0] if a.windows else None for a in advances],
            "window_job_ids": [w[1] for w in windows],
            "window_schedule_ids": [w[0] for w in windows],
            "window_fire_times": [w[2] for w in windows],
            "skip_grace_seconds": skip_grace_seconds,
            "channel": self.channel,
        })
        return len(due), await cur.fetchall()

    async def next_schedule_fire(self) -> tuple[datetime | None, datetime]:
        """(earliest next_fire_at of active schedules, database now)."""
        row = (await self._rows("next_schedule_fire", {}))[0]
        return row["next_fire_at"], row["db_now"]

    async def list_schedules(self, schedule_id: str | None = None) -> list[dict[str, Any]]:
        return await self._rows("list_schedules", {"id": schedule_id})

    async def pause_schedule(self, schedule_id: str) -> dict[str, Any] | None:
        rows = await self._rows("pause_schedule", {"id": schedule_id})
        return rows[0] if rows else None

    async def resume_schedule(self, schedule_id: str) -> dict[str, Any] | None:
        rows = await self._rows("resume_schedule", {"id": schedule_id, "channel": self.channel})
        return rows[0] if rows else None

    async def trigger_schedule(self, schedule_id: str, job_id: str) -> str | None:
        rows = await self._rows(
            "trigger_schedule", {"id": schedule_id, "job_id": job_id, "channel": self.channel})
        return rows[0]["id"] if rows else None

    async def remove_schedule(self, schedule_id: str) -> dict[str, Any] | None:
        rows = await self._rows("remove_schedule", {"id": schedule_id})
        return rows[0] if rows else None

    # -- queues and cancellation (sql/queues.sql) -----------------------------------------

    async def request_cancel(
        self,
        *,
        ids: Sequence[str] | None = None,
        task: str | None = None,
        queue: str | None = None,
        batch_size: int = 5000,
    ) -> dict[str, str]:
        """Cancel pending jobs and mark running ones for their worker to stop: the given
        ids, or every job of a task and/or queue (in batches). Returns {id: 'cancelled' or
        'running'}; ids not returned were not found or had already finished."""
        params = {"ids": list(ids) if ids is not None else None, "task": task, "queue": queue,
                  "channel": self.channel}
        if ids is not None:
            rows = await self._cancel_batch({**params, "limit": max(1, len(ids))})
            return {row["id"]: row["status"] for row in rows}
        result: dict[str, str] = {}
        while rows := await self._cancel_batch({**params, "limit": batch_size}):
            result.update((row["id"], row["status"]) for row in rows)
        return result

    async def _cancel_batch(self, params: dict[str, Any], attempts: int = 5) -> list[dict]:
        # The batch locks running rows of many workers in id order while a worker's
        # heartbeat or completion locks its own rows in its order: PostgreSQL may break a
        # rare deadlock by aborting either side. The statement is idempotent, so retry it
        # (the worker retries its side too).
        failed = 0
        while True:
            try:
                return await self._rows("request_cancel", params)
            except psycopg.errors.DeadlockDetected:
                failed += 1
                if failed >= attempts:
                    raise

    async def finish_cancelled_jobs(
        self, *, worker_id: str, held: Sequence[tuple[str, int]]
    ) -> set[str]:
        """Record running jobs stopped on request as cancelled; returns the ids written."""
        if not held:
            return set()
        rows = await self._rows(
            "finish_cancelled_jobs",
            {"worker_id": worker_id, "ids": [i for i, _ in held],
             "attempts": [a for _, a in held]},
        )
        return {row["id"] for row in rows}

    async def pause_queues(
        self, queues: Sequence[str], *, paused_by: str | None = None, reason: str | None = None
    ) -> set[str]:
        """Stop claims from these queues for every worker; returns those newly paused."""
        rows = await self._rows(
            "pause_queues", {"queues": list(queues), "paused_by": paused_by, "reason": reason})
        return {row["queue"] for row in rows}

    async def resume_queues(self, queues: Sequence[str]) -> set[str]:
        """Allow claims again and wake idle workers; returns those that were paused."""
        rows = await self._rows("resume_queues", {"queues": list(queues), "channel": self.channel})
        return {row["queue"] for row in rows}

    async def queue_stats(self) -> list[dict[str, Any]]:
        """Per queue: due, scheduled and running jobs, lag, and the pause if any."""
        return await self._rows("queue_stats", {})

    # -- worker registry -----------------------------------------------------------------

    async def register_worker(self, **worker: Any) -> None:
        await self._rowcount("register_worker", worker)

    async def heartbeat_worker(self, worker_id: str) -> bool:
        return bool(await self._rows("heartbeat_worker", {"id": worker_id}))

    async def unregister_worker(self, worker_id: str) -> None:
        await self._rowcount("unregister_worker", {"id": worker_id})

    async def prune_workers(self, older_than_seconds: float) -> list[str]:
        rows = await self._rows("prune_workers", {"older_than_seconds": older_than_seconds})
        return [row["id"] for row in rows]

    # -- operator views and retry (sql/ops.sql; used by pgsched status/top/workers/retry) --


    async def job_counts(self, *, active_only: bool = False) -> list[dict[str, Any]]:
        """Rows of (queue, status, jobs, due, oldest_due); active_only: pending and running."""
        return await self._rows("ops_active_counts" if active_only else "ops_job_counts", {})

    async def throughput(self) -> dict[str, int]:
        return (await self._rows("ops_throughput", {}))[0]

    async def list_workers(self) -> list[dict[str, Any]]:
        return await self._rows("ops_workers", {})

    async def running_jobs(self, *, limit: int) -> list[dict[str, Any]]:
        return await self._rows("ops_running_jobs", {"limit": limit})

    async def next_jobs(self, *, limit: int, priorities: Sequence[int]) -> list[dict[str, Any]]:
        return await self._rows("ops_next_jobs", {"limit": limit, "priorities": list(priorities)})

    async def recent_failures(self, *, limit: int) -> list[dict[str, Any]]:
        return await self._rows("ops_recent_failures", {"limit": limit})

    async def retry_jobs(
        self, *, statuses: Sequence[str], cutoff: datetime, limit: int,
        ids: Sequence[str] | None = None, task: str | None = None, queue: str | None = None,
    ) -> list[str]:
        """Put up to `limit` matching finished jobs back to pending; returns their ids."""
        rows = await self._rows("ops_retry_jobs", {
            "statuses": list(statuses), "ids": list(ids) if ids is not None else None,
            "task": task, "queue": queue, "cutoff": cutoff, "limit": limit,
            "channel": self.channel,
        })
        return [row["id"] for row in rows]


    # -- the web service (sql/web.sql; used by pgsched/web) ------------------------------
    # The change feed runs its statements on its own LISTEN connection (`conn`), so one
    # connection serves both; the request handlers use the pool.

    async def listen(self, conn: psycopg.AsyncConnection) -> None:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))

    async def job_changes(
        self, conn: psycopg.AsyncConnection, *, since: datetime, watch: Sequence[str],
        limit: int,
    ) -> list[dict[str, Any]]:
        """Jobs created, started or finished after `since`, and the jobs in `watch`."""
        cur = await conn.cursor(row_factory=dict_row).execute(
            self._q["web_job_changes"], {"since": since, "watch": list(watch), "limit": limit})
        return await cur.fetchall()

    async def web_state(self, conn: psycopg.AsyncConnection) -> dict[str, Any]:
        """db_now, paused_queues, workers (ids), schedules_changed, schedules (count)."""
        cur = await conn.cursor(row_factory=dict_row).execute(self._q["web_state"], {})
        return (await cur.fetchall())[0]

    async def schedule_outcomes(self, *, limit: int) -> list[dict[str, Any]]:
        return await self._rows("web_schedule_outcomes", {"limit": limit})

    async def throughput_series(self) -> list[dict[str, Any]]:
        return await self._rows("web_throughput_series", {})


# One encoder for every call: json.dumps builds a new one whenever options are given.
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _collect(jobs: Iterable[NewJob], into: list[NewJob]) -> Iterator[NewJob]:
    for job in jobs:
        into.append(job)
        yield job


def decode_json(text: str, what: str) -> Any:
    """Parse JSON text given by a user; NaN/Infinity and absurd nesting are bad input."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply") from None


def encode_json(value: Any, what: str) -> str:
    """JSON text for args, kwargs and results; NaN, Infinity and non-JSON types refused."""
    if not value and type(value) in (list, dict):  # most jobs: no args or no kwargs
        return "[]" if type(value) is list else "{}"
    try:
        return _JSON.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"{what} must be JSON (no NaN/Infinity, no custom objects): {exc}"
        ) from exc
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply (or refers to itself)") from None


def check_dsn(dsn: str) -> None:
    """Refuse a DSN libpq cannot parse, without quoting it: libpq's message quotes the
    text it choked on, which can be (part of) the password."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise InvalidInput(
            "the database DSN cannot be parsed: use a postgresql:// URI (percent-encode "
            "characters such as @ : / % in the password) or key=value pairs (quote values "
            "that contain spaces: password='a b')"
        ) from None


async def open_pool(
    dsn: str, *, max_size: int = 4, min_size: int = 1, application_name: str = "pgsched"
) -> AsyncConnectionPool:
    """An opened pool. Raises InvalidInput for a DSN that cannot be parsed, and
    psycopg.OperationalError with the server's reason if it cannot be reached.

    application_name shows in pg_stat_activity, so an operator can tell a worker's
    connections from a web app's that only enqueues.
    """
    check_dsn(dsn)
    kwargs = {"autocommit": True, **_application_name(dsn, application_name)}
    # One plain connection first: an unreachable server or a refused login fails now with
    # libpq's reason, not after the pool's ten seconds of retries ending in a timeout.
    probe = await psycopg.AsyncConnection.connect(dsn, **kwargs)
    await probe.close()
    pool = AsyncConnectionPool(
        dsn, min_size=min_size, max_size=max_size, open=False, name="pgsched", kwargs=kwargs,
        configure=_configure,
    )
    await pool.open(wait=True, timeout=10)
    return pool


async def _configure(conn: psycopg.AsyncConnection) -> None:
    """Cheaper adaptation on the hot paths, for this pool's connections only.

    List parameters (the ids, attempts and results of every batch) go in binary, which
    psycopg dumps about five times faster than its quoted text arrays (a few us per job
    in the completer). JSON columns skip the decoder for the empty list and object most
    jobs have for args or kwargs (about 5 us per claimed job otherwise).
    """
    conn.adapters.register_dumper(list, ListBinaryDumper)
    set_json_loads(_loads_json, conn)


def _loads_json(data: bytes) -> Any:
    if data == b"[]":
        return []
    if data == b"{}":
        return {}
    return json.loads(data.decode())


async def connect(dsn: str, application_name: str = "pgsched") -> psycopg.AsyncConnection:
    """A dedicated autocommit connection (the LISTEN connection)."""
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, **_application_name(dsn, application_name)
    )


def _application_name(dsn: str, default: str) -> dict[str, str]:
    """Our application_name, unless the DSN sets its own (the operator's choice wins)."""
    return {} if "application_name" in conninfo_to_dict(dsn) else {"application_name": default}
