"""The Python API: `Scheduler`, `JobSpec` and `ConflictResolution`.

Owns: validating what callers ask for (task names, times, JSON payloads, options) so
that nothing invalid is ever written (a bulk call validates while it streams its rows,
in a transaction that a bad job rolls back), and the pg-scheduler-compatible calls
`schedule`, `schedule_bulk` and `cancel_job`. Enqueueing needs no running worker: a web
app opens a Scheduler, schedules, and closes it. `start()` runs the same worker as
`pgsched worker` inside the caller's event loop. Given `connection=` (or through
`schedule_sync`/`schedule_bulk_sync`), jobs are written in the caller's own transaction
on the caller's connection, with no pool and no open() needed. `wait(job_id)` waits for
a job's end on a LISTEN connection of its own.

Invariants: arguments, keyword arguments and results are JSON (never pickle); NaN,
Infinity and non-JSON types are refused at schedule time. A bulk call with
ConflictResolution.RAISE writes all of its jobs or none of them. pgsched never commits
or rolls back a caller's transaction (a savepoint undoes a RAISE clash).

Failure: InvalidInput for bad arguments (and for a caller's connection of the wrong
kind, closed, or in a failed transaction), JobConflict for an id clash the conflict mode
does not allow, DatabaseUnavailable when the server cannot be reached, JobNotFound and
WaitTimedOut from wait().
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg

from .errors import InvalidInput, JobConflict, JobNotFound, WaitTimedOut
from .logs import configure_unless_configured as configure_logging_unless_configured
from .payload import encode_arguments
from .queues import DEFAULT_QUEUE, validate_queue_name
from .recurring import is_schedule_job_id
from .store import (
    FINISHED_STATUSES,
    LOCK_TIMEOUT_SECONDS,
    NewJob,
    Store,
    cannot_connect,
    connect,
    lock_timeout_for,
    open_pool,
    statement_timeout_for,
)
from .tasks import JobPriority, check_max_retries, get_task, task_name_of

if TYPE_CHECKING:
    import psycopg_pool

    from .worker import Worker, WorkerOptions

MAX_JOB_ID_LENGTH = 255
MAX_UNIQUE_KEY_LENGTH = 255
MIN_UNIQUE_SECONDS = 0.001
MAX_UNIQUE_SECONDS = 10 * 366 * 86400.0
# How many jobs one job may wait for (depends_on): a bound on the locks one insert takes.
MAX_DEPENDENCIES = 1000
DEFAULT_MISFIRE_GRACE_SECONDS = 300.0
# A unique insert may run again when it races another (store.insert_unique_job): not
# inside a caller's transaction, which one failed round would abort.
_UNIQUE_IN_TRANSACTION = ("unique_for cannot be combined with connection= (a unique insert "
                          "may need a second round, which would abort the caller's "
                          "transaction): schedule the unique job without connection=")
# wait(job_id): how often the job is read while no NOTIFY came (a safety net only).
WAIT_POLL_SECONDS = 5.0
# wait(job_id): the pause before a dropped LISTEN connection is opened again.
WAIT_RECONNECT_SECONDS = 0.5


class _Options(NamedTuple):
    task: str
    queue: str
    priority: int
    max_retries: int
    timeout: float | None
    grace: float | None


class _Unset(Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET


class ConflictResolution(Enum):
    RAISE = "raise"  # a job with this id exists: JobConflict
    IGNORE = "ignore"  # keep the existing job (bulk: its position in the result is None)
    REPLACE = "replace"  # overwrite the existing job unless it is running

    @classmethod
    def parse(cls, value: ConflictResolution | str) -> ConflictResolution:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidInput(
                f"invalid conflict mode {value!r}: use raise, ignore or replace"
            ) from None


@dataclass(frozen=True)
class JobSpec:
    """One job for `schedule_bulk`; the fields mirror `schedule()`'s arguments."""

    func: Callable[..., Any] | str
    execution_time: datetime | None = None
    args: Sequence[Any] = ()
    kwargs: dict[str, Any] | None = None
    priority: JobPriority | int | str | None = None
    max_retries: int | None = None
    job_id: str | None = None
    timeout: float | _Unset | None = UNSET
    misfire_grace_time: float | _Unset | None = UNSET
    queue: str | None = None
    # schedule() only (one job, one statement): schedule_bulk refuses them.
    unique_for: timedelta | float | None = None
    unique_key: str | None = None


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        raise InvalidInput(f"invalid job id: use 1 to {MAX_JOB_ID_LENGTH} characters")
    if any(ord(ch) < 32 or 0x7f <= ord(ch) <= 0x9f for ch in job_id):
        raise InvalidInput("invalid job id: control characters are not allowed")
    if job_id != job_id.strip():
        # "a " and "a" would be two jobs that look the same in every listing.
        raise InvalidInput(f"invalid job id {job_id!r}: remove the leading or trailing spaces")
    if is_schedule_job_id(job_id):
        raise InvalidInput(
            f"invalid job id {job_id!r}: ids like SCHEDULE@<time> and SCHEDULE@trigger-... "
            "are reserved for schedule windows; choose another id (e.g. without '@')")
    return job_id


def unique_seconds(unique_for: object, unique_key: object) -> float | None:
    """The unique period in seconds (None: not a unique job), and the key checked."""
    if unique_for is None:
        if unique_key is not None:
            raise InvalidInput("unique_key applies to unique jobs: give unique_for too "
                               "(CLI: --unique-for)")
        return None
    seconds = _seconds(unique_for, "unique_for")
    if not MIN_UNIQUE_SECONDS <= seconds <= MAX_UNIQUE_SECONDS:
        raise InvalidInput(f"invalid unique_for {unique_for!r}: use 1 ms to 10 years")
    if unique_key is not None and (not isinstance(unique_key, str) or not unique_key
                                   or len(unique_key) > MAX_UNIQUE_KEY_LENGTH
                                   or "\x00" in unique_key):
        raise InvalidInput(f"invalid unique_key {unique_key!r}: use text of 1 to "
                           f"{MAX_UNIQUE_KEY_LENGTH} characters, without NUL")
    return seconds


def new_job_id() -> str:
    """A time-ordered (version 7) UUID as text: the Unix time in milliseconds, then 74
    random bits. Ids made later sort later, so new rows land at the right edge of the
    primary key index (and of every index ending in the id) instead of on random pages."""
    h = os.urandom(10).hex()
    t = f"{time.time_ns() // 1_000_000:012x}"
    return f"{t[:8]}-{t[8:]}-7{h[:3]}-{'89ab'[int(h[3], 16) & 3]}{h[4:7]}-{h[7:19]}"


# Where the 32 hex digits go in "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".
_UUID_DIGIT_AT = [at for at in range(36) if at not in (8, 13, 18, 23)]
# new_job_ids(): the digits of its 32-bit counter (after the version digit 7, around the
# variant digit 8) and of its 40 random bits.
_COUNTER_DIGITS = (13, 14, 15, 17, 18, 19, 20, 21)
_RANDOM_DIGITS = range(22, 32)


def new_job_ids() -> Iterator[str]:
    """Version 7 UUIDs without end, for schedule_bulk(): 0.1 us an id against 1.

    Every id of one generator has the same millisecond and a counter that starts at a
    random 31-bit value, so the ids of a bulk call are strictly increasing: COPY then
    appends to the indexes instead of writing to random pages, which made the server
    ingest random ids two to three times slower than ordered ones (100,000 rows). Two
    calls in the same millisecond differ by their counters and 40 random bits.

    Ids are made in chunks (64 first, so a small call pays little, then 1,024) with
    C-level operations on whole buffers only: the counters as one array, one os.urandom(),
    two hex()es, and each varying digit copied into a template holding the time with one
    extended-slice assignment for the whole chunk.
    """
    t = f"{time.time_ns() // 1_000_000:012x}"
    template = f"{t[:8]}-{t[8:]}-7000-8000-000000000000 ".encode()
    counter = int.from_bytes(os.urandom(4)) >> 1
    count = 64
    while True:
        counters = array.array("L", range(counter, counter + count))
        counter += count
        # Big-endian words of 8 bytes, of which the last 4 hold the 32-bit counter.
        if sys.byteorder == "little":
            counters.byteswap()
        counter_digits = counters.tobytes().hex().encode()
        random_digits = os.urandom(5 * count).hex().encode()
        text = bytearray(template) * count
        width = 2 * counters.itemsize
        for k, digit in enumerate(_COUNTER_DIGITS):
            text[_UUID_DIGIT_AT[digit]::37] = counter_digits[width - 8 + k::width]
        for k, digit in enumerate(_RANDOM_DIGITS):
            text[_UUID_DIGIT_AT[digit]::37] = random_digits[k::10]
        yield from text.decode().split()
        count = 1024


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value <= 0:
        raise InvalidInput(f"invalid {what} {value!r}: use a number of seconds > 0, or None")
    return float(value)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a bulk call builds its rows.

    A call of 100,000 jobs allocates enough tuples to set off several full collections,
    each walking every object of the process (the caller's 100,000 JobSpecs included):
    1.5 us of its 5.4 us per job. Reference counting still frees everything; cycles made
    meanwhile (by this call or other tasks of the loop) wait until the call ends. If the
    collector was already off, it stays off."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# The types of a spec's empty args that _new_jobs takes for no args at all.
_EMPTY_ARGS_TYPES = (tuple, list)


# NewJob from a tuple in its field order without NewJob.__new__'s Python-level call.
_new_tuple = tuple.__new__


def _pool_conninfo(pool: psycopg_pool.AsyncConnectionPool) -> str:
    """A borrowed pool's connection string (the worker's LISTEN connection needs one)."""
    if not isinstance(pool.conninfo, str):
        raise InvalidInput("the pool's conninfo is a function: give Scheduler a pool made "
                           "with a connection string, or the string itself")
    return pool.conninfo


def _bulk_result(rows: list[NewJob], written: set[str]) -> list[str | None]:
    """schedule_bulk()'s answer: each job's id in input order, None where it was not
    written (skipped by IGNORE, or a repeat of an earlier id)."""
    if len(written) == len(rows):  # every job written: no id repeated, none skipped
        return [row.id for row in rows]
    result: list[str | None] = []
    seen: set[str] = set()
    for row in rows:
        result.append(row.id if row.id in written and row.id not in seen else None)
        seen.add(row.id)
    return result


def _caller_connection(conn: Any, *, sync: bool) -> Any:
    """The connection= of a transactional enqueue, checked: the kind the call needs, open."""
    kind = psycopg.Connection if sync else psycopg.AsyncConnection
    if not isinstance(conn, kind):
        other = "schedule()/schedule_bulk()" if sync else "schedule_sync()/schedule_bulk_sync()"
        raise InvalidInput(
            f"connection= must be a psycopg {kind.__name__}, not {type(conn).__name__}"
            f" (for the other kind use {other}; for Django pass connection.connection, for "
            "SQLAlchemy session.connection().connection.driver_connection)")
    if conn.closed:
        raise InvalidInput("connection= is closed: pass the open connection of your transaction")
    return conn


class WaitConnectionLost(Exception):
    """wait()'s LISTEN connection dropped: it is opened again (never seen by callers)."""


class _NoPool:
    """The pool of a Scheduler that was never opened: it only writes through callers'
    connections, and anything else says how to open it."""

    def connection(self) -> Any:
        raise RuntimeError("Scheduler is not open: use `async with Scheduler(...)` or open()")


class Scheduler:
    """Schedule, cancel and inspect jobs; optionally run a worker in-process.

    `Scheduler(dsn_or_pool, schema="pgsched", misfire_grace_time=300, options=...)`.
    Given a DSN it opens (and closes) its own pool; given an AsyncConnectionPool it
    borrows it. Use it as `async with Scheduler(dsn) as sched:` or call open()/close().
    """

    def __init__(
        self,
        dsn_or_pool: str | psycopg_pool.AsyncConnectionPool,
        *,
        schema: str = "pgsched",
        misfire_grace_time: float | None = DEFAULT_MISFIRE_GRACE_SECONDS,
        options: WorkerOptions | None = None,
        pool_size: int = 4,
        application_name: str = "pgsched",
        prepare_threshold: int | None = 5,
        listen_dsn: str | None = None,
    ):
        self._pool: psycopg_pool.AsyncConnectionPool | None
        if isinstance(dsn_or_pool, str):
            self._dsn, self._pool = dsn_or_pool, None
        else:
            self._dsn, self._pool = _pool_conninfo(dsn_or_pool), dsn_or_pool
        self._own_pool = self._pool is None
        self._pool_size = pool_size
        self._prepare_threshold = prepare_threshold
        # The worker's LISTEN connection goes here: behind a transaction pooler only a
        # direct connection keeps the session a LISTEN needs (docs/pgbouncer.md).
        self._listen_dsn = listen_dsn or self._dsn
        self.application_name = application_name
        self.schema = schema
        self.misfire_grace_time = (
            None if misfire_grace_time is None
            else _seconds(misfire_grace_time, "misfire_grace_time")
        )
        self.options = options  # None: WorkerOptions() when start() needs them
        self._store: Store | None = None
        self._unpooled: Store | None = None  # _statements before open()
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> Scheduler:
        if self._store is None:
            if self._pool is None:
                import psycopg_pool  # only here: a CLI read command never needs it

                try:
                    self._pool = await open_pool(
                        self._dsn, max_size=self._pool_size,
                        application_name=self.application_name,
                        lock_timeout_seconds=LOCK_TIMEOUT_SECONDS if self.options is None
                        else lock_timeout_for(self.options.lease_seconds),
                        statement_timeout_seconds=None if self.options is None
                        else statement_timeout_for(self.options.lease_seconds),
                        prepare_threshold=self._prepare_threshold)
                except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
                    raise cannot_connect(exc) from exc
            self._store = Store(self._pool, self.schema)
        return self

    async def close(self) -> None:
        await self.shutdown()
        if self._own_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None
        self._store = None

    async def __aenter__(self) -> Scheduler:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def dsn(self) -> str:
        """The connection string (a dedicated connection, like LISTEN, needs it)."""
        return self._dsn

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("Scheduler is not open: use `async with Scheduler(...)` or open()")
        return self._store

    async def migrate(self, *, grant: Sequence[str] = ()) -> int:
        """Create or upgrade the schema and grant the runtime roles in `grant` what they
        need (no DDL); returns the schema version."""
        return await self.store.migrate(grant=grant)

    async def start(self) -> Worker:
        """Run a worker inside this event loop until shutdown() (tasks must be registered).

        Logs as `pgsched worker` does (level info, JSON lines on stderr unless it is a
        terminal) unless the application has configured structlog itself, whose set-up
        is then left alone (docs/log-events.md)."""
        configure_logging_unless_configured()
        await self.open()
        if self._worker is None:
            # Imported here: a CLI that only enqueues or lists never loads the worker.
            from .worker import Worker, WorkerOptions

            self._worker = Worker(self.store, self._listen_dsn, self.options or WorkerOptions())
            self._worker_task = asyncio.create_task(self._worker.run(), name="pgsched-worker")
        return self._worker

    async def wait(
        self, job_id: str | None = None, *, timeout: float | timedelta | None = None,
    ) -> dict[str, Any] | None:
        """Wait until job `job_id` ends (completed, failed, cancelled or expired) and
        return its row: `status`, `result`, `last_error`... Raises JobNotFound for an
        unknown id and WaitTimedOut (a TimeoutError) after `timeout` seconds; the job may
        still run then. The end wakes the wait with a NOTIFY (migration 0010's trigger);
        a read every WAIT_POLL_SECONDS is only a safety net. Each wait holds one
        connection of its own while it waits (the listen_dsn, as the worker's LISTEN).

        Without a job id: wait until the in-process worker exits (after stop(), a
        signal, or --burst)."""
        if job_id is None:
            if self._worker_task is not None:
                await self._worker_task
            return None
        seconds = None if timeout is None else _seconds(timeout, "timeout")
        try:
            async with asyncio.timeout(seconds):
                row = await self._wait_for_end(job_id)
        except TimeoutError:
            raise WaitTimedOut(
                f"job {job_id!r} did not end within {seconds:g}s; it may still run "
                f"(see `pgsched show {job_id}`)") from None
        if row is None:
            raise JobNotFound(f"job {job_id!r}: not found (never added, or vacuumed)")
        return row

    async def _wait_for_end(self, job_id: str) -> dict[str, Any] | None:
        """The job's row once it ended. A LISTEN connection that drops (a server restart,
        a terminated backend, a proxy's idle cut) is opened again, LISTENing before it
        reads, so no end falls in the gap; one that cannot be opened again raises
        DatabaseUnavailable."""
        while True:
            try:
                return await self._wait_on_one_connection(job_id)
            except WaitConnectionLost:
                await asyncio.sleep(WAIT_RECONNECT_SECONDS)

    async def _wait_on_one_connection(self, job_id: str) -> dict[str, Any] | None:
        try:
            conn = await connect(self._listen_dsn, application_name=self.application_name)
        except psycopg.OperationalError as exc:
            raise cannot_connect(exc) from exc
        try:
            return await self._wait_listening(conn, job_id)
        except psycopg.OperationalError as exc:
            if not conn.closed:
                raise  # the pool's statement failed, not this connection
            raise WaitConnectionLost from exc
        finally:
            await conn.close()

    async def _wait_listening(self, conn: psycopg.AsyncConnection[Any],
                              job_id: str) -> dict[str, Any] | None:
        await self.store.listen_done(conn)  # before the mark: no end can fall between
        row, marked = await self._mark_awaited(job_id)
        while row is not None and str(row["status"]) not in FINISHED_STATUSES:
            async for notice in conn.notifies(timeout=WAIT_POLL_SECONDS):
                if notice.payload == job_id:
                    break
            row, marked = (await self._mark_awaited(job_id) if not marked
                           else (await self.store.get_job(job_id), True))
        return row

    async def _mark_awaited(self, job_id: str) -> tuple[dict[str, Any] | None, bool]:
        """(the job, whether it is marked to notify). A row held by a long transaction (a
        task between its complete() and its commit) cannot be marked within the
        lock_timeout: it is read instead, and marked on a later round."""
        try:
            return await self.store.mark_awaited(job_id), True
        except psycopg.errors.LockNotAvailable:
            return await self.store.get_job(job_id), False

    async def shutdown(self) -> None:
        """Stop the in-process worker gracefully (running jobs get the grace period)."""
        if self._worker is not None and self._worker_task is not None:
            self._worker.stop()
            await self._worker_task
        self._worker = None
        self._worker_task = None

    # -- scheduling ----------------------------------------------------------------------

    def _new_job(self, spec: JobSpec) -> NewJob:
        return self._row(spec, self._options(spec), new_job_id)

    def _new_jobs(self, specs: Iterable[JobSpec]) -> Iterator[NewJob]:
        """Validate specs one by one. A bulk call usually repeats the same options (the
        same task, priority, queue... objects) in every spec: those are validated once for
        a run of specs that share them, compared by identity (the previous spec holds them,
        so an equal-looking `True` never passes for a validated `1`).

        Within such a run, a spec with nothing but options (no id, args or kwargs) and the
        same execution_time object as the last such spec validated gets that job's row
        with a new id: everything _row() checks and computes for it depends only on what
        they share, so it would come out the same (a 100,000-job call: 1.6 us of client CPU
        a job instead of 1.9)."""
        last: JobSpec | None = None  # the spec whose options `options` are
        options: _Options
        plain: tuple[Any, tuple[Any, ...]] | None = None  # (execution_time, the row's rest)
        new_id = new_job_ids().__next__
        for spec in specs:
            if spec.unique_for is not None or spec.unique_key is not None:
                raise InvalidInput("unique_for and unique_key are for schedule(), one job at a "
                                   "time; schedule_bulk does not deduplicate")
            if last is None or not (
                    spec.func is last.func and spec.priority is last.priority
                    and spec.max_retries is last.max_retries
                    and spec.timeout is last.timeout
                    and spec.misfire_grace_time is last.misfire_grace_time
                    and spec.queue is last.queue):
                last, options, plain = spec, self._options(spec), None
            # Plain: no job id, no args (an empty list or tuple) and no kwargs (None), so
            # its row is made of its options and execution_time alone.
            is_plain = (spec.job_id is None and spec.kwargs is None
                        and type(spec.args) in _EMPTY_ARGS_TYPES and not spec.args)
            if is_plain and plain is not None and spec.execution_time is plain[0]:
                yield _new_tuple(NewJob, (new_id(), *plain[1]))
                continue
            row = self._row(spec, options, new_id)
            if is_plain:
                plain = spec.execution_time, row[1:]
            yield row

    def _options(self, spec: JobSpec) -> _Options:
        """A spec's task name, queue and options, validated, the task's defaults applied."""
        return self._options_of(spec.func, spec.priority, spec.max_retries, spec.timeout,
                                spec.misfire_grace_time, spec.queue)

    def _options_of(self, func: Callable[..., Any] | str, priority: Any, max_retries: Any,
                    timeout: Any, grace: Any, queue: Any) -> _Options:
        """_options() of JobSpec's fields (schedule() makes no JobSpec)."""
        name = task_name_of(func)
        registered = get_task(name)
        if priority is not None:
            priority = JobPriority.parse(priority)
        else:
            priority = registered.priority if registered else JobPriority.NORMAL
        if max_retries is None:
            max_retries = registered.max_retries if registered else 0
        check_max_retries(max_retries)
        if timeout is UNSET:
            timeout = registered.timeout if registered else None
        if timeout is not None:
            timeout = _seconds(timeout, "timeout")
        if grace is UNSET:
            grace = self.misfire_grace_time  # validated once, in __init__
        elif grace is not None:
            grace = _seconds(grace, "misfire_grace_time")
        if queue is None:
            queue = registered.queue if registered else DEFAULT_QUEUE
        return _Options(name, validate_queue_name(queue), int(priority), max_retries,
                        timeout, grace)

    def _row(self, spec: JobSpec, options: _Options, new_id: Callable[[], str]) -> NewJob:
        """The job of `spec`, whose options are validated already."""
        return self._row_of(spec.func, spec.execution_time, spec.args, spec.kwargs,
                            spec.job_id, options, new_id)

    def _row_of(self, func: Callable[..., Any] | str, when: datetime | None,
                args: Sequence[Any], kwargs: dict[str, Any] | None, job_id: str | None,
                options: _Options, new_id: Callable[[], str]) -> NewJob:
        """_row() of JobSpec's fields (schedule() makes no JobSpec)."""
        if when is not None:
            if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
                raise InvalidInput(
                    f"execution_time {when!r} must be a timezone-aware datetime, "
                    "e.g. datetime.now(UTC) + timedelta(minutes=5)"
                )
            if when.tzinfo is not UTC:
                when = when.astimezone(UTC)
        args_json, kwargs_json = encode_arguments(args, kwargs)
        task, queue, priority, max_retries, timeout, grace = options
        if callable(func) and (registered := get_task(task)) is not None:
            # Given the function itself, its signature is here to check against; a name may
            # be registered differently in the workers, so it is not.
            registered.check_arguments(args, kwargs)
        job_id = validate_job_id(job_id) if job_id is not None else new_id()
        # Positional: NewJob's fields in order (keywords cost a microsecond a job).
        return NewJob(job_id, task, queue, args_json, kwargs_json, priority, when, grace,
                      max_retries, timeout)

    def validate(self, spec: JobSpec) -> None:
        """Raise InvalidInput if schedule_bulk would refuse `spec`; needs no database."""
        self._new_job(spec)

    async def schedule(
        self,
        func: Callable[..., Any] | str,
        *,
        execution_time: datetime | None = None,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        priority: JobPriority | int | str | None = None,
        max_retries: int | None = None,
        job_id: str | None = None,
        conflict_resolution: ConflictResolution | str = ConflictResolution.RAISE,
        misfire_grace_time: float | _Unset | None = UNSET,
        timeout: float | _Unset | None = UNSET,
        queue: str | None = None,
        connection: psycopg.AsyncConnection[Any] | None = None,
        unique_for: timedelta | float | None = None,
        unique_key: str | None = None,
        depends_on: Sequence[str] = (),
    ) -> str:
        """Schedule one job; returns its id (the existing id when IGNORE found one).

        Defaults: due now (on the database clock, whatever this machine's clock says);
        priority, max_retries, timeout and queue from the task's @task options;
        misfire_grace_time from the Scheduler (300 s; None = never expire).

        connection: the caller's open psycopg AsyncConnection: the job is written in its
        transaction (docs/job-control.md), exists only if that commits, and wakes workers
        only then. The Scheduler need not be open. schedule_sync() takes a sync one.

        unique_for (a timedelta or seconds): enqueue nothing if a pending or running job
        has the same unique_key (default: this task and these arguments) and was enqueued
        in the same period bucket; return that job's id instead (docs/job-control.md).

        depends_on: ids of jobs that must all complete first; the job waits (and is
        due at execution_time or when the last completes, whichever is later), and is
        cancelled if one fails, is cancelled or expires (docs/job-control.md).
        """
        period = unique_seconds(unique_for, unique_key)
        if period is not None and connection is not None:
            raise InvalidInput(_UNIQUE_IN_TRANSACTION)
        if depends_on and (period is not None or connection is not None):
            raise InvalidInput("depends_on cannot be combined with unique_for or connection=: "
                               "schedule the job that waits on its own")
        # JobSpec's validation without a JobSpec (a frozen dataclass costs 1.3 us to make).
        job = self._row_of(
            func, execution_time, args, kwargs, job_id,
            self._options_of(func, priority, max_retries, timeout, misfire_grace_time, queue),
            new_job_id)
        mode = ConflictResolution.parse(conflict_resolution)
        if period is not None:
            return (await self._schedule_unique(job, period, unique_key, mode))[0]
        replace = mode is ConflictResolution.REPLACE
        if depends_on:
            written = await self._schedule_waiting(job, mode, depends_on)
        elif connection is not None:
            written = await self._statements.insert_jobs_in(
                _caller_connection(connection, sync=False), [job], replace=replace,
                require_all=False)
        else:
            written = {job.id} if await self.store.insert_job(job, replace=replace) else set()
        return self._scheduled_id(job, mode, written)

    def schedule_sync(
        self, func: Callable[..., Any] | str, *, connection: psycopg.Connection[Any],
        conflict_resolution: ConflictResolution | str = ConflictResolution.RAISE,
        **options: Any,
    ) -> str:
        """schedule() through the caller's synchronous psycopg Connection (Django's
        `connection.connection`, a SQLAlchemy session's driver connection), in its
        transaction; the same keyword options as schedule() (JobSpec's fields). Needs no
        open Scheduler and no event loop: a Django view calls it inside
        `transaction.atomic()`."""
        if options.get("unique_for") is not None or options.get("unique_key") is not None:
            raise InvalidInput(_UNIQUE_IN_TRANSACTION)
        job = self._new_job(JobSpec(func, **options))
        mode = ConflictResolution.parse(conflict_resolution)
        written = self._statements.insert_jobs_in_sync(
            _caller_connection(connection, sync=True), [job],
            replace=mode is ConflictResolution.REPLACE, require_all=False)
        return self._scheduled_id(job, mode, written)

    @property
    def _statements(self) -> Store:
        """The store's statements for a caller's connection: no pool, no open() needed."""
        if self._store is not None:
            return self._store
        if self._unpooled is None:
            self._unpooled = Store(_NoPool(), self.schema)
        return self._unpooled

    @staticmethod
    def _scheduled_id(job: NewJob, mode: ConflictResolution, written: set[str]) -> str:
        if job.id in written or mode is ConflictResolution.IGNORE:
            return job.id
        if mode is ConflictResolution.REPLACE:
            raise JobConflict(f"job {job.id!r} is running and cannot be replaced; try again later")
        raise JobConflict(
            f"job {job.id!r} already exists: use conflict_resolution IGNORE or REPLACE "
            "(CLI: --on-conflict ignore|replace)"
        )

    async def schedule_unique(
        self, spec: JobSpec, *,
        conflict_resolution: ConflictResolution | str = ConflictResolution.RAISE,
    ) -> tuple[str, bool]:
        """schedule() for a spec with unique_for: (the job's id, whether it was added);
        False with the id of the pending or running job that holds the key (or, with
        IGNORE, of the job that has the spec's id)."""
        period = unique_seconds(spec.unique_for, spec.unique_key)
        if period is None:
            raise InvalidInput("schedule_unique needs a spec with unique_for")
        return await self._schedule_unique(
            self._new_job(spec), period, spec.unique_key,
            ConflictResolution.parse(conflict_resolution))

    async def _schedule_unique(self, job: NewJob, period: float, unique_key: str | None,
                               mode: ConflictResolution) -> tuple[str, bool]:
        if mode is ConflictResolution.REPLACE:
            raise InvalidInput("a unique job cannot replace another: use conflict_resolution "
                               "RAISE or IGNORE with unique_for")
        outcome, job_id = await self.store.insert_unique_job(
            job, unique_seconds=period, unique_key=unique_key)
        if outcome == "id_taken" and mode is ConflictResolution.RAISE:
            raise JobConflict(
                f"job {job.id!r} already exists: use conflict_resolution IGNORE "
                "(CLI: --on-conflict ignore)")
        return job_id, outcome == "inserted"

    async def _schedule_waiting(
        self, job: NewJob, mode: ConflictResolution, depends_on: Sequence[str]
    ) -> set[str]:
        if isinstance(depends_on, str):
            raise InvalidInput("depends_on must be a list of job ids, not one string")
        deps = list(dict.fromkeys(validate_job_id(d) for d in depends_on))
        if len(deps) > MAX_DEPENDENCIES:
            raise InvalidInput(f"depends_on: at most {MAX_DEPENDENCIES} jobs, not {len(deps)}")
        if job.id in deps:
            raise InvalidInput(f"depends_on: job {job.id!r} cannot wait for itself")
        if mode is ConflictResolution.REPLACE:
            raise InvalidInput("depends_on cannot be combined with conflict_resolution "
                               "REPLACE: cancel the job and schedule it again")
        return {job.id} if await self.store.insert_waiting_job(job, deps) else set()

    async def schedule_bulk(
        self,
        jobs: Iterable[JobSpec],
        *,
        conflict_resolution: ConflictResolution | str = ConflictResolution.IGNORE,
        batch_size: int = 5000,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[str | None]:
        """Schedule many jobs; returns their ids in input order, None where IGNORE skipped one.

        Nothing is written unless every job is valid, and with RAISE unless no id clashes:
        the jobs are validated while they stream to the server (COPY), inside one
        transaction that a bad job or a clash rolls back. `batch_size` is accepted for
        compatibility; the stream needs no batches.

        connection: the caller's open AsyncConnection, as for schedule(): the jobs are
        validated first, then written in one statement inside the caller's transaction
        (a clash under RAISE undoes only this call, through a savepoint).
        """
        mode = ConflictResolution.parse(conflict_resolution)
        if connection is not None:
            rows, unique = self._bulk_rows(jobs, mode)
            written = await self._statements.insert_jobs_in(
                _caller_connection(connection, sync=False), list(unique),
                replace=mode is ConflictResolution.REPLACE,
                require_all=mode is ConflictResolution.RAISE)
            return _bulk_result(rows, written)
        with _gc_paused():
            return await self._schedule_bulk(jobs, mode)

    def schedule_bulk_sync(
        self, jobs: Iterable[JobSpec], *, connection: psycopg.Connection[Any],
        conflict_resolution: ConflictResolution | str = ConflictResolution.IGNORE,
    ) -> list[str | None]:
        """schedule_bulk() through the caller's synchronous Connection, in its
        transaction (see schedule_sync())."""
        mode = ConflictResolution.parse(conflict_resolution)
        rows, unique = self._bulk_rows(jobs, mode)
        written = self._statements.insert_jobs_in_sync(
            _caller_connection(connection, sync=True), list(unique),
            replace=mode is ConflictResolution.REPLACE,
            require_all=mode is ConflictResolution.RAISE)
        return _bulk_result(rows, written)

    def _bulk_rows(self, jobs: Iterable[JobSpec],
                   mode: ConflictResolution) -> tuple[list[NewJob], Iterable[NewJob]]:
        """(rows, unique): every job in input order, and the ones to write, one per id
        (RAISE refuses a repeated id). Without REPLACE, `unique` validates the specs as it
        is consumed and fills `rows` meanwhile."""
        rows: list[NewJob] = []
        if mode is ConflictResolution.REPLACE:
            rows = list(self._new_jobs(jobs))
            # A repeated id keeps the first one's position and the last one's contents.
            return rows, {row.id: row for row in rows}.values()
        return rows, self._first_of_each_id(jobs, rows, strict=mode is ConflictResolution.RAISE)

    async def _schedule_bulk(
        self, jobs: Iterable[JobSpec], mode: ConflictResolution
    ) -> list[str | None]:
        rows, unique = self._bulk_rows(jobs, mode)  # validated as COPY streams them
        written = await self.store.copy_jobs(
            unique, replace=mode is ConflictResolution.REPLACE,
            require_all=mode is ConflictResolution.RAISE,
        )
        return _bulk_result(rows, written)

    def _first_of_each_id(
        self, specs: Iterable[JobSpec], rows: list[NewJob], *, strict: bool
    ) -> Iterator[NewJob]:
        """Validate specs one by one, collecting them in `rows`; yield the first job of
        each id (strict: a repeated id is an error)."""
        ids: set[str] = set()
        for row in self._new_jobs(specs):
            rows.append(row)
            if row.id in ids:
                if strict:
                    raise JobConflict(f"job id {row.id!r} appears twice in the bulk call")
                continue
            ids.add(row.id)
            yield row

    async def cancel_job(self, job_id: str) -> bool:
        """Cancel a pending job; False if it does not exist or is no longer pending."""
        return job_id in await self.store.cancel_jobs([job_id])

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        return await self.store.get_job(job_id)
