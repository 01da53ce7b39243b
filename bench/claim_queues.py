"""The `queues` scenario (opt-in, issue 14's per-tenant queues): claim cost against the
number of queues with jobs due.

For each count in Sizes.claim_queues, a fresh schema holds Sizes.claim_queues_jobs due
jobs spread evenly over that many queues (a fifth at priority 1, the rest at 5); one
store then claims 10 jobs Sizes.claim_queues_claims times, first as a worker of every
queue (the flat walk, claim_jobs_flat, prepared from PREPARED_CLAIM_ROWS rows on),
then with every queue listed by name (the per-queue walks), each claim timed from the
client around Store.claim_jobs.

Metrics: queues_<n>_all_p50_ms/_p95_ms/_max_ms and queues_<n>_listed_..., in ms. The
target (report.py): a worker of every queue claims as fast at 1,000 queues as at 1, within
2x (p50). Failure: BenchError if a claim comes back short of its 10 jobs.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg import sql

from pgsched.store import Store, open_pool

from .harness import BenchError, Harness
from .scenarios import percentiles

Metrics = dict[str, Any]

FILL = """
INSERT INTO {schema}.jobs (id, task, queue, priority, execution_time)
SELECT md5(g::text), 'noop', 'q' || (g %% %(queues)s), CASE WHEN g %% 5 = 0 THEN 1 ELSE 5 END,
       now() - interval '1 s'
FROM generate_series(1, %(jobs)s) g
"""
LIMIT = 10


async def claim_queues(h: Harness) -> Metrics:
    metrics: Metrics = {}
    for queues in h.sizes.claim_queues:
        metrics.update(await _one(h, queues))
    return metrics


async def _one(h: Harness, queues: int) -> Metrics:
    schema = await h.fresh_schema(f"queues_{queues}")
    pool = await open_pool(h.dsn, max_size=1)
    metrics: Metrics = {}
    try:
        store = Store(pool, schema)
        async with pool.connection() as conn:
            await conn.execute(sql.SQL(FILL).format(schema=sql.Identifier(schema)),
                               {"queues": queues, "jobs": h.sizes.claim_queues_jobs})
        await h.analyze(schema)
        names = [f"q{n}" for n in range(queues)]
        for label, served in (("all", None), ("listed", names)):
            times = []
            for _ in range(h.sizes.claim_queues_claims):
                started = time.perf_counter()
                claimed, _, _ = await store.claim_jobs(
                    worker_id="bench", limit=LIMIT, lease_seconds=60, queues=served)
                times.append((time.perf_counter() - started) * 1000)
                if len(claimed) != LIMIT:
                    raise BenchError(f"queues: a claim at {queues} queues took "
                                     f"{len(claimed)} of {LIMIT} due jobs")
            metrics.update(percentiles(times, f"queues_{queues}_{label}"))
        return metrics
    finally:
        await pool.close()
        await h.drop_schema(schema)
