"""Real `pgsched worker` processes against a real PostgreSQL: exactly-once completion,
crash recovery, lease fencing, shutdown and reconnection."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime

import worker_tasks  # noqa: F401 - registers the test tasks for scheduling by function
from conftest import audit_counts, audit_env, wait_until, write_config

from pgsched import JobSpec


async def count_status(sched, status: str) -> int:
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(
            f'SELECT count(*) FROM "{sched.schema}".jobs WHERE status = %s', [status])
        return (await cur.fetchone())[0]


async def test_two_workers_run_500_jobs_each_exactly_once(sched, pg_dsn, schema, tmp_path,
                                                          workers):
    keys = [f"k{i}" for i in range(500)]
    await sched.schedule_bulk([JobSpec("record", args=(k,)) for k in keys])
    config = write_config(tmp_path, pg_dsn, schema, concurrency=10)
    env = audit_env(pg_dsn, schema)
    first, second = workers(config, env=env), workers(config, env=env)
    await wait_until(lambda: count_status(sched, "completed"), timeout=60,
                     what="first completion")
    await wait_until(lambda: _eq(count_status(sched, "completed"), 500), timeout=120,
                     what="500 completed jobs")
    counts = audit_counts(pg_dsn, schema)
    assert set(counts) == set(keys) and set(counts.values()) == {1}
    for w in (first, second):
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(
            f'SELECT count(DISTINCT worker_id) FROM "{schema}".jobs')
        assert (await cur.fetchone())[0] == 2  # both workers took part


async def _eq(awaitable, expected):
    return await awaitable == expected


async def test_sigkilled_worker_job_is_recovered_by_another(sched, pg_dsn, schema, tmp_path,
                                                            workers):
    job_id = await sched.schedule("sleep_then_record", args=("crash", 3600))
    config = write_config(tmp_path, pg_dsn, schema, lease_seconds=1.5, heartbeat_seconds=0.3)
    env = audit_env(pg_dsn, schema)
    victim = workers(config, env=env)
    await wait_until(lambda: _status_is(sched, job_id, "running"), what="job running")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    # The job must now run again elsewhere; make the second run quick.
    async with sched.store.pool.connection() as conn:
        await conn.execute(
            f'UPDATE "{schema}".jobs SET args = \'["crash", 0.01]\' WHERE id = %s', [job_id])
    workers(config, env=env)
    job = await wait_until(lambda: _status_is(sched, job_id, "completed"), timeout=30,
                           what="recovered job completed")
    assert job["recoveries"] == 1 and job["attempts"] == 2
    assert job["errors"][0]["error"].startswith("lease expired")
    assert audit_counts(pg_dsn, schema) == {"crash": 1}


async def _status_is(sched, job_id, status):
    job = await sched.get_job(job_id)
    return job if str(job["status"]) == status else None


async def test_late_completion_from_worker_that_lost_its_lease_is_rejected(sched):
    job_id = await sched.schedule("noop")
    store = sched.store
    claimed, _, _ = await store.claim_jobs(worker_id="stale", limit=1, lease_seconds=0.05)
    assert [j["id"] for j in claimed] == [job_id]
    await asyncio.sleep(0.1)  # let the 50 ms lease lapse in the database clock
    assert [r["id"] for r in await store.recover_orphans(max_recoveries=3)] == [job_id]
    # Put back by recovery, it is a suspect: a worker claims it alone.
    fresh, _, _ = await store.claim_jobs(worker_id="fresh", limit=1, lease_seconds=60,
                                         suspects=True)
    assert fresh[0]["attempts"] == 2
    # The stale worker wakes up: its heartbeat, completion, failure and release all miss.
    assert await store.heartbeat_jobs(worker_id="stale", held=[(job_id, 1)],
                                      lease_seconds=60) == {}
    assert await store.complete_jobs(worker_id="stale", done=[(job_id, 1, '"stale"')]) == set()
    assert await store.fail_job(worker_id="stale", job_id=job_id, attempt=1, error="x",
                                traceback=None, retry_delay_seconds=0) is None
    assert await store.release_jobs(worker_id="stale", held=[(job_id, 1)]) == set()
    assert await store.complete_jobs(worker_id="fresh", done=[(job_id, 2, '"fresh"')]) \
        == {(job_id, 2)}
    job = await sched.get_job(job_id)
    assert job["status"] == "completed" and job["result"] == "fresh"
    assert job["worker_id"] == "fresh"


async def test_sigterm_with_job_in_flight_finishes_it_and_exits_zero(sched, pg_dsn, schema,
                                                                      tmp_path, workers):
    job_id = await sched.schedule("sleep", args=(1.0,))
    w = workers(write_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=10))
    await wait_until(lambda: _status_is(sched, job_id, "running"), what="job running")
    w.signal(signal.SIGTERM)
    assert await w.wait() == 0
    assert (await sched.get_job(job_id))["status"] == "completed"


async def test_second_signal_stops_at_once_and_releases_the_job(sched, pg_dsn, schema,
                                                                 tmp_path, workers):
    job_id = await sched.schedule("sync_sleep", args=(3600,))
    w = workers(write_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=600))
    await wait_until(lambda: _status_is(sched, job_id, "running"), what="job running")
    w.signal(signal.SIGTERM)
    await w.wait_for_log("shutdown_waiting")
    w.signal(signal.SIGINT)
    assert await w.wait(timeout=20) == 0
    job = await sched.get_job(job_id)
    assert job["status"] == "pending" and job["failures"] == 0 and job["worker_id"] is None


async def test_worker_reconnects_after_its_connections_are_terminated(sched, pg_dsn, schema,
                                                                      tmp_path, workers):
    w = workers(write_config(tmp_path, pg_dsn, schema, poll_seconds=60))
    await w.wait_for_log("worker_starting")
    first = await sched.schedule("add", args=(1, 1))
    await wait_until(lambda: _status_is(sched, first, "completed"), what="first job")
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgsched-worker'")
        killed = len(await cur.fetchall())
    assert killed >= 2  # its pool connection(s) and the LISTEN connection
    await w.wait_for_log("listener_reconnected", timeout=30)
    # With a 60 s poll, only a re-established LISTEN wakes the worker this fast.
    second = await sched.schedule("add", args=(2, 2))
    job = await wait_until(lambda: _status_is(sched, second, "completed"), timeout=15,
                           what="job after reconnect")
    assert job["result"] == 4
    assert w.proc.poll() is None


async def test_burst_runs_due_jobs_then_exits(sched, pg_dsn, schema, tmp_path, workers):
    due = [await sched.schedule("add", args=(i, i)) for i in range(5)]
    later = await sched.schedule("noop", execution_time=datetime.now(UTC).replace(year=2099))
    w = workers(write_config(tmp_path, pg_dsn, schema), "--burst")
    assert await w.wait() == 0
    for job_id in due:
        assert (await sched.get_job(job_id))["status"] == "completed"
    assert (await sched.get_job(later))["status"] == "pending"
    assert os.path.exists(w.log_path)


async def test_a_failed_tasks_traceback_names_only_the_task(sched, pg_dsn, schema, tmp_path,
                                                             workers):
    """The worker used to start its loop inside `except ImportError` (uvloop missing), so
    every exception a task raised carried "No module named 'uvloop'" as its context, and
    each stored traceback told the operator about a module the task never used."""
    job_id = await sched.schedule("async_fail", args=("plain failure",))
    w = workers(write_config(tmp_path, pg_dsn, schema), "--burst")
    assert await w.wait() == 0
    job = await sched.get_job(job_id)
    traceback = job["errors"][-1]["traceback"]
    assert job["status"] == "failed" and "plain failure" in traceback
    assert "During handling of the above exception" not in traceback
    assert "uvloop" not in traceback
