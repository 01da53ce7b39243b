"""Review of branch `load`'s prepared completions (store.PREPARED_COMPLETE_ROWS) behind a
real PgBouncer in transaction mode with `prepare_threshold = "none"`: once the statistics
count enough rows for the store to ask for prepared claims and completions, nothing may
be prepared all the same (a prepared statement made on one server connection is missing
on the next one PgBouncer hands out).
"""

from __future__ import annotations

import asyncio
import signal

import psycopg

from .kit import (
    audit,
    audit_env,
    check_each_completed_once,
    fault_config,
    job_if,
    jobs,
    log_events,
    release_file,
)
from .test_pgbouncer import NEVER_POLL, _registered, pooled_config


async def test_a_worker_behind_pgbouncer_prepares_nothing_on_a_large_jobs_table(
        cluster, cluster_sched, schema, pgbouncer, workers, tmp_path):
    sched = cluster_sched
    async with await psycopg.AsyncConnection.connect(cluster.app_dsn(),
                                                     autocommit=True) as conn:
        # Past both thresholds (PREPARED_CLAIM_ROWS pending, PREPARED_COMPLETE_ROWS in
        # all), and analysed, so every claim reports them.
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, status, execution_time, finished_at) '
            "SELECT 'old' || g, 'noop', 'completed', now(), now() "
            "FROM generate_series(1, 20000) g")
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, execution_time) '
            "SELECT 'future' || g, 'noop', now() + interval '1 day' "
            "FROM generate_series(1, 12000) g")
        await conn.execute(f'ANALYZE "{schema}".jobs')
    config = pooled_config(tmp_path, pgbouncer, schema, listen_dsn=cluster.app_dsn(),
                           poll_seconds=NEVER_POLL)
    worker = workers(config, "--no-migrate", env=audit_env(cluster.app_dsn(), schema))
    await wait_for(lambda: _registered(sched), "worker registered")
    # One at a time, more than psycopg's 5 executions per statement and connection.
    for n in range(12):
        await sched.schedule("record", args=(f"k{n}",), job_id=f"k{n}")
        await wait_for(lambda j=f"k{n}": job_if(sched, j, "completed"), f"k{n} completed")
    assert "prepared statement" not in pgbouncer.log
    assert "db_unavailable" not in worker.log_path.read_text()


async def wait_for(predicate, what: str) -> None:
    from conftest import wait_until

    await wait_until(predicate, timeout=30, what=what)


async def test_sigterm_while_the_fetcher_waits_for_a_write_behind_a_row_lock(
        sched, pg_dsn, schema, workers, tmp_path):
    """A real worker of 2 slots: one job's completion waits behind a row lock (another
    session's FOR UPDATE) and two more outcomes wait behind it, past a batch, so the
    fetcher is held back by the write. SIGTERM then, and the lock let go a second later:
    the worker exits 0 without timing out, the three are completed once each, and a job
    added after the signal is left pending for the next worker."""
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=2, poll_seconds=60,
                          lease_seconds=8)  # lock_timeout 2 s
    worker = workers(config, env=env)
    await sched.schedule("hold", args=("locked", release), job_id="locked")
    await wait_for(lambda: job_if(sched, "locked", "running"), "locked running")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                             ["locked"])
        do_release()
        for key in ("a", "b"):
            await sched.schedule("record", args=(key,), job_id=key)
        await wait_for(lambda: _audited(sched, 3), "locked, a and b ran")
        worker.signal(signal.SIGTERM)
        await worker.wait_for_log('"signal_received"')
        await sched.schedule("record", args=("after",), job_id="after")
        await asyncio.sleep(1.0)
        await locker.rollback()
    assert await worker.wait(timeout=30) == 0
    assert not log_events(worker, "shutdown_timed_out")
    rows = {r["id"]: r for r in await jobs(sched)}
    assert str(rows["after"]["status"]) == "pending" and rows["after"]["attempts"] == 0
    done = [rows[k] for k in ("locked", "a", "b")]
    assert check_each_completed_once(done, await audit(sched)).executions == 3


async def _audited(sched, n: int) -> bool:
    return len(await audit(sched)) >= n
