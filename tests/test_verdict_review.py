"""Review of branch `verdict` (the completer's too-slow verdict spanning TOO_SLOW_SPAN_LEASES,
and the `errors` entry that tells an attempt's own abandoned write from a lost lease),
against a real PostgreSQL and the real in-process Worker: rows edited by SQL while an
outcome waits to be written, a cancel request withdrawn, slowness that comes and goes.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import psycopg
import worker_tasks  # noqa: F401  (registers the tasks the in-process worker runs)
from conftest import wait_until
from test_fetcher_write_wait_review import (
    _is,
    _mark_status_changes,
    _slow_completion_writes,
    _slow_writes,
    _slow_writes_while_held,
    start,
    until_released,  # noqa: F401  (registers the task)
)
from test_worker_core import stop

from pgsched import Scheduler, task
from pgsched.worker.completer import TOO_SLOW_CUTS


async def _parked(worker) -> bool:
    return worker.ctx.parked > 0


async def test_a_parked_outcome_whose_row_was_taken_and_given_an_errors_object_kills_no_worker(
        sched, pg_dsn, tmp_path):
    """A finished job's row is locked by another session, so its success is parked; that
    session then hands the job to another worker and writes `errors` as a JSON object, not
    an array (SQL: nothing read from the database is trusted), and commits. The parked
    outcome is looked at again (Store.outcome_states): a lost lease, counted as such. The
    worker must live on and record later outcomes; the query must not fail on the row's
    `errors` (jsonb_array_elements of an object), killing the completer and the worker."""
    schema = sched.schema
    worker, runner = await start(sched, concurrency=2)  # lease 2 s: lock_timeout 0.5 s
    release = tmp_path / "release"
    try:
        await sched.schedule("until_released", args=(str(release),), job_id="taken")
        await wait_until(lambda: _is(sched, "taken", "running"), what="taken running")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                                 ["taken"])
            release.touch()  # it ends now, its row locked
            await wait_until(lambda: _parked(worker), what="its success parked (row lock)")
            await locker.execute(f"""UPDATE "{schema}".jobs SET worker_id = 'other',
                errors = '{{"not": "an array"}}' WHERE id = 'taken'""")
            await locker.commit()
        await wait_until(lambda: worker.stats.lease_lost == 1 or runner.done(),
                         what="the parked outcome settled as a lost lease")
        assert not runner.done(), runner.exception()
        await sched.schedule("noop", job_id="after")
        await wait_until(lambda: _is(sched, "after", "completed"), what="a later outcome")
    finally:
        if not runner.done():
            await stop(worker, runner)


@task
async def slow_to_cancel(release: str) -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        # Cleaning up until the test has locked the row (the file `release`): a fixed
        # cleanup time could end first on a loaded machine, the cancellation written.
        async with asyncio.timeout(30):
            while not Path(release).exists():
                await asyncio.sleep(0.02)
        raise


async def test_a_cancellation_whose_request_was_withdrawn_is_not_parked_for_ever(
        sched, pg_dsn, tmp_path):
    """A running job's cancel is requested and its task stops; while it cleans up another
    session locks the row, so the cancellation is parked, and withdraws the request (SQL:
    cancel_requested_at = NULL) before it commits. finish_cancelled_jobs is fenced on the
    request, so it writes nothing, for ever; the row is still this worker's running
    attempt ('free'). On main that was a lost lease (forgotten, at-least-once by
    recovery); the outcome must settle, not be parked and written again every quarter
    lease while its slot and its lease are held for as long as the worker runs."""
    schema = sched.schema
    worker, runner = await start(sched, concurrency=2)  # lease 2 s: lock_timeout 0.5 s
    try:
        release = tmp_path / "release"
        job_id = await sched.schedule("slow_to_cancel", args=(str(release),))
        await wait_until(lambda: _is(sched, job_id, "running"), what="job running")
        assert await sched.store.request_cancel(ids=[job_id]) == {job_id: "running"}
        await wait_until(lambda: any(h.cancel_requested for h in worker.ctx.held.values()),
                         what="the cancel seen by the worker")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                                 [job_id])
            release.touch()  # the cleanup ends now, the row locked
            await wait_until(lambda: _parked(worker), what="its cancellation parked")
            await locker.execute(f"""UPDATE "{schema}".jobs SET cancel_requested_at = NULL
                WHERE id = %s""", [job_id])
            await locker.commit()
        await wait_until(lambda: not worker.ctx.held, timeout=10,
                         what="the cancellation settled (not parked again and again)")
        assert worker.stats.lease_lost == 1, worker.stats
    finally:
        await stop(worker, runner)


async def test_two_short_spells_of_slowness_apart_do_not_fail_a_large_result(sched, pg_dsn):
    """A result of 1.5 MiB is cut on statement_timeout TOO_SLOW_CUTS - 1 times, written
    alone (a short spell of slowness),
    then its row is locked by another session for longer than TOO_SLOW_SPAN_LEASES leases
    (the database is fast again; the outcome is parked, 'running'), then, once the lock
    is let go, the database is slow once more, briefly. No spell of slowness lasted five
    leases, yet the first cut and the last span them: the verdict must not fail the job
    (docs/delivery.md: a spell shorter than five leases never fails a job)."""
    schema = sched.schema
    async with _slow_completion_writes(
            sched, pg_dsn, f"""NEW.status = 'completed' AND octet_length(NEW.result::text)
                >= 1048576 AND EXISTS (SELECT 1 FROM "{schema}".slow_on)""",
            slow_writes=10**9) as conn:
        await conn.execute(f'CREATE TABLE "{schema}".slow_on ()')
        await conn.execute(f'INSERT INTO "{schema}".slow_on DEFAULT VALUES')
        # lease 1 s: statement_timeout 0.5 s, lock_timeout 0.25 s; five leases are 5 s
        worker, runner = await start(sched, concurrency=2, lease_seconds=1.0,
                                     heartbeat_seconds=0.2)
        try:
            job_id = await sched.schedule("ordinary_result", args=(1536,), job_id="large")
            # the batch's write, then two of its write alone (TOO_SLOW_CUTS - 1)
            await wait_until(lambda: _slow_writes_at_least(conn, schema, TOO_SLOW_CUTS),
                             timeout=10, what="two cuts of its write alone")
            async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
                await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s '
                                     "FOR UPDATE", [job_id])
                await conn.execute(f'DELETE FROM "{schema}".slow_on')  # fast again
                await asyncio.sleep(6.0)  # locked past five leases: parked, not cut
                await conn.execute(f'INSERT INTO "{schema}".slow_on DEFAULT VALUES')
                cuts = await _slow_writes(conn, schema)
                await locker.rollback()
            # slow again, briefly: one more cut, then fast
            await wait_until(lambda: _slow_writes_at_least(conn, schema, cuts + 1),
                             timeout=10, what="a cut after the lock")
            await conn.execute(f'DELETE FROM "{schema}".slow_on')
            await wait_until(lambda: _ended(sched, job_id), timeout=20, what="the job ended")
            job = await sched.get_job(job_id)
            assert job["status"] == "completed", job["last_error"][:200]
        finally:
            await stop(worker, runner)


def _large_results_never_written(
        sched: Scheduler, pg_dsn: str) -> contextlib.AbstractAsyncContextManager[
            psycopg.AsyncConnection]:
    """Every completion write of a result of 1 MiB or more sleeps past statement_timeout."""
    return _slow_completion_writes(
        sched, pg_dsn, "NEW.status = 'completed' AND octet_length(NEW.result::text) "
        ">= 1048576", slow_writes=10**9)


async def _slow_writes_at_least(conn: psycopg.AsyncConnection, schema: str, n: int) -> bool:
    return await _slow_writes(conn, schema) >= n


async def _ended(sched: Scheduler, job_id: str) -> bool:
    return str((await sched.get_job(job_id))["status"]) not in ("pending", "running")



async def test_outcome_states_read_any_errors_sql_wrote_as_no_entry_of_this_worker(
        sched, pg_dsn):
    """`errors` as SQL may leave it (a scalar, an object, JSON null, an array of entries
    of every type, one naming this worker for another attempt): each job another worker
    holds reads as a lost lease (None), and the query answers for every outcome at once."""
    hostile = ['"text"', '{"worker_id": "w", "attempt": 1}', "null", "42",
               '[1, "w", null, [1], {"worker_id": 1}, {"worker_id": ["w"], "attempt": 1},'
               ' {"worker_id": "w", "attempt": 2, "outcome": "failed"}]']
    ids = [f"h{i}" for i in range(len(hostile))]
    for job_id in ids:
        await sched.schedule("noop", job_id=job_id)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        for job_id, errors in zip(ids, hostile, strict=True):
            await conn.execute(f"""UPDATE "{sched.schema}".jobs SET status = 'running',
                attempts = 1, worker_id = 'other', errors = %s::jsonb WHERE id = %s""",
                [errors, job_id])
    states = await sched.store.outcome_states(worker_id="w", held=[(i, 1) for i in ids])
    assert {key: s.state for key, s in states.items()} == {(i, 1): None for i in ids}


async def test_a_large_result_parked_at_shutdown_ends_the_worker_in_time_and_is_run_again(
        sched, pg_dsn):
    """A result of 1.5 MiB that the database never writes in time (a trigger sleeps past
    statement_timeout on every such write) is parked, far from its verdict (five leases),
    when the worker is stopped: run() returns within the shutdown deadline (grace,
    KILL_CLEANUP_SECONDS, SHUTDOWN_DB_SECONDS), not after the verdict, and the job is not
    lost: a worker started once the database is fast again runs it and completes it."""
    schema = sched.schema
    async with _large_results_never_written(sched, pg_dsn) as conn:
        # lease 4 s: statement_timeout 2 s; the verdict would come after 20 s
        worker, runner = await start(sched, concurrency=2, lease_seconds=4.0,
                                     heartbeat_seconds=0.5, shutdown_grace_seconds=1.0)
        job_id = await sched.schedule("ordinary_result", args=(1536,))
        await wait_until(lambda: _slow_writes_at_least(conn, schema, TOO_SLOW_CUTS),
                         timeout=20, what="its write alone cut")
        worker.stop()
        await asyncio.wait_for(runner, 1.0 + 1.0 + 5.0 + 2.0)
        await conn.execute(f'DROP TRIGGER slow ON "{schema}".jobs')
    assert (await sched.get_job(job_id))["status"] != "failed"
    successor, runner = await start(sched, concurrency=2, lease_seconds=4.0)
    try:
        await wait_until(lambda: _ended(sched, job_id), timeout=30, what="the job ended")
        job = await sched.get_job(job_id)
        assert (job["status"], len(job["result"]["text"])) == ("completed", 1536 << 10)
    finally:
        await stop(successor, runner)


async def test_an_outcome_waits_behind_one_write_at_most_while_large_results_are_tried(
        sched, pg_dsn):
    """Three results of 1.5 MiB that the database never writes in time are parked and
    tried again and again until their verdict (five leases). docs/delivery.md: "each try
    holds up the outcomes behind it for one write at most". A job that finishes meanwhile
    must be recorded after at most one slow write begun after it started, not after the
    tries of every parked result that came back in the same batch (written first).
    Counted inside the database (the slow writes begun between a job's claim and its
    completion write, read by a trigger on both), since a count read by polling from here
    takes in the write begun right after the job's write too, now and then."""
    schema = sched.schema
    async with _large_results_never_written(sched, pg_dsn) as conn:
        await _mark_status_changes(conn, schema)
        # lease 2 s: statement_timeout 1 s; the verdicts come after 10 s
        worker, runner = await start(sched, concurrency=4, lease_seconds=2.0,
                                     heartbeat_seconds=0.3)
        try:
            large = [await sched.schedule("ordinary_result", args=(1536,)) for _ in range(3)]
            await wait_until(lambda: _slow_writes_at_least(conn, schema, 6), timeout=20,
                             what="the large results' writes alone cut")
            waited = []
            for i in range(8):
                job_id = await sched.schedule("noop", job_id=f"n{i}")
                await wait_until(lambda j=job_id: _is(sched, j, "completed"), timeout=30,
                                 what=f"n{i} recorded")
                waited.append(await _slow_writes_while_held(conn, schema, job_id))
            assert max(waited) <= 1, waited
            for job_id in large:
                await wait_until(lambda j=job_id: _ended(sched, j), timeout=30,
                                 what="a large result's job ended")
        finally:
            await stop(worker, runner)
