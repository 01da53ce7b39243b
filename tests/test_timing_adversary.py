"""Adversarial review of the due-time work (issue 11): what the custom-plan claims and the
fine timer must not do to whatever shares their connection or their event loop.

- A session setting made for pgsched's claims never reaches a connection the application
  owns: a pool it lends (`Scheduler(pool=...)`), where its own statements run next.
"""

from __future__ import annotations

import asyncio

import psycopg_pool
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import fast_options

from pgsched import Scheduler


async def _modes(pool: psycopg_pool.AsyncConnectionPool, n: int) -> list[str]:
    """plan_cache_mode of n connections of `pool`, all borrowed at once (so every one is
    seen, whichever the worker last used)."""
    conns = [await pool.getconn() for _ in range(n)]
    try:
        return [(await (await c.execute("SHOW plan_cache_mode")).fetchone())[0]
                for c in conns]
    finally:
        for c in conns:
            await pool.putconn(c)


async def test_a_borrowed_pool_keeps_the_applications_session_settings(pg_dsn, schema):
    """An application lends its own pool to an in-process worker: once the worker has
    claimed and completed jobs on it, the application's next statements on those
    connections still run with the session the application set up (plan_cache_mode
    'auto'), not with the worker's force_custom_plan."""
    pool = psycopg_pool.AsyncConnectionPool(pg_dsn, min_size=2, max_size=2, open=False,
                                            kwargs={"autocommit": True})
    await pool.open(wait=True)
    try:
        async with Scheduler(pool, schema=schema, options=fast_options()) as sched:
            await sched.migrate()
            await sched.start()
            ids = [await sched.schedule("noop") for _ in range(5)]
            for job in ids:
                await asyncio.wait_for(sched.wait(job), 20)
            await sched.shutdown()
        assert await _modes(pool, 2) == ["auto", "auto"]
    finally:
        await pool.close()
