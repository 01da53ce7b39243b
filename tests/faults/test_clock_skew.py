"""Fault 7: machines whose clocks are an hour off (skewed_clock/sitecustomize.py).

Leases, due times and recovery use the database clock, so a worker an hour ahead must
not recover its peers' jobs early, and a worker an hour behind must not lose its own
leases. The worker reads its own clock only to turn a NOTIFY's due time into a timer,
corrected by the database clock every claim returns: the worker an hour behind, with a
ten-minute poll, still starts a job due in two seconds on time, not early. A client an
hour behind or ahead that adds a job "now" gets the database's now: not a job that is
already past its misfire grace (expired unrun), nor one that waits an hour.
"""

from __future__ import annotations

import signal
from datetime import timedelta
from pathlib import Path

from conftest import audit_env, run_cli, wait_until

from pgsched import JobSpec

from .kit import (
    at_least,
    audit,
    check_each_completed_once,
    db_now,
    fault_config,
    job_if,
    jobs,
    log_events,
    pid_of,
    query,
    release_file,
)

LEASE = 1.5
HOUR = 3600
SHIM = str(Path(__file__).parent / "skewed_clock")


def skewed(env: dict[str, str], seconds: float) -> dict[str, str]:
    return {**env, "PYTHONPATH": SHIM, "PGSCHED_TEST_CLOCK_OFFSET_SECONDS": str(seconds)}


async def test_an_hour_of_skew_changes_no_lease_and_no_timer(sched, pg_dsn, schema, workers,
                                                             tmp_path):
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=1, lease_seconds=LEASE,
                          heartbeat_seconds=0.3, poll_seconds=600)
    env = audit_env(pg_dsn, schema)
    ahead = workers(config, env=skewed(env, HOUR))
    behind = workers(config, env=skewed(env, -HOUR))
    release, do_release = release_file(tmp_path)
    await sched.schedule_bulk([JobSpec("hold", args=(f"h{i}", release), job_id=f"h{i}")
                               for i in range(2)])
    claimed = await wait_until(lambda: _running(sched), what="each worker holding one job")
    assert {pid_of(r["worker_id"]) for r in claimed} == {ahead.pid, behind.pid}

    # Four leases pass on the database clock while both keep heartbeating.
    await wait_until(lambda: _heartbeated_for(sched, 4 * LEASE), timeout=30,
                     what="four leases of heartbeats")
    now = await _running(sched)
    for before, after in zip(claimed, now, strict=True):
        assert (after["worker_id"], after["attempts"], after["recoveries"]) == \
            (before["worker_id"], 1, 0)
    for w in (ahead, behind):
        assert not log_events(w, "job_recovered") and not log_events(w, "lease_lost")
    do_release()
    await wait_until(lambda: at_least(sched, "completed", 2), what="held jobs completed")
    check_each_completed_once(await jobs(sched), await audit(sched))

    ahead.signal(signal.SIGTERM)
    assert await ahead.wait() == 0
    due = await db_now(sched) + timedelta(seconds=2)
    job_id = await sched.schedule("noop", execution_time=due, job_id="timer")
    job = await wait_until(lambda: job_if(sched, job_id, "completed"), timeout=20,
                           what="the job started by its timer, not the 600 s poll")
    assert job["started_at"] >= due and pid_of(job["worker_id"]) == behind.pid
    behind.signal(signal.SIGTERM)
    assert await behind.wait() == 0


async def test_a_client_an_hour_off_adds_jobs_due_now_on_the_database_clock(
        sched, pg_dsn, schema, workers, tmp_path):
    config = fault_config(tmp_path, pg_dsn, schema)
    env = audit_env(pg_dsn, schema)
    for offset, from_file in ((-HOUR, False), (HOUR, False), (-HOUR, True)):
        before = await db_now(sched)
        added = run_cli("add", *(["--from", "-"] if from_file else ["noop"]), config=config,
                        env=skewed(env, offset), input='{"task": "noop"}\n')
        assert added.returncode == 0, added.stderr
        job = await sched.store.get_job(added.stdout.split()[0])
        assert before <= job["execution_time"] <= await db_now(sched), (offset, job)
    worker = workers(config, env=env)
    await wait_until(lambda: at_least(sched, "completed", 3),
                     what="every job run, none expired")
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


async def _running(sched):
    rows = await query(sched, "SELECT * FROM {schema}.jobs WHERE status = 'running' "
                              "ORDER BY id")
    return rows if len(rows) == 2 else None


async def _heartbeated_for(sched, seconds):
    rows = await query(sched, "SELECT bool_and(heartbeat_at > started_at "
                              "+ make_interval(secs => %s)) AS ok FROM {schema}.jobs",
                       [seconds])
    return rows[0]["ok"]

