"""Attacks on the flat claim (claim_jobs_flat, issue 14) against a real PostgreSQL: what
its invariants (sql/queries.sql, block claim_jobs) promise and a broken walk, check or
store choice would get wrong. Each test names the promise it holds the claim to."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import audit_counts, audit_env, wait_until, write_config
from psycopg import sql
from test_claim_flat import fill_series, run_flat, scans_of_jobs

from pgsched import JobSpec

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


@pytest.mark.xfail(strict=True, reason=(
    "the flat check probes jobs 11 times per paused queue with pending jobs (one 'has "
    "pending' probe, ten per-priority due probes) and never refuses for their number: "
    "with 1,000 paused tenants it costs ten times the per-queue walk it replaces"))
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
