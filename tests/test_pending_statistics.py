"""The worker's ANALYZE of jobs after a burst into a drained table (Store.statistics_suspect,
Store.refresh_pending_statistics, migration 0017, worker/maintenance.py).

Analysed while no job was pending, PostgreSQL expects about one pending row, and every
claim after a burst reads a pending index whole and sorts it until the next ANALYZE
(tests/test_claim_flat_review.py measures the claims). These tests check the rule that
decides, the lock it must not wait for, and real worker processes running as the runtime
role of `migrate --grant`: one that analyses, and one that may not and keeps working.
"""

from __future__ import annotations

import json

import psycopg
import pytest
from conftest import run_cli, wait_until
from psycopg import sql
from test_claim_flat import claim_ids
from test_hostile import granted as granted  # the runtime role's config, as a fixture
from test_hostile import roles as roles

from pgsched.store import ANALYZE_PENDING_ROWS, PREPARED_CLAIM_ROWS, statistics_behind

HISTORY = ("INSERT INTO {jobs} (id, task, status, execution_time, finished_at) "
           "SELECT 'h' || g, 'noop', 'completed', now(), now() FROM generate_series(1, {n}) g")
BURST = ("INSERT INTO {jobs} (id, task, execution_time) "
         "SELECT 'n' || g, 'noop', now() - make_interval(secs => g) "
         "FROM generate_series(1, {n}) g")


@pytest.mark.parametrize(("pending", "counted", "changed", "behind"), [
    (PREPARED_CLAIM_ROWS, 0, 50_000, True),        # a burst after an ANALYZE of none
    (PREPARED_CLAIM_ROWS, -1, 50_000, True),       # ... of a table never analysed
    (ANALYZE_PENDING_ROWS, 0, ANALYZE_PENDING_ROWS, True),
    (ANALYZE_PENDING_ROWS - 1, 0, 50_000, False),  # a trickle: sorting it costs little
    (3_000, 2_000, 50_000, False),                 # the statistics count most of them
    (4_000, 2_000, 50_000, True),
    (2_000, 0, 1_999, False),  # analysed since they came: its sample missed them
    (PREPARED_CLAIM_ROWS, None, 50_000, False),    # no pending index to read them from
])
def test_statistics_are_behind_only_when_an_analyze_would_count_many_more_pending_jobs(
        pending, counted, changed, behind):
    assert statistics_behind(pending, counted, changed) is behind


def fill(dsn: str, schema: str, *, history: int, burst: int) -> None:
    """`history` finished jobs, analysed, autovacuum off (so that only pgsched analyses);
    then `burst` pending ones. The session ends, so its row counts reach the statistics."""
    jobs = sql.Identifier(schema, "jobs")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(jobs))
        conn.execute(sql.SQL(HISTORY.format(jobs="{}", n=history)).format(jobs))
        conn.execute(sql.SQL("ANALYZE {}").format(jobs))
        conn.execute(sql.SQL(BURST.format(jobs="{}", n=burst)).format(jobs))


def analyses(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute("SELECT analyze_count FROM pg_stat_user_tables "
                            "WHERE schemaname = %s AND relname = 'jobs'", [schema]).fetchone()[0]


async def test_an_analyze_held_off_by_another_skips_at_once_and_claims_go_on(sched, pg_dsn):
    fill(pg_dsn, sched.schema, history=5_000, burst=3_000)
    assert len(await claim_ids(sched.store, 8)) == 8
    assert sched.store.statistics_suspect
    before = analyses(pg_dsn, sched.schema)
    with psycopg.connect(pg_dsn) as holder:  # as autovacuum or another worker's ANALYZE
        holder.execute(sql.SQL("LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE")
                       .format(sql.Identifier(sched.schema, "jobs")))
        outcome, warning = await sched.store.refresh_pending_statistics()
        assert outcome == "busy" and "lock not available" in warning, warning
        assert len(await claim_ids(sched.store, 8)) == 8  # claims never wait for it
    assert analyses(pg_dsn, sched.schema) == before
    assert await sched.store.refresh_pending_statistics() == ("analyzed", "")
    assert analyses(pg_dsn, sched.schema) == before + 1
    # counted now: nothing more to do, until the pending jobs outgrow it again
    assert await sched.store.refresh_pending_statistics() == ("current", "")


def events(worker, name: str) -> list[dict]:
    return [json.loads(line) for line in worker.log().splitlines() if f'"{name}"' in line]


async def test_a_worker_of_the_runtime_role_analyses_jobs_after_a_burst(granted, workers):
    roles, config = granted
    fill(roles.owner_dsn, roles.schema, history=20_000, burst=2_000)
    before = analyses(roles.owner_dsn, roles.schema)
    worker = workers(config)
    await worker.wait_for_log('"statistics_refreshed"', timeout=30)
    assert analyses(roles.owner_dsn, roles.schema) == before + 1
    assert events(worker, "statistics_not_refreshed") == []


async def test_a_worker_that_may_not_analyse_says_so_once_and_runs_every_job(
        granted, workers, tmp_path):
    """A runtime role granted before migration 0017 has no EXECUTE on analyze_jobs()."""
    roles, config = granted
    with psycopg.connect(roles.owner_dsn, autocommit=True) as conn:
        conn.execute(f"REVOKE EXECUTE ON FUNCTION {roles.schema}.analyze_jobs() "
                     f"FROM {roles.runtime}")
    fill(roles.owner_dsn, roles.schema, history=5_000, burst=3_000)
    worker = workers(config)
    await worker.wait_for_log('"statistics_not_refreshed"', timeout=30)
    with psycopg.connect(roles.owner_dsn, autocommit=True) as conn:  # a second burst
        conn.execute(f"INSERT INTO {roles.schema}.jobs (id, task, execution_time) "
                     "SELECT 'm' || g, 'noop', now() FROM generate_series(1, 2000) g")

    def pending() -> int:
        with psycopg.connect(roles.owner_dsn) as conn:
            return conn.execute(f"SELECT count(*) FROM {roles.schema}.jobs "
                                "WHERE status <> 'completed'").fetchone()[0]

    await wait_until(lambda: pending() == 0, timeout=90, what="every job to run")
    assert worker.proc.poll() is None, worker.log()[-2000:]
    refused = events(worker, "statistics_not_refreshed")
    assert len(refused) == 1 and "permission denied" in refused[0]["error"], refused
    assert events(worker, "statistics_refreshed") == []
    # re-running `migrate --grant` (as after every upgrade) gives it back
    owner_config = tmp_path / "owner" / "pgsched.toml"
    assert run_cli("migrate", "--grant", roles.runtime, config=owner_config).returncode == 0
    with psycopg.connect(roles.runtime_dsn, autocommit=True) as conn:
        conn.execute(f"SELECT {roles.schema}.analyze_jobs()")
