"""Fault 2: a worker frozen (SIGSTOP) past its lease comes back after another worker
reclaimed and finished its job: its late heartbeat and outcome change nothing."""

from __future__ import annotations

import signal

import pytest
from conftest import audit_env, wait_until

from .kit import (
    audit,
    check_each_completed_once,
    fault_config,
    job_if,
    jobs,
    log_events,
    pid_of,
    release_file,
)

LOST_LEASE_EVENTS = ("lease_lost", "job_completion_rejected", "job_outcome_dropped",
                     "job_abandoned")


@pytest.mark.parametrize("task", ["hold", "sync_hold"])
async def test_frozen_worker_cannot_overwrite_the_job(task, sched, pg_dsn, schema, workers,
                                                      tmp_path):
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=1, lease_seconds=2)
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    job_id = await sched.schedule(task, args=("stale", release), job_id="stale")
    stale = workers(config, env=env)
    first = await wait_until(lambda: job_if(sched, job_id, "running", 1), what="first claim")
    assert pid_of(first["worker_id"]) == stale.pid

    stale.signal(signal.SIGSTOP)  # frozen mid-job: no heartbeat, lease runs out
    fresh = workers(config, env=env)
    second = await wait_until(lambda: job_if(sched, job_id, "running", 2), timeout=30,
                              what="the job recovered and claimed again")
    assert pid_of(second["worker_id"]) == fresh.pid and second["recoveries"] == 1
    do_release()
    done = await wait_until(lambda: job_if(sched, job_id, "completed"),
                            what="second run completed")

    stale.signal(signal.SIGCONT)
    await wait_until(lambda: any(log_events(stale, e) for e in LOST_LEASE_EVENTS),
                     what="the stale worker to notice its lease was lost")
    stale.signal(signal.SIGTERM)
    assert await stale.wait() == 0  # after this it can write nothing more

    after = (await sched.store.get_job(job_id))
    for column in ("status", "result", "attempts", "worker_id", "finished_at", "lease_until",
                   "heartbeat_at", "failures", "recoveries", "errors"):
        assert after[column] == done[column], column
    assert after["worker_id"] == second["worker_id"] and after["attempts"] == 2
    check_each_completed_once(await jobs(sched), await audit(sched))
    assert not await sched.store.heartbeat_jobs(worker_id=first["worker_id"],
                                                held=[(job_id, 1)], lease_seconds=60)

