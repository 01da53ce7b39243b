"""Fault: a table lock on jobs longer than the lease (a migration building an index
without CONCURRENTLY, an operator's LOCK TABLE). A live worker's job heartbeats queue
behind it, but its registry heartbeat does not: it keeps its running job, which runs
exactly once."""

from __future__ import annotations

import asyncio

import psycopg
from conftest import wait_until

from .kit import (
    audit,
    audit_env,
    check_each_completed_once,
    fault_config,
    job_if,
    jobs,
    query,
    release_file,
)

LEASE_SECONDS = 4
LOCK_SECONDS = 7


async def test_live_worker_keeps_its_job_through_a_table_lock_longer_than_its_lease(
        sched, pg_dsn, schema, workers, tmp_path):
    config = fault_config(tmp_path, pg_dsn, schema, lease_seconds=LEASE_SECONDS)
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    # A thread cannot be cancelled: a second claim of this job would run it a second time.
    await sched.schedule("sync_hold", args=("locked", release), job_id="locked")
    running = workers(config, env=env)
    first = await wait_until(lambda: job_if(sched, "locked", "running", 1), what="claim")
    idle = workers(config, env=env)  # free slots, ready to take a recovered job
    await wait_until(lambda: query(sched, "SELECT 1 FROM {schema}.workers HAVING count(*) = 2"),
                     what="both workers registered")

    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'LOCK TABLE "{schema}".jobs IN SHARE MODE')
        await asyncio.sleep(LOCK_SECONDS)
        await locker.commit()
    unlocked = await query(sched, "SELECT clock_timestamp() AS at")

    # Let every worker's maintenance run after the lock (a recovery would happen now),
    # then let the job finish.
    await wait_until(lambda: query(
        sched, "SELECT 1 FROM {schema}.jobs WHERE id = 'locked' AND heartbeat_at > %s + "
               "interval '2 s'", [unlocked[0]["at"]]),
        timeout=30, what="heartbeats resumed after the lock")
    do_release()
    done = await wait_until(lambda: job_if(sched, "locked", "completed"), timeout=30,
                            what="the job completed")
    assert (done["attempts"], done["recoveries"], done["worker_id"]) == \
        (1, 0, first["worker_id"]), done["errors"]
    deliveries = check_each_completed_once(await jobs(sched), await audit(sched))
    assert deliveries.executions == 1
    assert running.proc.poll() is None and idle.proc.poll() is None
