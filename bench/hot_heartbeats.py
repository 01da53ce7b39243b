"""How many heartbeats are HOT updates: n_tup_hot_upd / n_tup_upd on jobs.

Usage: python -m bench.hot_heartbeats --dsn DSN [--target N] [--fillfactor F]
       [--rows 10000] [--held 50] [--beats 10]

Migrates a fresh schema to version --target (default: the latest), optionally sets the
table's fillfactor, fills it with --rows pending jobs, claims --held of them as one
worker and renews their leases --beats times with Store.heartbeat_jobs (held x beats row
updates, 500 by default), then prints the table's update counters for the heartbeats
alone. Drops the schema at the end. Measures only; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import psycopg
from psycopg import sql

from pgsched.store import Store, open_pool

FILL = """
INSERT INTO {schema}.jobs (id, task, queue, execution_time)
SELECT md5(g::text), 'noop', 'default', now() - interval '1 s' FROM generate_series(1, %s) g
"""
COUNTERS = """
SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
WHERE schemaname = %s AND relname = 'jobs'
"""


async def counters(conn: psycopg.AsyncConnection, schema: str) -> tuple[int, int]:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return await (await conn.execute(COUNTERS, (schema,))).fetchone()


async def run(args: argparse.Namespace) -> dict:
    schema = f"hot_{uuid.uuid4().hex[:8]}"
    pool = await open_pool(args.dsn, max_size=1)
    store = Store(pool, schema)
    ident = sql.Identifier(schema)
    try:
        await store.migrate(args.target)
        async with pool.connection() as conn:
            if args.fillfactor:
                await conn.execute(sql.SQL("ALTER TABLE {}.jobs SET (fillfactor = {})").format(
                    ident, sql.Literal(args.fillfactor)))
            await conn.execute(sql.SQL(FILL).format(schema=ident), (args.rows,))
        claimed, _, _ = await store.claim_jobs(
            worker_id="w", limit=args.held, lease_seconds=60)
        held = [(job["id"], job["attempts"]) for job in claimed]
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_stat_force_next_flush()")
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True) as reader:
            upd0, hot0 = await counters(reader, schema)
            for _ in range(args.beats):
                assert len(await store.heartbeat_jobs(
                    worker_id="w", held=held, lease_seconds=60)) == len(held)
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_stat_force_next_flush()")
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            upd1, hot1 = await counters(reader, schema)
            updates, hot = upd1 - upd0, hot1 - hot0
            options = (await (await reader.execute(
                "SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                (f'"{schema}".jobs',))).fetchone())[0] or []
        fillfactor = next((int(o.split("=")[1]) for o in options
                           if o.startswith("fillfactor=")), 100)
        return {"version": await store.schema_version(), "fillfactor": fillfactor,
                "held": len(held), "updates": updates, "hot_updates": hot,
                "hot_ratio": round(hot / updates, 3) if updates else None}
    finally:
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--target", type=int, default=None)
    parser.add_argument("--fillfactor", type=int, default=None)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--held", type=int, default=50)
    parser.add_argument("--beats", type=int, default=10)
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
