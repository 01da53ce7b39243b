"""Transactional enqueue and waiting for an outcome (issue 13), against a real PostgreSQL
and real `pgsched worker` processes: a job written through the caller's connection
exists, and wakes a worker, only if the caller's transaction commits; `wait()` and
`pgsched add --wait` return when the job ends, woken by its NOTIFY."""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest
from conftest import run_cli, wait_until, write_config

import pgsched.scheduler
from pgsched import JobConflict, JobNotFound, JobSpec, Scheduler, WaitTimedOut
from pgsched.errors import InvalidInput

MARKER_CHANNEL = "pgsched_test_marker"


async def job_ids(pg_dsn: str, schema: str) -> list[str]:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute(f'SELECT id FROM "{schema}".jobs ORDER BY id')
        return [row[0] for row in await cur.fetchall()]


async def notifications_until_marker(listener: psycopg.AsyncConnection, pg_dsn: str) -> list:
    """Everything delivered on the listener before a marker committed now: notifications
    arrive in commit order, so one a transaction sent before the marker comes first."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify(%s, 'end')", [MARKER_CHANNEL])
    seen = []
    async for notice in listener.notifies(timeout=30):
        if notice.channel == MARKER_CHANNEL:
            return seen
        seen.append(notice.payload)
    raise AssertionError("the marker never arrived")


@pytest.fixture
async def listener(pg_dsn, sched):
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    await conn.execute(f'LISTEN "{sched.store.channel}"')
    await conn.execute(f"LISTEN {MARKER_CHANNEL}")
    yield conn
    await conn.close()


@pytest.fixture
def three_workers(tmp_path, pg_dsn, schema, sched, workers):
    config = write_config(tmp_path, pg_dsn, schema)
    return [workers(config) for _ in range(3)]


# -- transactional enqueue ----------------------------------------------------------------


async def test_rolled_back_enqueue_leaves_no_job_and_wakes_no_worker(
        pg_dsn, schema, sched, listener, three_workers):
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:  # not autocommit
        job_id = await sched.schedule("noop", connection=conn)
        [bulk_id] = await sched.schedule_bulk([JobSpec("noop")], connection=conn)
        assert await job_ids(pg_dsn, schema) == []  # not visible before the commit
        await conn.rollback()
    assert await notifications_until_marker(listener, pg_dsn) == []
    assert await job_ids(pg_dsn, schema) == []
    with pytest.raises(JobNotFound):
        await sched.wait(job_id, timeout=5)
    assert bulk_id != job_id


def test_a_django_style_transaction_is_not_committed_by_the_enqueue(pg_dsn, schema, sched):
    """A non-autocommit connection that has not run a statement yet (Django's atomic()
    before its first query): a savepoint taken naively would BEGIN and COMMIT on its own."""
    plain = Scheduler(pg_dsn, schema=schema)  # never opened: the caller's connection only
    with psycopg.connect(pg_dsn) as conn:
        plain.schedule_sync("noop", connection=conn)
        plain.schedule_bulk_sync([JobSpec("noop"), JobSpec("noop")], connection=conn,
                                 conflict_resolution="raise")
        conn.rollback()
    assert asyncio.run(job_ids(pg_dsn, schema)) == []


async def test_committed_enqueue_runs_at_once_on_worker_processes(
        pg_dsn, schema, sched, listener, three_workers):
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute(f'CREATE TABLE "{schema}".orders (id int)')
        await conn.execute(f'INSERT INTO "{schema}".orders VALUES (1)')
        job_id = await sched.schedule("add", args=(2, 3), connection=conn)
        bulk = await sched.schedule_bulk(
            [JobSpec("add", args=(i, i)) for i in range(5)], connection=conn)
        await conn.commit()
    # Delivered at the commit; both statements sent the same due time (the transaction's
    # now()), which PostgreSQL folds into one notification. Counted before the waits:
    # waiting for a pending job wakes the workers too (mark_awaited).
    assert len(await notifications_until_marker(listener, pg_dsn)) == 1
    row = await sched.wait(job_id, timeout=30)
    assert str(row["status"]) == "completed" and row["result"] == 5
    assert [(await sched.wait(i, timeout=30))["result"] for i in bulk] == [0, 2, 4, 6, 8]


def test_sync_enqueue_commits_with_the_callers_writes(pg_dsn, schema, sched):
    plain = Scheduler(pg_dsn, schema=schema)
    with psycopg.connect(pg_dsn) as conn:
        with conn.transaction():
            conn.execute(f'CREATE TABLE "{schema}".orders (id int)')
            job_id = plain.schedule_sync("add", args=(1, 1), connection=conn, job_id="order-1")
        assert job_id == "order-1"
    assert asyncio.run(job_ids(pg_dsn, schema)) == ["order-1"]


async def test_a_clash_under_raise_undoes_only_this_call_and_the_transaction_goes_on(
        pg_dsn, schema, sched):
    await sched.schedule("noop", job_id="taken")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await sched.schedule("noop", job_id="mine", connection=conn)
        with pytest.raises(JobConflict, match="'taken' already exists: nothing was scheduled"):
            await sched.schedule_bulk([JobSpec("noop", job_id="new"),
                                       JobSpec("noop", job_id="taken")],
                                      conflict_resolution="raise", connection=conn)
        with pytest.raises(JobConflict):
            await sched.schedule("noop", job_id="taken", connection=conn)
        assert await sched.schedule_bulk([JobSpec("noop", job_id="taken")],
                                         connection=conn) == [None]  # IGNORE
        await conn.commit()
    assert await job_ids(pg_dsn, schema) == ["mine", "taken"]


async def test_an_autocommit_connection_outside_a_transaction_writes_at_once(pg_dsn, schema,
                                                                              sched):
    async with await psycopg.AsyncConnection.connect(
            pg_dsn, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        await sched.schedule_bulk([JobSpec("noop", job_id="a"), JobSpec("noop", job_id="b")],
                                  connection=conn)
    assert await job_ids(pg_dsn, schema) == ["a", "b"]


async def test_a_connection_that_cannot_carry_the_job_is_refused_in_one_line(pg_dsn, sched):
    with pytest.raises(InvalidInput, match="must be a psycopg AsyncConnection"):
        await sched.schedule("noop", connection=object())
    with psycopg.connect(pg_dsn) as sync_conn, pytest.raises(InvalidInput,
                                                              match="use schedule_sync"):
        await sched.schedule("noop", connection=sync_conn)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1/0")
        with pytest.raises(InvalidInput, match="transaction has failed: roll it back"):
            await sched.schedule("noop", connection=conn)
    with pytest.raises(InvalidInput, match="is closed"):
        await sched.schedule("noop", connection=conn)


# -- waiting for an outcome -----------------------------------------------------------


async def test_wait_returns_each_end_woken_by_notify_not_by_polling(
        pg_dsn, schema, sched, three_workers, monkeypatch):
    monkeypatch.setattr(pgsched.scheduler, "WAIT_POLL_SECONDS", 3600.0)
    done = await sched.schedule("sleep", args=(0.5,))
    failed = await sched.schedule("fail", args=("nope",))
    # Without the NOTIFY these would time out: the safety poll comes after an hour.
    rows = await asyncio.gather(sched.wait(done, timeout=60), sched.wait(failed, timeout=60))
    assert (str(rows[0]["status"]), rows[0]["result"]) == ("completed", 0.5)
    assert (str(rows[1]["status"]), rows[1]["last_error"]) == ("failed", "RuntimeError: nope")
    again = await sched.wait(done, timeout=1)  # already ended: at once
    assert again["result"] == 0.5


async def test_wait_for_an_unknown_job_or_past_its_timeout_says_so(sched):
    with pytest.raises(JobNotFound, match="'nope': not found"):
        await sched.wait("nope", timeout=5)
    job_id = await sched.schedule("noop")  # no worker runs it
    with pytest.raises(WaitTimedOut, match=r"did not end within 0\.2s"):
        await sched.wait(job_id, timeout=0.2)
    with pytest.raises(InvalidInput, match="invalid timeout"):
        await sched.wait(job_id, timeout=-1)


async def test_add_wait_prints_the_result_and_exits_by_the_outcome(
        tmp_path, pg_dsn, schema, sched, workers):
    config = write_config(tmp_path, pg_dsn, schema)
    late = run_cli("add", "add", "--args", "[2, 2]", "--wait", "--wait-timeout", "1s",
                   config=config)  # no worker yet
    assert late.returncode == 124, late.stderr
    assert "did not end within 1s" in late.stderr and late.stdout == ""
    for _ in range(3):
        workers(config)
    done = run_cli("add", "add", "--args", "[2, 2]", "--wait", config=config)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (data["status"], data["result"]) == ("completed", 4)
    # The job that timed out above has run meanwhile: --wait on its own is no --id clash.
    failed = run_cli("add", "fail", "--args", '["bad"]', "--wait", "--wait-timeout", "1m",
                     config=config)
    assert failed.returncode == 1, failed.stderr
    assert json.loads(failed.stdout)["last_error"] == "RuntimeError: bad"
    bad = run_cli("add", "noop", "--wait-timeout", "30s", config=config)
    assert bad.returncode == 2 and "--wait-timeout needs --wait" in bad.stderr
    bad = run_cli("add", "noop", "--wait", "--wait-timeout", "soon", config=config)
    assert bad.returncode == 2 and "--wait-timeout" in bad.stderr


async def test_wait_outlives_a_worker_pool(pg_dsn, schema):
    """wait() borrows no pool connection while it waits (its own LISTEN connection)."""
    async with Scheduler(pg_dsn, schema=schema, pool_size=1) as one:
        await one.migrate()
        job_id = await one.schedule("noop")
        waiting = asyncio.create_task(one.wait(job_id, timeout=30))
        await wait_until(lambda: one.store is not None, what="open")
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            await asyncio.sleep(0.2)
            await conn.execute(f"""UPDATE "{schema}".jobs SET status = 'completed',
                                   result = '7' WHERE id = %s""", [job_id])
        assert (await waiting)["result"] == 7
        assert await one.schedule("noop")  # the pool's one connection is free



REPLACE_PATHS = {
    "schedule": lambda sched, conn, job_id: sched.schedule(
        "noop", job_id=job_id, conflict_resolution="replace"),
    "schedule_bulk": lambda sched, conn, job_id: sched.schedule_bulk(
        [JobSpec("noop", job_id=job_id)], conflict_resolution="replace"),
    "connection": lambda sched, conn, job_id: sched.schedule(
        "noop", job_id=job_id, conflict_resolution="replace", connection=conn),
}


@pytest.mark.parametrize("path", REPLACE_PATHS)
async def test_every_replace_path_makes_a_plain_job_of_a_unique_or_waiting_one(
        pg_dsn, schema, sched, path):
    """REPLACE overwrites a job with a new, plain one, whichever way it is written: the old
    job's unique key is freed and it no longer waits for its dependencies."""
    await sched.schedule("noop", job_id="unique", unique_for=600, unique_key="k")
    await sched.schedule("noop", job_id="a")
    await sched.schedule("noop", job_id="waiting", depends_on=["a"])
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        for job_id in ("unique", "waiting"):
            await REPLACE_PATHS[path](sched, conn, job_id)
        cur = await conn.execute(
            f'SELECT id, unique_key, due_after_dependencies, execution_time <= now() '
            f'FROM "{schema}".jobs WHERE id <> %s ORDER BY id', ["a"])
        assert await cur.fetchall() == [("unique", None, None, True),
                                        ("waiting", None, None, True)]
    assert await sched.schedule("noop", unique_for=600, unique_key="k") != "unique"
