"""pgsched behind a real PgBouncer in transaction mode (pgbouncer.py starts it).

The CLI and worker processes reach PostgreSQL only through PgBouncer, with
`prepare_threshold = "none"` (PgBouncer 1.18 cannot route prepared statements). A worker
with `listen_dsn` set LISTENs on a direct connection and is woken by each enqueue: its
poll is longer than every deadline here, so a completed job proves the wake-up arrived.
Without listen_dsn the worker says it will poll, and polls its jobs through.
"""

from __future__ import annotations

import json

from conftest import run_cli, wait_until

from .kit import audit_env, fault_config, job_if

NEVER_POLL = 600  # seconds: longer than every deadline, so only a NOTIFY wakes the worker


def pooled_config(tmp_path, bouncer, schema: str, *, listen_dsn: str | None,
                  poll_seconds: float):
    path = fault_config(tmp_path, bouncer.dsn(), schema, poll_seconds=poll_seconds)
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


async def _registered(sched) -> bool:
    return bool(await sched.store.list_workers())
