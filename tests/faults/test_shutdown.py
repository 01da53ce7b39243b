"""Fault 9: shutdown with jobs in flight. Whatever happens, a job ends completed or back
to pending (no failure counted), never left running and never failed by the shutdown."""

from __future__ import annotations

import signal

from conftest import wait_until

from pgsched import JobSpec

from .kit import (
    at_least,
    audit,
    audit_env,
    check_each_completed_once,
    db_now,
    fault_config,
    jobs,
    lease_expiries,
    log_events,
    query,
    release_file,
)


async def _statuses(sched):
    rows = await query(sched, "SELECT id, status::text, failures, worker_id, result "
                              "FROM {schema}.jobs ORDER BY id")
    return {r["id"]: r for r in rows}


async def test_sigterm_within_the_grace_lets_jobs_finish(sched, pg_dsn, schema, workers,
                                                         tmp_path):
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    await sched.schedule_bulk([JobSpec(task, args=(task, release), job_id=task)
                               for task in ("hold", "sync_hold")])
    worker = workers(fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=30),
                     env=env)
    await wait_until(lambda: at_least(sched, "running", 2), what="jobs in flight")
    worker.signal(signal.SIGTERM)
    await worker.wait_for_log('"shutdown_waiting"')
    do_release()
    assert await worker.wait() == 0
    check_each_completed_once(await jobs(sched), await audit(sched))


async def test_past_the_grace_jobs_go_back_to_pending(sched, pg_dsn, schema, workers,
                                                      tmp_path):
    """...and run again, even when that is later than their misfire grace allows for a
    first start (they did start in time)."""
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    config = fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=0.5)
    worker = workers(config, env=env)
    # The worker is up before the jobs exist, so their short grace measures the claim
    # (a NOTIFY away), not the process start-up of a busy machine.
    await worker.wait_for_log("worker_starting")
    await sched.schedule_bulk([JobSpec(task, args=(task, release), job_id=task,
                                       misfire_grace_time=2)
                               for task in ("hold", "sync_hold")])
    await wait_until(lambda: at_least(sched, "running", 2), what="jobs in flight")
    await wait_until(lambda: _all_past_grace(sched, 2), what="the misfire grace to pass")
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0  # the sync task's thread cannot stop; the process can
    assert log_events(worker, "sync_tasks_abandoned")
    for row in (await _statuses(sched)).values():
        assert (row["status"], row["failures"], row["worker_id"]) == ("pending", 0, None)
    do_release()
    successor = workers(config, env=env)
    await wait_until(lambda: _all_completed(sched), what="a new worker to run them")
    check_each_completed_once(await jobs(sched), await audit(sched))
    successor.signal(signal.SIGTERM)
    assert await successor.wait() == 0


async def _all_past_grace(sched, grace):
    rows = await query(sched, "SELECT bool_and(now() > execution_time + make_interval("
                              "secs => %s)) AS past FROM {schema}.jobs", [grace])
    return rows[0]["past"]


async def _all_completed(sched):
    return all(r["status"] == "completed" for r in (await _statuses(sched)).values())


async def test_a_second_signal_skips_the_grace(sched, pg_dsn, schema, workers, tmp_path):
    env = audit_env(pg_dsn, schema)
    release, _ = release_file(tmp_path)
    await sched.schedule("hold", args=("hold", release), job_id="hold")
    worker = workers(fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=600),
                     env=env)
    await wait_until(lambda: at_least(sched, "running", 1), what="a job in flight")
    worker.signal(signal.SIGTERM)
    await worker.wait_for_log('"shutdown_waiting"')
    worker.signal(signal.SIGINT)
    assert await worker.wait() == 0  # well before the 600 s grace
    row = (await _statuses(sched))["hold"]
    assert (row["status"], row["failures"]) == ("pending", 0)


async def test_cancellation_paths_inside_tasks(sched, pg_dsn, schema, workers, tmp_path):
    """A task that cleans up and re-raises, one whose cleanup fails, one that returns
    instead, and one that ignores cancellation (only the second signal gets past it)."""
    env = audit_env(pg_dsn, schema)
    release, _ = release_file(tmp_path)
    await sched.schedule_bulk(
        [JobSpec("hold_with_cleanup", args=(mode, release, mode), job_id=mode)
         for mode in ("reraise", "error", "swallow")]
        + [JobSpec("stubborn", args=(release,), job_id="stubborn")])
    worker = workers(fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=0.5),
                     env=env)
    await wait_until(lambda: at_least(sched, "running", 4), what="jobs in flight")
    worker.signal(signal.SIGTERM)
    await worker.wait_for_log('"shutdown_waiting"')
    await wait_until(lambda: len(log_events(worker, "job_interrupted")) == 2
                     and log_events(worker, "job_completed"),
                     what="the cooperative tasks to react to the cancellation")
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
    assert log_events(worker, "jobs_ignored_cancellation")
    rows = await _statuses(sched)
    assert {k: (r["status"], r["failures"]) for k, r in rows.items()} == {
        "reraise": ("pending", 0), "error": ("pending", 0),
        "swallow": ("completed", 0), "stubborn": ("pending", 0)}
    assert rows["swallow"]["result"] == "interrupted"


async def test_a_slow_cleanup_does_not_cost_other_interrupted_jobs_their_lease(
        sched, pg_dsn, schema, workers, tmp_path):
    """While one task cleans up for longer than a lease, the jobs already interrupted wait
    to be released: their leases must be kept, not expire and count as crashes."""
    env = audit_env(pg_dsn, schema)
    release, _ = release_file(tmp_path)
    cleanup_done, finish_cleanup = release_file(tmp_path, "cleanup")
    await sched.schedule_bulk([
        JobSpec("hold", args=("quick", release), job_id="quick"),
        JobSpec("hold_with_cleanup", args=("slow", release, f"wait:{cleanup_done}"),
                job_id="slow")])
    config = fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=0.2,
                          lease_seconds=1.5, heartbeat_seconds=0.3)
    worker = workers(config, env=env)
    await wait_until(lambda: at_least(sched, "running", 2), what="jobs in flight")
    bystander = workers(config, env=env)  # would recover an expired lease at once
    worker.signal(signal.SIGTERM)
    await worker.wait_for_log('"job_interrupted"')
    interrupted_at = await db_now(sched)
    await wait_until(lambda: _heartbeat_after(sched, "quick", interrupted_at, 3 * 1.5),
                     what="the interrupted job's lease kept for three lease periods")
    finish_cleanup()
    assert await worker.wait() == 0
    rows = await jobs(sched)
    # Released, not recovered: the release wakes the bystander, which may claim them.
    assert [(r["id"], lease_expiries(r), r["recoveries"], r["failures"]) for r in rows] == \
        [("quick", 0, 0, 0), ("slow", 0, 0, 0)]
    assert {str(r["status"]) for r in rows} <= {"pending", "running"}
    assert not log_events(bystander, "job_recovered")
    bystander.signal(signal.SIGTERM)
    assert await bystander.wait() == 0


async def _heartbeat_after(sched, job_id, since, seconds):
    rows = await query(sched, "SELECT heartbeat_at > %s + make_interval(secs => %s) AS ok "
                              "FROM {schema}.jobs WHERE id = %s", [since, seconds, job_id])
    return rows[0]["ok"]
