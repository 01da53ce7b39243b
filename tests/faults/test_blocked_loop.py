"""Fault 8: a task blocks the event loop (CPU work in `async def`) longer than the lease.

The worker cannot heartbeat while its loop is stuck, so another worker recovers the job
and runs it again: at-least-once delivery, as documented. When the loop comes back the
worker says plainly that it was blocked and why, and its late outcome changes nothing.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

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


async def test_blocked_loop_is_reported_and_the_job_recovered(sched, pg_dsn, schema, workers,
                                                              tmp_path):
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=1, lease_seconds=2)
    env = audit_env(pg_dsn, schema)
    marker = tmp_path / "spinning"
    release, do_release = release_file(tmp_path)
    job_id = await sched.schedule("spin_once", args=("spin", str(marker), release))
    blocked = workers(config, env=env)
    await wait_until(marker.exists, what="the task to start blocking its worker's loop")
    rescuer = workers(config, env=env)
    job = await wait_until(lambda: job_if(sched, job_id, "completed"), timeout=30,
                           what="another worker to recover and finish the job")
    assert pid_of(job["worker_id"]) == rescuer.pid
    assert (job["attempts"], job["recoveries"]) == (2, 1)

    do_release()  # the blocked loop runs again
    await wait_until(lambda: log_events(blocked, "event_loop_blocked"),
                     what="the blocked worker to report it")
    warning = json.loads(log_events(blocked, "event_loop_blocked")[0])
    assert warning["level"] == "warning" and warning["seconds"] > 0.5  # the heartbeat interval
    assert "async def" in warning["hint"] and "plain def" in warning["hint"]
    await wait_until(lambda: any(log_events(blocked, e) for e in (
        "lease_lost", "job_completion_rejected", "job_outcome_dropped", "job_abandoned")),
                     what="the blocked worker to notice its lease was lost")
    for w in (blocked, rescuer):
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
    after = await sched.store.get_job(job_id)
    assert {k: after[k] for k in ("status", "worker_id", "attempts", "result", "finished_at")} \
        == {k: job[k] for k in ("status", "worker_id", "attempts", "result", "finished_at")}
    check_each_completed_once(await jobs(sched), await audit(sched))
    assert Path(release).exists()

