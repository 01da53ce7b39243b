"""Adversarial review of the due-time work (issue 11): what the custom-plan claims and the
fine timer must not do to whatever shares their connection or their event loop.

- A session setting made for pgsched's claims never reaches a connection the application
  owns: a pool it lends (`Scheduler(pool=...)`), where its own statements run next.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg_pool
import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import fast_options

from pgsched import JobSpec, Scheduler
from pgsched.store import Store, open_pool


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


@pytest.mark.xfail(strict=True, reason=(
    "design call: store._PLAN_CUSTOM trusts its own record of each connection's "
    "plan_cache_mode; a RESET ALL (or DISCARD ALL) run by someone else on a connection of "
    "pgsched's own pool is not seen, and the small-table claim, prepared, gets the generic "
    "plan PREPARED_CLAIM_ROWS exists to avoid. Only pgsched runs statements on open_pool's "
    "connections, so nobody does this today; noticing it costs a column in the claim "
    "(current_setting('plan_cache_mode')) or a round trip"))
async def test_a_reset_all_by_someone_else_is_noticed(sched, pg_dsn):
    """A claim switched the session; someone runs RESET ALL on that connection; the
    following claims, still on a small table, must still never be planned generic."""
    pool = await open_pool(pg_dsn, max_size=1)
    try:
        store = Store(pool, sched.schema)
        later = await sched.store.db_now() + timedelta(hours=1)
        await sched.schedule_bulk([JobSpec("noop", execution_time=later) for _ in range(50)])
        await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        async with pool.connection() as conn:
            await conn.execute("RESET ALL")
        for _ in range(10):
            await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert not store._claim_prepared
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT generic_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%FOR UPDATE SKIP LOCKED%"])
            assert [row[0] for row in await cur.fetchall()] == [0]
    finally:
        await pool.close()
