"""Claim cost against the number of queues with pending jobs (issue 14, per-tenant queues).

Usage: python -m bench.claim_queues --dsn DSN [--queues 1,10,100,1000] [--jobs 20000]
       [--claims 50] [--limit 10]

For each queue count, a fresh schema holds --jobs due jobs spread evenly over that many
queues; one worker then claims --limit jobs --claims times, first serving every queue
(queues found by the loose index scan), then with every queue listed by name, and the
p50/p95 of Store.claim_jobs are printed in ms. Measures only; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from psycopg import sql

from pgsched.store import Store, open_pool

FILL = """
INSERT INTO {schema}.jobs (id, task, queue, priority, execution_time)
SELECT md5(g::text), 'noop', 'q' || (g %% %(queues)s), CASE WHEN g %% 5 = 0 THEN 1 ELSE 5 END,
       now() - interval '1 s'
FROM generate_series(1, %(jobs)s) g
"""


async def one(dsn: str, queues: int, args: argparse.Namespace) -> dict:
    schema = f"claimq_{uuid.uuid4().hex[:8]}"
    pool = await open_pool(dsn, max_size=2)
    store = Store(pool, schema)
    ident = sql.Identifier(schema)
    result: dict = {"queues": queues}
    try:
        await store.migrate()
        async with pool.connection() as conn:
            await conn.execute(sql.SQL(FILL).format(schema=ident),
                               {"queues": queues, "jobs": args.jobs})
            await conn.execute(sql.SQL("VACUUM ANALYZE {}.jobs").format(ident))
        names = [f"q{n}" for n in range(queues)]
        for label, served in (("all_queues", None), ("listed_queues", names)):
            times = []
            for _ in range(args.claims):
                started = time.perf_counter()
                claimed, _, _ = await store.claim_jobs(
                    worker_id="w", limit=args.limit, lease_seconds=60,
                    queues=served)
                times.append((time.perf_counter() - started) * 1000)
                assert len(claimed) == args.limit
            times.sort()
            result[label] = {"p50_ms": round(statistics.median(times), 2),
                             "p95_ms": round(times[round(0.95 * (len(times) - 1))], 2)}
        return result
    finally:
        async with pool.connection() as conn:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        await pool.close()


async def run(args: argparse.Namespace) -> None:
    for queues in (int(q) for q in args.queues.split(",")):
        print(json.dumps(await one(args.dsn, queues, args)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--queues", default="1,10,100,1000")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--claims", type=int, default=50)
    parser.add_argument("--limit", type=int, default=10)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
