"""Due-time latency (issue 11): what the claims planned on a small table may and may not
do, against a real PostgreSQL.

- Claims planned below PREPARED_CLAIM_ROWS run prepared but are never given a generic
  plan (the plan made for a small table is the one that threshold avoids), and the
  session setting that ensures it never reaches any other prepared statement.
"""

from __future__ import annotations

from datetime import timedelta

from pgsched import JobSpec
from pgsched import store as store_module
from pgsched.store import Store, open_pool


async def _claim_statements(store: Store) -> list[tuple[int, int]]:
    """(generic plans, custom plans) of each prepared claim statement on the store's one
    connection."""
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %s", ["%FOR UPDATE SKIP LOCKED%"])
        return [tuple(row) for row in await cur.fetchall()]


async def _plan_cache_mode(store: Store) -> str:
    async with store.pool.connection() as conn:
        return (await (await conn.execute("SHOW plan_cache_mode")).fetchone())[0]


async def test_claims_on_a_small_table_are_never_planned_generic(sched, pg_dsn):
    """A store on one connection claims a dozen times from a table the statistics count
    small (never analysed): each claim is planned for its run (custom), never by the
    generic plan PostgreSQL would otherwise adopt after five runs of a prepared
    statement; a statement Store runs prepared afterwards runs with the session's own
    plan_cache_mode again."""
    pool = await open_pool(pg_dsn, max_size=1)
    try:
        store = Store(pool, sched.schema)
        later = await sched.store.db_now() + timedelta(hours=1)
        await sched.schedule_bulk([JobSpec("noop", execution_time=later)
                                   for _ in range(50)])
        for i in range(12):
            if i % 3 == 0:
                await sched.schedule("noop")
            await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert not store._claim_prepared  # the case under test: below the threshold
        statements = await _claim_statements(store)
        assert statements, "the claims ran as unnamed statements: parsed at every run"
        assert [generic for generic, _ in statements] == [0] * len(statements)
        assert sum(custom for _, custom in statements) >= 12
        assert await _plan_cache_mode(store) == "force_custom_plan"
        await store.job_statuses(["nothing"])  # any statement Store runs prepared
        assert await _plan_cache_mode(store) == "auto"
    finally:
        await pool.close()


async def test_claims_above_the_threshold_get_their_generic_plan(sched, pg_dsn, monkeypatch):
    """Once the statistics count enough pending rows (here: any count), the claims run
    prepared as before, on a session set back from the small table's custom plans:
    PostgreSQL adopts the generic plan that spares planning each claim."""
    pool = await open_pool(pg_dsn, max_size=1)
    try:
        store = Store(pool, sched.schema)
        later = await sched.store.db_now() + timedelta(hours=1)
        await sched.schedule_bulk([JobSpec("noop", execution_time=later)
                                   for _ in range(50)])
        await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert await _plan_cache_mode(store) == "force_custom_plan"
        monkeypatch.setattr(store_module, "PREPARED_CLAIM_ROWS", -1)
        for _ in range(12):
            await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert store._claim_prepared
        assert await _plan_cache_mode(store) == "auto"
        assert any(generic > 0 for generic, _ in await _claim_statements(store))
    finally:
        await pool.close()
