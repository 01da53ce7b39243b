"""A second adversary's attacks on real `pgsched worker` processes (issue 9's review):
signals at the worst moment, and a table lock on jobs longer than lock_timeout and than
a lease. Every time: nothing is left running after a clean exit, every job completes
exactly once (the audit), and the worker exits within its grace plus a few seconds."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import psycopg
from conftest import wait_until

from .kit import (
    audit,
    audit_env,
    check_each_completed_once,
    fault_config,
    job_if,
    jobs,
    log_events,
    query,
    release_file,
    with_params,
)

CLAIM_SQL = "-- Claim up to %"  # claim_jobs, as the server shows it (with its comment)


async def _claims_waiting(sched, app: str) -> set[tuple[int, object]]:
    rows = await query(sched, "SELECT pid, query_start FROM pg_stat_activity "
                              "WHERE application_name = %s AND wait_event_type = 'Lock' "
                              "AND query LIKE %s", [app, CLAIM_SQL])
    return {(r["pid"], r["query_start"]) for r in rows}


async def test_sigterm_after_claims_failed_behind_a_table_lock_releases_promptly(
        sched, pg_dsn, schema, workers, tmp_path):
    """An ACCESS EXCLUSIVE lock on jobs makes every claim fail after lock_timeout, and the
    fetcher backs off further each time (up to 10 s). A SIGTERM that arrives once the lock
    is gone must not wait for that backoff: the running job is released within the grace,
    not left running for lease expiry (`shutdown_timed_out`). The lock also outlasts the
    lease: an idle bystander must not recover the live worker's job. A job that finished
    during the lock has its outcome written before the worker exits (the completer backed
    off too)."""
    app = f"adv-{uuid.uuid4().hex[:6]}"
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
            now = await _claims_waiting(sched, app)
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
    row = await sched.store.get_job("held")
    assert (str(row["status"]), row["failures"], row["recoveries"], row["worker_id"]) == \
        ("pending", 0, 0, None), row
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
