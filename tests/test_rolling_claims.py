"""Claims of the previous release against the schema of this one (a rolling deploy: the
first new worker migrates at start, and the old ones go on claiming until they are
replaced). Their statement text is tests/claims_0019.sql, the release before migration
0020. Each must still find its rows by walking an index, as test_claim_flat_adversary
counts rows read: a claim planned as a scan of jobs reads the table at every poll."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg import sql
from test_claim_flat import scans_of_jobs

from pgsched.store import _bind, _variants, parse_named_blocks

CLAIM_OF_10 = {"worker_id": "w", "limit": 10, "lease_seconds": 60, "queues": None,
               "capped_queues": [], "capped_free": [], "limit_recheck_seconds": 0.5}


def claims_0019() -> dict[str, str]:
    text = (Path(__file__).parent / "claims_0019.sql").read_text("utf-8")
    return {name: variant for block, body in parse_named_blocks(text).items()
            for name, variant in _variants(block, body)}


@pytest.mark.xfail(strict=True, reason=(
    "design: migration 0020 drops jobs_pending_queue_idx and jobs_pending_due_idx, whose "
    "predicate (status = 'pending') is the only one the previous release's loose scans, "
    "next_due and paused probes prove (they say no `NOT suspect`); its claims then read "
    "700,076 (claim_jobs) and 1,000,030 (claim_jobs_flat) rows for 10 jobs among 100,000. "
    "Keeping the old indexes until a later migration, or a documented stop-the-fleet "
    "upgrade to 0020, is the lead's call"))
@pytest.mark.parametrize("queues", [None, ["q1", "q2"]], ids=["every-queue", "listed"])
@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_unlimited", "claim_jobs_flat"])
async def test_a_claim_of_the_previous_release_walks_an_index_after_the_migration(
        sched, name, queues):
    async with sched.store.pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute(sql.SQL(
            "INSERT INTO {s}.jobs (id, task, queue, priority, execution_time) "
            "SELECT 'j' || g, 'noop', 'q' || (g % 5), g % 3, CASE WHEN g < 100"
            " THEN now() - interval '1 minute' ELSE now() + make_interval(secs => g) END "
            "FROM generate_series(1, 100000) g").format(s=sql.Identifier(sched.schema)))
        await conn.execute(sql.SQL("ANALYZE {}.jobs").format(sql.Identifier(sched.schema)))
    statement = _bind(claims_0019()[name], sched.schema)
    async with sched.store.pool.connection() as conn, conn.transaction(force_rollback=True):
        await conn.execute("SET LOCAL statement_timeout = 0")
        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement,
                                 dict(CLAIM_OF_10, queues=queues))
        plan = (await cur.fetchone())[0][0]["Plan"]
    read = sum(rows for _, rows in scans_of_jobs(plan))
    assert read < 1000, f"{name} of the previous release read {read} rows for 10 jobs"
