"""schedule()'s single-job write (Store.insert_job) on the pools it may be given.

schedule() borrows its connection with the pool's getconn()/putconn() instead of
`async with pool.connection()` (issue 11: fewer layers a call). These tests hold it to
what connection() guaranteed: a pool that is not autocommit still has its job committed,
a failed statement leaves the connection clean, and a pool class with its own
connection() is still borrowed through it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from pgsched import ConflictResolution, JobSpec, Scheduler
from pgsched.store import _positional


async def _job_ids(pg_dsn: str, schema: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        rows = await (await conn.execute(f'SELECT id FROM "{schema}".jobs')).fetchall()
    return {row[0] for row in rows}


async def test_a_borrowed_pool_without_autocommit_still_commits_each_job(sched, pg_dsn, schema):
    """A connection handed back inside a transaction is rolled back by the pool: without
    the commit that connection() made, every job would vanish (and REPLACE's overwrite)."""
    async with AsyncConnectionPool(pg_dsn, min_size=1, max_size=1, open=False) as pool:
        borrowed = Scheduler(pool, schema=schema)
        await borrowed.open()
        first = await borrowed.schedule("noop")
        again = await borrowed.schedule("noop", job_id=first, queue="other",
                                        conflict_resolution=ConflictResolution.REPLACE)
        assert again == first
        await borrowed.close()
    assert await _job_ids(pg_dsn, schema) == {first}
    job = await sched.get_job(first)
    assert job["queue"] == "other"


async def test_a_failed_insert_hands_the_connection_back_clean(pg_dsn, schema, caplog):
    """A statement that fails (here: no jobs table yet) on a pool without autocommit
    leaves its transaction aborted; it is rolled back before the connection goes back,
    so the pool has nothing to roll back (it warns when it must) and the next job on the
    same single connection is written."""
    async with (AsyncConnectionPool(pg_dsn, min_size=1, max_size=1, open=False) as pool,
                Scheduler(pool, schema=schema) as borrowed):
        with (caplog.at_level(logging.WARNING, logger="psycopg.pool"),
              pytest.raises(psycopg.errors.UndefinedTable)):
            await borrowed.schedule("noop")
        assert not [r for r in caplog.records if "rolling back" in r.getMessage()]
        async with pool.connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        async with Scheduler(pg_dsn, schema=schema) as own:
            await own.migrate()
        job_id = await borrowed.schedule("noop")
    assert await _job_ids(pg_dsn, schema) == {job_id}


async def test_a_pool_with_its_own_connection_method_is_borrowed_through_it(
        sched, pg_dsn, schema):
    """An application's pool class may do its own work in connection() (a role, a
    search_path, a metric): schedule() then goes through it, not around it."""
    lent = []

    class CountingPool(AsyncConnectionPool):
        def connection(self, timeout=None):
            lent.append(timeout)
            return super().connection(timeout)

    async with (CountingPool(pg_dsn, kwargs={"autocommit": True}, min_size=1, max_size=1,
                             open=False) as pool,
                Scheduler(pool, schema=schema) as borrowed):
        job_id = await borrowed.schedule("noop")
    assert lent == [None]
    assert await _job_ids(pg_dsn, schema) == {job_id}


def test_positional_parameters_must_come_in_the_order_given():
    text = "INSERT INTO t (a, b) VALUES (%(a)s, %(b)s) RETURNING pg_notify(%(c)s, 'x')"
    assert _positional(text, ("a", "b", "c")) == (
        "INSERT INTO t (a, b) VALUES (%s, %s) RETURNING pg_notify(%s, 'x')")
    for wrong in (("b", "a", "c"), ("a", "b"), ("a", "b", "c", "d")):
        with pytest.raises(RuntimeError, match="in this order"):
            _positional(text, wrong)


async def test_concurrent_schedules_each_run_on_their_own_connections_cursor(
        pg_dsn, schema, sched):
    """insert_job keeps a cursor per pool connection: concurrent calls, each on a
    connection of its own, never share one (a cursor runs on the connection that made
    it), and all of their jobs are written."""
    async with Scheduler(pg_dsn, schema=schema, pool_size=3) as three:
        ids = await asyncio.gather(*(three.schedule("noop") for _ in range(30)))
        cursors = three.store._insert_cursors
        assert 1 <= len(cursors) <= 3
        assert all(cur.connection is conn for conn, cur in cursors.items())
    assert await _job_ids(pg_dsn, schema) == set(ids)


async def test_a_connection_lost_under_schedule_leaves_no_cursor_behind(pg_dsn, schema, sched):
    """The connection a cursor was kept for dies (a terminated backend): that call fails
    as it always did, the pool drops the connection, and the next call runs on a new
    connection and a new cursor; the dead connection's cursor is let go."""
    async with Scheduler(pg_dsn, schema=schema, pool_size=1) as one:
        await one.schedule("noop")
        (dead,) = one.store._insert_cursors
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (dead.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            await one.schedule("noop")
        job_id = await one.schedule("noop")
        (alive,) = one.store._insert_cursors
        assert alive is not dead and not alive.closed
    assert job_id in await _job_ids(pg_dsn, schema)


async def test_bulk_jobs_without_a_due_time_are_due_at_the_transactions_start(sched, pg_dsn):
    """schedule_bulk() copies a missing due time as `now`, which PostgreSQL reads as the
    transaction's start: the jobs' created_at (now() in the same transaction), whatever
    the client's clock says; its wake-up carries the earliest due time of the call, now()
    among them."""
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    future = past + timedelta(hours=2)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{sched.store.channel}"')

        async def wakes() -> list[float]:
            return [float(n.payload) async for n in listener.notifies(timeout=0.5)]

        now_ids = await sched.schedule_bulk(
            [JobSpec("noop"), JobSpec("noop", execution_time=future), JobSpec("noop")])
        jobs = [await sched.get_job(job_id) for job_id in now_ids]
        due = jobs[0]["execution_time"]
        assert [j["execution_time"] for j in jobs] == [due, future, due]
        assert all(j["created_at"] == due for j in jobs)
        assert await wakes() == [due.timestamp()]
        await sched.schedule_bulk([JobSpec("noop"), JobSpec("noop", execution_time=past)])
        assert await wakes() == [past.timestamp()]
