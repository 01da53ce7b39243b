"""Tasks the test suite's worker processes run (loaded by path from the generated config).

`record` and the other audited tasks write one row per real execution of a job body to an
`audit` table in the test's schema, outside pgsched's own tables, so tests can count how
many times each job really ran and which claim (job id, attempt, worker) ran it. The
claim comes from the context pgsched binds for every job (structlog contextvars), which
reaches sync tasks too because the worker copies the context into the thread.

Tasks that must wait for the test (`hold`, `spin_until`) wait for a file to appear, so
tests release them on an event instead of guessing durations.
"""

import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psycopg
import structlog

from pgsched import JobPriority, task

# `execution` names one run of a task body, so writing its row again after a lost reply
# cannot count that run twice.
AUDIT_COLUMNS = ("key text, job_id text, attempt int, worker_id text, pid int, "
                 "at timestamptz DEFAULT now(), execution uuid UNIQUE")

_local = threading.local()


def create_audit_table(conn: psycopg.Connection, schema: str) -> None:
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{schema}".audit ({AUDIT_COLUMNS})')


def _audit_connection() -> psycopg.Connection:
    """One connection per thread, reopened when a server restart broke it. While the
    server is down, it waits for it (up to a minute) like a patient real task would."""
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg.connect(os.environ["PGSCHED_TEST_AUDIT_DSN"], autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        _local.conn = conn
        schema = os.environ["PGSCHED_TEST_AUDIT_SCHEMA"]
        # Another process may create it at the same moment.
        with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            create_audit_table(conn, schema)
    return conn


def _audit(key: str) -> None:
    claim = structlog.contextvars.get_contextvars()
    schema = os.environ["PGSCHED_TEST_AUDIT_SCHEMA"]
    row = [key, claim.get("job_id"), claim.get("attempt"), claim.get("worker_id"), os.getpid(),
           uuid.uuid4()]
    sql = (f'INSERT INTO "{schema}".audit (key, job_id, attempt, worker_id, pid, execution) '
           "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (execution) DO NOTHING")
    try:
        _audit_connection().execute(sql, row)
    except psycopg.OperationalError:
        # The connection died (server crash or restart, pg_terminate_backend). The insert
        # may have committed with its reply lost (seen after an immediate shutdown: one
        # run audited twice, 4 s apart), so it is written again under the same execution
        # id, which the conflict clause makes count once.
        _local.conn = None
        _audit_connection().execute(sql, row)


def _wait_for_file(path: str) -> None:
    while not Path(path).exists():
        time.sleep(0.02)


@task
async def noop() -> None:
    return None


@task
async def add(a: int, b: int) -> int:
    return a + b


@task
def sync_add(a: int, b: int) -> int:
    return a + b


@task
def record(key: str, seconds: float = 0.0) -> str:
    if seconds:
        time.sleep(seconds)
    _audit(key)
    return key


@task
async def sleep_then_record(key: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    await asyncio.to_thread(_audit, key)
    return key


@task
async def hold(key: str, release: str) -> str:
    """Run until the file `release` exists, then audit: a job that is busy on demand."""
    while not Path(release).exists():
        await asyncio.sleep(0.02)
    await asyncio.to_thread(_audit, key)
    return key


@task
def sync_hold(key: str, release: str) -> str:
    """Like hold, in a thread: a sync task cannot be interrupted."""
    _wait_for_file(release)
    _audit(key)
    return key


@task
async def hold_with_cleanup(key: str, release: str, on_cancel: str) -> str:
    """Like hold, with an asyncio cancellation path: `reraise` cleans up and lets the
    cancellation through, `error` fails while cleaning up, `swallow` returns instead,
    `wait:PATH` cleans up until PATH exists, then lets the cancellation through."""
    try:
        while not Path(release).exists():
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)  # an await inside the cleanup, like closing a client
        if on_cancel.startswith("wait:"):
            while not Path(on_cancel.removeprefix("wait:")).exists():
                await asyncio.sleep(0.02)
        if on_cancel == "error":
            raise RuntimeError("cleanup failed") from None
        if on_cancel == "swallow":
            return "interrupted"
        raise
    await asyncio.to_thread(_audit, key)
    return key


@task
async def spin_once(key: str, marker: str, release: str) -> str:
    """The first run blocks the event loop with CPU work (no await) until `release`
    exists; later runs do not. Audits every run."""
    if not Path(marker).exists():
        Path(marker).touch()
        while not Path(release).exists():
            sum(i * i for i in range(20_000))  # the worker's loop is stuck in here
    await asyncio.to_thread(_audit, key)
    return key


@task
async def sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@task
def sync_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task
def fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@task
async def async_fail(message: str = "boom") -> None:
    raise RuntimeError(message)


@task(priority=JobPriority.CRITICAL)
async def urgent() -> str:
    return "urgent"


# How many `track` jobs of each key run at once, in this process (in-process workers).
ACTIVE: dict[str, int] = {}
PEAK: dict[str, int] = {}


@task
async def track(key: str, seconds: float) -> str:
    ACTIVE[key] = ACTIVE.get(key, 0) + 1
    PEAK[key] = max(PEAK.get(key, 0), ACTIVE[key])
    try:
        await asyncio.sleep(seconds)
    finally:
        ACTIVE[key] -= 1
    return key


@task
def span(key: str, seconds: float) -> str:
    """Audit `key:start`, run `seconds`, audit `key:end`: the audit rows bracket the body,
    so tests can count how many bodies overlapped at any instant, across processes."""
    _audit(f"{key}:start")
    time.sleep(seconds)
    _audit(f"{key}:end")
    return key


@task
async def stubborn(release: str) -> str:
    """Ignores cancellation until `release` exists: a task only a second signal stops."""
    while not Path(release).exists():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.02)
    return "done"


@task
async def hold_attempt(release_prefix: str) -> int:
    """Run until the file `<release_prefix><attempt>` exists: each attempt of the job is
    released on its own."""
    attempt = structlog.contextvars.get_contextvars()["attempt"]
    while not Path(f"{release_prefix}{attempt}").exists():
        await asyncio.sleep(0.02)
    return attempt


@task
async def returns_nul() -> str:
    return "a\x00b"


@task
async def returns_lone_surrogate() -> str:
    """Encodes to JSON ("\\ud800") that jsonb refuses: only the database can tell."""
    return "\ud800"


@task
async def raises_nul(repeat: int = 1) -> None:
    raise ValueError("x\x00y" * repeat)


@task
async def kill_own_worker(seconds: float) -> None:
    """A poison pill: SIGKILL the worker process that runs it, `seconds` after it starts."""
    await asyncio.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


@task
async def freeze_loop(seconds: float) -> None:
    """A poison pill that hangs rather than kills: it blocks its worker's event loop (no
    heartbeat, no lease renewal) for `seconds`, then returns as if nothing happened."""
    time.sleep(seconds)
