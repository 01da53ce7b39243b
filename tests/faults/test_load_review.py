"""Review of branch `load`'s prepared completions (store.PREPARED_COMPLETE_ROWS) behind a
real PgBouncer in transaction mode with `prepare_threshold = "none"`: once the statistics
count enough rows for the store to ask for prepared claims and completions, nothing may
be prepared all the same (a prepared statement made on one server connection is missing
on the next one PgBouncer hands out).
"""

from __future__ import annotations

import psycopg

from .kit import audit_env, job_if
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
