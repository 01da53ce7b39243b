"""The flat claim (claim_jobs_flat, issue 14) against a real PostgreSQL: a worker of every
queue, with no caps and no global limits, walks one index in claim order instead of every
queue with pending jobs. What a broken flat walk would get wrong: the order across queues,
a paused queue served (with or without a due backlog), a concurrent claimer left short by
rows locked and let go, and a cost that grows with the number of queues."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from conftest import claim_params
from psycopg import sql

from pgsched.store import OneConnection, Store, open_connection, walk_bound


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


async def add(db_conn: psycopg.AsyncConnection[Any], schema: str, rows: list[tuple]) -> None:
    """rows: (id, queue, priority, execution_time)."""
    async with db_conn.cursor() as cur:
        await cur.executemany(
            sql.SQL("INSERT INTO {}.jobs (id, task, queue, priority, execution_time) "
                    "VALUES (%s, 'noop', %s, %s, %s)").format(sql.Identifier(schema)), rows)


async def fill(sched, rows: list[tuple]) -> None:
    async with sched.store.pool.connection() as conn:
        await add(conn, sched.schema, rows)


async def claim_ids(store: Store, limit: int, **kw: Any) -> list[str]:
    claimed, _, _ = await store.claim_jobs(worker_id="w", limit=limit, lease_seconds=60, **kw)
    return [job["id"] for job in claimed]


async def run_flat(store: Store, limit: int) -> list[dict[str, Any]]:
    """The flat statement itself, as the store sends it."""
    return await store._rows("claim_jobs_flat", {"worker_id": "w", "limit": limit,
                                                 "lease_seconds": 60}, times_clamped=True)


async def test_flat_claim_takes_priority_then_due_time_across_queues(sched):
    # Interleaved over three queues so that no per-queue order gives the global one.
    await fill(sched, [
        ("a-p5-old", "a", 5, ago(300)), ("b-p5-mid", "b", 5, ago(200)),
        ("c-p5-new", "c", 5, ago(100)), ("c-p0", "c", 0, ago(10)),
        ("a-p2", "a", 2, ago(20)), ("b-p2-older", "b", 2, ago(50)),
        ("b-p9", "b", 9, ago(900)), ("a-future", "a", 0, ago(-3600)),
    ])
    rows = await run_flat(sched.store, 3)
    assert not rows[0]["flat_refused"]  # this test is about the flat walk
    assert {r["id"] for r in rows} == {"c-p0", "b-p2-older", "a-p2"}
    # Through the store, one at a time: the whole order.
    taken = [await claim_ids(sched.store, 1) for _ in range(5)]
    assert taken == [["a-p5-old"], ["b-p5-mid"], ["c-p5-new"], ["b-p9"], []]
    _, next_due, _ = await sched.store.claim_jobs(worker_id="w", limit=1, lease_seconds=60)
    assert next_due is not None and next_due > datetime.now(UTC) + timedelta(minutes=50)


async def test_flat_claim_never_serves_a_paused_queue(sched):
    await fill(sched, [(f"held-{i}", "held", 1, ago(60 - i)) for i in range(50)]
               + [(f"free-{i}", "free", 5, ago(10)) for i in range(3)])
    await sched.store.pause_queues(["held"])
    # A paused due backlog lies in the flat walk's path: the flat statement refuses...
    rows = await run_flat(sched.store, 10)
    assert rows[0]["flat_refused"] and rows[0]["id"] is None
    # ... and the store's claim is served by the per-queue walks, without the paused jobs.
    assert sorted(await claim_ids(sched.store, 10)) == ["free-0", "free-1", "free-2"]
    assert await claim_ids(sched.store, 10) == []
    await sched.store.resume_queues(["held"])
    assert len(await claim_ids(sched.store, 100)) == 50


async def test_flat_claim_leaves_a_paused_queue_whose_jobs_fall_due(sched):
    # Not due when the flat walk is chosen, due by the time it walks: the walk's own
    # paused test must leave them (the flat statement sees them as due then). Made due by
    # SQL, not by sleeping past a due time a second ahead, which a loaded machine's pause
    # before the first walk could pass already.
    await fill(sched, [("held-soon", "held", 0, ago(-60)), ("free", "free", 5, ago(5))])
    await sched.store.pause_queues(["held"])
    rows = await run_flat(sched.store, 10)
    assert not rows[0]["flat_refused"] and [r["id"] for r in rows] == ["free"]
    assert rows[0]["next_due"] is not None  # the paused job may wake the worker early
    async with sched.store.pool.connection() as conn:
        await conn.execute(sql.SQL("UPDATE {}.jobs SET execution_time = now() - interval "
                                   "'1 second' WHERE id = 'held-soon'").format(
                                       sql.Identifier(sched.schema)))
    rows = await run_flat(sched.store, 10)
    assert rows[0]["flat_refused"] and rows[0]["id"] is None
    assert await claim_ids(sched.store, 10) == []


async def test_a_concurrent_claimer_is_not_short(sched, pg_dsn):
    """Three queues with 4 due jobs each, two claims of 5 at once: together they get 10.
    Claims that lock up to their limit in every queue (12 here) leave the second none."""
    await fill(sched, [(f"{q}-{i}", q, 5, ago(10 + i)) for q in "abc" for i in range(4)])
    first = await open_connection(pg_dsn)
    second = await open_connection(pg_dsn)
    try:
        async with first.transaction():  # holds its locks while the second claims
            with Store.using(OneConnection(first)):
                mine = await claim_ids(sched.store, 5)
            async with second.transaction():
                with Store.using(OneConnection(second)):
                    theirs = await claim_ids(sched.store, 5)
        assert len(mine) == 5 and len(theirs) == 5 and not set(mine) & set(theirs)
    finally:
        await first.close()
        await second.close()


async def test_a_capped_listed_or_limited_claim_keeps_its_bounds(sched):
    await fill(sched, [(f"{q}-{i}", q, 5, ago(10 + i)) for q in "ab" for i in range(5)])
    capped = await claim_ids(sched.store, 10, capped=(["a"], [1]))
    assert len(capped) == 6 and sum(i.startswith("a") for i in capped) == 1
    assert sorted(await claim_ids(sched.store, 10, queues=["a"])) == [f"a-{i}" for i in range(4)]
    await fill(sched, [(f"c-{i}", "c", 5, ago(10)) for i in range(3)])
    await sched.store.set_queue_limits("c", global_concurrency=1, set_concurrency=True)
    assert len(await claim_ids(sched.store, 10)) == 1
    assert await claim_ids(sched.store, 10) == []  # c's one running job holds its limit


async def fill_series(sched, count: int, *, queue: str, priority: str) -> None:
    """count jobs due 1..count seconds ago, queue and priority SQL expressions of g.
    Without statement_timeout: the fixture's pool has a worker's (1 s at lease 2 s), and
    20,000 rows took 0.6 s of it at a load of 3 on 2 cores."""
    async with sched.store.pool.connection() as conn:
        await conn.execute("SET statement_timeout = 0")
        try:
            await conn.execute(sql.SQL(
                "INSERT INTO {schema}.jobs (id, task, queue, priority, execution_time) "
                "SELECT 'j' || g, 'noop', {queue}, {priority}, "
                "now() - make_interval(secs => g) FROM generate_series(1, %s) g").format(
                    schema=sql.Identifier(sched.schema), queue=sql.SQL(queue),
                    priority=sql.SQL(priority)), [count])
            await conn.execute(sql.SQL("ANALYZE {}.jobs").format(sql.Identifier(sched.schema)))
        finally:
            await conn.execute("RESET statement_timeout")  # the pool's again


def scans_of_jobs(plan: dict[str, Any]) -> list[tuple[int, int]]:
    """(loops, rows read) of every executed scan of the jobs table in the plan."""
    here = []
    if plan.get("Relation Name") == "jobs" and plan.get("Actual Loops", 0):
        here.append((plan["Actual Loops"], (plan.get("Actual Rows", 0)
                                            + plan.get("Rows Removed by Filter", 0))
                     * plan["Actual Loops"]))
    return here + [s for child in plan.get("Plans", ()) for s in scans_of_jobs(child)]


async def test_flat_claim_at_1000_queues_walks_no_queue(sched):
    """Structural, not timed: the per-queue walks probe each of the 1,000 queues; a walk
    that sorts the due rows of a priority instead of following the index reads 1,666."""
    await fill_series(sched, 5000, queue="'q' || (g %% 1000)", priority="g %% 3")
    flat = await plan(sched, "claim_jobs_flat")
    assert max(loops for loops, _ in flat) <= 10 and sum(rows for _, rows in flat) < 100
    per_queue = await plan(sched, "claim_jobs_unlimited")
    assert max(loops for loops, _ in per_queue) >= 1000  # what the flat walk spares


async def test_a_claim_at_one_queue_reads_only_what_it_takes(sched):
    """The store's choice (one_queue) must not cost a scan of the table at one queue."""
    await fill_series(sched, 20000, queue="'default'", priority="5")
    for name in ("claim_jobs_unlimited", "claim_jobs_flat"):
        assert sum(rows for _, rows in await plan(sched, name)) < 100, name


async def plan(sched, name: str) -> list[tuple[int, int]]:
    """(loops, rows read) of each scan of jobs in one claim of 10, rolled back."""
    params = claim_params()
    async with sched.store.pool.connection() as conn, conn.transaction(force_rollback=True):
        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sched.store._q[name],
                                 params)
        return scans_of_jobs((await cur.fetchone())[0][0]["Plan"])


class RecordingStore(Store):
    """A store that notes which claim statements it ran (the real ones, on the database)."""

    ran: list[str]

    async def _rows(self, name: str, params: dict[str, Any], **kw: Any) -> list[dict[str, Any]]:
        self.ran.append(name)
        return await super()._rows(name, params, **kw)


async def test_the_store_walks_flat_at_one_queue_as_at_many(sched):
    """One statement for a worker of every queue, however many queues have jobs: the flat
    walk, with its walk bound for the claim's limit."""
    store = RecordingStore(sched.store.pool, sched.schema)
    store.ran = []
    await fill(sched, [(f"a-{i}", "a", 5, ago(10 + i)) for i in range(20)])
    for _ in range(3):
        await claim_ids(store, 2)
    await fill(sched, [("b-0", "b", 0, ago(1))])
    assert await claim_ids(store, 1) == ["b-0"]
    assert sorted(await claim_ids(store, 3)) == ["a-11", "a-12", "a-13"]  # the oldest left
    assert store.ran == ["claim_jobs_flat/8"] * 5


async def test_a_claim_larger_than_a_smaller_walk_bound_keeps_priority_order(sched):
    """Each priority's walk stops at the walk bound: below the claim's limit, a priority
    with more due jobs than the bound would give way to the next one too early."""
    await fill(sched, [(f"p0-{i:03}", "a", 0, ago(1000 - i)) for i in range(100)]
               + [(f"p1-{i:03}", "b", 1, ago(2000)) for i in range(100)])
    for limit in (3, 9, 33, 70):
        async with sched.store.pool.connection() as conn, conn.transaction(force_rollback=True):
            with Store.using(OneConnection(conn)):
                taken = await claim_ids(sched.store, limit)
        assert taken and sorted(taken) == [f"p0-{i:03}" for i in range(limit)], limit


def test_the_walk_bound_is_the_power_of_two_at_or_above_the_limit():
    for limit in range(1, 3000):
        bound = walk_bound(limit)
        assert limit <= bound < 2 * limit or bound == 8 > limit
        assert bound & (bound - 1) == 0
