"""The small-table claims' session setting (store._PLAN_CUSTOM) across a server restart,
and behind a real PgBouncer in transaction mode that routes prepared statements
(docs/pgbouncer.md: PgBouncer 1.21 or later with max_prepared_statements keeps the
default prepare_threshold). PgBouncer 1.18 here, with a single server connection, so the
prepared statements reach the session that prepared them as 1.21 would route them.
"""

from __future__ import annotations

import contextlib

import psycopg

from pgsched.store import Store, open_pool

from .pgbouncer import PgBouncer


async def test_a_pooler_that_keeps_prepared_statements_gets_no_session_setting(
        cluster, cluster_sched):
    """Behind a transaction pooler a SET outlives the transaction and reaches whichever
    client gets that server connection next: another application's statements would run
    with force_custom_plan. The claims run unnamed there instead."""
    bouncer = PgBouncer(cluster, pool_size=1)
    try:
        pool = await open_pool(bouncer.dsn(), max_size=1, prepare_threshold=5)
        try:
            store = Store(pool, cluster_sched.schema)
            for _ in range(8):
                await cluster_sched.schedule("noop")
                await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        finally:
            await pool.close()
        async with await psycopg.AsyncConnection.connect(bouncer.dsn(),
                                                         autocommit=True) as other:
            mode = (await (await other.execute("SHOW plan_cache_mode")).fetchone())[0]
            # ...and the claims, planned at every run, were never given a generic plan
            plans = await (await other.execute(
                "SELECT generic_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%FOR UPDATE SKIP LOCKED%"])).fetchall()
        assert mode == "auto"
        assert [generic for generic, in plans if generic] == []
    finally:
        bouncer.destroy()


async def test_connections_replaced_after_a_server_restart_are_switched_again(
        cluster, cluster_sched):
    """A server restart ends every session the claims switched: the pool's new
    connections start with the server's default, and the small-table claims on them must
    switch again before running prepared, or PostgreSQL adopts the generic plan."""
    pool = await open_pool(cluster.app_dsn(), max_size=1, prepare_threshold=5)
    try:
        store = Store(pool, cluster_sched.schema)
        await cluster_sched.schedule("noop")
        await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        cluster.stop()
        cluster.start()
        for _ in range(8):
            # the connections the restart broke fail once: the pools replace them
            with contextlib.suppress(psycopg.OperationalError):
                await cluster_sched.schedule("noop")
            with contextlib.suppress(psycopg.OperationalError):
                await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        async with pool.connection() as conn:
            mode = (await (await conn.execute("SHOW plan_cache_mode")).fetchone())[0]
            plans = await (await conn.execute(
                "SELECT generic_plans FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%FOR UPDATE SKIP LOCKED%"])).fetchall()
        assert mode == "force_custom_plan"
        assert plans and [generic for generic, in plans if generic] == []
    finally:
        await pool.close()
