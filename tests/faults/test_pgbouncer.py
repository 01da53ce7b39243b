"""pgsched behind a real PgBouncer in transaction mode (pgbouncer.py starts it).

The CLI and worker processes reach PostgreSQL only through PgBouncer, with
`prepare_threshold = "none"` (PgBouncer 1.18 cannot route prepared statements). A worker
with `listen_dsn` set LISTENs on a direct connection and is woken by each enqueue: its
poll is longer than every deadline here, so a completed job proves the wake-up arrived.
Without listen_dsn the worker says it will poll, and polls its jobs through.
"""

from __future__ import annotations

import asyncio
import json

import psycopg
from conftest import claim_params, run_cli, wait_until
from psycopg.rows import dict_row

from .kit import audit_env, fault_config, job_if

NEVER_POLL = 600  # seconds: longer than every deadline, so only a NOTIFY wakes the worker


def pooled_config(tmp_path, bouncer, schema: str, *, listen_dsn: str | None,
                  poll_seconds: float, **worker):
    path = fault_config(tmp_path, bouncer.dsn(), schema, poll_seconds=poll_seconds, **worker)
    extra = 'prepare_threshold = "none"\n'
    if listen_dsn is not None:
        extra += f'listen_dsn = "{listen_dsn}"\n'
    path.write_text(path.read_text().replace("[database]\n", "[database]\n" + extra, 1))
    return path


def cli(config, *args: str):
    done = run_cli(*args, config=config)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def added_and_completed(sched, config, name: str, count: int = 8) -> None:
    # More than psycopg's default prepare_threshold (5) executions of the same insert.
    for n in range(count):
        cli(config, "add", "record", "--args", json.dumps([f"{name}-{n}"]), "--id",
            f"{name}-{n}")
    for n in range(count):
        await wait_until(lambda j=f"{name}-{n}": job_if(sched, j, "completed"), timeout=30,
                         what=f"{name}-{n} completed through PgBouncer")


async def test_cli_and_a_listening_worker_through_pgbouncer(cluster, cluster_sched, schema,
                                                            pgbouncer, workers, tmp_path):
    config = pooled_config(tmp_path, pgbouncer, schema, listen_dsn=cluster.app_dsn(),
                           poll_seconds=NEVER_POLL)
    worker = workers(config, "--no-migrate", env=audit_env(cluster.app_dsn(), schema))
    await wait_until(lambda: _registered(cluster_sched), what="worker registered")
    await added_and_completed(cluster_sched, config, "woken")

    listed = json.loads(cli(config, "ls", "--json", "--limit", "100"))
    assert {job["id"] for job in listed} >= {f"woken-{n}" for n in range(8)}
    cli(config, "add", "record", "--args", '["later"]', "--id", "later", "--in", "1h")
    assert "later" in cli(config, "cancel", "later")
    assert await job_if(cluster_sched, "later", "cancelled")
    assert "listen_through_pooler" not in worker.log_path.read_text()
    assert "prepared statement" not in pgbouncer.log


async def test_a_worker_without_listen_dsn_warns_and_polls(cluster, cluster_sched, schema,
                                                          pgbouncer, workers, tmp_path):
    config = pooled_config(tmp_path, pgbouncer, schema, listen_dsn=None, poll_seconds=1)
    worker = workers(config, "--no-migrate", env=audit_env(cluster.app_dsn(), schema))
    await wait_until(lambda: _registered(cluster_sched), what="worker registered")
    await added_and_completed(cluster_sched, config, "polled")
    assert "listen_through_pooler" in worker.log_path.read_text()


async def test_a_claim_through_pgbouncer_that_lets_a_job_go_wakes_a_listening_worker(
        cluster, cluster_sched, schema, pgbouncer, workers, tmp_path):
    """A claim from several queues that locked more than it took wakes the workers of the
    queue it let go (let_go, a NOTIFY inside the claim's transaction): through PgBouncer in
    transaction mode it is sent at that transaction's commit all the same, and heard on
    the worker's listen_dsn. The worker's poll is longer than the deadline."""
    config = pooled_config(tmp_path, pgbouncer, schema, listen_dsn=cluster.app_dsn(),
                           poll_seconds=NEVER_POLL, concurrency=1, queues=["q1", "q2"])
    workers(config, "--no-migrate", env=audit_env(cluster.app_dsn(), schema))
    await wait_until(lambda: _registered(cluster_sched), what="worker registered")
    sched = cluster_sched
    busy = await sched.schedule("sleep", args=(3.0,), queue="q2")
    await wait_until(lambda: job_if(sched, busy, "running"), timeout=30, what="busy")
    first = await sched.schedule("noop", queue="q1", job_id="j1")
    second = await sched.schedule("noop", queue="q2", job_id="j2")
    async with await psycopg.AsyncConnection.connect(pgbouncer.dsn(),
                                                     prepare_threshold=None) as other:
        cur = other.cursor(row_factory=dict_row)
        await cur.execute(sched.store._q["claim_jobs_unlimited"], claim_params(
            worker_id="other", limit=1, lease_seconds=30, queues=["q1", "q2"],
            limit_recheck_seconds=1.0, channel=sched.store.channel))
        assert [r["id"] for r in await cur.fetchall()] == [first]
        assert await job_if(sched, busy, "running"), "the worker was idle: no race made"
        # The busy job ends; the worker claims with its slot free and skips j2.
        await wait_until(lambda: job_if(sched, busy, "completed"), timeout=30,
                         what="the busy job to end")
        await asyncio.sleep(1.0)
        await other.commit()
    await wait_until(lambda: job_if(sched, second, "completed"), timeout=20,
                     what="the job a claim through PgBouncer let go to run")


async def _registered(sched) -> bool:
    return bool(await sched.store.list_workers())
