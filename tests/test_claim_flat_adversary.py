"""Attacks on the flat claim (claim_jobs_flat, issue 14) against a real PostgreSQL: what
its invariants (sql/queries.sql, block claim_jobs) promise and a broken walk, check or
store choice would get wrong. Each test names the promise it holds the claim to."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import audit_counts, audit_env, claim_params, wait_until, write_config
from psycopg import sql
from test_claim_flat import ago, claim_ids, fill, fill_series, run_flat, scans_of_jobs

from pgsched import JobSpec
from pgsched.store import PREPARED_CLAIM_ROWS, OneConnection, Store

CLAIM_OF_10 = claim_params()


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


async def test_a_paused_queue_with_future_jobs_costs_the_flat_claim_no_scan_of_the_table(
        sched):
    """A paused queue with jobs, none due, costs the flat check one probe per priority.
    With few queues and priorities in the statistics, PostgreSQL planned an unordered
    probe (LIMIT 1) as a scan of jobs expected to stop early; nothing is due, so each of
    the ten read the whole table, at every claim."""
    async with sched.store.pool.connection() as conn:
        await conn.execute(sql.SQL(
            "INSERT INTO {}.jobs (id, task, queue, priority, execution_time) "
            "SELECT 'later' || g, 'noop', 'paused', 5, now() + interval '1 hour' "
            "FROM generate_series(1, 5) g").format(sql.Identifier(sched.schema)))
    await fill_series(sched, 20000, queue="'a' || (g %% 2)", priority="g %% 3")
    await sched.store.pause_queues(["paused"])
    read = sum(rows for _, rows in scans_of_jobs(await explain(sched, "claim_jobs_flat")))
    assert read < 100, f"the flat claim read {read} rows of jobs for 10 jobs"


async def test_flat_and_listed_workers_run_every_due_job_once_before_the_poll(
        sched, pg_dsn, schema, tmp_path, workers):
    """Real workers, two of every queue (flat claims) and one of two listed queues (the
    per-queue walk, which locks up to its limit in each queue and lets the surplus go):
    every job of a queue that is not paused runs exactly once, those falling due while
    the workers run included, and none waits for the 60 s poll; the paused queue's due
    backlog and future jobs stay pending."""
    now = datetime.now(UTC)
    rng = random.Random(14)
    specs = [JobSpec("record", args=(f"q{i % 30}-{i}",), queue=f"q{i % 30}",
                     priority=rng.randrange(10),
                     execution_time=now + timedelta(seconds=rng.uniform(-30, 4)))
             for i in range(600)]
    held = [JobSpec("record", args=(f"held-{i}",), queue="held", priority=i % 10,
                    execution_time=now + timedelta(seconds=rng.uniform(-30, 4)))
            for i in range(60)]
    await sched.store.pause_queues(["held"])
    await sched.schedule_bulk(specs + held)
    config = write_config(tmp_path, pg_dsn, schema, concurrency=6, poll_seconds=60)
    env = audit_env(pg_dsn, schema)
    for args in ((), (), ("--queues", "q0,q1")):
        workers(config, *args, env=env)
    expected = {spec.args[0] for spec in specs}
    await wait_until(lambda: len(audit_counts(pg_dsn, schema)) >= len(expected), timeout=45,
                     what="every job of the served queues to run")
    counts = audit_counts(pg_dsn, schema)
    assert set(counts) == expected and set(counts.values()) == {1}
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.jobs WHERE queue = 'held' "
                                         "AND status = 'pending'").format(sql.Identifier(schema)))
        assert (await cur.fetchone())[0] == len(held)


async def test_a_burst_worker_of_every_queue_runs_every_due_job_and_leaves_the_paused(
        sched, pg_dsn, schema, tmp_path, workers):
    """A burst worker stops at its first short claim: a flat claim refused for a paused
    queue's due backlog, or one that came back short, would end it with jobs left."""
    now = datetime.now(UTC)
    specs = [JobSpec("record", args=(f"q{i % 25}-{i}",), queue=f"q{i % 25}", priority=i % 10,
                     execution_time=now - timedelta(seconds=i % 7)) for i in range(300)]
    held = [JobSpec("record", args=(f"held-{i}",), queue="held", priority=0,
                    execution_time=now - timedelta(seconds=60)) for i in range(40)]
    await sched.store.pause_queues(["held"])
    await sched.schedule_bulk(specs + held)
    config = write_config(tmp_path, pg_dsn, schema, concurrency=4, poll_seconds=60)
    burst = workers(config, "--burst", env=audit_env(pg_dsn, schema))
    assert await burst.wait(timeout=60) == 0
    counts = audit_counts(pg_dsn, schema)
    assert set(counts) == {spec.args[0] for spec in specs} and set(counts.values()) == {1}


def probes(plan: dict[str, Any]) -> int:
    return sum(loops for loops, _ in scans_of_jobs(plan))


async def test_many_paused_tenants_never_make_the_flat_claim_dearer_than_the_per_queue_walk(
        sched):
    """Per-tenant queues: 1,000 paused tenants, each with a job due in an hour, and two
    active queues. The store chooses the flat claim because it is the cheaper walk; when
    it is not, it must refuse (the store then takes the per-queue walk)."""
    await fill_series(sched, 2000, queue="'a' || (g %% 2)", priority="5")
    async with sched.store.pool.connection() as conn:
        await conn.execute(sql.SQL(
            "INSERT INTO {}.jobs (id, task, queue, priority, execution_time) "
            "SELECT 'tenant' || g, 'noop', 't' || g, 5, now() + interval '1 hour' "
            "FROM generate_series(1, 1000) g").format(sql.Identifier(sched.schema)))
    await sched.store.pause_queues([f"t{g}" for g in range(1, 1001)])
    flat = await explain(sched, "claim_jobs_flat")
    per_queue = await explain(sched, "claim_jobs_unlimited")
    refused = (await run_flat(sched.store, 10))[0]["flat_refused"]
    assert refused or probes(flat) <= probes(per_queue), (
        f"flat: {probes(flat)} probes of jobs, per-queue walk: {probes(per_queue)}")


async def test_the_flat_claim_takes_rows_written_by_sql_without_failing(sched):
    """Rows no API writes: due at -infinity (claimed), at infinity and in the year
    200000 (next_due clamped to what Python holds), a grace of NaN (never expires) or
    -Infinity (expires), attempts that cannot count up (left pending). One bad row must
    not fail the claim that meets it."""
    async with sched.store.pool.connection() as conn:
        await conn.execute(sql.SQL(
            "INSERT INTO {}.jobs (id, task, queue, priority, execution_time, "
            "misfire_grace_seconds, attempts) VALUES "
            "('minus-inf', 'noop', 'a', 0, '-infinity', NULL, 0),"
            "('plus-inf', 'noop', 'b', 0, 'infinity', NULL, 0),"
            "('far', 'noop', 'c', 9, '200000-01-01', NULL, 0),"
            "('nan-grace', 'noop', 'd', 4, now() - interval '1 hour', 'NaN', 0),"
            "('neg-grace', 'noop', 'd', 4, now() - interval '1 hour', '-Infinity', 0),"
            "('spent', 'noop', 'e', 2, now() - interval '1 hour', NULL, 2147483647)"
        ).format(sql.Identifier(sched.schema)))
    rows = await run_flat(sched.store, 10)
    assert not rows[0]["flat_refused"]
    assert {r["id"]: r["expired"] for r in rows} == {
        "minus-inf": False, "nan-grace": False, "neg-grace": True}
    assert rows[0]["next_due"] == datetime(9999, 12, 30, tzinfo=UTC)
    assert await claim_ids(sched.store, 10) == []


async def db_clock(conn) -> datetime:
    return (await (await conn.execute("SELECT clock_timestamp()")).fetchone())[0]


async def test_concurrent_claims_under_pause_and_limit_changes_take_each_job_once(
        sched, pg_dsn):
    """Six claimers on three stores (flags shared and not), while one queue is paused and
    resumed over and over and a global limit appears: each job is taken once, the queue
    paused throughout never, the toggled queue by no claim that began while it was
    paused, and the limited queue by at most its limit of claims begun after the limit;
    at the end every due job of a served queue was taken."""
    rng = random.Random(14)
    rows = [(f"j{i}", f"q{rng.randrange(40)}", rng.randrange(10), ago(rng.uniform(-2, 30)))
            for i in range(2500)]
    rows += [(f"{q}{i}", q, rng.randrange(10), ago(rng.uniform(-2, 30)))
             for q, n in (("held", 200), ("tog", 300), ("lim", 300)) for i in range(n)]
    await sched.store.pause_queues(["held"])
    await fill(sched, rows)
    stores = [sched.store, Store(sched.store.pool, sched.schema),
              Store(sched.store.pool, sched.schema)]
    claimed: list[dict[str, Any]] = []
    paused_windows: list[tuple[datetime, datetime]] = []
    limit_set: list[datetime] = []
    claiming = asyncio.Event()

    async def claimer(k: int) -> None:
        for _ in range(60):
            got, _, _ = await stores[k % 3].claim_jobs(
                worker_id=f"w{k}", limit=rng.randrange(1, 20), lease_seconds=60)
            claimed.extend(got)
            claiming.set()

    async def toggler(conn) -> None:
        while not done.is_set():
            await sched.store.pause_queues(["tog"])
            paused_at = await db_clock(conn)
            await asyncio.sleep(rng.uniform(0, 0.03))
            paused_windows.append((paused_at, await db_clock(conn)))
            await sched.store.resume_queues(["tog"])
            await asyncio.sleep(rng.uniform(0, 0.03))

    async def limiter(conn) -> None:
        await claiming.wait()
        await sched.store.set_queue_limits("lim", global_concurrency=2, set_concurrency=True)
        limit_set.append(await db_clock(conn))

    done = asyncio.Event()
    async with sched.store.pool.connection() as conn:
        side = [asyncio.create_task(toggler(conn)), asyncio.create_task(limiter(conn))]
        await asyncio.gather(*(claimer(k) for k in range(6)))
        done.set()
        await asyncio.gather(*side)
        await sched.store.resume_queues(["tog"])
        while True:
            # Jobs fall due up to 2 s after the fill: "every due job" means due by the
            # start of the last, empty, claim (a run under 2 s saw one fall due between
            # that claim and the check below).
            drained_at = await db_clock(conn)
            got = (await sched.store.claim_jobs(worker_id="drain", limit=50,
                                                lease_seconds=60))[0]
            if not got:
                break
            claimed.extend(got)
        cur = await conn.execute(sql.SQL(
            "SELECT id, queue, started_at, status::text FROM {} WHERE status <> 'pending' "
            "OR (execution_time <= %s AND queue NOT IN ('held', 'lim'))").format(
                sql.Identifier(sched.schema, "jobs")), [drained_at])
        taken = await cur.fetchall()
    ids = [job["id"] for job in claimed]
    assert len(ids) == len(set(ids)), "a job was claimed twice"
    assert all(status in ("running", "expired") for _, _, _, status in taken)
    assert len(taken) == len(ids)  # every due job of a served queue, and no more
    assert not [i for i, q, _, _ in taken if q == "held"]
    assert not [i for i, q, at, _ in taken
                if q == "tog" and any(a < at < b for a, b in paused_windows)]
    assert sum(q == "lim" and at > limit_set[0] for _, q, at, _ in taken) <= 2



async def rows_read(conn, schema: str) -> int:
    """Rows of jobs and entries of its indexes this transaction read: a scan of the table,
    or of an index it cannot search (a generic plan made for a few rows may pick one)."""
    cur = await conn.execute(
        "SELECT pg_stat_get_xact_tuples_returned(%(t)s::regclass) + ("
        "SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid)) FROM pg_index "
        "WHERE indrelid = %(t)s::regclass)", {"t": f'"{schema}".jobs'})
    return int((await cur.fetchone())[0])


async def rows_read_after_growth(sched, start: int = 60, *, tenants: bool = False,
                                 **claim: Any) -> tuple[int, dict]:
    """Rows of jobs (and index entries) read by one claim of 2 on a connection that claimed
    twelve times while the table held `start` rows (PostgreSQL makes a prepared statement's
    generic plan at its sixth run), after 200,000 rows of history came, not yet analysed
    (autovacuum is off here, as it is between two of its passes); and the plans of the
    claim statements that connection prepared (claim_plans). The rows are pending in 3
    queues, or with `tenants` spread over 1,000 queues with 99 in 100 finished."""
    jobs = sql.Identifier(sched.schema, "jobs")
    async with sched.store.pool.connection() as conn:
        await conn.execute(sql.SQL("TRUNCATE {} CASCADE").format(jobs))
        await conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)")
                           .format(jobs))
    await fill_series(sched, start, queue="'t' || (g %% 1000)" if tenants else "'a' || (g %% 3)",
                      priority="g %% 3")
    async with sched.store.pool.connection() as conn:
        if tenants:
            await conn.execute(sql.SQL("UPDATE {} SET status = 'completed', finished_at = now() "
                                       "WHERE id NOT LIKE '%%00'").format(jobs))
            # their index entries too, or each claim steps over them
            await conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(jobs))
        with Store.using(OneConnection(conn)):
            for _ in range(12):  # not rolled back: psycopg forgets what it prepared then
                await sched.store.claim_jobs(worker_id="w", limit=2, lease_seconds=60, **claim)
            await conn.execute("SET statement_timeout = 0")
            await conn.execute(sql.SQL(
                "INSERT INTO {} (id, task, queue, priority, execution_time, status) "
                "SELECT 'done' || g, 'noop', 'a0', 5, now() - interval '1 day', 'completed' "
                "FROM generate_series(1, 200000) g").format(jobs))
            await conn.execute("RESET statement_timeout")
            async with conn.transaction(force_rollback=True):
                claimed, _, _ = await sched.store.claim_jobs(
                    worker_id="w", limit=2, lease_seconds=60, **claim)
                assert len(claimed) == min(2, start)
                return await rows_read(conn, sched.schema), await claim_plans(conn)


async def test_the_flat_claim_scans_no_row_after_the_table_grew(sched):
    """A plan made for jobs while it held a few rows (or none, analysed) must not serve a
    claim once the table has grown: at that size PostgreSQL scans the table, or an index
    by a column it does not lead with, to find the claimed rows."""
    assert (await rows_read_after_growth(sched))[0] < 100
    assert (await rows_read_after_growth(sched, start=0))[0] < 100


async def test_the_per_queue_claim_scans_no_row_after_the_table_grew(sched):
    assert (await rows_read_after_growth(sched, queues=["a0", "a1", "a2"]))[0] < 100
    assert (await rows_read_after_growth(sched, start=0, queues=["a0", "a1", "a2"]))[0] < 100


async def claim_plans(conn) -> dict[str, tuple[int, int]]:
    """(generic, custom) plans PostgreSQL made of each claim statement this connection
    prepared, by the CTE that names the statement."""
    cur = await conn.execute("SELECT statement, generic_plans, custom_plans "
                             "FROM pg_prepared_statements")
    found = {}
    for statement, generic, custom in await cur.fetchall():
        for name, mark in (("flat", "flat_priorities AS"), ("per_queue", "served_priorities AS")):
            if mark in statement:
                old = found.get(name, (0, 0))
                found[name] = (old[0] + generic, old[1] + custom)
    return found


async def test_the_flat_claim_is_planned_once_per_connection_while_jobs_is_large(sched):
    """The claim a worker of every queue runs: planning it took longer than running it
    (0.6 against 0.35 ms), so at 1 queue (the per-queue walk, prepared) a claim cost half
    of one at 1,000 (issue 14). Once jobs is large it runs a generic plan, made once."""
    await fill_series(sched, 20000, queue="'q' || (g %% 1000)", priority="g %% 3")
    async with sched.store.pool.connection() as conn:
        with Store.using(OneConnection(conn)):
            for _ in range(12):
                assert len(await claim_ids(sched.store, 10)) == 10
        generic, custom = (await claim_plans(conn)).get("flat", (0, 0))
    assert generic >= 5 and custom <= 6, f"{generic} generic, {custom} custom plans"


@pytest.mark.parametrize("claim", [{}, {"tenants": True}, {"queues": ["a0", "a1", "a2"]}],
                         ids=["flat", "flat_tenants", "per_queue"])
async def test_a_generic_plan_made_at_the_smallest_prepared_size_stays_on_the_indexes(
        sched, claim):
    """The store prepares claims from PREPARED_CLAIM_ROWS pending rows on (as analysed);
    the generic plan PostgreSQL makes there is kept until jobs is analysed again, however
    much it grows meanwhile. (Measured: made at 2,000 rows of 1,000 tenants, 99 in 100
    finished, the flat claim's plan read 20,000 rows for 10 after 220,000 more came.)"""
    read, plans = await rows_read_after_growth(sched, start=PREPARED_CLAIM_ROWS, **claim)
    if claim.get("tenants"):  # 100 of those rows pending: planned at each claim
        # (prepared, but custom plans only: store._PLAN_CUSTOM)
        assert all(generic == 0 for generic, _ in plans.values()), plans
    else:
        assert plans.get("per_queue" if "queues" in claim else "flat", (0, 0))[0] >= 1, plans
    assert read < 100
