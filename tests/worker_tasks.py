"""Tasks the test suite's worker processes run (loaded by path from the generated config).

`record` writes to an audit table in the test's schema, outside pgsched's own tables, so
tests can count how many times each job body really ran. The test creates that table
first (conftest.audit_env): creating it here would race between concurrent jobs.
"""

import asyncio
import os
import time

import psycopg

from pgsched import JobPriority, task


def _audit(key: str) -> None:
    dsn, schema = os.environ["PGSCHED_TEST_AUDIT_DSN"], os.environ["PGSCHED_TEST_AUDIT_SCHEMA"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{schema}".audit (key, pid) VALUES (%s, %s)',
                     [key, os.getpid()])


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
def record(key: str) -> str:
    _audit(key)
    return key


@task
async def sleep_then_record(key: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
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
