"""The only module that runs SQL: one method per named query in sql/queries.sql.

Owns: loading the named blocks and the numbered migrations, binding them to one schema
(validated, then quoted with psycopg.sql.Identifier), and running them on a connection
pool. Nothing outside this module imports psycopg, except the embedded-server and
notification helpers that must hold a raw connection.

Invariants:
- Every write after a claim is fenced on (id, attempt, worker_id, status = 'running'):
  the methods return what was actually written, so callers can tell a lost lease.
- Time comes from the database clock; callers pass durations, never timestamps of
  their own for leases. Lease ends are computed at write time (clock_timestamp()), so
  a write that waited for a lock never commits a lease that is already over.
- attempts, the fencing token, never goes down for a job id (replace and retry keep it).
- Every pool connection waits at most LOCK_TIMEOUT_SECONDS (or a quarter of the lease)
  for a lock, so a table lock turns into errors the loops retry, never into hung
  connections that starve the worker's registry heartbeat (docs/delivery.md). A worker's
  pool also cuts any statement at half a lease (statement_timeout_for): claims,
  completions and renewals are retried in time to keep the leases they serve.
- A stored time Python cannot hold (infinity, before year 1 or after 9999, written by
  SQL) reads as CLAMPED_LATEST or CLAMPED_EARLIEST on every pgsched connection, so one
  poisoned row never fails `show`, `ls`, wait() or the web API (_configure).
- A statement that locks a pending job without ending it wakes the workers (a claim
  skipped the row meanwhile): by a NOTIFY at its commit, or, for a dependent's insert or
  retry that rolls back on a lock_timeout, a deadlock or a cancel, by wake_workers after.
- `migrate` runs under a session-level advisory lock, so concurrent migrations
  serialise and the second one finds nothing to do; it waits for locks without limit.

Callers' connections: the job-control methods ending in `_in`/`_in_transaction` (and
their `_sync` twins) run on a connection the caller owns, inside the caller's
transaction; they never commit or roll it back (savepoints only).

Failure: psycopg's OperationalError (connection lost) propagates so the worker loops can
back off and retry; within Store.bounded (the completer's writes) a query unanswered past
its bound fails with NoAnswer, its connection shut down and dropped from the pool;
constraint problems become pgsched errors. A caller that cannot open a connection at all
turns the error into DatabaseUnavailable with `cannot_connect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
import socket
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

import psycopg
from psycopg import sql
from psycopg.adapt import Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg.rows import dict_row, tuple_row
from psycopg.types.array import ListBinaryDumper
from psycopg.types.json import set_json_loads

from .config import mask_dsn
from .errors import DatabaseUnavailable, InvalidInput, JobConflict, PgschedError

if TYPE_CHECKING:
    # Imported by open_pool only: a CLI read command never loads psycopg_pool (~4 ms).
    from psycopg_pool import AsyncConnectionPool

# PostgreSQL truncates longer identifiers (and refuses longer NOTIFY channels).
MAX_IDENTIFIER_BYTES = 63
IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
FINISHED_STATUSES = ("completed", "failed", "cancelled", "expired")
STATUSES = ("pending", "running", *FINISHED_STATUSES)
# The operator views count at most this many pending jobs per queue (pending_counts,
# migration 0015) and show a bigger backlog as "500+". Pending rows sit on pages that
# recent writes left not all-visible, so counting them fetches a heap page per entry
# (about 1.4 us each at 5M jobs, bench/ops_at_size.py): 10,000 per queue took 30-160 ms
# for 4 queues, 1,000 took 10-44 ms depending on the machine's load.
COUNT_LIMIT = 500
# Rows a bulk cancel or retry (ops.RETRY_BATCH) writes per statement, holding their row
# locks until it commits: a row costs 40-100 us to write at 5M jobs on the 2-core test
# machine (bench/ops_at_size.py), so a batch takes 4-10 ms (p95 under 20 ms at a load
# of 13) and a worker's heartbeat or completion of one of its jobs waits no longer.
BULK_BATCH = 100
# Rows per block of COPY text sent to the server (about 100 kB of no-argument jobs).
COPY_BLOCK_ROWS = 1000
_FOR_RE = re.compile(r"\w+")
_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_INCLUDE_RE = re.compile(r"^[ \t]*-- include: (\w+)[ \t]*$", re.MULTILINE)
# The first line of a migration that runs statement by statement, outside a transaction
# (sql/migrations/README.md: CREATE INDEX CONCURRENTLY and the like).
NO_TRANSACTION = "-- pgsched: no-transaction\n"
# What split_statements steps over whole, as PostgreSQL's lexer does, and a `;` that ends
# a line: a `--` comment, a /* */ one (nested), a string, a quoted identifier, a dollar
# quote's opening tag (not inside an identifier: a$b$ is one), an E'' string (backslashes).
_SQL_TOKEN_RE = re.compile(
    r"--[^\n]*|/\*|(?<![\w$])[Ee]'(?:[^'\\]|''|\\.)*'|'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""
    r"|(?<![\w$])\$(?:[A-Za-z_]\w*)?\$|;[ \t]*(?=\n|$)", re.DOTALL)
_BLOCK_COMMENT_RE = re.compile(r"/\*|\*/")
_SPACE_RE = re.compile(r"\s+")
# A job's `errors` history keeps the entries of its first ERRORS_KEPT_FIRST attempts and
# of its last ERRORS_KEPT_LAST (docs/delivery.md): the first failure often explains the
# rest, the last ones say what happens now, and a job retried without end stays small.
ERRORS_KEPT_FIRST = 1
ERRORS_KEPT_LAST = 10
# Each stored traceback keeps its last TRACEBACK_MAX_CHARS characters (where it was
# raised); the cut is marked at the start.
TRACEBACK_MAX_CHARS = 4000
# How a transaction that held pending jobs locked can end without its NOTIFY while the
# server is there to wake the workers: a lock_timeout, a deadlock, a statement_timeout,
# or its caller's cancel (a deadline). Not a lost connection: a wake-up would only wait
# for one more.
_ROLLED_BACK = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
                psycopg.errors.QueryCanceled, asyncio.CancelledError)
# The longest a pool connection waits for a lock (see lock_timeout_for).
LOCK_TIMEOUT_SECONDS = 5.0
# The longest chain of waiting jobs (each waiting for the one before): the end of its
# first job settles them in nested triggers, and PostgreSQL's stack (max_stack_depth,
# 2 MB by default) ran out at about 400 levels, failing the statement that ended it.
MAX_DEPENDENCY_CHAIN = 100
# How many times a statement (or transaction) PostgreSQL aborted to break a deadlock is
# run again before the error is raised.
DEADLOCK_ATTEMPTS = 5
# How often insert_unique_job tries before giving up on a key that keeps changing hands.
UNIQUE_INSERT_ROUNDS = 20
# How soon a worker claims again from a queue its global concurrency held back (nothing
# tells it that another worker's job of the queue finished; claim_room in 0012).
LIMIT_RECHECK_SECONDS = 0.5
# After the flat claim was refused (a paused queue had jobs due, or a global limit
# exists), this store's claims take the per-queue walks for this long before trying it
# again: the refusal costs a second statement, the wait at most this much of the flat
# walk's saving.
FLAT_RETRY_SECONDS = 1.0
# A claim statement is prepared only while the planner's statistics count at least this
# many pending rows in jobs (pg_class.reltuples of jobs_pending_ordinary_due_idx, as the
# claim itself reports it); below, each claim is planned for the table as it is. PostgreSQL
# keeps a prepared statement's generic plan until jobs is analysed again, and one made for
# a few hundred rows (or none) scans the table to find the rows a claim takes: 2.2M rows
# read per claim once 200,000 had come (tests/test_claim_flat_adversary.py). Pending rows,
# not the table's: made with 60 pending among 20,000 finished, the flat claim's plan
# sorted every due row of a priority after a burst (tests/test_claim_flat_review.py).
# Generic plans of the three claim statements made at 10,000 rows kept to the indexes
# after 220,000 rows more came without an ANALYZE, in every case tried (3, 100 or 1,000
# queues; all pending); made at 1,000 rows the flat claim's read the table (220,000 rows a
# claim), and at 2,000 to 5,000 rows some read 20,000 index entries, or took 17 ms where
# planning at each claim took 3. Planned at every claim, the flat claim cost 0.6 ms to
# plan and 0.35 ms to run.
PREPARED_CLAIM_ROWS = 10_000
# complete_jobs is prepared only while the planner's statistics count at least this many
# rows in jobs (pg_class.reltuples, as each claim reports it); below, each completion is
# planned for the table as it is. Same cause as PREPARED_CLAIM_ROWS: a generic plan made
# for a table of a few pages scans it, and is kept until jobs is analysed again, so a
# worker started on a new table read the whole table per completion once a stream had
# filled it (38M rows read in 1,811 completions in the due-latency-load benchmark, where
# the worker fell to half its rate; tests/test_hot_paths.py). Generic plans of
# complete_jobs made at 3,000 analysed rows or more look ids up by primary key (seq scans
# at 1,000), and a plan that probes the key only gets cheaper beside a scan as the table
# grows. Rows of any status: the lookups are by id. Planned at every completion, a batch
# costs about 0.2 ms more of the server.
PREPARED_COMPLETE_ROWS = 10_000

# The statistics are behind (statistics_behind) when at least this many jobs are pending
# while the statistics count under half as many: a burst into a table analysed while it
# held none. Fewer pending rows cost little even when a claim sorts them all; counting up to
# PREPARED_CLAIM_ROWS bounds what the check reads (above that, claims are prepared and their
# plans keep to the indexes however far the table grows).
ANALYZE_PENDING_ROWS = 1_000


def statistics_behind(pending: int, counted: float | None, changed: int) -> bool:
    """Whether an ANALYZE of jobs would change how claims are planned (pending_statistics
    in sql/queries.sql): `pending` live pending rows (counted up to PREPARED_CLAIM_ROWS),
    at least ANALYZE_PENDING_ROWS and twice what the statistics count (`counted`), and the
    table changed by at least as many rows since it was last analysed (`changed`): else
    that ANALYZE sampled this table as it is, and one now would find what it found (a few
    thousand pending among tens of millions can escape its sample of 30,000 rows).
    `counted` is None without the pending index it is read from: nothing to judge by."""
    if counted is None:
        return False
    return pending >= max(ANALYZE_PENDING_ROWS, 2 * counted) and changed >= pending


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


def _sql_tokens(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, opener) of each comment, string, quoted name, dollar-quoted body and
    line-ending `;` of SQL text, in order: a block comment (nested ones too) and a
    dollar-quoted body span to their close, or to the end of the text if unclosed."""
    pos = 0
    while (token := _SQL_TOKEN_RE.search(text, pos)) is not None:
        pos = token.end()
        lexeme = token.group()
        if lexeme == "/*":
            depth = 1
            while depth and (mark := _BLOCK_COMMENT_RE.search(text, pos)) is not None:
                depth += 1 if mark.group() == "/*" else -1
                pos = mark.end()
            pos = len(text) if depth else pos
        elif lexeme.startswith("$"):
            close = text.find(lexeme, pos)
            pos = len(text) if close < 0 else close + len(lexeme)
        yield token.start(), pos, lexeme


def split_statements(text: str) -> list[str]:
    """The statements of a no-transaction migration: split at each `;` ending a line in
    code (not in a comment, a string or a dollar-quoted body, a function's, kept whole),
    without the `;` and without the chunks that hold only comments. An unclosed dollar
    quote or block comment runs to the end, where PostgreSQL reports it."""
    chunks: list[str] = []
    start = 0
    for begin, end, lexeme in _sql_tokens(text):
        if lexeme.startswith(";"):
            chunks.append(text[start:begin].strip())
            start = end
    chunks.append(text[start:].strip())
    return [chunk for chunk in chunks
            if any(line.strip() and not line.strip().startswith("--")
                   for line in chunk.splitlines())]


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
    """Named blocks of every sql/*.sql file (each area of pgsched owns one file), with
    their `-- include: NAME` lines replaced by block NAME (a fragment several statements
    share, such as the columns a REPLACE resets); an included block is not a statement."""
    folder = importlib.resources.files("pgsched").joinpath("sql")
    queries: dict[str, str] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            for block, text in parse_named_blocks(entry.read_text("utf-8")).items():
                for name, variant in _variants(block, text):
                    if name in queries:
                        raise RuntimeError(f"query {name} is defined twice in pgsched/sql")
                    queries[name] = variant
    included = set(_INCLUDE_RE.findall("\n".join(queries.values())))
    missing = included - queries.keys()
    if missing:
        raise RuntimeError(f"pgsched/sql includes {sorted(missing)}, which no block defines")
    fragments = {name: _without_leading_comment(queries.pop(name)) for name in included}
    return {name: _compact(_INCLUDE_RE.sub(lambda m: fragments[m.group(1)], text))
            for name, text in queries.items()}


def _compact(text: str) -> str:
    """The statement as sent: its first line (the block's description, which names it in
    pg_stat_activity and the server log), then its SQL without the comments and with each
    run of whitespace outside strings and quoted names made one space, or one line break
    if it held one (two string constants on separate lines are one string in SQL).
    psycopg caches its parse of a query text only up to 4,096 characters
    (MAX_CACHED_STATEMENT_LENGTH): the claims, commented, are 17-19 KB, and parsing them
    again cost the worker about 15 us a claim."""
    first, _, rest = text.partition("\n")
    if not first.lstrip().startswith("--"):
        first, rest = "", text
    out: list[str] = []  # code, kept, code, kept, ...: code is whitespace-normalised
    code: list[str] = []
    pos = 0
    for begin, end, lexeme in _sql_tokens(rest):
        code.append(rest[pos:begin])
        pos = end
        if lexeme.startswith("--"):
            continue  # its line break stays, in the code after it
        if lexeme == "/*":
            code.append(" ")
            continue
        # a string, a quoted name, a dollar-quoted body, a `;`: kept as written
        out += [_spaces("".join(code)), rest[begin:end]]
        code = []
    out.append(_spaces("".join([*code, rest[pos:]])))
    body = "".join(out).strip()
    return f"{first}\n{body}" if first else body


def _spaces(code: str) -> str:
    return _SPACE_RE.sub(lambda m: "\n" if "\n" in m.group() else " ", code)


def _without_leading_comment(text: str) -> str:
    lines = text.splitlines()
    while lines and lines[0].lstrip().startswith("--"):
        lines.pop(0)
    return "\n".join(lines)


def _variants(name: str, text: str) -> Iterator[tuple[str, str]]:
    """A block with marked parts is several statements: one text for all, so that their
    shared parts cannot drift apart. `-- if WHAT` / `-- else: OTHER` / `-- end`: NAME keeps
    the `if` parts, OTHER the `else` parts (replace_jobs_given and insert_jobs_given);
    `-- for: A, B` parts belong to the statements named (claim_jobs, claim_jobs_unlimited
    and claim_jobs_flat). Lines outside marked parts belong to every statement."""
    others = {line.strip()[len("-- else:"):].strip() for line in text.splitlines()
              if line.strip().startswith("-- else:")}
    if len(others) > 1:
        raise RuntimeError(f"query {name}: its `-- else:` lines name {sorted(others)}")
    named = [_FOR_RE.findall(line.strip()[len("-- for:"):]) for line in text.splitlines()
             if line.strip().startswith("-- for:")]
    kept: dict[str, list[str]] = {
        variant: [] for variant in [name, *others, *(n for names in named for n in names)]}
    if len(kept) == 1:
        yield name, text
        return
    part: set[str] | None = None
    for line in text.splitlines(keepends=True):
        marker = line.strip()
        if marker.startswith("-- if "):
            part = {name}
        elif marker.startswith("-- else:"):
            part = others
        elif marker.startswith("-- for:"):
            part = set(_FOR_RE.findall(marker[len("-- for:"):]))
        elif marker == "-- end":
            part = None
        else:
            for variant, lines in kept.items():
                if part is None or variant in part:
                    lines.append(line)
    for variant, lines in kept.items():
        yield variant, "".join(lines)


_QUERIES = _load_queries()


def _bind(text: str, schema: str, walk_bound: int | None = None,
          suspects: bool = False) -> str:
    """{schema} as an identifier; {walk_bound} (claim_jobs_flat's) as a number, or, without
    one, as the claim's `limit` parameter; {suspect}, the claim walks' test of which jobs
    they take, as `NOT suspect`, or `suspect` for a suspect claim: a constant, so that
    every plan knows which index serves it (migration 0019)."""
    bound = sql.SQL("%(limit)s") if walk_bound is None else sql.Literal(walk_bound)
    which = sql.SQL("suspect" if suspects else "NOT suspect")
    return sql.SQL(text).format(schema=sql.Identifier(schema), walk_bound=bound,
                                suspect=which).as_string(None)


@contextlib.contextmanager
def _warnings(conn: Any) -> Iterator[list[tuple[str | None, str]]]:
    """(SQLSTATE, message) of each WARNING the server sends on `conn` meanwhile: VACUUM and
    ANALYZE say with one, not with an error, that they skipped a table."""
    warned: list[tuple[str | None, str]] = []

    def keep(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized == "WARNING" and diag.message_primary:
            warned.append((diag.sqlstate, diag.message_primary))

    conn.add_notice_handler(keep)
    try:
        yield warned
    finally:
        conn.remove_notice_handler(keep)


def _positional(text: str, names: Sequence[str]) -> str:
    """A statement's %(name)s parameters as %s, for parameters given as a sequence: the
    statement must name each of `names` once, in that order (RuntimeError otherwise, at
    import: a reordered SQL block never binds a value to the wrong column)."""
    found = _NAMED_PARAM_RE.findall(text)
    if found != list(names):
        raise RuntimeError(f"expected the parameters {list(names)} in this order, found {found}")
    return _NAMED_PARAM_RE.sub("%s", text)


_NAMED_PARAM_RE = re.compile(r"%\((\w+)\)s")


def walk_bound(limit: int) -> int:
    """claim_jobs_flat's walk bound for a claim of `limit`: a constant, so that a generic
    plan knows it, and at least `limit` (sql/queries.sql). Powers of two from 8: a
    connection prepares one statement per bound it meets, about 0.35 MB of plan each (3
    at the default concurrency of 25)."""
    return max(8, 1 << max(limit - 1, 0).bit_length())


def channel_name(schema: str) -> str:
    """The NOTIFY channel of a schema: workers of other schemas never wake for it.

    `pgsched_<schema>` while that fits PostgreSQL's identifier limit (schemas of up to 55
    characters); a longer schema keeps its first characters and a hash of the whole name,
    so the channel stays within the limit and distinct per schema.
    """
    channel = f"pgsched_{schema}"
    if len(channel.encode()) <= MAX_IDENTIFIER_BYTES:
        return channel
    digest = hashlib.sha256(schema.encode()).hexdigest()[:8]
    return f"{channel[:MAX_IDENTIFIER_BYTES - len(digest) - 1]}_{digest}"


def done_channel_name(schema: str) -> str:
    """The channel of a schema's finished awaited jobs; computed the same way by the
    trigger of migration 0010 (the schema name is ASCII: bytes are characters)."""
    channel = f"pgsched_done_{schema}"
    if len(channel) <= MAX_IDENTIFIER_BYTES:
        return channel
    return f"{channel[:54]}_{hashlib.sha256(schema.encode()).hexdigest()[:8]}"


def _must_begin(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether a statement must open the caller's transaction before a savepoint can be
    taken: psycopg's transaction() on an idle connection would BEGIN and COMMIT on its
    own, committing (Django's) transaction that has not run a statement yet. A caller's
    aborted transaction is refused in one line instead of a confusing server error."""
    status = conn.info.transaction_status
    if status == psycopg.pq.TransactionStatus.INERROR:
        raise InvalidInput("the connection's transaction has failed: roll it back before "
                           "scheduling through it")
    return status == psycopg.pq.TransactionStatus.IDLE and not conn.autocommit


def _all_written(jobs: Sequence[NewJob], written: set[str], require_all: bool) -> set[str]:
    if require_all and len(written) < len(jobs):
        clash = next(job.id for job in jobs if job.id not in written)
        raise JobConflict(f"job {clash!r} already exists: nothing was scheduled; use "
                          "conflict_resolution IGNORE or REPLACE")
    return written


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
    overlap: bool = True  # False: a window skips while a run of the schedule is active


@dataclass(frozen=True)
class ScheduleAdvance:
    """What the planner decided for one locked schedule: move next_fire_at from
    `expected` to `next_fire_at` and enqueue `windows` as (job id, fire time)."""

    id: str
    expected: datetime
    next_fire_at: datetime
    windows: Sequence[tuple[str, datetime]] = ()


class Recovery(NamedTuple):
    """One orphan recovery pass: the jobs it recovered, and the registered workers it
    found silent, each with the registry heartbeat it judged by (the next pass's
    `sighted`)."""

    recovered: list[dict[str, Any]]
    silent: dict[str, datetime]


class OutcomeState(NamedTuple):
    """Where an unwritten outcome's job stands (Store.outcome_states): `state` 'free',
    'running', the status this worker's attempt ended in by a write of its own ('pending'
    when that write put the job back), or None (the lease was lost); `due` is when a job
    put back is due, unless it was claimed again since."""

    state: str | None
    due: datetime | None


_SIGHTING_COLUMNS = frozenset({"silent_worker", "registry_beat"})


class Store:
    """Runs pgsched's named queries against one schema through a psycopg async pool."""

    def __init__(self, pool: Connections, schema: str = "pgsched"):
        self.pool = pool
        self.schema = validate_identifier(schema)
        self.channel = channel_name(schema)
        self._q = {name: _bind(text, self.schema) for name, text in _QUERIES.items()}
        # insert_job and replace_job (False, True) with positional parameters in NewJob's
        # field order, then the channel: insert_job sends a job's tuple as it is, with no
        # dict to build and none for psycopg to reorder.
        self._one_job = tuple(_positional(self._q[name], (*NewJob._fields, "channel"))
                              for name in ("insert_job", "replace_job"))
        # Which claim statement the next claim starts with: claim_jobs once a queue has a
        # global limit, else, for a worker of every queue without caps, the flat claim
        # (unless it was refused within FLAT_RETRY_SECONDS), else the cheaper
        # claim_jobs_unlimited; each claim reports which one fits, and whether jobs is
        # large enough for the next to be prepared (PREPARED_CLAIM_ROWS). Only a guess
        # shared by the store's claimers: each claim checks its own, so a wrong guess costs
        # a second statement or speed, never a wrong claim.
        self._claim_limits = False
        self._claim_prepared = False
        self._complete_prepared = False  # as _claim_prepared, for PREPARED_COMPLETE_ROWS
        # Whether insert_job borrows with getconn/putconn (_lends_directly): None until the
        # first insert_job asks.
        self._direct_lending: bool | None = None
        # insert_job's cursor on each pool connection it used (_rowcount_on_lent).
        self._insert_cursors: dict[psycopg.AsyncConnection[Any], psycopg.AsyncCursor[Any]] = {}
        # Set by a claim that came back full while the statistics counted fewer than
        # PREPARED_CLAIM_ROWS pending rows: a hint that they may have fallen behind a burst,
        # which the worker's maintenance checks (refresh_pending_statistics) and clears.
        self.statistics_suspect = False
        self._flat_refused_until = float("-inf")
        self._claim_shapes: dict[str, _ClaimShape] = {}  # per claim statement name
        self._hot_cursors: dict[tuple[psycopg.AsyncConnection[Any], str],
                                psycopg.AsyncCursor[Any]] = {}  # _hot_cursor
        # Whether the last claim saw a suspect due in a queue its claimer may claim from
        # (claim_jobs' suspect_due): read by the one claimer of a worker's store right
        # after its claim (Fetcher), as the claim's fourth answer.
        self.suspect_due = False

    # -- helpers -------------------------------------------------------------------------

    async def _rows(self, name: str, params: dict[str, Any], *, times_clamped: bool = False,
                    prepare: bool = True, row_factory: Any = dict_row,
                    custom: bool | None = None, keep_cursor: bool = False) -> list[Any]:
        """times_clamped: the query clamps every time it returns to what Python holds, so
        psycopg's own (faster) loader reads them instead of ClampingTimestamptzLoader.
        prepare: False plans the statement at this run (PREPARED_CLAIM_ROWS). row_factory:
        dicts, or tuple_row where a hot path reads rows by position. custom
        (_PLAN_CUSTOM): True plans it at this run too, but prepared, on a session that
        plans every prepared statement for its parameters (parsed and analysed once per
        connection instead of at each run); False runs it on a session that may give it
        its generic plan (what `prepare` is for, on a large table); None either. On a
        pool the application lent (not open_pool's), True runs it unnamed instead.
        keep_cursor (the worker's claims and completions): on a connection of a pool
        open_pool made, the statement runs on the cursor kept for that connection and
        that statement name (_hot_cursor)."""
        using = _USING.get()
        lender = using or self.pool
        async with lender.connection() as conn:
            kept = keep_cursor and using is None and self.pool in _OPENED_POOLS
            if kept:
                cur = self._hot_cursor(conn, name, row_factory, times_clamped)
            else:
                cur = conn.cursor(row_factory=row_factory)
                if times_clamped:
                    cur.adapters.register_loader(_TIMESTAMPTZ_OID, _TimestamptzLoader)
            bound = _BOUND.get()
            try:
                # Unbounded (every statement but the completer's): no generator on this path.
                with _NOT_BOUNDED if bound is None else _abandoned_after(conn, bound):
                    if custom is not None and conn.prepare_threshold is not None:
                        if ((lender is self.pool and self.pool not in _OPENED_POOLS)
                                or conn in _POOLED):
                            custom = False  # never switched: planned as an unnamed statement
                        elif (_PLAN_CUSTOM.get(conn, False) is not custom and not
                              await _custom_plans(conn, custom, self._q["custom_plans"])):
                            custom = False
                    return await (await cur.execute(self._q[name], params,
                                                    prepare=prepare or bool(custom))).fetchall()
            finally:
                if kept and cur.pgresult is not None:
                    # Freed now, not held by the kept cursor until its next run (a claim's
                    # result holds its jobs' payloads, up to 1 MiB each); in `finally`: a
                    # claim cancelled once its answer had come has that answer on the cursor.
                    cur.pgresult.clear()

    def _hot_cursor(self, conn: psycopg.AsyncConnection[Any], name: str, row_factory: Any,
                    times_clamped: bool) -> psycopg.AsyncCursor[Any]:
        """The cursor kept for statement `name` on pool connection `conn`, made on first
        use. psycopg keeps a cursor's loaders and dumpers while it runs the same query
        object again, and makes them anew for every new cursor: about 30 us of client CPU
        per claim (25 columns), a fixed cost of every claim however few jobs it takes.
        One per statement name, whose columns and row factory never change (the row
        factory of a cursor is read again from its last result when it is set). A pool
        lends a connection to one task at a time, so is its cursor. Its result is cleared
        once read (_rows). The cursors of closed connections are dropped whenever a new
        one is made."""
        cur = self._hot_cursors.get((conn, name))
        if cur is None:
            for closed in [key for key in self._hot_cursors if key[0].closed]:
                del self._hot_cursors[closed]
            cur = conn.cursor(row_factory=row_factory)
            if times_clamped:
                cur.adapters.register_loader(_TIMESTAMPTZ_OID, _TimestamptzLoader)
            self._hot_cursors[(conn, name)] = cur
        return cur

    async def _rows_past_deadlocks(self, name: str, params: dict[str, Any],
                                   attempts: int = DEADLOCK_ATTEMPTS, *,
                                   prepare: bool = True, row_factory: Any = dict_row,
                                   custom: bool | None = None,
                                   keep_cursor: bool = False) -> list[Any]:
        """_rows for a statement that locks rows in an order it does not choose, on the
        pool's autocommit connections: the rows of a batch of jobs from many workers, or
        the dependents its trigger settles for each job it ends (two completion batches
        can settle shared dependents in opposite orders). PostgreSQL breaks a deadlock by
        aborting one statement, which then wrote nothing: running it again is running it
        once. Raises DeadlockDetected after `attempts` aborts."""
        failed = 0
        while True:
            try:
                return await self._rows(name, params, prepare=prepare,
                                        row_factory=row_factory, custom=custom,
                                        keep_cursor=keep_cursor)
            except psycopg.errors.DeadlockDetected:
                failed += 1
                if failed >= attempts:
                    raise

    async def _rowcount(self, name: str, params: dict[str, Any]) -> int:
        async with (_USING.get() or self.pool).connection() as conn:
            cur = await conn.execute(self._q[name], params)
            return cur.rowcount

    @staticmethod
    @contextlib.contextmanager
    def using(connections: Connections | None) -> Iterator[None]:
        """Within this block, and in the calling task only, queries borrow from
        `connections` (None: the pool) instead of the pool: the heartbeater's own
        connection, without a second Store (so a subclass's methods stay in the path)."""
        token = _USING.set(connections)
        try:
            yield
        finally:
            _USING.reset(token)

    @staticmethod
    @contextlib.contextmanager
    def bounded(seconds: float | None) -> Iterator[None]:
        """Within this block, and in the calling task only, a query still unanswered after
        `seconds` is abandoned: its connection is shut down (so the pool discards it, never
        lending it again in a bad state) and the query fails at once with NoAnswer. For a
        server that stopped answering (a frozen backend, a network black hole), which no
        statement_timeout ends: the frozen process enforces it. Not task cancellation:
        psycopg meets a cancelled query with a server-side cancel and then waits on the
        same socket for 5 s more (AsyncConnection.wait; 5.5 s in all for a 0.5 s
        asyncio.timeout on a frozen backend)."""
        token = _BOUND.set(seconds)
        try:
            yield
        finally:
            _BOUND.reset(token)

    def own_connection(self) -> DedicatedConnection | None:
        """A connection of its own, set up as the pool's (same server, session options
        and adapters), for a service that must never wait behind the pool's slow work.
        Only for a pool open_pool made: one the application built may set its
        connections up in ways that cannot be copied (a configure callback that runs SET
        ROLE, a conninfo function), so with it (and with OneConnection) None is returned
        and that service shares the pool."""
        how = _OPENED_POOLS.get(self.pool)
        return None if how is None else DedicatedConnection(*how)

    # -- schema --------------------------------------------------------------------------

    async def migrate(self, target: int | None = None, *, grant: Sequence[str] = ()) -> int:
        """Apply missing migrations (up to `target`), then grant each role in `grant` what a
        runtime role needs (security.sql); returns the version.

        Each migration commits with the row that records it, in one transaction, or for a
        no-transaction file statement by statement (sql/migrations/README.md). The whole
        run holds a session-level advisory lock, so concurrent runs serialise and the
        second finds nothing to do.
        """
        roles = [validate_identifier(role, "role name") for role in grant]
        current = await self.schema_version()
        wanted = migrations()[-1][0] if target is None else target
        if not roles and current is not None and current >= wanted:
            # Up to date: no DDL at all, so a worker running as a runtime role (no CREATE
            # privilege) starts with its default --migrate.
            return current
        if roles:
            missing = await self._rows("missing_roles", {"roles": roles})
            if missing:
                raise _missing_role(missing[0]["name"])
        async with self.pool.connection() as conn:
            try:
                # Migrations wait for their locks as long as it takes (another run's index
                # build, a long transaction), and an index build runs as long as it takes:
                # the pool's lock_timeout and statement_timeout are for the hot paths.
                await conn.execute("SET lock_timeout = 0")
                await conn.execute("SET statement_timeout = 0")
                await self._lock_migrations(conn)
                return await self._migrate_locked(conn, target, roles)
            finally:
                # The connection goes back to the pool: unlocked, with its lock_timeout.
                # A broken one took both with its session.
                with contextlib.suppress(psycopg.OperationalError):
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtext('pgsched.migrate.' || %s))",
                        [self.schema])
                    await conn.execute("RESET lock_timeout")
                    await conn.execute("RESET statement_timeout")

    async def _lock_migrations(self, conn: psycopg.AsyncConnection) -> None:
        """Take the schema's migration lock (hashtext of its name: migrations of different
        schemas do not block each other). Polled, not waited for: a session waiting in
        pg_advisory_lock holds a snapshot, and the CREATE INDEX CONCURRENTLY of the run
        holding the lock waits for every older snapshot, a deadlock."""
        pause = 0.05
        while True:
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(hashtext('pgsched.migrate.' || %s))",
                [self.schema])
            if (await _one(cur))[0]:
                return
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    async def _migrate_locked(
        self, conn: psycopg.AsyncConnection, target: int | None, roles: Sequence[str]
    ) -> int:
        schema = sql.Identifier(self.schema)
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(schema)
        )
        cur = await conn.execute(sql.SQL("SELECT version FROM {}.schema_migrations").format(schema))
        applied = {row[0] for row in await cur.fetchall()}
        version = max(applied, default=0)
        record = sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)"
                         ).format(schema)
        for number, name, text in migrations():
            if number in applied or (target is not None and number > target):
                continue
            body = _bind(text, self.schema)
            if text.startswith(NO_TRANSACTION):
                for statement in split_statements(body):
                    await conn.execute(statement)
                await conn.execute(record, [number, name])
            else:
                async with conn.transaction():
                    await conn.execute(body)
                    await conn.execute(record, [number, name])
            version = max(version, number)
        if roles:
            async with conn.transaction():
                for role in roles:
                    await self._grant_runtime_role(conn, role)
        return version

    async def schema_version(self) -> int | None:
        """The applied version, or None when the schema was never migrated."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", [f'"{self.schema}".schema_migrations']
            )
            if not (await _one(cur))[0]:
                return None
            cur = await conn.execute(
                sql.SQL("SELECT max(version) FROM {}.schema_migrations").format(
                    sql.Identifier(self.schema)
                )
            )
            return (await _one(cur))[0]

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
        except psycopg.errors.UndefinedObject:  # dropped since migrate() checked
            raise _missing_role(role) from None

    # -- enqueue -------------------------------------------------------------------------

    async def insert_jobs(self, jobs: Sequence[NewJob], *, replace: bool = False) -> set[str]:
        """Insert (or with replace, overwrite non-running) jobs; returns the ids written.
        One job is one statement with scalar parameters (sql/enqueue.sql); more are copied."""
        if not jobs:
            return set()
        if len(jobs) > 1:
            return await self.copy_jobs(jobs, replace=replace, require_all=False)
        return {jobs[0].id} if await self.insert_job(jobs[0], replace=replace) else set()

    async def insert_job(self, job: NewJob, *, replace: bool = False) -> bool:
        """schedule()'s write: insert one job (with replace, overwrite it unless it is
        running) in one statement and one round trip, which also wakes the workers
        (sql/enqueue.sql); True if the row was written."""
        params = (*job, self.channel)
        query = self._one_job[replace]
        if self._direct_lending is None:
            self._direct_lending = _lends_directly(self.pool)
        if not self._direct_lending:
            async with self.pool.connection() as conn:
                return (await conn.execute(query, params)).rowcount == 1
        pool = cast("AsyncConnectionPool[Any]", self.pool)  # _lends_directly said so
        return await _rowcount_on_lent(pool, query, params, self._insert_cursors) == 1

    async def insert_unique_job(
        self, job: NewJob, *, unique_seconds: float, unique_key: str | None
    ) -> tuple[str, str]:
        """Insert a unique job (sql/enqueue.sql, insert_unique_job); returns (outcome, id):
        ('inserted', its id), ('duplicate', the id of the pending or running job holding
        the key in this period) or ('id_taken', its id). The unique index decides; a
        statement that lost to a holder committed after its snapshot saw no row of it and
        runs again (each round means another client changed that key meanwhile)."""
        params = {**job._asdict(), "channel": self.channel, "unique_seconds": unique_seconds,
                  "unique_key": unique_key}
        for _ in range(UNIQUE_INSERT_ROUNDS):
            outcomes = dict((row["outcome"], row["id"])
                            for row in await self._rows("insert_unique_job", params))
            for outcome in ("inserted", "duplicate", "id_taken"):
                if outcome in outcomes:
                    return outcome, outcomes[outcome]
        raise PgschedError(
            f"job {job.id!r}: its unique key changed hands {UNIQUE_INSERT_ROUNDS} times while "
            "it was being enqueued; try again")

    async def copy_jobs(
        self, jobs: Iterable[NewJob], *, replace: bool, require_all: bool
    ) -> set[str]:
        """Write many jobs in one transaction with COPY; returns the ids written.

        Without replace they are streamed straight into the jobs table, as fast as the
        server ingests rows. If an id exists already that transaction is rolled back and
        the rows go, in a second one, through a staging table and INSERT ... ON CONFLICT,
        which skips them (or with replace, overwrites those not running). With require_all
        a skipped id raises JobConflict and nothing is written. `jobs` may be a generator
        that validates as it goes, so that validation overlaps the server's work: whatever
        it raises rolls the transaction back, and nothing is written either.
        """
        copied: list[NewJob] = []
        jobs = iter(jobs)
        async with self.pool.connection() as conn:
            if not replace:
                try:
                    # No savepoint: the COPY is the transaction's first write, so a clash
                    # undoes nothing a rollback would not (two round trips less a call).
                    async with conn.transaction():
                        due_now, earliest = await self._copy(conn, "copy_jobs", jobs, copied)
                        if copied:
                            await conn.execute(self._q["notify_due"], {
                                "channel": self.channel, "at": earliest, "due_now": due_now})
                    return {job.id for job in copied}
                except psycopg.errors.UniqueViolation:
                    pass
            async with conn.transaction():
                copied.extend(jobs)  # all of them, or those the COPY did not reach
                await conn.execute(self._q["create_staging"])
                await self._copy(conn, "copy_staging", copied)
                cur = await conn.execute(
                    self._q["replace_staged" if replace else "insert_staged"],
                    {"channel": self.channel})
                skipped = set((await _one(cur))[1])
                if require_all and skipped:
                    clash = next(job.id for job in copied if job.id in skipped)
                    raise JobConflict(
                        f"job {clash!r} already exists: nothing was scheduled; use "
                        "conflict_resolution IGNORE or REPLACE"
                    )
        return {job.id for job in copied} - skipped

    async def _copy(self, conn: psycopg.AsyncConnection, name: str, jobs: Iterable[NewJob],
                    copied: list[NewJob] | None = None) -> tuple[bool, datetime | None]:
        """COPY `jobs` in the open transaction, appending each to `copied`; returns whether
        a job had no due time, and the earliest due time given (None if none was), which
        notify_due needs.

        A job without a due time is written as `now`, which PostgreSQL reads as the
        transaction's start, now(): the value insert_job gives it, with no query to fetch
        it first (one round trip less a call).

        The rows are written as COPY text, in blocks of COPY_BLOCK_ROWS: a bulk call
        usually repeats the task, queue and options, so their text is made once for a run
        of jobs that share them (compared as tuples, which is quick for the same objects),
        and a job costs one f-string and a scan of its id, args and kwargs. psycopg's
        write_row() dumps each of the ten values of every row (1.7 us a row), more than the
        rest of the call.
        """
        due_now = False
        earliest: datetime | None = None
        last_head: tuple[Any, ...] | None = None
        last_tail: tuple[Any, ...] | None = None
        head = tail = ""
        lines: list[str] = []
        keep = _discard if copied is None else copied.append
        async with conn.cursor().copy(self._q[name]) as copy:
            for job in jobs:
                keep(job)
                if job[1:3] != last_head:  # task, queue
                    last_head = job[1:3]
                    head = "\t".join(map(_copy_text, last_head))
                if job[5:] != last_tail:  # priority, due time, grace, retries, timeout
                    # (a job with the same tail has the same due time: counted already)
                    last_tail = job[5:]
                    when = last_tail[1]
                    if when is None:
                        due_now = True
                    elif earliest is None or when < earliest:
                        earliest = when
                    tail = "\t".join(_copy_text(v, "now") if at == 1 else _copy_text(v)
                                     for at, v in enumerate(last_tail))
                job_id, args, kwargs = job[0], job[3], job[4]
                varying = job_id + args + kwargs  # one scan of the three, C-level
                if "\\" in varying or not varying.isprintable():
                    job_id, args, kwargs = map(_copy_text, (job_id, args, kwargs))
                lines.append(f"{job_id}\t{head}\t{args}\t{kwargs}\t{tail}\n")
                if len(lines) >= COPY_BLOCK_ROWS:
                    await copy.write("".join(lines))
                    lines.clear()
            if lines:
                await copy.write("".join(lines))
        return due_now, earliest

    async def insert_waiting_job(self, job: NewJob, depends_on: Sequence[str]) -> bool:
        """Insert a job that waits until every job in `depends_on` completed (it may be
        released or cancelled at once, if they already ended). True if it was written,
        False if its id exists. Raises InvalidInput, writing nothing, for a dependency
        that does not exist or that waits (transitively) for this job, and for a job that
        would end a chain of more than MAX_DEPENDENCY_CHAIN waiting jobs."""
        params = {**job._asdict(), "depends_on": list(depends_on), "channel": self.channel,
                  "max_chain": MAX_DEPENDENCY_CHAIN}
        # The dependencies are locked in id order, but a completion locks the job it ends
        # and then (its trigger) that job's waiting dependents: with a dependency that
        # waits for another, the two can deadlock. The aborted transaction wrote nothing.
        try:
            for attempt in range(DEADLOCK_ATTEMPTS):
                try:
                    return await self._insert_waiting_job(job, depends_on, params)
                except psycopg.errors.DeadlockDetected:
                    if attempt + 1 == DEADLOCK_ATTEMPTS:
                        raise
        except _ROLLED_BACK:
            await self.wake_workers()
            raise
        raise AssertionError("unreachable")

    async def wake_workers(self) -> None:
        """The wake-up a failed transaction that held pending jobs locked did not deliver
        (rolled back with it): a claim skipped those rows meanwhile. Best effort, within
        LOCK_TIMEOUT_SECONDS (a cancelled caller is kept waiting no longer): a failure
        here (the server is gone) leaves the caller's own error to tell."""
        with contextlib.suppress(psycopg.Error, TimeoutError):
            async with asyncio.timeout(LOCK_TIMEOUT_SECONDS):
                await self._rows("wake_workers", {"channel": self.channel})

    async def notify(self, payload: str) -> None:
        """Send `payload` to the workers (a worker's `took:`, worker/turns.py)."""
        await self._rows("notify", {"channel": self.channel, "payload": payload})

    async def _insert_waiting_job(self, job: NewJob, depends_on: Sequence[str],
                                  params: dict[str, Any]) -> bool:
        async with self.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            row = await _one(await cur.execute(self._q["insert_waiting_job"], params))
            refusal = _waiting_refusal(job, depends_on, row)
            if row["inserted"]:
                await conn.execute(self._q["settle_waiting"], {"ids": [job.id], **params})
        # Raised after the commit: a refused job wrote nothing, and the commit delivers the
        # wake-up for the dependencies the statement held locked (insert_waiting_job).
        if refusal is not None:
            raise InvalidInput(refusal)
        return bool(row["inserted"])

    # -- the worker's path ---------------------------------------------------------------

    async def claim_jobs(
        self,
        *,
        worker_id: str,
        limit: int,
        lease_seconds: float,
        queues: Sequence[str] | None = None,
        capped: tuple[Sequence[str], Sequence[int]] = ((), ()),
        suspects: bool = False,
    ) -> tuple[list[dict[str, Any]], datetime | None, datetime]:
        """Claim due jobs: (claimed rows incl. expired ones, next future due time, db now).

        queues: the queues served (None: all); capped: (queues, free slots of each) for
        queues with a per-queue concurrency limit. Paused queues are never claimed from.
        A worker of every queue without caps claims by the flat walk (claim_jobs_flat),
        unless it was refused within the last FLAT_RETRY_SECONDS (sql/queries.sql).
        Suspects (migration 0019) are left out, and taken only by a claim with
        `suspects`, which takes one and nothing else (by the per-queue walks, which read only
        jobs_pending_suspect_idx for them; the flat walk would wade through every due
        job); whether one is due is in `self.suspect_due` afterwards.
        """
        params = {
            "worker_id": worker_id,
            "limit": 1 if suspects else limit,
            "lease_seconds": lease_seconds,
            # Each queue once: one listed twice was walked twice, and the second walk
            # locked the same rows again (a transaction does not skip its own locks).
            "queues": list(dict.fromkeys(queues)) if queues is not None else None,
            "capped_queues": list(capped[0]),
            "capped_free": list(capped[1]),
            "limit_recheck_seconds": LIMIT_RECHECK_SECONDS,
            "channel": self.channel,  # a claim that locked more than it took wakes workers
        }
        # Decided by what each statement ran and reported, never by the flags afterwards:
        # claimers that share the store change them while this one runs. A statement that
        # could not serve this claim took nothing and said why; the next one serves it.
        loop = asyncio.get_running_loop()
        flat = (not suspects and not self._claim_limits and queues is None
                and not capped[0] and loop.time() >= self._flat_refused_until)
        name = ("claim_jobs" if self._claim_limits
                else self._flat_claim(limit) if flat else "claim_jobs_unlimited")
        head, jobs = await self._claim_rows(name, params, suspects)
        if flat and head["flat_refused"]:
            self._flat_refused_until = loop.time() + FLAT_RETRY_SECONDS
            if not head["limits_exist"]:  # a paused queue has jobs due
                name = "claim_jobs_unlimited"
                head, jobs = await self._claim_rows(name, params, suspects)
        if name != "claim_jobs" and head["limits_exist"]:
            # A global limit appeared and the cheaper claim took nothing: claim with it.
            name = "claim_jobs"
            head, jobs = await self._claim_rows(name, params, suspects)
        self._claim_limits = head["limits_exist"]
        self.suspect_due = head["suspect_due"]
        return [_decode_payload(job) for job in jobs], head["next_due"], head["db_now"]

    async def _claim_rows(self, name: str, params: dict[str, Any], suspects: bool = False
                          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One claim statement, prepared while jobs has many pending rows
        (PREPARED_CLAIM_ROWS), and below that prepared too but planned at every run
        (_PLAN_CUSTOM); notes what this one found for the next claim, and for the
        completions (PREPARED_COMPLETE_ROWS). It clamps its times in SQL: psycopg's own
        loader decodes them, not the clamping one, a Python call per value on the hot
        path.

        The count comes from an earlier claim, so after an ANALYZE that found jobs small a
        claim may still run prepared, and PostgreSQL plans it for the table that ANALYZE
        just measured; once the claims under way across that ANALYZE have ended, none runs
        prepared until the count is large again, after the ANALYZE that also makes
        PostgreSQL plan again. A suspect claim (rare: one per job of a crash) is planned
        each time, as it is.

        Returns the claim's own columns, those before `claimed.*` (the same on every row:
        read from the first), and a dict of the job columns for each job claimed. Rows
        are read as tuples and only the job columns made into dicts: psycopg's dict rows
        of all the columns, less the claim's own popped off each, cost about 1 to 2 us
        more per claimed job (a claim of 25 on a loaded 2-core machine)."""
        if suspects:
            name = self._suspect_claim(name)
        prepared = self._claim_prepared and not suspects
        # Planned at each run: prepared for that (_PLAN_CUSTOM) only while the completions
        # are planned too; once they are prepared for their generic plan, the two would
        # switch the session back and forth, a round trip each, at every claim.
        custom = False if prepared else None if self._complete_prepared else True
        shape = self._claim_shapes.get(name)
        if shape is None:
            shape = self._claim_shapes[name] = _ClaimShape()
        rows = await self._rows(name, params, times_clamped=True, prepare=prepared,
                                custom=custom, row_factory=shape, keep_cursor=True)
        first, keys = shape.first, shape.job_keys
        head = dict(zip(shape.head_keys, rows[0], strict=False))
        jobs = [dict(zip(keys, row[first:], strict=False))
                for row in rows if row[first] is not None]
        self._claim_prepared = head["pending_rows"] >= PREPARED_CLAIM_ROWS
        self._complete_prepared = head["job_rows"] >= PREPARED_COMPLETE_ROWS
        if (not self._claim_prepared and not suspects and len(rows) >= params["limit"]
                and rows[0][first]):
            self.statistics_suspect = True
        return head, jobs

    def _suspect_claim(self, name: str) -> str:
        """The name of the suspect claim of claim statement `name`, its text bound on
        first use."""
        if f"{name}/suspects" not in self._q:
            self._q[f"{name}/suspects"] = _bind(_QUERIES[name], self.schema, suspects=True)
        return f"{name}/suspects"

    def _flat_claim(self, limit: int) -> str:
        """The name of claim_jobs_flat with the walk bound of a claim of `limit`, its text
        bound on first use."""
        bound = walk_bound(limit)
        name = f"claim_jobs_flat/{bound}"
        if name not in self._q:
            self._q[name] = _bind(_QUERIES["claim_jobs_flat"], self.schema, bound)
        return name

    async def heartbeat_jobs(
        self, *, worker_id: str, held: Sequence[tuple[str, int]], lease_seconds: float
    ) -> dict[tuple[str, int], bool]:
        """Renew leases; returns {(id, attempt) still held: whether a cancel was requested}.
        A row locked by another write is left unrenewed for the next beat and counts as
        held (sql/queries.sql)."""
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
        return {(row["id"], row["attempts"]): row["cancel_requested"] for row in rows}

    async def complete_jobs(
        self, *, worker_id: str, done: Sequence[tuple[str, int, str]]
    ) -> set[tuple[str, int]]:
        """done: (id, attempt, result as JSON text). Returns the (id, attempt) pairs
        actually completed. The three arrays go as array literals (text the statement
        casts): psycopg's list dumpers, looked up and run in Python for each list of each
        batch, cost the worker about 40 us more per statement (2 us a job at 25)."""
        if not done:
            return set()
        rows = await self._rows_past_deadlocks(
            "complete_jobs",
            {
                "worker_id": worker_id,
                "ids": _text_array([d[0] for d in done]),
                "attempts": "{" + ",".join([str(int(d[1])) for d in done]) + "}",
                "results": _text_array([d[2] for d in done]),
            },
            prepare=self._complete_prepared,
            row_factory=tuple_row,  # (id, attempts): no dict per completed job
            # its generic plan is why it is prepared (_PLAN_CUSTOM); planned, either
            custom=False if self._complete_prepared else None,
            keep_cursor=True,
        )
        return set(rows)

    async def outcome_states(
        self, *, worker_id: str, held: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], OutcomeState]:
        """Where unwritten outcomes stand, without waiting on a row lock (outcome_states in
        sql/queries.sql), per (id, attempt)."""
        rows = await self._rows("outcome_states", {
            "worker_id": worker_id, "ids": [i for i, _ in held],
            "attempts": [a for _, a in held]})
        return {(row["id"], row["attempt"]): OutcomeState(row["state"], row["due"])
                for row in rows}

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
        rows = await self._rows_past_deadlocks(
            "fail_job",
            {
                "worker_id": worker_id,
                "id": job_id,
                "attempt": attempt,
                "error": error,
                "traceback": clip_traceback(traceback),
                "retry_delay_seconds": retry_delay_seconds,
                **_ERRORS_KEPT,
            },
        )
        return rows[0] if rows else None

    async def defer_job(
        self,
        *,
        worker_id: str,
        job_id: str,
        attempt: int,
        error: str,
        base_delay_seconds: float,
        max_delay_seconds: float,
        give_up_seconds: float,
    ) -> dict[str, Any] | None:
        """Put back a job whose task is unknown here; returns {status, execution_time}
        (pending, or failed once deferred for give_up_seconds) or None if fenced out."""
        rows = await self._rows(
            "defer_job",
            {"worker_id": worker_id, "id": job_id, "attempt": attempt, "error": error,
             "base_delay_seconds": base_delay_seconds,
             "max_delay_seconds": max_delay_seconds, "give_up_seconds": give_up_seconds},
        )
        return rows[0] if rows else None

    async def reserve_suspect(self, *, worker_id: str, job_id: str | None,
                              queues: Sequence[str] | None, seconds: float) -> str | None:
        """Reserve a due suspect for `seconds`: `job_id` again (a renewal), or with None
        the first unreserved one of `queues` (None: every queue) that is not paused and
        that its global limit lets `worker_id` claim once alone. Returns its id, or None
        when there is none (see reserve_suspect in queries.sql)."""
        rows = await self._rows("reserve_suspect", {
            "worker_id": worker_id, "id": job_id,
            "queues": list(queues) if queues is not None else None, "seconds": seconds})
        return rows[0]["id"] if rows else None

    async def release_jobs(self, *, worker_id: str, held: Sequence[tuple[str, int]],
                           suspects: Sequence[str] = ()) -> set[str]:
        """Put held jobs back to pending (shutdown) and wake idle workers for them; those
        in `suspects` (claimed as suspects) are suspects again."""
        if not held:
            return set()
        rows = await self._rows(
            "release_jobs",
            {
                "worker_id": worker_id,
                "ids": [job_id for job_id, _ in held],
                "attempts": [attempt for _, attempt in held],
                "suspects": list(suspects),
                "channel": self.channel,
            },
        )
        return {row["id"] for row in rows}

    async def recover_orphans(
        self, *, max_recoveries: int, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Recover expired leases of silent workers at first sight (sql/queries.sql says
        which, and which job a crash counts against) and wake idle workers for them: an
        operator's or a test's one-off pass. The worker's loop uses recover_seen_twice."""
        return (await self._recover(max_recoveries, limit, None)).recovered

    async def recover_seen_twice(
        self, *, max_recoveries: int, sighted: dict[str, datetime], limit: int = 1000
    ) -> Recovery:
        """Like recover_orphans, taking jobs only from workers gone from the registry or
        found silent with the same registry heartbeat by the previous pass (`sighted`,
        that pass's Recovery.silent)."""
        return await self._recover(max_recoveries, limit, sighted)

    async def _recover(self, max_recoveries: int, limit: int,
                       sighted: dict[str, datetime] | None) -> Recovery:
        rows = await self._rows("recover_orphans", {
            "max_recoveries": max_recoveries, "limit": limit, "channel": self.channel,
            "seen_twice": sighted is not None, "sighted_workers": list(sighted or {}),
            "sighted_beats": list((sighted or {}).values()), **_ERRORS_KEPT,
        })
        return Recovery(
            recovered=[{k: v for k, v in row.items() if k not in _SIGHTING_COLUMNS}
                       for row in rows if row["silent_worker"] is None],
            silent={row["silent_worker"]: row["registry_beat"]
                    for row in rows if row["silent_worker"] is not None})

    # -- inspection and operations -------------------------------------------------------

    async def cancel_jobs(self, ids: Sequence[str]) -> set[str]:
        held = await self._hold_withdrawn_windows(ids)
        rows = await self._rows("cancel_jobs", {"ids": list(ids)})
        return held | {row["id"] for row in rows}

    async def _hold_withdrawn_windows(self, ids: Sequence[str]) -> set[str]:
        """Before a cancel by id: the named jobs of withdrawn windows become the
        operator's (sql/queues.sql). First, since a planner taking one over in between
        leaves it pending, for the cancel that follows."""
        rows = await self._rows("hold_withdrawn_windows", {"ids": list(ids)})
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
        """Newest first; `before` = (created_at, id) of the last row of the previous page."""
        before_created, before_id = before if before is not None else (None, None)
        return await self._rows(
            "list_jobs",
            {"statuses": list(statuses) if statuses else None, "task": task, "limit": limit,
             "since": since, "queue": queue, "before_created": before_created,
             "before_id": before_id},
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

    async def reclaim_jobs(self) -> str | None:
        """VACUUM (ANALYZE) the jobs table (reclaim_jobs in sql/queries.sql), on one of the
        pool's connections, which must be in autocommit (those open_pool makes are); give
        it the connection that deleted (a pool of one) for n_dead_tup to come out right.
        Returns None when the table was vacuumed, or why it was not: the server's warning
        when the role does not own the table (a runtime role; PostgreSQL skips it with a
        WARNING, not an error), or the lock timeout when another VACUUM or a migration
        held the table longer than the pool's lock_timeout."""
        async with self.pool.connection() as conn:
            with _warnings(conn) as warned:
                try:
                    await conn.execute(self._q["flush_statistics"])
                    await conn.execute(self._q["reclaim_jobs"])
                except psycopg.errors.LockNotAvailable as exc:
                    warned.append((exc.sqlstate, str(exc).strip()))
        return warned[0][1] if warned else None

    async def refresh_pending_statistics(self) -> tuple[str, str]:
        """ANALYZE jobs when its statistics have fallen behind the pending rows
        (statistics_behind; pending_statistics and analyze_jobs in sql/queries.sql), on an
        autocommit connection. Returns what happened and the server's WARNING when it
        skipped the table: ("current", ""), nothing was needed; ("analyzed", "");
        ("busy", warning), another ANALYZE, a VACUUM or a migration held the table, or an
        open transaction jobs' catalog row (a GRANT) past the function's lock_timeout
        (SQLSTATE 55P03 either way), try again later; ("refused", why), the role may not
        run analyze_jobs() (migration 0017; one granted before it) or its owner may not
        analyse jobs."""
        self.statistics_suspect = False
        if not await self._statistics_behind():
            return "current", ""
        async with (_USING.get() or self.pool).connection() as conn:
            with _warnings(conn) as warned:
                try:
                    async with conn.transaction():
                        # One worker at a time checks again and analyses: a check made
                        # while another ANALYZE ran reads, once that one has committed,
                        # the statistics it left, instead of running a second.
                        turn = await conn.execute(self._q["analyze_turn"],
                                                  {"schema": self.schema})
                        if not (await turn.fetchone() or [False])[0]:
                            return "busy", "another worker is analysing jobs"
                        if not await self._statistics_behind(conn):
                            return "current", ""
                        await conn.execute(self._q["analyze_jobs"])
                except psycopg.errors.LockNotAvailable as exc:
                    # a lock SKIP_LOCKED does not cover, held past the function's lock_timeout
                    return "busy", str(exc).strip().splitlines()[0]
                except (psycopg.errors.InsufficientPrivilege,
                        psycopg.errors.UndefinedFunction) as exc:
                    # a role granted before migration 0017 (re-run `migrate --grant ROLE`),
                    # or the function dropped by hand
                    return "refused", str(exc).strip()
        if not warned:
            return "analyzed", ""
        sqlstate, message = warned[0]
        return ("busy" if sqlstate == "55P03" else "refused"), message

    async def _statistics_behind(self, conn: Any = None) -> bool:
        """statistics_behind for jobs as it is now, on `conn` or a pooled connection."""
        params = {"limit": PREPARED_CLAIM_ROWS}
        if conn is None:
            (found,) = await self._rows("pending_statistics", params)
        else:
            cur = conn.cursor(row_factory=dict_row)
            found = await (await cur.execute(self._q["pending_statistics"], params)).fetchone()
        return statistics_behind(found["pending"], found["counted"], found["changed"] or 0)

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
            "overlaps": [s.overlap for s in schedules],
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
        lookahead_seconds: float = 0.0,
        now: datetime | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        """Lock up to `limit` due schedules, let `plan` decide each, apply the decisions.

        Due: next_fire_at has come, or comes within `lookahead_seconds` and the window may
        be planned ahead (sql/recurring.sql, lock_due_schedules).

        One transaction: a planner that dies before it commits moves nothing and inserts
        nothing, and its row locks go with its session. Returns (schedules locked, jobs
        inserted, or withdrawn ones taken over, as {id, schedule_id, fire_time, status}:
        'pending', or 'cancelled' for a window skipped because it would overlap its
        schedule's active run).
        """
        try:
            async with self.pool.connection() as conn, conn.transaction():
                return await self._fire_due_schedules(
                    conn, plan, limit, skip_grace_seconds, idle_timeout_seconds,
                    lookahead_seconds, now)
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
        lookahead_seconds: float,
        now: datetime | None,
    ) -> tuple[int, list[dict[str, Any]]]:
        # A planner frozen mid-transaction (SIGSTOP, a stalled VM) would hold its rows for
        # ever; the server ends such a session instead, and others take over.
        await conn.execute(self._q["limit_idle_transaction"],
                           {"ms": str(round(idle_timeout_seconds * 1000))})
        cur = conn.cursor(row_factory=dict_row)
        due = await (await cur.execute(
            self._q["lock_due_schedules"],
            {"limit": limit, "now": now, "lookahead": lookahead_seconds,
             **_UNREADABLE_JSON})).fetchall()
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
            "now": now,
            "channel": self.channel,
        })
        return len(due), await cur.fetchall()

    async def next_schedule_fire(
        self, lookahead_seconds: float = 0.0
    ) -> tuple[datetime | None, datetime]:
        """(when the earliest active schedule becomes due, planned ahead by up to
        `lookahead_seconds`; database now)."""
        row = (await self._rows("next_schedule_fire", {"lookahead": lookahead_seconds}))[0]
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
        batch_size: int = BULK_BATCH,
    ) -> dict[str, str]:
        """Cancel pending jobs and mark running ones for their worker to stop: the given
        ids, or every job of a task and/or queue (in batches). Returns {id: 'cancelled' or
        'running'}; ids not returned were not found or had already finished. A window's
        job withdrawn before its window came, named by id, is the operator's from then
        on (hold_withdrawn_windows): 'cancelled'."""
        params = {"ids": list(ids) if ids is not None else None, "task": task, "queue": queue,
                  "channel": self.channel}
        if ids is not None:
            held = await self._hold_withdrawn_windows(ids)
            rows = await self._cancel_batch({**params, "limit": max(1, len(ids))})
            return {**dict.fromkeys(held, "cancelled"),
                    **{row["id"]: row["status"] for row in rows}}
        result: dict[str, str] = {}
        while rows := await self._cancel_batch({**params, "limit": batch_size}):
            result.update((row["id"], row["status"]) for row in rows)
        return result

    async def _cancel_batch(self, params: dict[str, Any]) -> list[dict]:
        # The batch locks running rows of many workers in id order while a worker's
        # heartbeat or completion locks its own rows in its order (the worker retries
        # its side too).
        return await self._rows_past_deadlocks("request_cancel", params)

    async def finish_cancelled_jobs(
        self, *, worker_id: str, held: Sequence[tuple[str, int]]
    ) -> set[str]:
        """Record running jobs stopped on request as cancelled; returns the ids written."""
        if not held:
            return set()
        rows = await self._rows_past_deadlocks(
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

    async def set_queue_limits(
        self, queue: str, *, global_concurrency: int | None = None,
        rate: tuple[int, float] | None = None, set_concurrency: bool = False,
        set_rate: bool = False, set_by: str | None = None,
    ) -> dict[str, Any] | None:
        """Set (or with None, remove) a queue's global concurrency and/or rate (jobs,
        period in seconds), each only when its set_ flag is true; wakes idle workers.
        Returns the queue's limits afterwards, None when it has none left."""
        params = {
            "queue": queue, "global_concurrency": global_concurrency,
            "rate_jobs": rate[0] if rate else None,
            "rate_period_seconds": rate[1] if rate else None,
            "set_concurrency": set_concurrency, "set_rate": set_rate, "set_by": set_by,
            "channel": self.channel,
        }
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(self._q["upsert_queue_limits"], params)
            await conn.execute(self._q["drop_empty_queue_limits"], params)
        rows = await self.queue_limits(queue)
        return rows[0] if rows else None

    async def queue_limits(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Global limits of every limited queue (or of `queue`), with running jobs and the
        starts in the rate window."""
        return await self._rows("list_queue_limits", {"queue": queue})

    async def queue_stats(self, *, exact: bool = False) -> list[dict[str, Any]]:
        """Per queue: due, scheduled and running jobs, lag, and the pause if any. Pending
        rows are counted up to COUNT_LIMIT per queue (`capped`: due and scheduled are
        lower bounds), or all of them when `exact`."""
        return await self._rows("queue_stats", {"count_limit": None if exact else COUNT_LIMIT})

    # -- worker registry -----------------------------------------------------------------

    async def register_worker(self, **worker: Any) -> None:
        await self._rowcount("register_worker", worker)

    async def heartbeat_worker(self, worker_id: str,
                               alive_seconds: float = 30.0) -> list[str] | None:
        """Mark the worker alive: its peers' ids (same queues, heartbeated within
        `alive_seconds`), or None if it is not registered (pruned)."""
        rows = await self._rows("heartbeat_worker", {"id": worker_id,
                                                     "alive_seconds": alive_seconds})
        return [str(p) for p in rows[0]["peers"] or ()] if rows else None

    async def unregister_worker(self, worker_id: str) -> None:
        await self._rowcount("unregister_worker", {"id": worker_id})

    async def prune_workers(self, older_than_seconds: float) -> list[str]:
        rows = await self._rows("prune_workers", {"older_than_seconds": older_than_seconds})
        return [row["id"] for row in rows]

    # -- job control (sql/job_control.sql: snoozes, Fail, a task's own completion,
    # waiting for an outcome, enqueueing through the caller's connection) --------------

    async def snooze_job(self, *, worker_id: str, job_id: str, attempt: int,
                         delay_seconds: float, max_snoozes: int) -> dict[str, Any] | None:
        """Run a job again after delay_seconds without counting a failure (failed once it
        snoozed max_snoozes times); returns {status, execution_time} or None if fenced out."""
        rows = await self._rows("snooze_job", {
            "worker_id": worker_id, "id": job_id, "attempt": attempt,
            "delay_seconds": delay_seconds, "max_snoozes": max_snoozes, **_ERRORS_KEPT})
        return rows[0] if rows else None

    async def fail_job_now(self, *, worker_id: str, job_id: str, attempt: int, error: str,
                           traceback: str | None) -> dict[str, Any] | None:
        """Fail a job without retries; returns {status, execution_time} or None if fenced out."""
        rows = await self._rows_past_deadlocks("fail_job_now", {
            "worker_id": worker_id, "id": job_id, "attempt": attempt, "error": error,
            "traceback": clip_traceback(traceback), **_ERRORS_KEPT})
        return rows[0] if rows else None

    async def completed_by(self, *, worker_id: str, job_id: str, attempt: int) -> bool:
        """Whether this attempt's own completion (complete_in_transaction) committed."""
        rows = await self._rows("completed_by",
                                {"worker_id": worker_id, "id": job_id, "attempt": attempt})
        return bool(rows[0]["committed"])

    def _completion_params(self, worker_id: str, job_id: str, attempt: int,
                           result_json: str) -> dict[str, Any]:
        return {"worker_id": worker_id, "id": job_id, "attempt": attempt,
                "result": result_json}

    async def complete_in_transaction(
        self, conn: psycopg.AsyncConnection[Any], *, worker_id: str, job_id: str,
        attempt: int, result_json: str,
    ) -> bool:
        """Complete a running job on the task's own connection, in its transaction
        (fenced); True if written (it commits with that transaction)."""
        cur = await conn.execute(self._q["complete_in_transaction"],
                                 self._completion_params(worker_id, job_id, attempt, result_json))
        return cur.rowcount == 1

    def complete_in_transaction_sync(
        self, conn: psycopg.Connection[Any], *, worker_id: str, job_id: str, attempt: int,
        result_json: str,
    ) -> bool:
        """complete_in_transaction for a task's synchronous connection."""
        cur = conn.execute(self._q["complete_in_transaction"],
                           self._completion_params(worker_id, job_id, attempt, result_json))
        return cur.rowcount == 1

    async def mark_awaited(self, job_id: str) -> dict[str, Any] | None:
        """Ask for a NOTIFY on done_channel when the job ends; returns the job as it is
        (None: no such job). LISTEN first, or a job ending in between is missed."""
        rows = await self._rows("mark_awaited", {"id": job_id, "channel": self.channel})
        return rows[0] if rows else None

    @property
    def done_channel(self) -> str:
        """Where jobs marked awaited announce their end (migration 0010's trigger)."""
        return done_channel_name(self.schema)

    async def listen_done(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.done_channel)))

    def _given_jobs(self, jobs: Sequence[NewJob], replace: bool) -> tuple[str, dict[str, Any]]:
        columns = list(zip(*jobs, strict=True))
        params = dict(zip(("ids", "tasks", "queues", "args", "kwargs", "priorities",
                           "execution_times", "graces", "max_retries", "timeouts"),
                          map(list, columns), strict=True))
        return self._q["replace_jobs_given" if replace else "insert_jobs_given"], {
            **params, "channel": self.channel}

    async def insert_jobs_in(
        self, conn: psycopg.AsyncConnection[Any], jobs: Sequence[NewJob], *,
        replace: bool, require_all: bool,
    ) -> set[str]:
        """Write jobs through the caller's connection, inside the caller's transaction
        (in one of its own when none is open on an autocommit connection); returns the ids
        written. With require_all a clash raises JobConflict and writes nothing (a
        savepoint), leaving the caller's transaction usable."""
        if not jobs:
            return set()
        query, params = self._given_jobs(jobs, replace)
        if _must_begin(conn):
            await conn.execute(self._q["db_now"])  # starts the caller's transaction
        async with conn.transaction():
            # The caller's row factory may make dicts (dict_row): ours reads a tuple.
            cur = await conn.cursor(row_factory=tuple_row).execute(query, params)
            return _all_written(jobs, set((await _one(cur))[0]), require_all)

    def insert_jobs_in_sync(
        self, conn: psycopg.Connection[Any], jobs: Sequence[NewJob], *,
        replace: bool, require_all: bool,
    ) -> set[str]:
        """insert_jobs_in for a synchronous connection (Django, SQLAlchemy sessions)."""
        if not jobs:
            return set()
        query, params = self._given_jobs(jobs, replace)
        if _must_begin(conn):
            conn.execute(self._q["db_now"])
        with conn.transaction():
            row = conn.cursor(row_factory=tuple_row).execute(query, params).fetchone()
            assert row is not None
            return _all_written(jobs, set(row[0]), require_all)

    # -- operator views and retry (sql/ops.sql; used by pgsched status/top/workers/retry) --


    async def job_counts(self, *, active_only: bool = False) -> list[dict[str, Any]]:
        """Rows of (queue, status, jobs, due, oldest_due, capped). active_only: pending and
        running only, pending counted up to COUNT_LIMIT per queue (`capped`: jobs and due
        are lower bounds); otherwise every row of the table, exactly."""
        if active_only:
            return await self._rows("ops_active_counts", {"count_limit": COUNT_LIMIT})
        return await self._rows("ops_job_counts", {})

    async def finished_estimates(self) -> dict[str, int]:
        """Finished jobs per status as the planner estimates them (table size times the
        status's share in the statistics ANALYZE keeps), and under "rows" the estimated
        size of the table; reads no row of jobs."""
        rows = await self._rows("ops_finished_estimates", {})
        return {"rows": rows[0]["rows"], **{row["status"]: row["jobs"] for row in rows}}

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
        """Put up to `limit` matching finished jobs back to pending; returns their ids.
        A job scheduled with depends_on waits again for its dependencies (released at
        once if they all completed, cancelled again if one did not, or if it would wait
        for itself)."""
        params = {
            "statuses": list(statuses), "ids": list(ids) if ids is not None else None,
            "task": task, "queue": queue, "cutoff": cutoff, "limit": limit,
            "channel": self.channel, **_ERRORS_KEPT,
        }
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=dict_row)
                retried = [row["id"] for row in await (
                    await cur.execute(self._q["ops_retry_jobs"], params)).fetchall()]
                waiting = {"ids": retried, "channel": self.channel}
                # In this transaction: a retried job must never be left waiting for
                # dependencies that completed meanwhile.
                await cur.execute(self._q["lock_dependencies"], waiting)
                await cur.execute(self._q["settle_waiting"], waiting)
                await cur.execute(self._q["cancel_waiting_cycles"], waiting)
        except _ROLLED_BACK:  # lock_dependencies held pending dependencies meanwhile
            await self.wake_workers()
            raise
        return retried

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


_ERRORS_KEPT = {"errors_first": ERRORS_KEPT_FIRST, "errors_last": ERRORS_KEPT_LAST}
_CLIPPED = "[...]\n"


def clip_traceback(traceback: str | None) -> str | None:
    """A traceback of at most TRACEBACK_MAX_CHARS: its end (the frame that raised and the
    error), marked as cut when it was longer."""
    if traceback is None or len(traceback) <= TRACEBACK_MAX_CHARS:
        return traceback
    return _CLIPPED + traceback[len(traceback) - TRACEBACK_MAX_CHARS + len(_CLIPPED):]


def _missing_role(role: str) -> PgschedError:
    return PgschedError(
        f"role {role!r} does not exist: create it first (CREATE ROLE {role} LOGIN "
        "PASSWORD '...'); nothing was changed")


# One encoder for every call: json.dumps builds a new one whenever options are given.
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
# And its C part, made once too: JSONEncoder.encode() builds one a call, half the cost of
# encoding small arguments (1.3 us against 2.6 for a job's args and kwargs). It has no
# markers (JSONEncoder's check for circular references), so it holds no state and threads
# may share it; a value that refers to itself recurses until RecursionError instead, which
# encode_json refuses as nested too deeply. Its arguments are _JSON's settings.
_ENCODE = None if c_make_encoder is None else c_make_encoder(
    None, _JSON.default, encode_basestring_ascii, None, ":", ",", False, False, False)


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


# Arguments may nest at most this deep (the args list or kwargs object is level 1). The
# worker's JSON decoder recurses per level, so the limit keeps every stored value far from
# Python's recursion limit; real arguments rarely nest beyond ten.
MAX_JSON_DEPTH = 100
# jsonpath tests for stored arguments no worker could decode: a value at a level the API
# never writes (level 0 is the args list itself), or an integer beyond Python's default
# 4300-digit limit on int().
_UNREADABLE_JSON = {
    "too_deep": f"strict $.**{{{MAX_JSON_DEPTH + 1} to last}}",
    "too_long": 'strict $.** ? (@.type() == "number" && (@ >= 1e4300 || @ <= -1e4300))',
}
# Only the brackets of JSON text, as bytes, objects written like lists.
_AS_LIST_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def check_json_depth(text: str, what: str) -> None:
    """Refuse JSON text nested deeper than MAX_JSON_DEPTH, in one line.

    Cheap for the common case: text with fewer brackets than the limit (brackets in
    strings included) cannot nest that deep and is not scanned. Otherwise, with C-level
    string operations only (about 10 us for 1 KB holding a hundred lists and objects):
    drop escaped backslashes and quotes, keep what lies outside the quotes, keep its
    brackets, and remove the innermost pairs once per level.
    """
    if len(text) <= 2 * MAX_JSON_DEPTH or text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    outside = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    brackets = outside.encode().translate(_AS_LIST_BRACKETS, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return
        brackets = brackets.replace(b"[]", b"")
    if brackets:
        raise InvalidInput(
            f"{what} nest deeper than {MAX_JSON_DEPTH} levels of lists and objects; "
            "flatten them or store the data elsewhere and pass a reference")


class _ClaimShape:
    """The columns of one claim statement's result, read from its first result (one per
    statement name: its text, and so its columns, never change), and a row factory
    (psycopg's protocol) that reads rows as plain tuples, psycopg's fastest. claimed.*
    comes last, its first column the id (NULL on the one row of a claim that took
    nothing): the claim's own columns are those before it."""

    first = -1
    head_keys: tuple[str, ...] = ()
    job_keys: tuple[str, ...] = ()

    def __call__(self, cursor: Any) -> Any:
        if self.first < 0:
            names = tuple(column.name for column in cursor.description or ())
            first = names.index("id")
            self.head_keys, self.job_keys = names[:first], names[first:]
            self.first = first
        return tuple


def _decode_payload(job: dict[str, Any]) -> dict[str, Any]:
    """Decode a claimed job's args and kwargs (claim_jobs returns them as text). A value
    that cannot be decoded (nested too deeply for Python, written by SQL) sets
    `undecodable` to the reason instead of raising: that job fails, the claim goes on."""
    try:
        job["args"] = _loads_text(job["args"], "the job's args")
        job["kwargs"] = _loads_text(job["kwargs"], "the job's kwargs")
    except InvalidInput as exc:
        job["args"], job["kwargs"] = [], {}
        job["undecodable"] = f"{exc}; the row was not written by pgsched's API or CLI"
    return job


def _text_array(values: list[str]) -> str:
    """An array literal of `values`, every element quoted (the text array_in reads)."""
    return "{" + ",".join(['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values]) + "}"


def _loads_text(text: str, what: str) -> Any:
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return decode_json(text, what)


def encode_json(value: Any, what: str) -> str:
    """JSON text for args, kwargs and results; NaN, Infinity and non-JSON types refused."""
    if not value and type(value) in (list, dict):  # most jobs: no args or no kwargs
        return "[]" if type(value) is list else "{}"
    try:
        return _JSON.encode(value) if _ENCODE is None else "".join(_ENCODE(value, 0))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"{what} must be JSON (no NaN/Infinity, no custom objects): {exc}"
        ) from exc
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply (or refers to itself)") from None


# COPY's text format escapes these four characters (a NUL cannot be stored at all); the
# backslash first, since the others' escapes hold one.
_COPY_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))


def _discard(job: NewJob) -> None:
    """_copy's keeper of the jobs it wrote when the caller keeps none."""


def _copy_text(value: Any, null: str = "\\N") -> str:
    """One value as COPY text, as psycopg's text dumpers write it; None is `null` (NULL,
    or `now` for a job's due time)."""
    if value is None:
        return null
    if isinstance(value, str):
        for char, escaped in _COPY_ESCAPES:
            if char in value:  # a C-level scan: most values hold none of them
                value = value.replace(char, escaped)
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)  # an IntEnum's str() is its name
    raise TypeError(f"cannot write {type(value).__name__} with COPY")


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


def _waiting_refusal(job: NewJob, depends_on: Sequence[str],
                     row: dict[str, Any]) -> str | None:
    """Why insert_waiting_job refused `job` (its answer `row`), or None if it did not."""
    missing = [d for d in depends_on if d not in set(row["found"])]
    if missing:
        return (f"depends_on: no job {missing[0]!r}"
                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": give ids of jobs that exist (a vacuumed job is gone); nothing was "
                "scheduled")
    if row["cycle"]:
        return (f"depends_on: job {job.id!r} would wait for itself: one of its "
                "dependencies waits for it (a cycle); nothing was scheduled")
    if row["too_deep"]:
        return (f"depends_on: job {job.id!r} would end a chain of more than "
                f"{MAX_DEPENDENCY_CHAIN} waiting jobs; make it wait for a job nearer the "
                "start of the chain; nothing was scheduled")
    return None


def lock_timeout_for(lease_seconds: float) -> float:
    """The lock_timeout of a pool whose worker holds leases of `lease_seconds`: a quarter
    of the lease, at most LOCK_TIMEOUT_SECONDS. A statement blocked by a table lock then
    gives its pool connection back well within a lease, and the worker's registry
    heartbeat (which no job DDL locks) gets one in time to keep its jobs."""
    return min(LOCK_TIMEOUT_SECONDS, lease_seconds / 4)


def statement_timeout_for(lease_seconds: float) -> float:
    """The statement_timeout of a worker's pool: half its lease. A claim, completion or
    lease renewal that has run that long is cancelled (an error its loop backs off from
    and retries) while the leases it serves still have time left; maintenance batches are
    bounded the same way, migrations are not (Store.migrate). docs/operations.md."""
    return lease_seconds / 2


class Connections(Protocol):
    """Where a Store borrows its connections: an AsyncConnectionPool, or OneConnection."""

    def connection(
        self) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]: ...


def _lends_directly(pool: Any) -> bool:
    """Whether `pool` is psycopg_pool's AsyncConnectionPool (or a subclass that keeps its
    connection()), which _rowcount_on_lent may borrow from without connection()'s context
    managers. Never imports psycopg_pool: such a pool was made with it imported."""
    module = sys.modules.get("psycopg_pool")
    if module is None or not isinstance(pool, module.AsyncConnectionPool):
        return False
    return type(pool).connection is module.AsyncConnectionPool.connection


async def _rowcount_on_lent(pool: AsyncConnectionPool, query: str, params: Sequence[Any],
                            cursors: dict[Any, psycopg.AsyncCursor[Any]]) -> int:
    """One statement on a connection borrowed from `pool`; its row count.

    What `async with pool.connection()` does, commit on success (a borrowed pool need not
    be autocommit) and rollback on failure, through getconn() and putconn() alone: the
    context managers around them (the pool's, and the connection's own, whose commit takes
    its lock even when there is nothing to commit) cost 8.4 against 4.0 us of client CPU
    a call in a micro-benchmark, and about 14 us in schedule()'s loop.

    The statement runs on the cursor `cursors` keeps for that connection (made on first
    use): a cursor that runs the same query again keeps its adapters and its dumpers
    (psycopg makes them anew for every new cursor), 12-16 us of client CPU a call in
    schedule()'s loop. A connection is lent to one task at a time, so is its cursor. The
    cursors of closed connections are dropped whenever a new connection comes."""
    conn = await pool.getconn()
    try:
        cur = cursors.get(conn)
        if cur is None:
            for closed in [c for c in cursors if c.closed]:
                del cursors[closed]
            cur = cursors[conn] = conn.cursor()
        rowcount = (await cur.execute(query, params)).rowcount
        if conn.pgconn.transaction_status != _IDLE:
            await conn.commit()
        return rowcount
    except BaseException:
        if conn.pgconn.transaction_status in _IN_TRANSACTION:
            with contextlib.suppress(Exception):  # connection() ignores this failure too
                await conn.rollback()
        raise
    finally:
        await pool.putconn(conn)


_IDLE = psycopg.pq.TransactionStatus.IDLE
_IN_TRANSACTION = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)


class OneConnection:
    """One open connection lent as a pool lends them, for a short command that makes one
    query at a time (`pgsched ls`): it spares psycopg_pool's import, the probe and the pool's
    own connection. Not for concurrent use; the caller closes `conn`."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]):
        self.conn = conn

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        yield self.conn


def cannot_connect(exc: Exception) -> DatabaseUnavailable:
    """The error for a failed connection attempt: libpq's first line says why (the rest is
    a generic hint), any password in it masked."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailable(f"cannot connect to the database: {mask_dsn(reason)}")


async def open_connection(
    dsn: str, *, application_name: str = "pgsched",
    lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS, prepare_threshold: int | None = 5,
    statement_timeout_seconds: float | None = None,
) -> psycopg.AsyncConnection[Any]:
    """One connection set up as open_pool sets up each of its own; it fails the same ways."""
    check_dsn(dsn)
    conn = await psycopg.AsyncConnection.connect(
        dsn, **_connection_options(dsn, application_name, lock_timeout_seconds,
                                   prepare_threshold, statement_timeout_seconds))
    await _configure(conn)
    return conn


async def open_pool(
    dsn: str, *, max_size: int = 4, min_size: int = 1, application_name: str = "pgsched",
    lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS, prepare_threshold: int | None = 5,
    statement_timeout_seconds: float | None = None,
) -> AsyncConnectionPool:
    """An opened pool. Raises InvalidInput for a DSN that cannot be parsed, and
    psycopg.OperationalError with the server's reason if it cannot be reached.

    application_name shows in pg_stat_activity, so an operator can tell a worker's
    connections from a web app's that only enqueues. Every connection waits at most
    lock_timeout_seconds for a lock (a session default, so RESET returns to it), and
    with statement_timeout_seconds (a worker's pool) any statement is cut after it.
    prepare_threshold is psycopg's: None never prepares a statement, which a
    transaction pooler that hands each transaction another server connection needs.
    """
    from psycopg_pool import AsyncConnectionPool

    check_dsn(dsn)
    kwargs = _connection_options(dsn, application_name, lock_timeout_seconds,
                                 prepare_threshold, statement_timeout_seconds)
    # One plain connection first: an unreachable server or a refused login fails now with
    # libpq's reason, not after the pool's ten seconds of retries ending in a timeout.
    probe = await psycopg.AsyncConnection.connect(dsn, **kwargs)
    await probe.close()
    pool = AsyncConnectionPool(
        dsn, min_size=min_size, max_size=max_size, open=False, name="pgsched", kwargs=kwargs,
        configure=_configure,
    )
    await pool.open(wait=True, timeout=10)
    _OPENED_POOLS[pool] = (dsn, kwargs)
    return pool


# The pools open_pool made, with how they connect: Store.own_connection copies that.
_OPENED_POOLS: weakref.WeakKeyDictionary[Any, tuple[str, dict[str, Any]]] = (
    weakref.WeakKeyDictionary())


def _connection_options(dsn: str, application_name: str, lock_timeout_seconds: float,
                        prepare_threshold: int | None,
                        statement_timeout_seconds: float | None = None) -> dict[str, Any]:
    return {"autocommit": True, "prepare_threshold": prepare_threshold,
            **_application_name(dsn, application_name),
            **_session_options(dsn, lock_timeout_seconds, statement_timeout_seconds)}


async def _configure(conn: psycopg.AsyncConnection) -> None:
    """Cheaper adaptation on the hot paths, for this pool's connections only.

    List parameters (the ids, attempts and results of every batch) go in binary, which
    psycopg dumps about five times faster than its quoted text arrays (a few us per job
    in the completer). JSON columns skip the decoder for the empty list and object most
    jobs have for args or kwargs (about 5 us per claimed job otherwise).
    """
    conn.adapters.register_dumper(list, ListBinaryDumper)
    set_json_loads(_loads_json, conn)
    conn.adapters.register_loader(_TIMESTAMPTZ_OID, ClampingTimestamptzLoader)


class DedicatedConnection:
    """One connection lent as a pool lends them, opened on first use and opened again
    after it is lost: the heartbeater's (Store.own_connection). A connection given back
    broken, or not idle (a statement cancelled by a client-side timeout may still run on
    the server), is closed, so the next use starts on a clean session. Not for
    concurrent use: one service owns it; close() when done."""

    def __init__(self, conninfo: str, kwargs: dict[str, Any]):
        self._conninfo = conninfo
        # Autocommit whatever a borrowed pool says: nothing here may hold a transaction.
        self._kwargs = {**kwargs, "autocommit": True}
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._conn is None:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
            await _configure(conn)
            self._conn = conn
        conn = self._conn
        try:
            yield conn
        finally:
            if conn.broken or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


async def _one(cur: psycopg.AsyncCursor[Any]) -> Any:
    """The row of a query that always returns one (an aggregate, a SELECT of values)."""
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("expected one row, the query returned none")
    return row


# What a read shows for a stored JSON value Python cannot decode.
UNREADABLE_JSON = "<unreadable: nested too deeply, or a number too long, to decode>"


def _loads_json(data: str | bytes) -> Any:
    """Every jsonb value read through a pgsched connection. A value written by SQL around
    pgsched's checks (nesting past the recursion limit, an integer past int()'s digit
    limit) reads as UNREADABLE_JSON: one poisoned row must not break `ls`, `show` or the
    web API's lists. (Claimed jobs decode their arguments apart: claim_jobs.)"""
    # psycopg passes bytes; its signature allows text as well.
    if data == b"[]":
        return []
    if data == b"{}":
        return {}
    try:
        return json.loads(data.decode() if isinstance(data, bytes) else data)
    except (RecursionError, ValueError):
        return UNREADABLE_JSON


# What a read shows for a stored time Python cannot hold: the bounds the claim clamps to
# (claim_jobs), a day inside datetime's range so that a shift to any time zone still fits.
CLAMPED_LATEST = datetime(9999, 12, 30, tzinfo=UTC)
CLAMPED_EARLIEST = datetime(1, 1, 3, tzinfo=UTC)

_TIMESTAMPTZ_OID = psycopg.adapters.types["timestamptz"].oid


def _psycopg_loader(oid: int) -> type[psycopg.abc.Loader]:
    """psycopg's own text loader of a type (its C one when installed, which cannot be
    subclassed)."""
    loader = psycopg.adapters.get_loader(oid, Format.TEXT)
    if loader is None:
        raise RuntimeError(f"psycopg has no text loader for type {oid}")
    return loader


_TimestamptzLoader = _psycopg_loader(_TIMESTAMPTZ_OID)
# An ISO (DateStyle) time past year 9999: five digits or more before the first dash.
_FAR_FUTURE = re.compile(rb"\d{5,}-")


class ClampingTimestamptzLoader(Loader):
    """Every timestamptz read through a pgsched connection: psycopg's own value, except
    that infinity and years past 9999 read as CLAMPED_LATEST, -infinity and BC years as
    CLAMPED_EARLIEST, instead of failing the whole read with DataError. Anything else
    psycopg refuses (a DateStyle it cannot parse) still raises."""

    def __init__(self, oid: int, context: psycopg.abc.AdaptContext | None = None):
        super().__init__(oid, context)
        self._load = _TimestamptzLoader(oid, context).load

    def load(self, data: psycopg.abc.Buffer) -> datetime:
        try:
            return self._load(data)
        except psycopg.DataError:
            text = bytes(data)
            if text == b"-infinity" or text.endswith(b" BC"):
                return CLAMPED_EARLIEST
            if text == b"infinity" or _FAR_FUTURE.match(text):
                return CLAMPED_LATEST
            raise


# TCP keepalives of the LISTEN connection, which only ever reads: without them a server
# or network gone silent (no reset sent: a host power loss, a dropped route) would leave
# it waiting for ever, deaf to wake-ups; with them the read fails within about a minute
# and the listener reconnects. Settings in the DSN win.
LISTEN_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "30", "keepalives_interval": "10",
                     "keepalives_count": "3"}


async def connect(dsn: str, application_name: str = "pgsched") -> psycopg.AsyncConnection:
    """A dedicated autocommit connection (the LISTEN connection)."""
    given = conninfo_to_dict(dsn)
    options: dict[str, Any] = {**_application_name(dsn, application_name),
                               **{k: v for k, v in LISTEN_KEEPALIVES.items() if k not in given}}
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **options)


# The connections that Store.using lends to the queries of one task.
_USING: contextvars.ContextVar[Connections | None] = contextvars.ContextVar(
    "pgsched_store_using", default=None)
_BOUND: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "pgsched_store_bound", default=None)
_NOT_BOUNDED = contextlib.nullcontext()


class NoAnswer(psycopg.errors.QueryCanceled):
    """A query abandoned by Store.bounded: cut as statement_timeout cuts one, by the
    client. Either the server stopped answering or the query (a large value sent and
    parsed before the server's own clock can cut it) needed longer."""


@contextlib.contextmanager
def _abandoned_after(conn: psycopg.AsyncConnection[Any], seconds: float) -> Iterator[None]:
    """Store.bounded for one query on `conn`."""
    timer = asyncio.get_running_loop().call_later(seconds, _shut_down, conn)
    try:
        yield
    except psycopg.OperationalError as exc:
        if timer.when() > asyncio.get_running_loop().time():
            raise
        raise NoAnswer(
            f"no answer from the server within {seconds:g}s: the connection was abandoned "
            f"({str(exc).strip() or type(exc).__name__})") from exc
    finally:
        timer.cancel()


# How each connection's session plans prepared statements, for the claims planned below
# PREPARED_CLAIM_ROWS: True, at every run (plan_cache_mode = force_custom_plan); False, as
# the session does by default; None, not known (a switch that did not return); no entry,
# never switched. Planned as unnamed statements, those claims were parsed, analysed and
# rewritten at every run too (0.4-0.8 ms of the flat claim's 1.4-1.9 ms when nothing is
# due, on a loaded 2-core machine); prepared, that work is done once per connection, and
# the setting keeps PostgreSQL from ever switching them to a generic plan (after five runs
# it may, made for the small table they ran on: the plan PREPARED_CLAIM_ROWS is there to
# avoid). Only while the completions are planned at each run too (below
# PREPARED_COMPLETE_ROWS); above it the claims below PREPARED_CLAIM_ROWS run as unnamed
# statements again, as the two would otherwise switch the session at every claim (on
# a loaded machine those round trips cost more than the parse they save). The statements
# prepared for their generic plans (the completion above PREPARED_COMPLETE_ROWS, the
# claims above PREPARED_CLAIM_ROWS) set the session back first. Every other statement
# runs under whichever setting its connection has, which at most plans it at every run (a
# simple statement plans in tens of microseconds): switching for each would cost two
# round trips per failed job (fail_job, then the next claim on that connection). A switch
# is one round trip, made when a connection goes from a claim planned at every run to a
# statement that wants its generic plan, or back: in steady use, once. Never on
# a connection that prepares nothing (prepare_threshold None: behind a transaction
# pooler, where a session setting would reach other clients' sessions), nor on a pool
# open_pool did not make (Scheduler(pool=...): the application's own statements run on
# those connections next), nor on a connection whose server session is not its own
# (_POOLED: PgBouncer 1.21+ routes prepared statements in transaction mode, so the
# default prepare_threshold works there, but a SET stays on the server connection for
# the next client); there such a claim runs as an unnamed statement.
_PLAN_CUSTOM: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], bool | None] = (
    weakref.WeakKeyDictionary())
# The connections found behind a pooler: the backend pid the server reports is not the
# one the connection was given at start-up (a pooler hands its clients keys of its own).
_POOLED: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()


async def _custom_plans(conn: psycopg.AsyncConnection[Any], custom: bool,
                        switch: str) -> bool:
    """Switch conn's session (_PLAN_CUSTOM) on, with statement `switch` (custom_plans),
    or off; False if it was not switched: conn reaches its server session through a
    pooler (checked in the same round trip)."""
    _PLAN_CUSTOM[conn] = None  # until the server has answered: either may be in force
    if custom:
        cur = await conn.execute(switch, {"pid": conn.info.backend_pid}, prepare=False)
        row = await cur.fetchone()
        if row is None or row[0] is None:
            _POOLED.add(conn)
            del _PLAN_CUSTOM[conn]
            return False
    else:
        await conn.execute("RESET plan_cache_mode", prepare=False)
    # Inside a transaction (a caller's own connection, Store.using) a rollback undoes the
    # switch: not known then, so the next statement that cares switches again.
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        _PLAN_CUSTOM[conn] = custom
    return True


def _shut_down(conn: psycopg.AsyncConnection[Any]) -> None:
    """End a connection whose server stopped answering, from outside the query waiting on
    it: the socket is shut down (through a duplicate of its descriptor, which libpq still
    owns), so that query reads end-of-file and fails at once, and the connection is
    broken, which the pool discards."""
    with (contextlib.suppress(OSError, psycopg.Error),
          socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock):
        sock.shutdown(socket.SHUT_RDWR)


def _session_options(dsn: str, lock_timeout_seconds: float,
                     statement_timeout_seconds: float | None = None) -> dict[str, str]:
    """libpq `options`: JIT off unless the DSN's own options turn it on (they come
    after), and our timeouts after those (the DSN's other options stay).

    JIT off: every pgsched statement is short, and PostgreSQL compiles any plan whose
    estimated cost passes jit_above_cost. The operator views' estimates do (a LIMIT
    inside a per-queue probe is costed as the whole index range): with a server built
    with LLVM (Debian's PostgreSQL 15) `queues` spent 13.7 of its 16 ms at 5M jobs
    compiling, and ran in 2 ms without it."""
    given = str(conninfo_to_dict(dsn).get("options") or "")
    ours = f"-c lock_timeout={_milliseconds(lock_timeout_seconds)}"
    if statement_timeout_seconds is not None:
        ours += f" -c statement_timeout={_milliseconds(statement_timeout_seconds)}"
    return {"options": " ".join(part for part in ("-c jit=off", given, ours) if part)}


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _application_name(dsn: str, default: str) -> dict[str, str]:
    """Our application_name, unless the DSN sets its own (the operator's choice wins)."""
    return {} if "application_name" in conninfo_to_dict(dsn) else {"application_name": default}
