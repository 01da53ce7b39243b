"""A second adversary's attacks on real `pgsched worker` processes (issue 9's review):
signals at the worst moment, and a table lock on jobs longer than lock_timeout and than
a lease. Every time: nothing is left running after a clean exit, every job completes
exactly once (the audit), and the worker exits within its grace plus a few seconds."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
from conftest import wait_until

from pgsched import JobSpec

from .kit import (
    at_least,
    audit,
    audit_env,
    check_each_completed_once,
    counts,
    db_now,
    fault_config,
    job_if,
    jobs,
    lease_expiries,
    log_events,
    query,
    release_file,
    stop_all,
    with_params,
)

# Statements as the server shows them (each starts with its comment in sql/queries.sql).
CLAIM_SQL = "-- Claim up to %"
COMPLETE_SQL = "-- Record successful attempts%"


async def _waiting(sched, app: str, statement: str) -> set[tuple[int, object]]:
    """The worker's statements of this kind now waiting for a lock."""
    rows = await query(sched, "SELECT pid, query_start FROM pg_stat_activity "
                              "WHERE application_name = %s AND wait_event_type = 'Lock' "
                              "AND query LIKE %s", [app, statement])
    return {(r["pid"], r["query_start"]) for r in rows}


def _app() -> str:
    return f"adv-{uuid.uuid4().hex[:6]}"


async def test_sigterm_after_claims_failed_behind_a_table_lock_releases_promptly(
        sched, pg_dsn, schema, workers, tmp_path):
    """An ACCESS EXCLUSIVE lock on jobs makes every claim fail after lock_timeout, and the
    fetcher backs off further each time (up to 10 s). A SIGTERM that arrives once the lock
    is gone must not wait for that backoff: the running job is released within the grace,
    not left running for lease expiry (`shutdown_timed_out`). The lock also outlasts the
    lease: an idle bystander must not recover the live worker's job. A job that finished
    during the lock has its outcome written before the worker exits (the completer backed
    off too)."""
    app = _app()
    grace = 0.5
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    finish, do_finish = release_file(tmp_path, "finish")
    config = fault_config(tmp_path, with_params(pg_dsn, application_name=app), schema,
                          shutdown_grace_seconds=grace)
    await sched.schedule("hold", args=("held", release), job_id="held")
    await sched.schedule("hold", args=("finished", finish), job_id="finished")
    worker = workers(config, env=env)
    for job_id in ("held", "finished"):
        await wait_until(lambda j=job_id: job_if(sched, j, "running"), what="jobs running")
    bystander = workers(fault_config(tmp_path, pg_dsn, schema), env=env)
    await bystander.wait_for_log('"worker_starting"')
    seen: set[tuple[int, object]] = set()
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'LOCK TABLE "{schema}".jobs IN ACCESS EXCLUSIVE MODE')
        locked_at = time.monotonic()
        do_finish()  # its outcome cannot be written until the lock is gone

        async def seventh_claim_failed() -> bool:
            now = await _waiting(sched, app, CLAIM_SQL)
            seen.update(now)
            return len(seen) >= 7 and not now
        # After its 7th failed claim the fetcher sleeps 5-10 s.
        await wait_until(seventh_claim_failed, timeout=60, interval=0.02,
                         what="seven claims failed behind the lock")
        await locker.commit()
    print(f"lock held {time.monotonic() - locked_at:.1f} s (lease 3 s)")
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=30) == 0
    took = time.monotonic() - signalled
    print(f"stopped {took:.1f} s after SIGTERM (grace {grace} s)")
    assert not log_events(worker, "shutdown_timed_out"), took
    # Released (pending, no failure, no recovery): the release's NOTIFY may have woken the
    # idle bystander already, which then holds it as its own next attempt.
    row = await sched.store.get_job("held")
    stopped_id = json.loads(log_events(worker, "worker_starting")[0])["worker_id"]
    assert (row["failures"], row["recoveries"]) == (0, 0), row
    assert str(row["status"]) == "pending" or (
        str(row["status"]) == "running" and row["worker_id"] != stopped_id), row
    assert [json.loads(e)["count"] for e in log_events(worker, "jobs_released")] == [1]
    assert not log_events(bystander, "job_recovered")
    row = await sched.store.get_job("finished")
    assert (str(row["status"]), row["attempts"]) == ("completed", 1), row
    do_release()
    await wait_until(lambda: job_if(sched, "held", "completed"), what="the bystander runs it")
    check_each_completed_once(await jobs(sched), await audit(sched))
    bystander.signal(signal.SIGTERM)
    assert await bystander.wait() == 0
    await asyncio.sleep(0)


async def test_sigterm_during_an_outage_that_ends_within_the_grace_releases_the_job(
        cluster, cluster_sched, schema, workers, tmp_path):
    """PostgreSQL goes away with a job in flight, SIGTERM arrives during the outage, and
    the server is back a second later, well within the grace: the job goes back to pending
    (no failure, no recovery) instead of being left running until its lease expires."""
    sched = cluster_sched
    grace = 4
    worker = workers(fault_config(tmp_path, cluster.app_dsn(), schema,
                                  shutdown_grace_seconds=grace))
    await sched.schedule("sleep", args=(600,), job_id="long")
    await wait_until(lambda: job_if(sched, "long", "running"), what="the job running")
    cluster.stop("fast")
    try:
        await worker.wait_for_log('"db_unavailable"')
        await asyncio.sleep(5)  # long enough for every loop's back-off to grow
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(1)
    finally:
        cluster.start()
    assert await worker.wait(timeout=grace + 1 + 5 + 10) == 0
    print(f"stopped {time.monotonic() - signalled:.1f} s after SIGTERM (grace {grace} s)")
    assert not log_events(worker, "shutdown_timed_out")
    row = await wait_until(lambda: job_if(sched, "long", "pending"), timeout=5,
                           what="the job released")
    assert (row["failures"], row["recoveries"], row["worker_id"]) == (0, 0, None), row


async def test_second_sigterm_while_the_release_waits_for_a_row_lock(
        sched, pg_dsn, schema, workers, tmp_path):
    """The shutdown's release is blocked by a row lock on the job (lock_timeout, retried),
    and a second SIGTERM arrives meanwhile: once the lock goes the job is released, the
    worker exits 0, and nothing is left running."""
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    config = fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=0.2)
    await sched.schedule("hold", args=("held", release), job_id="held")
    worker = workers(config, env=env)
    await wait_until(lambda: job_if(sched, "held", "running"), what="the job running")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                             ["held"])
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        await worker.wait_for_log('"job_interrupted"')
        await asyncio.sleep(1.0)  # the release waits behind the row lock
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        await locker.commit()
    assert await worker.wait(timeout=15) == 0
    print(f"stopped {time.monotonic() - signalled:.1f} s after the first SIGTERM")
    assert not log_events(worker, "shutdown_timed_out")
    row = await sched.store.get_job("held")
    assert (str(row["status"]), row["failures"], row["recoveries"]) == ("pending", 0, 0), row
    successor = workers(config, env=env)
    do_release()
    await wait_until(lambda: job_if(sched, "held", "completed"), what="run again")
    check_each_completed_once(await jobs(sched), await audit(sched))
    successor.signal(signal.SIGTERM)
    assert await successor.wait() == 0


async def test_sigterm_during_a_claim_that_then_succeeds(sched, pg_dsn, schema, workers,
                                                        tmp_path):
    """SIGTERM lands while a claim waits for a table lock; the lock goes and the claim
    takes the jobs after stop() was called: they run within the grace and complete once."""
    app = _app()
    env = audit_env(pg_dsn, schema)
    worker = workers(fault_config(tmp_path, with_params(pg_dsn, application_name=app),
                                  schema, lease_seconds=8), env=env)  # lock_timeout 2 s
    await worker.wait_for_log('"worker_starting"')
    due = await db_now(sched) + timedelta(seconds=1.5)
    await sched.schedule_bulk([JobSpec("record", args=(f"k{i}",), job_id=f"j{i}",
                                       execution_time=due) for i in range(3)])
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'LOCK TABLE "{schema}".jobs IN SHARE MODE')
        await wait_until(lambda: _waiting(sched, app, CLAIM_SQL), interval=0.01,
                         what="the timed claim waiting for the lock")
        worker.signal(signal.SIGTERM)
        await worker.wait_for_log('"signal_received"')
    assert await worker.wait(timeout=20) == 0
    assert not log_events(worker, "shutdown_timed_out")
    rows = await jobs(sched)
    assert {str(r["status"]) for r in rows} <= {"completed", "pending"}, rows
    done = [r for r in rows if str(r["status"]) == "completed"]
    executions = await audit(sched)
    check_each_completed_once(done, [e for e in executions
                                     if e["job_id"] in {r["id"] for r in done}])
    assert len(executions) == len(done), executions


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_signal_while_a_completion_waits_for_a_row_lock(sched, pg_dsn, schema, workers,
                                                             tmp_path, sig):
    """The completion of a finished job waits for a row lock when the signal comes.
    SIGTERM: the outcome is written once the lock goes, before the exit. SIGKILL: the
    statement the server already has still runs once the lock goes (else a bystander
    would recover the job after its lease and run it again, an audited rerun).
    """
    app = _app()
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    worker = workers(fault_config(tmp_path, with_params(pg_dsn, application_name=app),
                                  schema, lease_seconds=8), env=env)  # lock_timeout 2 s
    await sched.schedule("hold", args=("held", release), job_id="held")
    await wait_until(lambda: job_if(sched, "held", "running"), what="the job running")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                             ["held"])
        do_release()
        await wait_until(lambda: _waiting(sched, app, COMPLETE_SQL), interval=0.01,
                         what="the completion waiting for the row lock")
        worker.signal(sig)
        if sig == signal.SIGTERM:
            await worker.wait_for_log('"signal_received"')
    code = await worker.wait(timeout=20)
    if sig == signal.SIGTERM:
        assert code == 0 and not log_events(worker, "shutdown_timed_out")
        row = await sched.store.get_job("held")
        assert (str(row["status"]), row["recoveries"]) == ("completed", 0), row
    else:
        bystander = workers(fault_config(tmp_path, pg_dsn, schema), env=env)
        await wait_until(lambda: job_if(sched, "held", "completed"), timeout=40,
                         what="the job completed")
        assert await stop_all([bystander]) == [0]
    result = check_each_completed_once(await jobs(sched), await audit(sched))
    print(f"{signal.Signals(sig).name}: {result.executions} execution(s)")
    if sig == signal.SIGTERM:
        assert result.executions == 1


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_postgres_crash_during_completion_batches(cluster, cluster_sched, schema,
                                                        workers, tmp_path, mode):
    """PostgreSQL crashes (or restarts) for longer than a lease while two busy workers
    write completion batches: every job ends completed exactly once (reruns only after a
    recovered lease), both workers live on, and both stop cleanly with nothing running."""
    sched = cluster_sched
    dsn = cluster.app_dsn()
    env = audit_env(dsn, schema)
    await sched.schedule_bulk([JobSpec("record", args=(f"k{i}", 0.01), job_id=f"j{i:04d}")
                               for i in range(400)])
    crew = [workers(fault_config(tmp_path, dsn, schema, max_recoveries=100), env=env)
            for _ in range(2)]
    await wait_until(lambda: at_least(sched, "completed", 100), what="batches under way")
    cluster.stop(mode)
    await asyncio.sleep(4)  # longer than the 3 s lease
    cluster.start()
    await wait_until(lambda: job_if(sched, "j0000", "completed"), what="reconnected")
    await wait_until(lambda: at_least(sched, "completed", 400), timeout=90,
                     what="all jobs completed")
    assert all(w.proc.poll() is None for w in crew)
    result = check_each_completed_once(await jobs(sched), await audit(sched))
    rejected = sum(len(log_events(w, "job_completion_rejected")) for w in crew)
    print(f"{mode}: {len(result.reruns)} reruns, {rejected} completions rejected")
    assert await stop_all(crew) == [0, 0]
    assert (await counts(sched))["running"] == 0


async def test_smallest_pool_keeps_the_registry_heartbeat_through_an_exclusive_lock(
        sched, pg_dsn, schema, workers, tmp_path):
    """pool_size = 2 (the least allowed) for five users (fetcher, completer, heartbeat,
    maintenance, planner), and an ACCESS EXCLUSIVE lock on jobs for three leases while
    outcomes wait to be written: every statement on jobs holds a connection for
    lock_timeout, yet the registry heartbeat must get through often enough that an idle
    bystander recovers nothing; afterwards every job completes exactly once."""
    env = audit_env(pg_dsn, schema)
    early, finish_early = release_file(tmp_path, "early")
    late, finish_late = release_file(tmp_path, "late")
    config = fault_config(tmp_path, pg_dsn, schema)
    config.write_text(config.read_text().replace("[database]\n", "[database]\npool_size = 2\n"))
    await sched.schedule_bulk(
        [JobSpec("sync_hold", args=(f"early{i}", early), job_id=f"early{i}") for i in range(2)]
        + [JobSpec("sync_hold", args=(f"late{i}", late), job_id=f"late{i}") for i in range(2)])
    worker = workers(config, env=env)
    await wait_until(lambda: at_least(sched, "running", 4), what="four jobs running")
    (tmp_path / "bystander").mkdir()
    bystander = workers(fault_config(tmp_path / "bystander", pg_dsn, schema), env=env)
    await bystander.wait_for_log('"worker_starting"')
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'LOCK TABLE "{schema}".jobs IN ACCESS EXCLUSIVE MODE')
        finish_early()  # two outcomes the completer retries during the lock
        await asyncio.sleep(9)  # three 3 s leases
        await locker.commit()
    finish_late()
    await wait_until(lambda: at_least(sched, "completed", 4), timeout=40, what="all completed")
    rows = await jobs(sched)
    assert [lease_expiries(r) for r in rows] == [0] * 4, [r["errors"] for r in rows]
    result = check_each_completed_once(rows, await audit(sched))
    assert result.executions == 4 and not log_events(bystander, "job_recovered")
    assert await stop_all([worker, bystander]) == [0, 0]


async def test_two_sigterms_back_to_back_while_jobs_finish(sched, pg_dsn, schema, workers,
                                                           tmp_path):
    """Two SIGTERMs a few milliseconds apart, as jobs finish and outcomes are being
    written: the worker exits 0 within the kill's bound, nothing is left running, what
    finished is recorded once, the rest is back to pending without a failure."""
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    await sched.schedule_bulk(
        [JobSpec("hold", args=(f"h{i}", release), job_id=f"h{i}") for i in range(4)]
        + [JobSpec("record", args=(f"r{i}", 0.05), job_id=f"r{i:02d}") for i in range(40)])
    worker = workers(fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=600,
                                  concurrency=8), env=env)
    await wait_until(lambda: at_least(sched, "completed", 5), what="jobs under way")
    do_release()
    signalled = time.monotonic()
    worker.signal(signal.SIGTERM)
    await asyncio.sleep(0.005)
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=20) == 0  # the grace is 600 s
    print(f"stopped {time.monotonic() - signalled:.1f} s after two SIGTERMs")
    assert not log_events(worker, "shutdown_timed_out")
    rows = await jobs(sched)
    assert {str(r["status"]) for r in rows} <= {"completed", "pending"}
    assert all(r["failures"] == 0 and r["recoveries"] == 0 for r in rows)
    done = [r for r in rows if str(r["status"]) == "completed"]
    executions = await audit(sched)
    check_each_completed_once(done, [e for e in executions
                                     if e["job_id"] in {r["id"] for r in done}])
