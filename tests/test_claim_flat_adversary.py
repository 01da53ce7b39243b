"""Attacks on the flat claim (claim_jobs_flat, issue 14) against a real PostgreSQL: what
its invariants (sql/queries.sql, block claim_jobs) promise and a broken walk, check or
store choice would get wrong. Each test names the promise it holds the claim to."""

from __future__ import annotations

from typing import Any

from test_claim_flat import fill_series, scans_of_jobs

CLAIM_OF_10 = {"worker_id": "w", "limit": 10, "lease_seconds": 60, "queues": None,
               "capped_queues": [], "capped_free": [], "limit_recheck_seconds": 0.5}


async def explain(sched, name: str) -> dict[str, Any]:
    """The executed plan of one claim of 10 by statement `name`, rolled back."""
    async with sched.store.pool.connection() as conn, conn.transaction(force_rollback=True):
        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sched.store._q[name],
                                 CLAIM_OF_10)
        return (await cur.fetchone())[0][0]["Plan"]


async def test_an_idle_paused_queue_costs_the_flat_claim_no_scan_of_the_table(sched):
    """A paused queue without pending jobs (paused, then drained or never used) must cost
    the flat check an index probe: a probe planned as a scan of jobs stops only at a
    pending row of that queue, so it reads every row of the table (history included) at
    every claim."""
    await fill_series(sched, 20000, queue="'q' || (g %% 50)", priority="g %% 3")
    await sched.store.pause_queues(["idle"])
    plan = await explain(sched, "claim_jobs_flat")
    read = sum(rows for _, rows in scans_of_jobs(plan))
    assert read < 100, f"the flat claim read {read} rows of jobs for 10 jobs"
