"""Fault 1: random SIGKILLs of busy workers while thousands of jobs run."""

from __future__ import annotations

import random
import signal

from conftest import wait_until

from pgsched import JobSpec

from .kit import (
    alive,
    at_least,
    audit,
    audit_env,
    check_each_completed_once,
    counts,
    fault_config,
    jobs,
    lease_expiries,
    pid_of,
    query,
    stop_all,
)

JOBS = 2000
WORKERS = 8
KILLS = 12


async def test_killed_workers_lose_nothing_and_double_nothing(sched, pg_dsn, schema, workers,
                                                              tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # We kill workers on purpose, so the poison-pill limit (a job that keeps killing its
    # worker) must not fail a job that was merely unlucky several times.
    config = fault_config(tmp_path, pg_dsn, schema, max_recoveries=1000)
    env = audit_env(pg_dsn, schema)
    await sched.schedule_bulk([
        JobSpec("record", args=(f"k{i}", rng.choice((0, 0.005, 0.02))), job_id=f"j{i:05d}")
        for i in range(JOBS)])
    live = [workers(config, env=env) for _ in range(WORKERS)]
    killed: set[int] = set()

    for _ in range(KILLS):
        done = (await counts(sched))["completed"]
        if done >= JOBS * 0.9:
            break
        # Space the kills by progress, not by time: about one per 7% of the jobs.
        await wait_until(lambda d=done: at_least(sched, "completed", d + JOBS // 15),
                         timeout=60, what="progress between kills")
        busy = await query(sched, "SELECT DISTINCT worker_id FROM {schema}.jobs "
                                  "WHERE status = 'running'")
        busy_pids = {pid_of(r["worker_id"]) for r in busy}
        victims = [w for w in live if w.pid in busy_pids] or live
        victim = rng.choice(victims)
        victim.signal(signal.SIGKILL)  # mid-job: its claims are left running, leases ticking
        await victim.wait()
        killed.add(victim.pid)
        live.remove(victim)
        live.append(workers(config, env=env))

    assert len(killed) >= KILLS // 2, f"only {len(killed)} kills happened (seed {seed})"
    await wait_until(lambda: at_least(sched, "completed", JOBS), timeout=120,
                     what=f"all {JOBS} jobs completed (seed {seed})")
    assert alive(live)
    result = check_each_completed_once(await jobs(sched), await audit(sched))
    # A rerun only ever follows a lease that expired because its worker was killed.
    assert result.rerun_worker_pids <= killed, (seed, result.reruns)
    assert await stop_all(live) == [0] * len(live)
    print(f"seed {seed}: {len(killed)} kills, {len(result.reruns)} reruns of "
          f"{result.jobs} jobs")


async def test_no_row_left_running_after_kills(sched, pg_dsn, schema, workers, tmp_path):
    """Kill every worker mid-job, start one fresh worker: it recovers everything."""
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=2)
    env = audit_env(pg_dsn, schema)
    await sched.schedule_bulk([JobSpec("record", args=(f"k{i}", 0.05), job_id=f"j{i}")
                               for i in range(40)])
    doomed = [workers(config, env=env) for _ in range(3)]
    await wait_until(lambda: at_least(sched, "running", 4), what="jobs running")
    for w in doomed:
        w.signal(signal.SIGKILL)
    for w in doomed:
        await w.wait()
    stranded = (await counts(sched))["running"]
    assert stranded > 0
    survivor = workers(config, env=env)
    await wait_until(lambda: at_least(sched, "completed", 40), what="all jobs completed")
    rows = await jobs(sched)
    result = check_each_completed_once(rows, await audit(sched))
    assert result.rerun_worker_pids <= {w.pid for w in doomed}
    assert sum(lease_expiries(j) for j in rows) >= stranded
    survivor.signal(signal.SIGTERM)
    assert await survivor.wait() == 0

