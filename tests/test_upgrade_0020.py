"""Claims while migration 0020 runs and after it: those of the previous release against
the schema of this one (a rolling deploy: the first new worker migrates at start, and the
old ones go on claiming until they are replaced; their statement text is
tests/claims_0019.sql), and those of this release while 0020 runs again after a failure.
Each must find its rows by walking an index, as test_claim_flat_adversary counts rows
read: a claim planned as a scan of jobs reads the table at every poll. And 0020 cut short
anywhere (a statement, a build) migrates again to the schema a fresh run leaves, with
statistics that count a burst it found."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import psycopg
import pytest
from conftest import claim_params, fast_options
from psycopg import sql
from test_claim_flat import scans_of_jobs
from test_claim_flat_adversary import rows_read as rows_of_jobs_read
from test_pending_statistics import fill

from pgsched import JobSpec, Scheduler
from pgsched.store import (
    OneConnection,
    Store,
    _bind,
    _variants,
    migrations,
    parse_named_blocks,
    split_statements,
)

CLAIM_OF_10 = claim_params()


async def jobs_due_and_later(sched) -> None:
    """100,000 pending jobs over 5 queues and 3 priorities, 99 of them due."""
    async with sched.store.pool.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute(sql.SQL(
            "INSERT INTO {s}.jobs (id, task, queue, priority, execution_time) "
            "SELECT 'j' || g, 'noop', 'q' || (g % 5), g % 3, CASE WHEN g < 100"
            " THEN now() - interval '1 minute' ELSE now() + make_interval(secs => g) END "
            "FROM generate_series(1, 100000) g").format(s=sql.Identifier(sched.schema)))
        await conn.execute(sql.SQL("ANALYZE {}.jobs").format(sql.Identifier(sched.schema)))


async def rows_read(conn, statement: str, queues: list[str] | None = None) -> int:
    """Rows of jobs one claim of 10 by `statement` reads, rolled back."""
    async with conn.transaction(force_rollback=True):
        await conn.execute("SET LOCAL statement_timeout = 0")
        cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement,
                                 dict(CLAIM_OF_10, queues=queues))
        plan = (await cur.fetchone())[0][0]["Plan"]
    return sum(rows for _, rows in scans_of_jobs(plan))


def claims_0019() -> dict[str, str]:
    text = (Path(__file__).parent / "claims_0019.sql").read_text("utf-8")
    return {name: variant for block, body in parse_named_blocks(text).items()
            for name, variant in _variants(block, body)}


@pytest.mark.parametrize("queues", [None, ["q1", "q2"]], ids=["every-queue", "listed"])
@pytest.mark.parametrize("name", ["claim_jobs", "claim_jobs_unlimited", "claim_jobs_flat"])
async def test_a_claim_of_the_previous_release_walks_an_index_after_the_migration(
        sched, name, queues):
    await jobs_due_and_later(sched)
    statement = _bind(claims_0019()[name], sched.schema)
    async with sched.store.pool.connection() as conn:
        read = await rows_read(conn, statement, queues)
    assert read < 1000, f"{name} of the previous release read {read} rows for 10 jobs"


async def test_claims_walk_an_index_at_every_statement_of_0020_run_again(sched, pg_dsn):
    await jobs_due_and_later(sched)
    [(_, _, text)] = [m for m in migrations() if m[0] == 20]
    read = {}
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        for number, statement in enumerate(split_statements(_bind(text, sched.schema))):
            await conn.execute(statement)
            for name in ("claim_jobs", "claim_jobs_flat"):
                read[f"{name} after statement {number}"] = await rows_read(
                    conn, sched.store._q[name])
    worst = max(read, key=read.__getitem__)
    assert read[worst] < 1000, f"{worst}: {read[worst]} rows read for 10 jobs"


async def _indexes(conn, schema: str) -> dict[str, tuple[str, bool]]:
    cur = await conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid"
        " JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s", [schema])
    return {name: (definition.replace(f'"{schema}"', "S").replace(schema, "S"), valid)
            for name, definition, valid in await cur.fetchall()}


async def test_0020_cut_short_after_any_statement_migrates_again_to_the_same_schema(
        pg_dsn, schema):
    """A failure after any statement of 0020 (the version unrecorded), or during an index
    build (an invalid index left), then `migrate` again: the schema ends as a fresh
    migration leaves it, every index valid, and claims take suspects apart."""
    [(_, _, text)] = [m for m in migrations() if m[0] == 20]
    statements = split_statements(_bind(text, schema + "_ref"))
    async with Scheduler(pg_dsn, schema=schema + "_ref", options=fast_options()) as ref:
        await ref.migrate()
        async with ref.store.pool.connection() as conn:
            expected = await _indexes(conn, schema + "_ref")
    try:
        for cut in range(len(statements) + 1):
            name = f"{schema}_{cut}"
            async with Scheduler(pg_dsn, schema=name, options=fast_options()) as sched:
                assert await sched.store.migrate(target=19) == 19
                await sched.schedule_bulk([JobSpec("noop", job_id=f"j{i}") for i in range(50)])
                async with await psycopg.AsyncConnection.connect(
                        pg_dsn, autocommit=True) as conn:
                    await conn.execute(sql.SQL(
                        "UPDATE {}.jobs SET suspect = true WHERE id < 'j2'").format(
                            sql.Identifier(name)))
                    for statement in split_statements(_bind(text, name))[:cut]:
                        await conn.execute(statement)
                    built = re.search(r"CREATE INDEX CONCURRENTLY (\w+)",
                                      statements[cut] if cut < len(statements) else "")
                    if built:  # a build cut short leaves its index invalid under its name
                        await conn.execute(split_statements(_bind(text, name))[cut])
                        await conn.execute(
                            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
                            "to_regclass(%s)", [f'"{name}".{built.group(1)}'])
                assert await sched.store.migrate() == migrations()[-1][0]
                async with sched.store.pool.connection() as conn:
                    assert await _indexes(conn, name) == expected, f"cut after {cut}"
                claimed, _, _ = await sched.store.claim_jobs(
                    worker_id="w", limit=100, lease_seconds=60)
                assert len(claimed) == 50 - 12, f"cut after {cut}"
    finally:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            for cut in range(len(statements) + 1):
                await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(f"{schema}_{cut}")))
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema + "_ref")))


@pytest.mark.parametrize("queues", [None, ["default"]], ids=["flat", "per-queue"])
async def test_a_burst_not_yet_analysed_at_the_upgrade_is_analysed_before_claims_prepare(
        pg_dsn, schema, queues):
    """0020 builds the pending indexes anew, and a build sets the new index's reltuples to
    the rows there are: the count the claim's statistics gate (PREPARED_CLAIM_ROWS) and the
    statistics check read as what the last ANALYZE saw. A burst that came after the last
    ANALYZE (history only) and before the upgrade must still be analysed, or claims are
    prepared on statistics that count no pending row and read the burst at every claim."""
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as s:
        assert await s.store.migrate(target=19) == 19
        fill(pg_dsn, schema, history=20_000, burst=50_000)
        assert await s.store.migrate() == migrations()[-1][0]
        refreshed = await s.store.refresh_pending_statistics()
        # a connection of its own: a backend's row counts include its migrations' reads
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            with Store.using(OneConnection(conn)):
                for _ in range(12):  # PostgreSQL makes a generic plan at the sixth run
                    await s.store.claim_jobs(worker_id="w", limit=2, lease_seconds=60,
                                             queues=queues)
                async with conn.transaction(force_rollback=True):
                    claimed, _, _ = await s.store.claim_jobs(
                        worker_id="w", limit=2, lease_seconds=60, queues=queues)
                    read = await rows_of_jobs_read(conn, schema)
    assert len(claimed) == 2
    assert read < 1000, f"13 claims of 2 read {read} rows of jobs (statistics {refreshed[0]})"


async def test_0020_killed_mid_build_while_claims_go_on_migrates_again(pg_dsn, schema):
    """A real cut: the migrating backend is terminated while it builds an index of 0020
    CONCURRENTLY, claims running meanwhile; `migrate` again ends at the latest version
    with every index valid, and no claim failed or took a suspect."""
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as s:
        assert await s.store.migrate(target=19) == 19
        await jobs_due_and_later(s)
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await conn.execute(sql.SQL("UPDATE {}.jobs SET suspect = true WHERE id = 'j1'")
                               .format(sql.Identifier(schema)))
        migrating = asyncio.create_task(s.store.migrate())
        claimed: list[str] = []
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX "
                    "CONCURRENTLY jobs_pending_ordinary%%' AND state = 'active'")
                pids = [pid for (pid,) in await cur.fetchall()]
                if pids:
                    await conn.execute(
                        "SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p", [pids])
                    break
                assert not migrating.done(), "0020 finished before it could be cut"
                taken, _, _ = await s.store.claim_jobs(worker_id="w", limit=2,
                                                       lease_seconds=60)
                claimed += [job["id"] for job in taken]
        with pytest.raises(psycopg.OperationalError):
            await migrating
        for _ in range(3):
            taken, _, _ = await s.store.claim_jobs(worker_id="w", limit=2, lease_seconds=60)
            claimed += [job["id"] for job in taken]
        assert await s.store.migrate() == migrations()[-1][0]
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            indexes = await _indexes(conn, schema)
        assert all(valid for _, valid in indexes.values()), indexes
        # the old ones stay for the previous release's workers (0020's header)
        assert {"jobs_pending_ordinary_queue_idx", "jobs_pending_ordinary_due_idx",
                "jobs_pending_queue_idx", "jobs_pending_due_idx"} <= set(indexes)
        assert claimed and "j1" not in claimed and len(set(claimed)) == len(claimed)
