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

import importlib.resources
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
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


@dataclass(frozen=True)
class NewJob:
    """One row to insert, already validated and JSON-encoded by the scheduler."""

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

    async def migrate(self, *, grant: Sequence[str] = ()) -> int:
        """Apply missing migrations, then grant each role in `grant` what a runtime role
        needs (security.sql), all in one transaction; returns the schema version."""
        roles = [validate_identifier(role, "role name") for role in grant]
        current = await self.schema_version()
        if not roles and current is not None and current >= migrations()[-1][0]:
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
                if number in applied:
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

    def _job_params(self, jobs: Sequence[NewJob]) -> dict[str, Any]:
        return {
            "ids": [j.id for j in jobs],
            "tasks": [j.task for j in jobs],
            "queues": [j.queue for j in jobs],
            "args": [j.args for j in jobs],
            "kwargs": [j.kwargs for j in jobs],
            "priorities": [j.priority for j in jobs],
            "execution_times": [j.execution_time for j in jobs],
            "misfire_graces": [j.misfire_grace_seconds for j in jobs],
            "max_retries": [j.max_retries for j in jobs],
            "timeouts": [j.timeout_seconds for j in jobs],
            "channel": self.channel,
        }

    async def insert_jobs(self, jobs: Sequence[NewJob], *, replace: bool = False) -> set[str]:
        """Insert (or with replace, overwrite non-running) jobs; returns the ids written."""
        if not jobs:
            return set()
        async with self.pool.connection() as conn:
            return await self._insert(conn, jobs, replace)

    async def insert_jobs_batched(
        self, jobs: Sequence[NewJob], *, replace: bool, batch_size: int, require_all: bool
    ) -> set[str]:
        """insert_jobs in batches inside one transaction. With require_all, an id that was
        not written raises JobConflict and rolls back every batch."""
        written: set[str] = set()
        async with self.pool.connection() as conn, conn.transaction():
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                done = await self._insert(conn, batch, replace)
                if require_all and len(done) < len(batch):
                    clash = next(j.id for j in batch if j.id not in done)
                    raise JobConflict(
                        f"job {clash!r} already exists: nothing was scheduled; use "
                        "conflict_resolution IGNORE or REPLACE"
                    )
                written |= done
        return written

    async def _insert(
        self, conn: psycopg.AsyncConnection, jobs: Sequence[NewJob], replace: bool
    ) -> set[str]:
        name = "replace_jobs" if replace else "insert_jobs"
        cur = await conn.execute(self._q[name], self._job_params(jobs))
        return {row[0] for row in await cur.fetchall()}

    # -- the worker's path ---------------------------------------------------------------

    async def claim_jobs(
        self, *, worker_id: str, limit: int, lease_seconds: float, priorities: Sequence[int]
    ) -> tuple[list[dict[str, Any]], datetime | None, datetime]:
        """Claim due jobs: (claimed rows incl. expired ones, next future due time, db now)."""
        rows = await self._rows(
            "claim_jobs",
            {
                "worker_id": worker_id,
                "limit": limit,
                "lease_seconds": lease_seconds,
                "priorities": list(priorities),
            },
        )
        claimed = [row for row in rows if row["id"] is not None]
        return claimed, rows[0]["next_due"], rows[0]["db_now"]

    async def heartbeat_jobs(
        self, *, worker_id: str, held: Sequence[tuple[str, int]], lease_seconds: float
    ) -> set[str]:
        if not held:
            return set()
        rows = await self._rows(
            "heartbeat_jobs",
            {
                "worker_id": worker_id,
                "ids": [job_id for job_id, _ in held],
                "attempts": [attempt for _, attempt in held],
                "lease_seconds": lease_seconds,
            },
        )
        return {row["id"] for row in rows}

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
        self, *, statuses: Sequence[str] | None = None, task: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        return await self._rows(
            "list_jobs",
            {"statuses": list(statuses) if statuses else None, "task": task, "limit": limit},
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


def encode_json(value: Any, what: str) -> str:
    """JSON text for args, kwargs and results; NaN, Infinity and non-JSON types refused."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
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


async def open_pool(dsn: str, *, max_size: int = 4, min_size: int = 1) -> AsyncConnectionPool:
    """An opened pool. Raises InvalidInput for a DSN that cannot be parsed, and
    psycopg.OperationalError with the server's reason if it cannot be reached."""
    check_dsn(dsn)
    # One plain connection first: an unreachable server or a refused login fails now with
    # libpq's reason, not after the pool's ten seconds of retries ending in a timeout.
    probe = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await probe.close()
    pool = AsyncConnectionPool(
        dsn, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True},
        name="pgsched",
    )
    await pool.open(wait=True, timeout=10)
    return pool


async def connect(dsn: str) -> psycopg.AsyncConnection:
    """A dedicated autocommit connection (the LISTEN connection)."""
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
