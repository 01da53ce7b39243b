"""Fault 11: the soak. Minutes of a steady stream of new jobs while workers are killed
and restarted and PostgreSQL is restarted and crashed, then an exact reconciliation.

Not in the default run: `pytest -m soak` (CI runs it). PGSCHED_SOAK_SECONDS sets how long
faults are injected (default 150); the whole test stays within a few minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from datetime import timedelta

import psycopg
import psycopg_pool
import pytest
from conftest import wait_until

from pgsched import JobSpec

from .kit import (
    alive,
    assert_json_lines,
    audit,
    audit_env,
    check_each_completed_once,
    counts,
    db_now,
    fault_config,
    jobs,
    pid_of,
    query,
    stop_all,
)

WORKERS = 6
SECONDS = float(os.environ.get("PGSCHED_SOAK_SECONDS", "150"))
# It runs SECONDS by design: the suite-wide per-test timeout (300 s) must not cut it.
pytestmark = [pytest.mark.soak, pytest.mark.timeout(SECONDS + 300)]
DB_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout)


async def test_soak_kills_restarts_and_a_steady_stream(cluster, cluster_sched, schema,
                                                       workers, tmp_path):
    sched = cluster_sched
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    dsn = cluster.app_dsn()
    config = fault_config(tmp_path, dsn, schema, max_recoveries=1000)
    env = audit_env(dsn, schema)
    crew = [workers(config, env=env) for _ in range(WORKERS)]
    produced: set[str] = set()
    killed: set[int] = set()
    faults = {"kill": 0, "restart": 0, "crash": 0}
    stop = asyncio.Event()

    async def produce() -> None:
        """A steady stream: batches of jobs due now and a little later, retried across
        outages with the same ids (IGNORE makes a retry of a committed batch harmless)."""
        n = 0
        while not stop.is_set():
            batch = []
            for _ in range(rng.randint(5, 30)):
                n += 1
                later = timedelta(seconds=rng.choice((0, 0, 0, 1, 5)))
                batch.append(JobSpec("record", args=(f"k{n}", rng.choice((0, 0.01, 0.05))),
                                     job_id=f"j{n:07d}", misfire_grace_time=None,
                                     execution_time=None if not later else
                                     (await db_now(sched)) + later))
            while True:
                try:
                    await sched.schedule_bulk(batch)
                    break
                except DB_ERRORS:
                    await asyncio.sleep(0.2)
            produced.update(spec.job_id for spec in batch)
            await asyncio.sleep(rng.uniform(0.05, 0.3))

    producer = asyncio.create_task(_tolerant(produce))
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        # The fault schedule itself: random gaps between faults, not waits for events.
        await asyncio.sleep(rng.uniform(1, 4))
        fault = rng.choices(["kill", "restart", "crash"], weights=[8, 1, 1])[0]
        faults[fault] += 1
        if fault == "kill":
            busy = {pid_of(r["worker_id"]) for r in await _tolerant(lambda: query(
                sched, "SELECT DISTINCT worker_id FROM {schema}.jobs "
                       "WHERE status = 'running'")) or []}
            victim = rng.choice([w for w in crew if w.pid in busy] or crew)
            victim.signal(signal.SIGKILL)
            await victim.wait()
            killed.add(victim.pid)
            crew.remove(victim)
            crew.append(workers(config, env=env))
        else:
            cluster.stop("fast" if fault == "restart" else "immediate")
            await asyncio.sleep(rng.uniform(0.5, 5))  # the outage
            cluster.start()
        # -- RECURRING WINDOWS (issue item 10) -------------------------------------------
        # When recurring schedules land, add them here: create a few short-interval
        # schedules before the loop, kill workers between computing a window and
        # inserting its job (the recurring tests' hook), and reconcile below that every
        # elapsed window has exactly one job.
        # --------------------------------------------------------------------------------

    stop.set()
    await producer
    await sched.store.pool.check()
    try:
        await wait_until(lambda: _settled(sched, len(produced)), timeout=180,
                         what=f"all {len(produced)} jobs completed (seed {seed})")
    except AssertionError:
        stuck = await query(sched, "SELECT id, status::text, attempts, recoveries, worker_id, "
                                   "execution_time, lease_until, last_error FROM {schema}.jobs "
                                   "WHERE status <> 'completed' LIMIT 10")
        print(f"seed {seed}, faults {faults}, counts {await counts(sched)}, stuck: {stuck}")
        for w in crew:
            print(w.pid, w.proc.poll(), w.log()[-3000:])
        raise
    assert alive(crew), f"a worker died on its own (seed {seed})"
    rows = await jobs(sched)
    assert {r["id"] for r in rows} == produced, "a job was lost or appeared from nowhere"
    result = check_each_completed_once(rows, await audit(sched))
    assert await stop_all(crew) == [0] * len(crew)
    for w in crew:
        assert cluster.app_password not in w.log()
        assert_json_lines(w)
    print(f"soak seed {seed}: {len(produced)} jobs, faults {faults}, "
          f"{len(result.reruns)} reruns after recovered leases")


async def _tolerant(fn):
    """Run fn(), retrying while the database is away (the test's own connections)."""
    while True:
        try:
            return await fn()
        except DB_ERRORS:
            await asyncio.sleep(0.2)


async def _settled(sched, n: int) -> bool:
    with contextlib.suppress(*DB_ERRORS):
        return (await counts(sched))["completed"] == n
    return False
