"""Tasks for the job-control tests (tests/test_job_control.py): current_job(), Retry,
Fail, retry_on, backoff and a task's own complete(). Registered by importing (the
in-process workers) or loaded by path from a generated config (worker processes).

Tasks that write go to a `side` table in the test's schema through their own connection
(PGSCHED_TEST_DSN_FOR_TASKS, PGSCHED_TEST_SCHEMA_FOR_TASKS): the task's own writes, which
a complete() commits with the job or not at all.
"""

import math
import os
import time
from pathlib import Path

import psycopg

from pgsched import Backoff, Fail, Retry, current_job, task


def _job_fields() -> dict:
    job = current_job()
    return {"id": job.id, "attempt": job.attempt, "queue": job.queue, "task": job.task,
            "scheduled_at": job.scheduled_at.isoformat(), "schedule_id": job.schedule_id,
            "fire_time": job.fire_time.isoformat() if job.fire_time else None}


@task(queue="control")
async def whoami() -> dict:
    return _job_fields()


@task(queue="control")
def whoami_sync() -> dict:
    return _job_fields()


@task
async def snooze_until(runs: int, delay: float) -> int:
    """Snoozes until its run number `runs`, then returns the attempt."""
    if current_job().attempt < runs:
        raise Retry(delay)
    return current_job().attempt


@task(max_snoozes=3)
async def snooze_forever() -> None:
    raise Retry(0)


@task(max_retries=5)
async def bad_retry(kind: str) -> None:
    """A Retry whose delay was made bad after it was checked (or one never checked)."""
    exc = Retry(0)
    exc.delay = {"nan": math.nan, "negative": -1, "huge": 10**30, "text": "soon"}[kind]
    raise exc


@task(max_retries=5)
async def retry_constructed_badly(kind: str) -> None:
    raise Retry({"nan": math.nan, "negative": -1, "huge": 10**30, "text": "soon"}[kind])


@task(max_retries=5)
async def fail_with(reason: str) -> None:
    raise Fail(reason.replace("<NUL>", "\x00"))  # no NUL can reach the task as an argument


@task(max_retries=3, retry_on=(ConnectionError, TimeoutError))
async def picky(kind: str) -> None:
    raise {"connection": ConnectionError("db down"), "value": ValueError("bad input")}[kind]


@task(max_retries=2, backoff=lambda n: 1 / 0)
async def backoff_raises() -> None:
    raise ConnectionError("again")


@task(max_retries=2, backoff=lambda n: math.nan)
async def backoff_nan() -> None:
    raise ConnectionError("again")


@task(max_retries=2, backoff=lambda n: "soon")
async def backoff_text() -> None:
    raise ConnectionError("again")


@task(max_retries=2, backoff=Backoff(base=3600, cap=7200, jitter=0))
async def backoff_hour() -> None:
    raise ConnectionError("again")


# -- a task's own transaction ------------------------------------------------------------


def _side_connection() -> psycopg.Connection:
    return psycopg.connect(os.environ["PGSCHED_TEST_DSN_FOR_TASKS"])


def _side_insert(conn, key: str) -> None:
    schema = os.environ["PGSCHED_TEST_SCHEMA_FOR_TASKS"]
    job = current_job()
    conn.execute(f'INSERT INTO "{schema}".side (key, job_id, attempt) VALUES (%s, %s, %s)',
                 [key, job.id, job.attempt])


@task(max_retries=3)
def complete_in_tx(key: str) -> str:
    with _side_connection() as conn:
        _side_insert(conn, key)
        current_job().complete(conn, {"key": key})
    return "ignored: the job completed in the task's transaction"


@task(max_retries=3)
async def complete_in_tx_async(key: str) -> None:
    async with await psycopg.AsyncConnection.connect(
            os.environ["PGSCHED_TEST_DSN_FOR_TASKS"]) as conn, conn.transaction():
        schema = os.environ["PGSCHED_TEST_SCHEMA_FOR_TASKS"]
        await conn.execute(f'INSERT INTO "{schema}".side (key, job_id, attempt) '
                           "VALUES (%s, %s, %s)", [key, current_job().id, 1])
        await current_job().complete(conn, {"async": key})


@task(max_retries=3)
def complete_then_hang(key: str, ready: str) -> None:
    """Writes, completes, then waits before its commit; the first run tells the test
    (the `ready` file) and is killed there; a later run commits."""
    conn = _side_connection()
    _side_insert(conn, key)
    current_job().complete(conn, {"attempt": current_job().attempt})
    if current_job().attempt == 1:
        Path(ready).touch()
        time.sleep(3600)
    conn.commit()
    conn.close()


@task(max_retries=0)
def complete_and_roll_back(key: str) -> None:
    with _side_connection() as conn:
        _side_insert(conn, key)
        current_job().complete(conn, None)
        conn.rollback()


@task(max_retries=0)
def complete_twice() -> None:
    """The second complete() in one transaction is refused; the task records what it
    raised (as a side row) and commits the first."""
    with _side_connection() as conn:
        current_job().complete(conn, 1)
        try:
            current_job().complete(conn, 2)
        except Exception as exc:
            _side_insert(conn, f"{type(exc).__name__}: {exc}")


@task(max_retries=0)
def complete_misuse(kind: str) -> str:
    """complete() on a closed connection, an autocommit one, a non-connection, with a
    result that cannot be stored: each raises, and the job's outcome is the task's."""
    conn = _side_connection()
    if kind == "closed":
        conn.close()
    elif kind == "autocommit":
        conn.autocommit = True
    elif kind == "not_a_connection":
        conn = object()
    try:
        current_job().complete(conn, "\x00" if kind == "nul" else None)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "passed"


@task(max_retries=0)
def complete_when_released(key: str, release: str) -> None:
    """Waits for the test (which takes the job away meanwhile), then writes and completes
    in one transaction: the refused complete() rolls the write back."""
    while not Path(release).exists():
        time.sleep(0.02)
    with _side_connection() as conn, conn.transaction():
        _side_insert(conn, key)
        current_job().complete(conn, "late")
