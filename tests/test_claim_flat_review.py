"""Review attacks on the prepared flat claim (claim_jobs_flat with its walk bound, and the
PREPARED_CLAIM_ROWS rule that decides whether claims are prepared), against a real
PostgreSQL and real concurrent claimers. Each test names what a broken change gets wrong."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import psycopg
import pytest
import test_claim_flat_adversary as adversary
from conftest import audit_counts, audit_env, wait_until, write_config
from psycopg import sql
from test_claim_flat import claim_ids, fill_series
from test_claim_flat_adversary import claim_plans, rows_read

from pgsched import JobSpec, Scheduler
from pgsched.store import PREPARED_CLAIM_ROWS, OneConnection, Store, open_connection, walk_bound

# Seeds analysed before the claims that make the generic plans, and the growth that comes
# after them, unanalysed. SQL with {jobs} for the table; g numbers the rows.
INSERT = ("INSERT INTO {jobs} (id, task, queue, priority, execution_time, status, "
          "finished_at) SELECT '{tag}' || g, 'noop', {queue}, {priority}, {due}, "
          "'{status}', {finished} FROM generate_series(1, {count}) g")


def rows(tag: str, count: int, *, queue: str = "'t' || (g % 1000)",
         priority: str = "g % 3", due: str = "now() - make_interval(secs => g)",
         status: str = "pending") -> str:
    return INSERT.format(jobs="{jobs}", tag=tag, queue=queue, priority=priority, due=due,
                         status=status, count=count,
                         finished="now()" if status == "completed" else "NULL")


async def run(conn, schema: str, statement: str) -> None:
    await conn.execute(sql.SQL(statement).format(
        jobs=sql.Identifier(schema, "jobs")))


async def read_after_growth(sched, seed: list[str], grow: list[str], *,
                            limit: int = 10, settle: Any = None,
                            **claim: Any) -> tuple[int, dict, int]:
    """Rows of jobs and its indexes read by one claim of `limit` on a connection that
    claimed twelve times after `seed` was analysed, once `grow` has run (not analysed:
    autovacuum is off, as between two of its passes) and then `settle(conn)`, if given;
    its claim plans; how many it took."""
    async with sched.store.pool.connection() as conn:
        await run(conn, sched.schema, "ALTER TABLE {jobs} SET (autovacuum_enabled = false)")
        await conn.execute("SET statement_timeout = 0")
        for statement in seed:
            await run(conn, sched.schema, statement)
        await run(conn, sched.schema, "VACUUM (ANALYZE) {jobs}")
        with Store.using(OneConnection(conn)):
            for _ in range(12):
                await sched.store.claim_jobs(worker_id="w", limit=limit, lease_seconds=60,
                                             **claim)
            for statement in grow:
                await run(conn, sched.schema, statement)
            if settle is not None:
                await settle(conn)
            async with conn.transaction(force_rollback=True):
                taken = len(await claim_ids(sched.store, limit, **claim))
                return await rows_read(conn, sched.schema), await claim_plans(conn), taken


FUTURE = "now() + interval '7 days' + make_interval(secs => g)"
SCENARIOS = {
    # analysed while every pending job was due next week: `execution_time <= now()`
    # looked empty when the plan was made
    "all_future": ([rows("f", 20000, due=FUTURE)], [rows("n", 200000)]),
    # analysed at one priority, the growth at others
    "one_priority_then_many": ([rows("o", 20000, priority="5")],
                               [rows("n", 200000, priority="g % 10")]),
    "many_priorities_then_one": ([rows("m", 20000, priority="g % 10")],
                                 [rows("n", 200000, priority="0")]),
    # analysed large, then emptied by a mass delete (reltuples keeps its count), then grown
    "mass_delete": ([rows("d", 20000)], ["DELETE FROM {jobs}", rows("n", 200000)]),
    # one queue, as many single-tenant deployments run
    "one_queue": ([rows("q", 20000, queue="'default'")],
                  [rows("n", 200000, queue="'default'")]),
    # history ahead of the due rows in time, 99 finished to 1 pending
    # emptied by TRUNCATE after the plans were made (reltuples goes to -1), then grown
    "truncate": ([rows("d", 20000)], ["TRUNCATE {jobs} CASCADE", rows("n", 200000)]),
    "history_ahead": ([rows("h", 20000, status="completed"), rows("p", 200)],
                      [rows("hh", 200000, status="completed"), rows("n", 2000)]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_a_prepared_claim_stays_on_the_indexes_after_the_table_grows(sched, scenario):
    seed, grow = SCENARIOS[scenario]
    read, plans, taken = await read_after_growth(sched, seed, grow)
    assert taken == 10
    assert read < 300, f"{scenario}: one claim of 10 read {read} rows ({plans})"


@pytest.mark.parametrize("claim", [{}, {"queues": [f"t{i}" for i in range(10)]}],
                         ids=["flat", "per_queue"])
async def test_a_claim_after_a_burst_into_a_drained_table_reads_only_what_it_takes(
        sched, claim):
    """The everyday idle state: every job finished, autovacuum has analysed the history;
    then a burst of jobs is enqueued. Analysed with no pending row, PostgreSQL expects one,
    and every claim, planned or prepared, read a pending index whole and sorted it (one
    claim of 10 read 550,010 rows flat, 4,000,010 per queue) until the next ANALYZE. The
    first full claim after the burst marks the statistics suspect; the worker's next
    maintenance pass (this check, as Maintenance.run_once makes it) analyses jobs; from
    then on the claims follow the due index."""

    async def flush_counts(conn) -> None:
        """This session's row counts into the shared statistics now (else within a
        second or so of going idle): the burst's for the check, then those of the claims
        before the measured one, out of what it reads."""
        await conn.execute("SELECT pg_stat_force_next_flush()")
        await conn.execute("SELECT 1")

    async def maintenance_pass(conn) -> None:
        await flush_counts(conn)
        assert len(await claim_ids(sched.store, 10, **claim)) == 10
        assert sched.store.statistics_suspect
        assert await sched.store.refresh_pending_statistics() == ("analyzed", "")
        assert not sched.store.statistics_suspect
        await flush_counts(conn)

    read, plans, taken = await read_after_growth(
        sched, [rows("h", 20000, status="completed")],
        [rows("n", 50000, queue="'t' || (g % 10)")], settle=maintenance_pass, **claim)
    assert taken == 10
    assert read < 2000, f"one claim of 10 read {read} rows ({plans})"


async def claim_order(sched, conn) -> list[str]:
    """Pending due jobs in claim order (priority, due time, id), as `conn` sees them."""
    cur = await conn.execute(sql.SQL(
        "SELECT id FROM {} WHERE status = 'pending' AND execution_time <= now() "
        "ORDER BY priority, execution_time, id").format(sql.Identifier(sched.schema, "jobs")))
    return [row[0] for row in await cur.fetchall()]


async def test_a_prepared_claim_past_rows_another_claim_holds_takes_its_whole_limit(
        sched, pg_dsn):
    """The walk bound limits what each priority's walk returns: rows skipped because
    another claim holds them must not count against it, or a claim of N behind a held
    block comes back short (or takes the next priority too early)."""
    await fill_series(sched, PREPARED_CLAIM_ROWS + 2000, queue="'t' || (g %% 1000)",
                      priority="(g / 4000)::int")  # long runs of one priority
    holder = await open_connection(pg_dsn)
    claimer = await open_connection(pg_dsn)
    try:
        with Store.using(OneConnection(claimer)):
            for _ in range(8):  # prepared, generic plans made
                assert len(await claim_ids(sched.store, 3)) == 3
        async with holder.transaction():
            with Store.using(OneConnection(holder)):
                held = set(await claim_ids(sched.store, 600))
            assert len(held) == 600
            for limit in (1, 8, 9, 16, 17, 100):
                expected = [i for i in await claim_order(sched, claimer) if i not in held]
                with Store.using(OneConnection(claimer)):
                    taken = await claim_ids(sched.store, limit)
                assert sorted(taken) == sorted(expected[:limit]), (
                    limit, sorted(set(taken) - set(expected[:limit])),
                    sorted(set(expected[:limit]) - set(taken)))
        plans = await claim_plans(claimer)
        assert plans.get("flat", (0, 0))[0] >= 1, plans  # the generic plan was the one run
    finally:
        await holder.close()
        await claimer.close()


async def test_concurrent_prepared_claimers_take_every_due_job_exactly_once(sched, pg_dsn):
    """Six connections claim at once, each a random limit from 1 to 40 (so every walk
    bound from 8 to 64), until nothing is due: no job twice, none left behind."""
    total = PREPARED_CLAIM_ROWS + 500
    await fill_series(sched, total, queue="'t' || (g %% 300)", priority="g %% 10")
    taken: Counter[str] = Counter()
    generic = []

    async def claimer(seed: int) -> None:
        rng = random.Random(seed)
        conn = await open_connection(pg_dsn)
        try:
            with Store.using(OneConnection(conn)):
                empty = 0
                while empty < 3:
                    got = await claim_ids(sched.store, rng.randint(1, 40))
                    taken.update(got)
                    empty = 0 if got else empty + 1
            generic.append((await claim_plans(conn)).get("flat", (0, 0))[0])
        finally:
            await conn.close()

    await asyncio.gather(*(claimer(n) for n in range(6)))
    assert [job for job, count in taken.items() if count > 1] == []
    assert len(taken) == total
    assert sum(generic) >= 6  # the prepared statements ran their generic plans


async def test_a_connection_prepares_one_flat_claim_per_walk_bound(sched, pg_dsn):
    """Memory per connection: claims of every limit from 1 to 300 prepare one flat claim
    per power of two (8 to 512), not one per limit."""
    await fill_series(sched, PREPARED_CLAIM_ROWS, queue="'t' || (g %% 10)", priority="g %% 3")
    conn = await open_connection(pg_dsn)
    try:
        with Store.using(OneConnection(conn)):
            for limit in range(1, 301):
                await claim_ids(sched.store, limit)  # committed: a rollback deallocates
        cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements "
                                 "WHERE statement LIKE '%flat_priorities AS%'")
        assert (await cur.fetchone())[0] == len({walk_bound(n) for n in range(1, 301)}) == 7
    finally:
        await conn.close()


async def test_prepared_sized_claims_run_unprepared_through_pgbouncer(cluster, schema):
    """prepare_threshold None (PgBouncer in transaction mode): however large jobs is, no
    claim statement is prepared, or the next transaction on another server connection
    fails with 'prepared statement ... does not exist'."""
    from faults.pgbouncer import PgBouncer

    cluster.start()
    bouncer = PgBouncer(cluster)
    try:
        async with Scheduler(cluster.app_dsn(), schema=schema) as direct:
            await direct.migrate()
            await fill_series(direct, PREPARED_CLAIM_ROWS + 1000, queue="'t' || (g %% 50)",
                              priority="g %% 3")
        async with Scheduler(bouncer.dsn(), schema=schema, prepare_threshold=None,
                             pool_size=6) as pooled:
            taken: Counter[str] = Counter()

            async def claims(limit: int) -> None:
                for _ in range(10):
                    taken.update(await claim_ids(pooled.store, limit))

            await asyncio.gather(*(claims(limit) for limit in (1, 7, 9, 20, 33, 64)))
        assert sum(taken.values()) == 10 * (1 + 7 + 9 + 20 + 33 + 64)
        assert max(taken.values()) == 1
        assert "prepared statement" not in bouncer.log
    finally:
        bouncer.destroy()
        with psycopg.connect(cluster.superuser_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def warmed(sched, pg_dsn, limit: int) -> psycopg.AsyncConnection[Any]:
    """A connection whose flat claim for `limit` runs its generic plan (jobs must count at
    least PREPARED_CLAIM_ROWS rows, analysed): eight committed claims of `limit` on it."""
    conn = await open_connection(pg_dsn)
    with Store.using(OneConnection(conn)):
        for _ in range(8):
            await claim_ids(sched.store, limit)
    assert (await claim_plans(conn)).get("flat", (0, 0))[0] >= 1
    return conn


async def lockable_due(sched, conn) -> int:
    cur = await conn.execute(sql.SQL(
        "SELECT count(*) FROM (SELECT 1 FROM {} WHERE status = 'pending' "
        "AND execution_time <= now() FOR UPDATE SKIP LOCKED) s").format(
            sql.Identifier(sched.schema, "jobs")))
    return (await cur.fetchone())[0]


async def test_a_generic_plan_claim_locks_only_what_it_takes(sched, pg_dsn):
    """Issue 14: the walk bound is above the claim's limit (8 for 5, 64 for 33); the
    generic plan must still stop locking at the limit, not at the bound."""
    await fill_series(sched, PREPARED_CLAIM_ROWS + 2000, queue="'t' || (g %% 1000)",
                      priority="g %% 3")
    other = await open_connection(pg_dsn)
    try:
        for limit in (5, 33):
            conn = await warmed(sched, pg_dsn, limit)
            try:
                before = await lockable_due(sched, other)
                async with conn.transaction(force_rollback=True):
                    with Store.using(OneConnection(conn)):
                        assert len(await claim_ids(sched.store, limit)) == limit
                    assert await lockable_due(sched, other) == before - limit
            finally:
                await conn.close()
    finally:
        await other.close()


async def test_a_generic_plan_claim_fills_its_limit_past_future_and_paused_rows(
        sched, pg_dsn):
    """Rows the walk passes over must not count against its bound: a claim of 8 takes
    the 5 due jobs of priority 0 behind 3,000 future ones and the 3 oldest of priority
    1; a paused queue's job is never taken, before or after it falls due."""
    await fill_series(sched, PREPARED_CLAIM_ROWS, queue="'bulk'", priority="2")
    conn = await warmed(sched, pg_dsn, 3)
    try:
        async with sched.store.pool.connection() as writer:  # not analysed
            for statement in (
                    rows("fut", 3000, queue="'t' || (g % 50)", priority="0", due=FUTURE),
                    rows("due0-", 5, queue="'t' || g", priority="0"),
                    rows("due1-", 100, queue="'u' || (g % 7)", priority="1"),
                    rows("held", 1, queue="'held'", priority="0",
                         due="now() + interval '1 second'")):
                await run(writer, sched.schema, statement)
        await sched.store.pause_queues(["held"])
        with Store.using(OneConnection(conn)):
            taken = await claim_ids(sched.store, 8)
            assert sorted(taken) == sorted([f"due0-{g}" for g in range(1, 6)]
                                           + ["due1-100", "due1-99", "due1-98"])
            await asyncio.sleep(1.1)  # held falls due: the flat walk is refused
            taken = await claim_ids(sched.store, 100)
            assert "held1" not in taken and len(taken) == 100
            assert {f"due1-{g}" for g in range(1, 98)} <= set(taken)
        assert (await claim_plans(conn))["flat"][0] >= 2
    finally:
        await conn.close()


async def test_a_generic_plan_made_while_few_jobs_were_pending_never_sorts_a_burst(sched):
    """jobs held 20,000 rows of history and 60 pending ones when analysed: the table is
    large, but the generic plan PostgreSQL makes then expects two due rows a priority and
    fetches them by a bitmap scan and a sort; after a burst of 50,000 jobs that sorts
    every due row of the priority at every claim: 17,356 rows read for 10. (Planned at
    that claim, it follows the due index: 680 rows read, then 20 to 40 a claim.)"""
    read, plans, taken = await read_after_growth(
        sched, [rows("h", 20000, status="completed"), rows("p", 60)],
        [rows("n", 50000, queue="'t' || (g % 10)")])
    assert taken == 10
    assert read < 2000, f"one claim of 10 read {read} rows ({plans})"



async def test_worker_processes_claiming_prepared_run_every_job_once(
        sched, pg_dsn, schema, tmp_path, workers):
    """Real workers, two of every queue (the flat claim, prepared: more than
    PREPARED_CLAIM_ROWS pending rows analysed) and one of two listed queues, over 10,400
    jobs at ten priorities: every job runs once and none is left pending."""
    await fill_series(sched, PREPARED_CLAIM_ROWS + 200, queue="'t' || (g %% 40)",
                      priority="g %% 10")
    async with sched.store.pool.connection() as conn:  # the filler runs the noop task
        await run(conn, schema, "UPDATE {jobs} SET task = 'noop'")
    specs = [JobSpec("record", args=(f"r-{i}",), queue=f"t{i % 40}", priority=i % 10)
             for i in range(200)]
    await sched.schedule_bulk(specs)
    config = write_config(tmp_path, pg_dsn, schema, concurrency=8, poll_seconds=60)
    env = audit_env(pg_dsn, schema)
    for args in ((), (), ("--queues", "t0,t1")):
        workers(config, *args, env=env)

    async def left() -> int:
        async with sched.store.pool.connection() as conn:
            cur = await conn.execute(sql.SQL(
                "SELECT count(*) FROM {} WHERE status <> 'completed'").format(
                    sql.Identifier(schema, "jobs")))
            return (await cur.fetchone())[0]

    await wait_until(lambda: _is_zero(left()), timeout=120, what="every job completed")
    counts = audit_counts(pg_dsn, schema)
    assert set(counts) == {spec.args[0] for spec in specs} and set(counts.values()) == {1}
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE attempts <> 1").format(
            sql.Identifier(schema, "jobs")))
        assert (await cur.fetchone())[0] == 0  # none claimed twice


async def _is_zero(count) -> bool:
    return await count == 0




async def test_prepared_claims_keep_global_limits_rates_caps_and_lists(sched, pg_dsn):
    """At a prepared size every claim statement still keeps the bounds it did when
    planned at each claim: a global concurrency of 3, a rate of 4 a minute, a per-worker
    cap of 2, and a worker's queue list, over twenty claims of 10 each."""
    await fill_series(sched, PREPARED_CLAIM_ROWS + 500, queue="'t' || (g %% 20)",
                      priority="g %% 10")
    async with sched.store.pool.connection() as conn:
        for queue in ("conc", "rated", "capped"):
            await run(conn, sched.schema, rows(queue, 50, queue=f"'{queue}'", priority="0",
                                               due="now() - interval '1 day'"))
    await sched.store.set_queue_limits("conc", global_concurrency=3, set_concurrency=True)
    await sched.store.set_queue_limits("rated", rate=(4, 60.0), set_rate=True)
    conn = await open_connection(pg_dsn)
    try:
        taken: list[str] = []
        with Store.using(OneConnection(conn)):
            for _ in range(20):
                taken += await claim_ids(sched.store, 10, capped=(["capped"], [2 - min(
                    2, sum(j.startswith("capped") for j in taken))]))
                listed = await claim_ids(sched.store, 10, queues=["t3"])
                assert listed and all(int(j[1:]) % 20 == 3 for j in listed), listed
        plans = await claim_plans(conn)
    finally:
        await conn.close()
    assert sum(j.startswith("conc") for j in taken) == 3
    assert sum(j.startswith("rated") for j in taken) == 4
    assert sum(j.startswith("capped") for j in taken) == 2
    assert plans.get("per_queue", (0, 0))[0] >= 1, plans  # generic plans did the work


async def test_concurrent_prepared_claims_under_pause_and_limit_changes_take_each_job_once(
        sched, pg_dsn):
    """The adversary's race (six claimers, a queue paused and resumed over and over, a
    global limit appearing) at a prepared size: 10,500 jobs due next week, analysed,
    make every claim statement run prepared."""
    async with sched.store.pool.connection() as conn:
        await run(conn, sched.schema, rows("later", PREPARED_CLAIM_ROWS + 500,
                                           queue="'later'", due=FUTURE))
        await run(conn, sched.schema, "ANALYZE {jobs}")
    await adversary.test_concurrent_claims_under_pause_and_limit_changes_take_each_job_once(
        sched, pg_dsn)
    async with sched.store.pool.connection() as conn:
        assert sum(generic for generic, _ in (await claim_plans(conn)).values()) >= 1


async def test_claims_go_on_without_the_due_index(sched):
    """The claim reads the due index's row count to decide whether to prepare the next
    one: an index dropped by an operator (rebuilding it by hand, or between the DROP and
    the CREATE of a migration run again) must cost speed, never every claim."""
    await fill_series(sched, 30, queue="'t' || (g %% 3)", priority="g %% 3")
    async with sched.store.pool.connection() as conn:
        await conn.execute(sql.SQL("DROP INDEX {}").format(
            sql.Identifier(sched.schema, "jobs_pending_ordinary_due_idx")))
    assert len(await claim_ids(sched.store, 10)) == 10
