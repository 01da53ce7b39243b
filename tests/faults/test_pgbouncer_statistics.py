"""The worker's ANALYZE of jobs after a burst (issue 14), through a real PgBouncer in
transaction mode: analyze_jobs() and the WARNING that says it skipped the table must work
through the pooler as they do on a direct connection."""

from __future__ import annotations

import json

import psycopg
from conftest import wait_until
from test_pending_statistics import analyses, fill

from .test_pgbouncer import pooled_config


async def test_a_worker_behind_pgbouncer_analyses_jobs_after_a_burst(
        cluster, cluster_sched, schema, pgbouncer, workers, tmp_path):
    fill(cluster.superuser_dsn, schema, history=20_000, burst=2_000)
    before = analyses(cluster.superuser_dsn, schema)
    config = pooled_config(tmp_path, pgbouncer, schema, listen_dsn=None, poll_seconds=1)
    worker = workers(config, "--no-migrate")
    await worker.wait_for_log('"statistics_refreshed"', timeout=60)
    assert analyses(cluster.superuser_dsn, schema) == before + 1

    def pending() -> int:
        with psycopg.connect(cluster.superuser_dsn) as conn:
            return conn.execute(f'SELECT count(*) FROM "{schema}".jobs '
                                "WHERE status <> 'completed'").fetchone()[0]

    await wait_until(lambda: pending() == 0, timeout=120, what="the burst to drain")
    log = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert [e for e in log if e["event"] in ("maintenance_db_error",
                                             "statistics_not_refreshed")] == []
    assert "prepared statement" not in pgbouncer.log
