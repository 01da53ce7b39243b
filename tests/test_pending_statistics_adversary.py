"""Adversarial review of the worker's ANALYZE of jobs (issue 14, branch stats): many
workers detecting one burst, schema names that need quoting, what analyze_jobs() lets a
runtime role or a role with no rights do, and the locks the ANALYZE could wait for.

Each test runs against a real PostgreSQL; the role tests create their roles in the
throwaway cluster (tests/faults/cluster.py, PostgreSQL 15)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import fast_options
from faults.cluster import Cluster, cluster_or_skip
from psycopg import sql
from test_hostile import granted as granted  # the runtime role's config, as a fixture
from test_hostile import roles as roles
from test_pending_statistics import analyses, fill

from pgsched import Scheduler
from pgsched.store import Store, lock_timeout_for, migrations, open_pool


@pytest.mark.parametrize("stagger", [0.0, 0.002, 0.01])
async def test_ten_workers_that_detect_one_burst_analyse_jobs_once(sched, pg_dsn, stagger):
    """Ten workers' maintenance passes check the same burst at about the same moment
    (staggered by a few milliseconds, as their jittered passes are): SKIP_LOCKED keeps the
    ANALYZEs from queueing, and a check made while another ANALYZE runs must not start a
    second one once it has ended."""
    fill(pg_dsn, sched.schema, history=20_000, burst=5_000)
    before = analyses(pg_dsn, sched.schema)
    others = [Scheduler(pg_dsn, schema=sched.schema, options=fast_options()) for _ in range(10)]
    for other in others:
        await other.__aenter__()
    try:
        async def one(n: int) -> str:
            await asyncio.sleep(n * stagger)
            return (await others[n].store.refresh_pending_statistics())[0]

        outcomes = await asyncio.gather(*(one(n) for n in range(10)))
    finally:
        for other in others:
            await other.__aexit__(None, None, None)
    assert outcomes.count("analyzed") == 1, outcomes
    assert analyses(pg_dsn, sched.schema) == before + 1, outcomes


class _CheckThenWait(Store):
    """A store whose first look at the statistics is followed, before it goes on, by
    `meanwhile` (another worker's whole refresh): the worst moment, as a CI run under
    load met it (['analyzed', 'busy', ..., 'analyzed'] above, stagger 0.01)."""

    meanwhile: Any = None

    async def _rows(self, name: str, params: dict[str, Any], **kw: Any) -> list[Any]:
        rows = await super()._rows(name, params, **kw)
        if name == "pending_statistics" and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            await meanwhile()
        return rows


async def test_a_check_made_before_another_analyze_committed_runs_no_second(sched, pg_dsn):
    fill(pg_dsn, sched.schema, history=20_000, burst=5_000)
    before = analyses(pg_dsn, sched.schema)
    other = Scheduler(pg_dsn, schema=sched.schema, options=fast_options())
    async with other, await open_pool(pg_dsn) as pool:
        late = _CheckThenWait(pool, sched.schema)
        outcomes: list[str] = []

        async def other_refreshes() -> None:
            outcomes.append((await other.store.refresh_pending_statistics())[0])

        late.meanwhile = other_refreshes
        outcomes.append((await late.refresh_pending_statistics())[0])
    assert outcomes == ["analyzed", "current"]
    assert analyses(pg_dsn, sched.schema) == before + 1


async def test_a_schema_name_that_needs_quoting_is_analysed(pg_dsn):
    """validate_identifier accepts capitals, which PostgreSQL folds unless quoted: the
    function body, the GRANT and the to_regclass literals all need the quoted name."""
    schema = f"Rev_Mixed_{secrets.token_hex(3)}"
    try:
        async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as s:
            await s.migrate()
            fill(pg_dsn, schema, history=5_000, burst=3_000)
            before = analyses(pg_dsn, schema)
            assert await s.store.refresh_pending_statistics() == ("analyzed", "")
            assert analyses(pg_dsn, schema) == before + 1
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))


def test_a_role_with_no_rights_cannot_run_analyze_jobs(granted):
    roles, _ = granted
    stranger = f"stranger_{secrets.token_hex(3)}"
    with psycopg.connect(roles.superuser_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {stranger} LOGIN PASSWORD 'x' IN ROLE pg_read_all_stats")
        conn.execute(f"GRANT USAGE ON SCHEMA {roles.schema} TO {stranger}")
    try:
        dsn = f"postgresql://{stranger}:x@{roles.runtime_dsn.split('@', 1)[1]}"
        with (psycopg.connect(dsn, autocommit=True) as conn,
              pytest.raises(psycopg.errors.InsufficientPrivilege)):
            conn.execute(f"SELECT {roles.schema}.analyze_jobs()")
    finally:
        with psycopg.connect(roles.superuser_dsn, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {stranger}")
            conn.execute(f"DROP ROLE {stranger}")


def test_the_function_is_owned_by_the_schema_owner_with_a_pinned_path(granted):
    roles, _ = granted
    with psycopg.connect(roles.owner_dsn) as conn:
        row = conn.execute(
            "SELECT pg_get_userbyid(p.proowner), p.prosecdef, p.proconfig, "
            "       has_function_privilege('public', p.oid, 'EXECUTE') "
            "FROM pg_proc p WHERE p.oid = %s::regprocedure",
            [f"{roles.schema}.analyze_jobs()"]).fetchone()
    assert row == (roles.owner, True, ["search_path=pg_catalog, pg_temp", "lock_timeout=100ms",
                                        "client_min_messages=warning"], False), row


@pytest.fixture(scope="module")
def pg15() -> Iterator[Cluster]:
    """PostgreSQL 15 from the postgresql package: from 15.9 (16.5, 17.1) an in-place
    update of a pg_class row waits for a transaction that updated the row and has not
    ended, which the bundled server of pgserver (16.2) does not do."""
    bin_dir = Path("/usr/lib/postgresql/15/bin")
    if not (bin_dir / "initdb").exists():
        pytest.skip("no PostgreSQL 15 binaries in /usr/lib/postgresql/15/bin")
    cluster = cluster_or_skip(bin_dir)
    yield cluster
    cluster.destroy()


async def test_an_uncommitted_grant_on_jobs_makes_the_analyze_skip_not_wait(pg15):
    """`migrate --grant` (or an operator's GRANT in an open transaction) updates jobs'
    pg_class row and takes no table lock that conflicts with ANALYZE's, so SKIP_LOCKED
    does not apply; the ANALYZE's update of that row (reltuples) waited for it until the
    pool's lock_timeout, a maintenance pass held that long, and LockNotAvailable reached
    the maintenance loop as a maintenance_db_error."""
    dsn, schema = pg15.superuser_dsn, f"s_{secrets.token_hex(4)}"
    options = fast_options(lease_seconds=60.0, heartbeat_seconds=10.0)
    async with Scheduler(dsn, schema=schema, options=options) as s:
        await s.migrate()
        fill(dsn, schema, history=5_000, burst=3_000)
        with psycopg.connect(dsn) as holder:
            holder.execute(f"GRANT SELECT ON {schema}.jobs TO PUBLIC")
            started = time.monotonic()
            outcome, warning = await s.store.refresh_pending_statistics()
            waited = time.monotonic() - started
            holder.rollback()
        assert outcome == "busy" and "lock" in warning, (outcome, warning)
        # the pool's lock_timeout is 5 s; the ANALYZE gives up long before
        assert waited < lock_timeout_for(options.lease_seconds) / 2, waited
        assert await s.store.refresh_pending_statistics() == ("analyzed", "")

def explain_check(dsn: str, schema: str, store) -> tuple[int, str]:
    """Rows of jobs and its indexes that one pending_statistics check reads, and its
    plan's scans."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET max_parallel_workers_per_gather = 0")
        (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + store._q["pending_statistics"],
                               {"limit": 10_000}).fetchone()[0]
    scans, read = [], 0

    def walk(node):
        nonlocal read
        if node.get("Relation Name") == "jobs":  # the table or one of its indexes
            scans.append(f'{node["Node Type"]} {node.get("Index Name", "")}'.strip())
            read += node["Actual Rows"] * node["Actual Loops"] + node.get(
                "Rows Removed by Filter", 0) * node["Actual Loops"]
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return read, "; ".join(scans)


async def test_the_check_reads_at_most_its_limit_when_the_statistics_overcount_pending(
        sched, pg_dsn):
    """The check is meant to stop at PREPARED_CLAIM_ROWS "whatever the statistics say".
    Statistics taken while most rows were pending (a big burst, analysed), then the
    table drained and vacuumed (VACUUM sets the index's reltuples to what is left, so the
    claims run unprepared and a full one marks the statistics suspect, but leaves the
    planner's pending fraction as ANALYZE found it); then a smaller burst."""
    jobs = sql.Identifier(sched.schema, "jobs")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(jobs))
        conn.execute(sql.SQL(
            "INSERT INTO {} (id, task, status, execution_time, finished_at) "
            "SELECT 'h' || g, 'noop', 'completed', now(), now() "
            "FROM generate_series(1, 100000) g").format(jobs))
        conn.execute(sql.SQL("INSERT INTO {} (id, task, execution_time) "
                             "SELECT 'p' || g, 'noop', now() FROM generate_series(1, 100000) g"
                             ).format(jobs))
        conn.execute(sql.SQL("ANALYZE {}").format(jobs))
        conn.execute(sql.SQL("UPDATE {} SET status = 'completed', finished_at = now() "
                             "WHERE status = 'pending'").format(jobs))
        conn.execute(sql.SQL("VACUUM {}").format(jobs))
        conn.execute(sql.SQL("INSERT INTO {} (id, task, execution_time) "
                             "SELECT 'n' || g, 'noop', now() FROM generate_series(1, 1500) g"
                             ).format(jobs))
    read, scans = explain_check(pg_dsn, sched.schema, sched.store)
    print("check read", read, scans)
    assert read <= 10_000 + 10, f"one check read {read} rows ({scans})"


async def test_an_upgrade_from_0016_with_jobs_adds_the_function_and_runs_twice(pg_dsn, schema):
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as s:
        assert await s.store.migrate(target=16) == 16
        # The burst comes after the upgrade: 0020 builds the pending indexes anew, which
        # counts the pending rows there are and leaves nothing for an ANALYZE to change.
        fill(pg_dsn, schema, history=5_000, burst=0)
        latest = migrations()[-1][0]
        assert await s.store.migrate() == latest
        assert await s.store.migrate() == latest
        fill(pg_dsn, schema, history=0, burst=3_000)
        assert await s.store.refresh_pending_statistics() == ("analyzed", "")
    with psycopg.connect(pg_dsn) as conn:
        counts = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE status = 'pending'), "
                                      "count(*) FROM {}").format(sql.Identifier(schema, "jobs"))
                              ).fetchone()
    assert counts == (3_000, 8_000)


async def test_without_the_pending_index_the_check_does_not_analyse_after_every_change(
        sched, pg_dsn):
    """The statistics are read from jobs_pending_ordinary_due_idx's reltuples; with the
    index dropped (by hand) the check read -1, as for a table never analysed, which no
    ANALYZE changes: every time as many rows changed as are pending (heartbeats and claims, about
    every pass under load), the worker analysed the table again, to no effect."""
    fill(pg_dsn, sched.schema, history=5_000, burst=3_000)
    jobs = sql.Identifier(sched.schema, "jobs")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP INDEX {}").format(
            sql.Identifier(sched.schema, "jobs_pending_ordinary_due_idx")))
    outcomes = []
    for _ in range(3):
        outcomes.append((await sched.store.refresh_pending_statistics())[0])
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # as heartbeats, claims do
            conn.execute(sql.SQL("UPDATE {} SET attempts = attempts WHERE status = 'pending'")
                         .format(jobs))
            conn.execute("SELECT pg_stat_force_next_flush()")  # its counts reach the check
            conn.execute("SELECT 1")
    assert outcomes.count("analyzed") <= 1, outcomes


async def test_a_skipped_analyze_is_not_reported_as_done_when_warnings_are_not_sent(
        sched, pg_dsn):
    """SKIP_LOCKED says it skipped the table with a WARNING, and the store reads that
    WARNING; a role or database with client_min_messages = error (set to quieten the
    logs) is not sent it, and a skipped ANALYZE read as done (statistics_refreshed)."""
    fill(pg_dsn, sched.schema, history=5_000, burst=3_000)
    quiet = pg_dsn + ("&" if "?" in pg_dsn else "?") + "options=-c%20client_min_messages%3Derror"
    async with Scheduler(quiet, schema=sched.schema, options=fast_options()) as s:
        with psycopg.connect(pg_dsn) as holder:
            holder.execute(sql.SQL("LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE")
                           .format(sql.Identifier(sched.schema, "jobs")))
            outcome, warning = await s.store.refresh_pending_statistics()
    assert outcome == "busy", (outcome, warning)
