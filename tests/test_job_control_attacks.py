"""Attacks on issue 13's job control (review): what a task raises, a complete() from a
thread left behind, and a task holding its job's row lock, against a real PostgreSQL and
real `pgsched worker` processes. Each test names the promise it holds the code to."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import cli_env, run_cli, wait_until, write_config
from test_worker_core import ended, sql, start, stop

from pgsched import Backoff, JobSpec, Retry, Scheduler
from pgsched.errors import InvalidInput

HOSTILE_TASKS = Path(__file__).resolve().parent / "hostile_tasks.py"
KINDS = ["delay_systemexit", "delay_keyboard", "delay_property", "reason_str_subclass",
         "reason_property"]


async def test_hostile_retry_and_fail_objects_fail_their_job_and_the_worker_lives(
        sched, tmp_path, pg_dsn, schema, workers):
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(HOSTILE_TASKS))
    worker = workers(config)
    jobs = {f"{name}:{kind}": await sched.schedule(name, args=(kind,))
            for name in ("hostile", "hostile_sync") for kind in KINDS}
    jobs["picky_meta"] = await sched.schedule("picky_meta")
    jobs["hostile_result"] = await sched.schedule("hostile_result")
    jobs["picky_meta_timeout"] = await sched.schedule("picky_meta_timeout", timeout=0.2,
                                                     max_retries=1)

    async def statuses():
        return {what: str((await sched.get_job(job_id))["status"])
                for what, job_id in jobs.items()}

    async def all_ended():
        return not {"pending", "running"} & set((await statuses()).values())

    try:
        await wait_until(all_ended, timeout=20, what="every hostile job ended")
    finally:
        print(await statuses(), worker.proc.poll())
    assert set((await statuses()).values()) == {"failed"}
    after = await sched.schedule("hostile_fine")
    row = await wait_until(lambda: ended(sched, after), what="a job after them")
    assert str(row["status"]) == "completed"
    assert worker.proc.poll() is None, worker.log()[-2000:]


@pytest.fixture
async def worker(sched, pg_dsn, monkeypatch):
    """The real Worker, in-process, running hostile_tasks (imported here)."""
    import hostile_tasks  # noqa: F401

    monkeypatch.setenv("PGSCHED_TEST_DSN_FOR_TASKS", pg_dsn)
    running, runner = await start(sched)
    yield running
    await stop(running, runner)


async def test_complete_from_a_thread_left_behind_cannot_touch_a_job_added_again_with_its_id(
        sched, worker, tmp_path):
    release, hold = tmp_path / "release", tmp_path / "hold"
    await sched.schedule("complete_late", args=(str(release),), job_id="same", timeout=0.5,
                         max_retries=0)
    row = await wait_until(lambda: ended(sched, "same"), what="timed out")
    assert str(row["status"]) == "failed" and "timed out" in row["last_error"]
    # vacuum deletes the ended job; the same id is added again and this worker claims it
    # as attempt 1, as the thread's run was.
    await sql(sched, "DELETE FROM {schema}.jobs WHERE id = 'same'")
    await sched.schedule("held_until", args=(str(hold),), job_id="same")
    try:
        await wait_until(lambda: _running(sched, "same"), what="the new job running")
        release.touch()
        said = Path(f"{release}.said")
        await wait_until(said.exists, what="the old thread's complete()")
        assert said.read_text().startswith("LeaseLost"), said.read_text()
        row = await sched.get_job("same")
        assert (str(row["status"]), row["result"]) == ("running", None)
    finally:
        release.touch()
        hold.touch()  # a thread still running would hold pytest's exit
    row = await wait_until(lambda: ended(sched, "same"), what="the new job's own end")
    assert (str(row["status"]), row["result"]) == ("completed", "held")


async def _running(sched, job_id):
    return str((await sched.get_job(job_id))["status"]) == "running"


async def test_a_backoff_function_that_sleeps_stalls_no_other_job_of_its_worker(
        sched, tmp_path, pg_dsn, schema, workers):
    await sql(sched, "CREATE TABLE {schema}.side (key text)")
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(HOSTILE_TASKS))
    env = cli_env(PGSCHED_TEST_DSN_FOR_TASKS=pg_dsn, PGSCHED_TEST_SCHEMA_FOR_TASKS=schema)
    workers(config, "--queues", "mine", env=env)
    workers(config, "--queues", "other", env=env)  # recovers what looks orphaned
    slow = await sched.schedule("slow_write", args=("b", 10), queue="mine")
    await wait_until(lambda: _running(sched, slow), what="the bystander running")
    sleepy = await sched.schedule("sleepy_backoff", queue="mine", max_retries=1)
    row = await wait_until(lambda: ended(sched, slow), timeout=60, what="the bystander's end")
    assert str(row["status"]) == "completed" and row["attempts"] == 1, row["errors"]
    assert await sql(sched, "SELECT key FROM {schema}.side") == [("b",)]
    row = await wait_until(lambda: ended(sched, sleepy), timeout=60, what="the sleepy job")
    assert str(row["status"]) == "failed" and row["attempts"] == 2


async def test_wait_outlives_a_dropped_connection_and_sees_the_end(sched):
    job_id = await sched.schedule("hostile_fine", execution_time=datetime.now(UTC)
                                  + timedelta(days=1))
    waiting = asyncio.create_task(sched.wait(job_id, timeout=30))
    listening = "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN %%pgsched_done%%'"
    [(pid,)] = await wait_until(lambda: sql(sched, listening), what="the wait's LISTEN")
    await sql(sched, "SELECT pg_terminate_backend(%s)", [pid])
    await wait_until(lambda: sql(sched, listening), what="a new LISTEN")
    await sql(sched, "UPDATE {schema}.jobs SET status = 'completed', result = '7', "
                     "finished_at = now() WHERE id = %s", [job_id])
    row = await waiting
    assert (str(row["status"]), row["result"]) == ("completed", 7)


async def test_a_transaction_longer_than_the_misfire_grace_still_runs_its_job(
        sched, worker, pg_dsn):
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        job_id = await sched.schedule("hostile_fine", connection=conn, misfire_grace_time=1)
        await asyncio.sleep(2)  # the rest of the caller's transaction
        await conn.commit()
    row = await wait_until(lambda: ended(sched, job_id), what="the committed job")
    assert str(row["status"]) == "completed", row["last_error"]



async def test_jobs_given_no_time_through_the_callers_connection_are_due_at_its_commit(
        sched, pg_dsn):
    later = datetime.now(UTC) + timedelta(days=1)
    await sched.schedule("hostile_fine", job_id="old", execution_time=later)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await sched.schedule_bulk([JobSpec("hostile_fine", job_id="bulk"),
                                   JobSpec("hostile_fine", job_id="timed", execution_time=later),
                                   JobSpec("hostile_fine", job_id="old")],
                                  connection=conn, conflict_resolution="replace")
        [(started,)] = await (await conn.execute("SELECT now()")).fetchall()
        await asyncio.sleep(1)
        [(committing,)] = await (await conn.execute("SELECT clock_timestamp()")).fetchall()
        await conn.commit()
    with psycopg.connect(pg_dsn) as conn:
        sched.schedule_sync("hostile_fine", job_id="sync", connection=conn)
        time.sleep(1)
        [(sync_committing,)] = conn.execute("SELECT clock_timestamp()").fetchall()
    rows = {job_id: (due, flagged) for job_id, due, flagged in await sql(
        sched, "SELECT id, execution_time, due_at_commit FROM {schema}.jobs")}
    assert rows["timed"] == (later, False)
    for job_id in ("bulk", "old"):
        due, flagged = rows[job_id]
        assert due > committing > started + timedelta(seconds=1) and not flagged, job_id
    assert rows["sync"][0] > sync_committing and not rows["sync"][1]


@pytest.mark.parametrize("schedule_id, fire_time, seen", [
    ("s", "infinity", ["s", "9999-12-30T00:00:00+00:00"]),
    ("s", "-infinity", ["s", "0001-01-03T00:00:00+00:00"]),
    (None, "2026-01-01Z", [None, "2026-01-01T00:00:00+00:00"]),
    ("x" * 5000, None, ["x" * 5000, None]),
])
async def test_current_job_survives_schedule_columns_written_with_sql(
        sched, worker, schedule_id, fire_time, seen):
    job_id = await sched.schedule("window", execution_time=datetime.now(UTC) + timedelta(days=1))
    await sql(sched, "UPDATE {schema}.jobs SET schedule_id = %s, fire_time = %s, "
                     "execution_time = now() WHERE id = %s", [schedule_id, fire_time, job_id])
    ended_row = ("SELECT status::text, result, last_error FROM {schema}.jobs "
                 "WHERE id = %s AND status NOT IN ('pending', 'running')")
    [(status, result, error)] = await wait_until(lambda: sql(sched, ended_row, [job_id]),
                                                 what="the job")
    assert (status, result) == ("completed", seen), error


async def test_many_waiters_on_jobs_ending_at_once_each_see_their_end(sched):
    later = datetime.now(UTC) + timedelta(days=1)
    ids = [await sched.schedule("hostile_fine", execution_time=later) for _ in range(5)]
    waiting = [asyncio.create_task(sched.wait(job_id, timeout=60))
               for job_id in ids for _ in range(6)]
    listening = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %%pgsched_done%%'"
    await wait_until(lambda: _count_is(sched, listening, len(waiting)), what="every LISTEN")
    await sql(sched, "UPDATE {schema}.jobs SET status = 'completed', result = to_jsonb(id), "
                     "finished_at = now()")
    rows = await asyncio.gather(*waiting)
    assert [row["result"] for row in rows] == [job_id for job_id in ids for _ in range(6)]


async def _count_is(sched, query, n):
    return (await sql(sched, query))[0][0] == n


async def test_sigterm_between_complete_and_commit_records_the_job_once(
        sched, tmp_path, pg_dsn, schema, workers):
    await sql(sched, "CREATE TABLE {schema}.side (key text)")
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(HOSTILE_TASKS),
                          shutdown_grace_seconds=1)
    env = cli_env(PGSCHED_TEST_DSN_FOR_TASKS=pg_dsn, PGSCHED_TEST_SCHEMA_FOR_TASKS=schema)
    first = workers(config, env=env)
    ready, release = tmp_path / "ready", tmp_path / "release"
    job_id = await sched.schedule("complete_then_wait", args=("k", str(ready), str(release)))
    await wait_until(ready.exists, what="complete() written, not committed")
    first.signal(signal.SIGTERM)
    await first.wait_for_log("job_interrupted")  # the grace ran out; the thread runs on
    release.touch()  # the task commits its writes and the completion
    assert await first.wait() == 0, first.log()[-2000:]
    workers(config, env=env)  # would run it again if it were left pending or orphaned
    row = await wait_until(lambda: ended(sched, job_id), what="the job's end")
    assert (str(row["status"]), row["result"], row["attempts"]) == ("completed", 1, 1)
    assert await sql(sched, "SELECT key FROM {schema}.side") == [("k",)]


def test_a_retry_delay_or_backoff_too_large_for_a_float_is_refused_in_one_line():
    with pytest.raises(InvalidInput, match="invalid Retry delay"):
        Retry(10**400)
    with pytest.raises(InvalidInput, match="invalid Backoff base"):
        Backoff(base=10**400)


async def test_a_task_raising_cancelled_error_itself_fails_its_job(sched, worker):
    ids = [await sched.schedule(name) for name in ("cancels_itself", "cancels_itself_sync")]
    for job_id in ids:
        row = await wait_until(lambda job_id=job_id: ended(sched, job_id), timeout=10,
                               what="the job's end")
        assert str(row["status"]) == "failed" and "CancelledError" in row["last_error"], row
    assert not worker.ctx.held


async def test_a_task_leaving_its_completion_uncommitted_stalls_no_other_job(
        sched, worker, pg_dsn, tmp_path):
    release = tmp_path / "release"
    leaked = await sched.schedule("complete_and_leak", args=(str(release),))
    try:
        await wait_until(lambda: worker.stats.claimed >= 1, what="the leaking job claimed")
        others = [await sched.schedule("hostile_fine") for _ in range(3)]
        for job_id in others:
            row = await wait_until(lambda job_id=job_id: ended(sched, job_id), timeout=15,
                                   what="a bystander's end")
            assert str(row["status"]) == "completed"
    finally:
        release.touch()
    row = await wait_until(lambda: ended(sched, leaked), what="the leaking job's end")
    assert str(row["status"]) == "failed" and "did not commit" in row["last_error"]


async def test_a_cancel_committed_while_the_snooze_waits_on_the_row_cancels_the_job(
        sched, pg_dsn, schema):
    job_id = await sched.schedule("hostile_fine", execution_time=datetime.now(UTC)
                                  + timedelta(days=1))
    await sql(sched, "UPDATE {schema}.jobs SET status = 'running', worker_id = 'w', "
                     "attempts = 1 WHERE id = %s", [job_id])
    # The snooze through a pool with the default lock_timeout (LOCK_TIMEOUT_SECONDS): the
    # fixture's (0.5 s, a worker's at lease 2 s) was passed now and then on a loaded
    # machine between seeing it wait and the commit (LockNotAvailable, no race made).
    async with await psycopg.AsyncConnection.connect(pg_dsn) as canceller, \
            Scheduler(pg_dsn, schema=schema) as patient:
        await canceller.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                                [job_id])
        snoozing = asyncio.create_task(patient.store.snooze_job(
            worker_id="w", job_id=job_id, attempt=1, delay_seconds=60, max_snoozes=5))
        waiting = ("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE '%%snoozed%%'")
        await wait_until(lambda: sql(sched, waiting), what="the snooze waiting on the row")
        await canceller.execute(f'UPDATE "{schema}".jobs SET cancel_requested_at = now() '
                                "WHERE id = %s", [job_id])
        await canceller.commit()
    row = await snoozing
    assert str(row["status"]) == "cancelled"
    assert str((await sched.get_job(job_id))["status"]) == "cancelled"


async def test_a_job_with_times_python_cannot_hold_reads_in_show_ls_and_wait(
        sched, tmp_path, pg_dsn, schema):
    job_id = await sched.schedule("hostile_fine", execution_time=datetime.now(UTC)
                                  + timedelta(days=1))
    await sql(sched, "UPDATE {schema}.jobs SET status = 'completed', result = '1', "
                     "fire_time = 'infinity', started_at = '-infinity', "
                     "finished_at = '20000-01-01Z', execution_time = '0044-03-15Z BC' "
                     "WHERE id = %s", [job_id])
    row = await sched.wait(job_id, timeout=10)
    assert (row["fire_time"], row["started_at"]) == (datetime(9999, 12, 30, tzinfo=UTC),
                                                     datetime(1, 1, 3, tzinfo=UTC))
    assert (row["finished_at"], row["execution_time"]) == (datetime(9999, 12, 30, tzinfo=UTC),
                                                           datetime(1, 1, 3, tzinfo=UTC))
    assert (await sched.get_job(job_id))["fire_time"] == datetime(9999, 12, 30, tzinfo=UTC)
    config = write_config(tmp_path, pg_dsn, schema)
    for args in (("show", job_id), ("ls",), ("ls", "--json"), ("show", job_id, "--json")):
        done = run_cli(*args, config=config)
        assert done.returncode == 0 and job_id in done.stdout, (args, done.stderr[-500:])
