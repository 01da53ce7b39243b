"""Review of the fetcher's wait for a completion write in flight (branch `load`): what
happens to claims when that write does not come back soon (a row lock held by another
session, a failed write being retried), against a real PostgreSQL and the real in-process
Worker.

Every worker here polls once a minute, so a due job that waits for the safety poll shows
as a deadline missed, not as a slow test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process worker runs)
from conftest import fast_options, wait_until, write_config
from test_worker_core import start as start_worker
from test_worker_core import stop

from pgsched import Fail, JobSpec, Retry, Scheduler, Worker, task
from pgsched.store import NoAnswer, OneConnection, open_connection
from pgsched.worker.completer import TOO_SLOW_CUTS

POLL_SECONDS = 60.0  # longer than every deadline below: no claim comes from the poll


async def start(sched: Scheduler, **options: Any) -> tuple[Worker, asyncio.Task[None]]:
    return await start_worker(sched, poll_seconds=POLL_SECONDS, **options)


async def status(sched: Scheduler, job_id: str) -> str:
    return str((await sched.get_job(job_id))["status"])


async def test_a_completion_retried_behind_a_row_lock_does_not_stop_the_claims_the_cap_allows(
        sched, pg_dsn):
    """Another session holds one finished job's row locked (an application's SELECT ...
    FOR UPDATE in a long transaction): its completion fails on lock_timeout and is
    retried for as long as the lock is held, and the outcomes behind it wait. On main the
    fetcher kept claiming what its backlog cap allowed (2 x concurrency held); a due job
    on a worker with free slots and room under the cap must start, not wait for a write
    that keeps failing."""
    # A pool of its own at lease 8 s: lock_timeout 2 s. The locked write gives up on the
    # lock once, then is parked, and a and b are written at once: their outcomes wait
    # behind it only for what is left of that first lock wait, which at 0.5 s (lease 2 s)
    # a loaded machine missed (a and b finished after it: 3 held never seen).
    async with Scheduler(pg_dsn, schema=sched.schema,
                         options=fast_options(lease_seconds=8.0)) as own:
        worker, runner = await start(own, concurrency=2, lease_seconds=8.0)
        try:
            async with completion_behind_a_row_lock(sched, pg_dsn):
                await due_job_claimed_behind_the_write(sched, worker, "is retried")
            for job_id in ("locked", "a", "b", "due"):
                await wait_until(lambda j=job_id: _is(sched, j, "completed"),
                                 what=f"{job_id} done")
        finally:
            await stop(worker, runner)


async def due_job_claimed_behind_the_write(sched: Scheduler, worker: Worker,
                                           state: str) -> None:
    """With job `locked`'s write in flight, two jobs run and their outcomes wait behind
    it (3 held, none running: past a batch); then a job falls due, which a worker of 2
    slots must claim (3 held of a cap of 4, both slots free: main claimed it at once)."""
    ctx = worker.ctx
    for job_id in ("a", "b"):
        await sched.schedule("noop", job_id=job_id)
    await wait_until(lambda: len(ctx.held) == 3 and ctx.executing == 0,
                     what="a and b finished, unrecorded")
    await sched.schedule("noop", job_id="due")
    await wait_until(lambda: any(k[0] == "due" for k in ctx.held), timeout=10,
                     what=f"the due job claimed while the write {state}")


async def _is(sched: Scheduler, job_id: str, wanted: str) -> bool:
    return await status(sched, job_id) == wanted


@task(max_retries=0)
async def until_released(release: str, fails: bool = False) -> None:
    """Runs until the file `release` exists, then returns (or fails, with `fails`): a job
    kept running until the test has locked its row. A task that sleeps a fixed time
    instead may end before the lock is taken on a loaded machine (seen polling for
    'running', then connecting, past a 0.3 s sleep), and its outcome is written at once."""
    while not Path(release).exists():
        await asyncio.sleep(0.02)
    if fails:
        raise RuntimeError("failed on purpose")


async def _completion_backend(sched: Scheduler) -> int | None:
    """The server process of a completion that waits for a row lock."""
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%Record successful attempts%%'")
        row = await cur.fetchone()
        return row[0] if row else None


async def test_a_completion_whose_server_stopped_answering_does_not_stop_the_claims_the_cap_allows(
        sched, pg_dsn):
    """The server process of the completion in flight stops answering (SIGSTOP: a frozen
    backend, or a network black hole, where statement_timeout cannot fire): the write
    neither returns nor fails. On main the fetcher kept claiming what the backlog cap
    allowed; here too a due job on free slots under the cap must start."""
    # lease 8 s: the frozen write is abandoned after 6 s (statement_timeout 4 s + 2 s),
    # not 2 s, so a and b finish behind it however slow the machine.
    worker, runner = await start(sched, concurrency=2, lease_seconds=8.0)
    frozen = await _freeze_a_completion(sched, pg_dsn)
    try:
        await due_job_claimed_behind_the_write(sched, worker, "hangs")
    finally:
        os.kill(frozen, signal.SIGCONT)
        await stop(worker, runner)
    for job_id in ("locked", "a", "b", "due"):
        assert await _is(sched, job_id, "completed"), job_id


@contextlib.asynccontextmanager
async def completion_behind_a_row_lock(sched: Scheduler, pg_dsn: str) -> AsyncIterator[int]:
    """Run job `locked` and hold its row locked from another session until the block
    ends: its completion waits for the lock (failing on lock_timeout, retried). Yields
    the server process of that completion."""
    with tempfile.TemporaryDirectory(prefix="pgsched-release-") as directory:
        release = Path(directory) / "release"
        await sched.schedule("until_released", args=(str(release),), job_id="locked")
        await wait_until(lambda: _is(sched, "locked", "running"), what="locked running")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'SELECT 1 FROM "{sched.schema}".jobs WHERE id = %s '
                                 "FOR UPDATE", ["locked"])
            release.touch()  # the job ends now, its row locked
            yield await wait_until(lambda: _completion_backend(sched),
                                   what="its completion waiting for the row lock")
            await locker.rollback()


async def _freeze_a_completion(sched: Scheduler, pg_dsn: str) -> int:
    """Run job `locked`, whose completion's server process is then frozen (SIGSTOP)
    mid-write; returns that process's id (the caller sends SIGCONT)."""
    async with completion_behind_a_row_lock(sched, pg_dsn) as frozen:
        os.kill(frozen, signal.SIGSTOP)
    return frozen


async def test_outcomes_behind_a_write_whose_server_stopped_answering_are_recorded(
        sched, pg_dsn):
    worker, runner = await start(sched, concurrency=2)
    frozen = await _freeze_a_completion(sched, pg_dsn)
    try:
        await sched.schedule("noop", job_id="after")
        # Three leases: the frozen write could have been abandoned and the outcome
        # written on another connection twice over.
        await wait_until(lambda: _is(sched, "after", "completed"), timeout=6,
                         what="a later outcome recorded")
    finally:
        os.kill(frozen, signal.SIGCONT)
        await stop(worker, runner)


async def test_stop_during_a_write_whose_server_stopped_answering_ends_in_time(
        sched, pg_dsn):
    """stop() while the completion in flight hangs and the fetcher may be waiting for it:
    run() still returns within the shutdown deadline (shutdown_timed_out), and once the
    server answers again a new worker recovers what was left and every job completes."""
    worker, runner = await start(sched, concurrency=2, shutdown_grace_seconds=1.0)
    frozen = await _freeze_a_completion(sched, pg_dsn)
    try:
        for job_id in ("a", "b"):
            await sched.schedule("noop", job_id=job_id)
        await wait_until(lambda: len(worker.ctx.held) == 3, what="a and b finished")
        worker.stop()
        await asyncio.wait_for(runner, 1.0 + 20)
    finally:
        os.kill(frozen, signal.SIGCONT)
        if not runner.done():
            runner.cancel()
    successor, runner = await start(sched, concurrency=2)
    try:
        for job_id in ("locked", "a", "b"):
            await wait_until(lambda j=job_id: _is(sched, j, "completed"), what=f"{job_id} done")
    finally:
        await stop(successor, runner)


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_a_burst_worker_whose_completion_waits_for_a_row_lock_ends_with_all_done(
        sched, pg_dsn, schema, tmp_path, workers, concurrency):
    """`pgsched worker --burst` (a real process, polling once a minute) while one
    completion waits behind a row lock for two seconds and a backlog of quick jobs
    forms behind it: it runs everything, exits 0 once nothing is left, and every job is
    completed."""
    config = write_config(tmp_path, pg_dsn, schema, concurrency=concurrency,
                          poll_seconds=60, lease_seconds=8)  # lock_timeout 2 s
    await sched.schedule("sleep", args=(1.0,), job_id="locked")
    await sched.schedule_bulk([JobSpec("noop", job_id=f"q{i}") for i in range(200)])
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        worker = workers(config, "--burst")
        await wait_until(lambda: _is(sched, "locked", "running"), what="locked running")
        await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                             ["locked"])
        await asyncio.sleep(2.0)
    assert await worker.wait(timeout=60) == 0, worker.log()[-2000:]
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(
            f'SELECT status::text, count(*) FROM "{schema}".jobs GROUP BY 1')
        assert dict(await cur.fetchall()) == {"completed": 201}


@pytest.mark.parametrize("concurrency", [1, 2, 25])
async def test_a_stream_with_the_backlog_over_a_batch_loses_no_wake_up(sched, concurrency):
    """Jobs due now in bulk (the completer's backlog passes a batch, so the fetcher waits
    for writes) and jobs due a moment later (only the fetcher's timer claims them, the
    poll is a minute away): all complete, none waits for the poll."""
    worker, runner = await start(sched, concurrency=concurrency)
    try:
        now = datetime.now(UTC)
        later = [await sched.schedule("noop", job_id=f"later{i}",
                                      execution_time=now + timedelta(seconds=0.5 + i / 10))
                 for i in range(10)]
        await sched.schedule_bulk([JobSpec("noop", job_id=f"now{i}") for i in range(500)])
        for job_id in [*later, "now499"]:
            await wait_until(lambda j=job_id: _is(sched, j, "completed"), timeout=30,
                             what=f"{job_id} completed")
        async with sched.store.pool.connection() as conn:
            cur = await conn.execute(f'SELECT count(*) FROM "{sched.schema}".jobs '
                                     "WHERE status <> 'completed'")
            assert (await cur.fetchone())[0] == 0
    finally:
        await stop(worker, runner)


@task(max_retries=0)
async def big_result(megabytes: int) -> str:
    return "x" * (megabytes << 20)


async def test_results_too_large_to_write_within_statement_timeout_end_their_jobs(sched):
    # lease 1 s: statement_timeout 0.5 s, which writing 2 x 100 MB of jsonb passes here
    # (2 x 60 MB took longer already at a load of 5)
    worker, runner = await start(sched, concurrency=2, lease_seconds=1.0,
                                 heartbeat_seconds=0.2)
    try:
        big = [await sched.schedule("big_result", args=(100,)) for _ in range(2)]
        for job_id in big:
            # Each try encodes and sends 100 MB, slow on a loaded machine; never ended,
            # they would be tried for ever: the bound only says how soon that shows.
            await wait_until(lambda j=job_id: _ended(sched, j), timeout=60,
                             what="the big results' jobs ended")
    finally:
        await stop(worker, runner)


async def _ended(sched: Scheduler, job_id: str) -> bool:
    return await status(sched, job_id) not in ("pending", "running")


async def test_outcomes_of_other_jobs_are_recorded_while_one_row_is_locked(sched, pg_dsn):
    worker, runner = await start(sched, concurrency=2)
    try:
        async with completion_behind_a_row_lock(sched, pg_dsn):
            await sched.schedule("noop", job_id="after")
            # The lock is held until it is: held up behind it, it would never be.
            await wait_until(lambda: _is(sched, "after", "completed"), timeout=20,
                             what="a later outcome recorded")
    finally:
        await stop(worker, runner)


@task(max_retries=0)
async def ordinary_result(kilobytes: int) -> dict[str, str]:
    return {"text": "y" * (kilobytes << 10)}


SLOW_WRITES = 6  # more than completer.TOO_SLOW_CUTS


async def test_an_ordinary_result_survives_a_database_too_slow_to_write_it_for_a_while(
        sched, pg_dsn):
    """A database slow for a while (a trigger that sleeps past statement_timeout on the
    first completion writes; heartbeats still answer, so the database is not down): an
    ordinary result (100 KB, under completer.TOO_SLOW_RESULT_BYTES) is cut on
    statement_timeout more times than the verdict for a result too large counts, and is
    still recorded as completed with its result, not failed."""
    job = await _written_through_slow_writes(sched, pg_dsn, 100)
    assert (job["status"], job["result"]) == ("completed", {"text": "y" * 102400})


async def test_a_large_result_survives_a_database_too_slow_to_write_it_for_a_while(
        sched, pg_dsn):
    """The same spell of slowness (SLOW_WRITES cuts, then fast again) for a result of
    1.5 MiB, over completer.TOO_SLOW_RESULT_BYTES: cut more times than TOO_SLOW_CUTS,
    with heartbeats answered between the cuts, but over a spell shorter than
    TOO_SLOW_SPAN_LEASES (about 0.75 s a cut at a 1 s lease: under 5 s for six), so it is
    written once the database recovers, not failed as too slow."""
    job = await _written_through_slow_writes(sched, pg_dsn, 1536)
    assert job["status"] == "completed", job["last_error"][:200]
    assert job["result"] == {"text": "y" * (1536 << 10)}


async def test_a_large_result_that_never_fits_fails_while_later_outcomes_are_recorded(
        sched, pg_dsn):
    """The database never writes a result of 1 MiB or more within statement_timeout (a
    trigger sleeps past it on every such write) and answers everything else: the job fails
    with 'could not be recorded within statement_timeout' in bounded time (once its cuts
    span TOO_SLOW_SPAN_LEASES), and outcomes of jobs that finish meanwhile are recorded,
    not held up behind it."""
    async with _slow_completion_writes(
            sched, pg_dsn, "NEW.status = 'completed' AND octet_length(NEW.result::text) "
            ">= 1048576", slow_writes=10**9) as conn:
        worker, runner = await start(sched, concurrency=2, lease_seconds=1.0,
                                     heartbeat_seconds=0.2)
        try:
            await _mark_status_changes(conn, sched.schema)
            job_id = await sched.schedule("ordinary_result", args=(1536,))
            await wait_until(lambda: _slow_writes(conn, sched.schema), what="a write cut")
            for i in range(3):
                await sched.schedule("noop", job_id=f"after{i}")
                await wait_until(lambda i=i: _is(sched, f"after{i}", "completed"),
                                 timeout=30, what="a later outcome recorded")
                # behind one cut write at most (counted in the database, not by the clock)
                assert await _slow_writes_while_held(conn, sched.schema, f"after{i}") <= 1
            await wait_until(lambda: _ended(sched, job_id), timeout=30, what="the job ended")
            job = await sched.get_job(job_id)
            assert job["status"] == "failed"
            assert "could not be recorded within statement_timeout" in job["last_error"]
            assert await _slow_writes(conn, sched.schema) > TOO_SLOW_CUTS
        finally:
            await stop(worker, runner)


async def _ended_once(sched: Scheduler, job_id: str, status: str) -> bool:
    """Whether the job's first attempt ended leaving it `status` (other than completed:
    with the attempt's one `errors` entry, since a retried job is pending from the start)."""
    job = await sched.get_job(job_id)
    return job["status"] == status and (status == "completed" or len(job["errors"]) == 1)


async def _mark_status_changes(conn: psycopg.AsyncConnection, schema: str) -> None:
    """A trigger that notes, at each status change of a job row, how many slow writes
    (_slow_completion_writes's sequence, which no rollback undoes) had begun by then."""
    await conn.execute(f'CREATE TABLE "{schema}".marks (id text, status text, slow bigint)')
    await conn.execute(f"""
        CREATE FUNCTION "{schema}".mark() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status IS DISTINCT FROM OLD.status THEN
                INSERT INTO "{schema}".marks
                SELECT NEW.id, NEW.status, last_value FROM "{schema}".slow_writes;
            END IF;
            RETURN NEW;
        END $$""")
    await conn.execute(f'CREATE TRIGGER mark BEFORE UPDATE ON "{schema}".jobs FOR EACH ROW '
                       f'EXECUTE FUNCTION "{schema}".mark()')


async def _slow_writes_while_held(conn: psycopg.AsyncConnection, schema: str,
                                  job_id: str) -> int:
    """The slow writes begun between the job's claim and its completion write."""
    cur = await conn.execute(f"""SELECT max(slow) FILTER (WHERE status = 'completed')
        - max(slow) FILTER (WHERE status = 'running') FROM "{schema}".marks WHERE id = %s""",
        [job_id])
    return (await cur.fetchone())[0]


async def _slow_writes(conn: psycopg.AsyncConnection, schema: str) -> int:
    """How many completion writes _slow_completion_writes has slowed down (or let go)."""
    cur = await conn.execute(f'SELECT last_value, is_called FROM "{schema}".slow_writes')
    value, called = await cur.fetchone()
    return value if called else 0


@contextlib.asynccontextmanager
async def _slow_completion_writes(
        sched: Scheduler, pg_dsn: str, condition: str = "NEW.status = 'completed'",
        slow_writes: int = SLOW_WRITES, sleep: str = "PERFORM pg_sleep(5);",
) -> AsyncIterator[psycopg.AsyncConnection]:
    """A trigger that runs `sleep` (past statement_timeout) on the first `slow_writes`
    writes of a job row where `condition` (SQL on OLD and NEW) holds, counting them in the
    sequence slow_writes. Yields an autocommit connection."""
    schema = sched.schema
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f'CREATE SEQUENCE "{schema}".slow_writes')
        await conn.execute(f"""
            CREATE FUNCTION "{schema}".slow_completion() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF {condition} THEN
                    IF nextval('"{schema}".slow_writes') <= {slow_writes} THEN
                        {sleep}
                    END IF;
                END IF;
                RETURN NEW;
            END $$""")
        await conn.execute(f'CREATE TRIGGER slow BEFORE UPDATE ON "{schema}".jobs FOR EACH '
                           f'ROW EXECUTE FUNCTION "{schema}".slow_completion()')
        yield conn


async def _written_through_slow_writes(sched: Scheduler, pg_dsn: str,
                                       kilobytes: int) -> dict[str, Any]:
    """The job of ordinary_result(kilobytes) once ended, run while a trigger sleeps past
    statement_timeout on the first SLOW_WRITES completion writes."""
    async with _slow_completion_writes(sched, pg_dsn) as conn:
        # lease 1 s: statement_timeout 0.5 s, which each slow write passes
        worker, runner = await start(sched, concurrency=2, lease_seconds=1.0,
                                     heartbeat_seconds=0.2)
        try:
            job_id = await sched.schedule("ordinary_result", args=(kilobytes,))
            await wait_until(lambda: _ended(sched, job_id), timeout=30, what="the job ended")
            assert await _slow_writes(conn, sched.schema) >= TOO_SLOW_CUTS, \
                "the slow writes were tried"
            return await sched.get_job(job_id)
        finally:
            await stop(worker, runner)


async def test_a_bounded_query_whose_server_stopped_answering_fails_and_drops_its_connection(
        sched, pg_dsn):
    """Store.bounded on a connection whose server process is frozen: the query fails with
    NoAnswer soon after the bound (psycopg's own handling of a cancelled query would wait
    5 s more on the frozen socket), and the connection is left closed, never reusable."""
    conn = await open_connection(pg_dsn)
    frozen = conn.info.backend_pid
    os.kill(frozen, signal.SIGSTOP)
    try:
        with (sched.store.using(OneConnection(conn)), sched.store.bounded(0.5),
              pytest.raises(NoAnswer, match=r"no answer from the server within 0\.5s")):
            async with asyncio.timeout(4):  # under psycopg's 5 s: the bound ended it
                await sched.store.completed_by(worker_id="w", job_id="j", attempt=1)
        assert conn.broken or conn.closed
    finally:
        os.kill(frozen, signal.SIGCONT)
        await conn.close()


async def test_outcome_states_tell_a_locked_row_from_a_lost_lease_without_waiting(
        sched, pg_dsn):
    """What the completer asks about unwritten outcomes: 'free' for this worker's running
    attempt, 'running' while another session holds its row locked (answered at once, not
    after lock_timeout), the status this worker's attempt ended in ('completed': an
    abandoned write that committed after all; 'pending', with when it is due, for one
    that put the job back, told by its `errors` entry), None for another worker's attempt,
    an older attempt, or a job recovery took from this worker (a lost lease)."""
    schema = sched.schema
    for job_id in ("free", "locked", "done", "theirs", "put_back", "recovered"):
        await sched.schedule("noop", job_id=job_id)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f"""UPDATE "{schema}".jobs SET status = 'running', attempts = 1,
            worker_id = CASE id WHEN 'theirs' THEN 'other' ELSE 'w' END""")
        await conn.execute(f"""UPDATE "{schema}".jobs SET status = 'completed'
            WHERE id = 'done'""")
        for job_id, outcome in (("put_back", "snoozed"), ("recovered", "lease_expired")):
            await conn.execute(f"""UPDATE "{schema}".jobs SET status = 'pending',
                worker_id = NULL, execution_time = '2099-01-01Z',
                errors = errors || jsonb_build_object('attempt', 1, 'worker_id', 'w',
                                                      'outcome', %s::text)
                WHERE id = %s""", [outcome, job_id])
        async with conn.transaction():
            await conn.execute(f"""SELECT 1 FROM "{schema}".jobs WHERE id = 'locked'
                FOR UPDATE""")
            async with asyncio.timeout(0.4):  # under the pool's lock_timeout (0.5 s)
                states = await sched.store.outcome_states(worker_id="w", held=[
                    ("free", 1), ("locked", 1), ("done", 1), ("theirs", 1), ("free", 2),
                    ("put_back", 1), ("recovered", 1), ("put_back", 2)])
    assert {key: s.state for key, s in states.items()} == {
        ("free", 1): "free", ("locked", 1): "running", ("done", 1): "completed",
        ("theirs", 1): None, ("free", 2): None, ("put_back", 1): "pending",
        ("recovered", 1): None, ("put_back", 2): None}
    assert states["put_back", 1].due == datetime(2099, 1, 1, tzinfo=UTC)


async def _later_outcomes_recorded_while_unwritten(sched: Scheduler, worker: Worker,
                                                   job_id: str) -> None:
    """Once job_id's task ended (its outcome held up by a lock), three later jobs are
    each recorded in turn while job_id stays running."""
    await wait_until(lambda: not any(h.task and not h.task.done()
                                     for h in worker.ctx.held.values()),
                     what="the task ended, its outcome unwritten")
    for i in range(3):
        await sched.schedule("noop", job_id=f"after{i}")
        # The lock is held until all three are: held up behind it, none would be.
        await wait_until(lambda i=i: _is(sched, f"after{i}", "completed"), timeout=20,
                         what="a later outcome recorded")
    assert await _is(sched, job_id, "running")


async def test_a_failure_whose_row_is_locked_holds_up_no_later_outcome(sched, pg_dsn,
                                                                       tmp_path):
    """A failure (a single-row statement) meets the row lock another session holds: later
    outcomes are recorded while the lock is held, and the failure is recorded once it
    goes, as the job's last error."""
    worker, runner = await start(sched, concurrency=2)  # lease 2 s: lock_timeout 0.5 s
    release = tmp_path / "release"
    try:
        job_id = await sched.schedule("until_released", args=(str(release), True))
        await wait_until(lambda: _is(sched, job_id, "running"), what="the job running")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'SELECT 1 FROM "{sched.schema}".jobs WHERE id = %s '
                                 "FOR UPDATE", [job_id])
            release.touch()  # it fails now, its row locked
            await _later_outcomes_recorded_while_unwritten(sched, worker, job_id)
            await locker.rollback()
        await wait_until(lambda: _is(sched, job_id, "failed"), what="the failure recorded")
        assert "failed on purpose" in (await sched.get_job(job_id))["last_error"]
    finally:
        await stop(worker, runner)


async def test_outcomes_of_other_jobs_are_recorded_while_a_dependent_row_is_locked(
        sched, pg_dsn, tmp_path):
    """Completing a job settles its waiting dependents in the same statement
    (jobs_dependents_settle locks each FOR UPDATE): another session holding a dependent's
    row locked makes the completion fail on lock_timeout although the job's own row is
    free. That outcome must be put aside like one whose own row is locked, not retried
    at once for ever ahead of every later outcome; it is recorded once the lock goes."""
    worker, runner = await start(sched, concurrency=2)  # lease 2 s: lock_timeout 0.5 s
    try:
        # The child is added once the parent runs: its insert locks the parent FOR SHARE
        # for a moment, which a claim racing it skips (then waits for the 60 s poll).
        release = tmp_path / "release"
        parent = await sched.schedule("until_released", args=(str(release),), job_id="parent")
        await wait_until(lambda: _is(sched, parent, "running"), what="parent running")
        child = await sched.schedule("noop", job_id="child", depends_on=[parent])
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'SELECT 1 FROM "{sched.schema}".jobs WHERE id = %s '
                                 "FOR UPDATE", [child])
            release.touch()  # the parent ends now, its dependent's row locked
            await _later_outcomes_recorded_while_unwritten(sched, worker, parent)
            await locker.rollback()
        for job_id in (parent, child):
            await wait_until(lambda j=job_id: _is(sched, j, "completed"), what=f"{job_id} done")
    finally:
        await stop(worker, runner)


async def test_a_worker_whose_finished_jobs_rows_are_all_locked_keeps_running_others(
        sched, pg_dsn, tmp_path):
    """Other sessions hold the rows of as many finished jobs as the backlog cap allows
    (2 x concurrency) locked for a long time: their outcomes are parked, each waiting on
    a lock of its own, not on the database. The worker must still run other due jobs."""
    worker, runner = await start(sched, concurrency=2)  # lease 2 s: lock_timeout 0.5 s
    locked = [f"locked{i}" for i in range(4)]
    try:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            for job_id in locked:
                release = tmp_path / job_id
                await sched.schedule("until_released", args=(str(release),), job_id=job_id)
                await wait_until(lambda j=job_id: _is(sched, j, "running"),
                                 what=f"{job_id} running")
                await locker.execute(f'SELECT 1 FROM "{sched.schema}".jobs WHERE id = %s '
                                     "FOR UPDATE", [job_id])
                release.touch()  # it ends now, its row locked
            await wait_until(lambda: len(worker.ctx.held) == 4 and worker.ctx.executing == 0,
                             what="every locked job finished, its outcome parked")
            await sched.schedule("noop", job_id="other")
            await wait_until(lambda: _is(sched, "other", "completed"), timeout=10,
                             what="another job run while the rows stay locked")
            await locker.rollback()
        for job_id in locked:
            await wait_until(lambda j=job_id: _is(sched, j, "completed"), what=f"{job_id} done")
    finally:
        await stop(worker, runner)


@task(max_retries=1)
async def ends_as(kind: str) -> None:
    if kind == "success":
        return
    if kind == "snooze":
        raise Retry(3600)
    if kind == "failure":
        raise Fail("failed on purpose")
    if kind == "cancel":
        await asyncio.sleep(60)  # until a cancel is requested
    raise RuntimeError("retried on purpose")


@pytest.mark.parametrize(("kind", "status", "counted"), [
    ("retry", "pending", "retried"), ("snooze", "pending", "snoozed"),
    ("failure", "failed", "failed"), ("cancel", "cancelled", "cancelled"),
    ("success", "completed", "completed")])
async def test_an_abandoned_outcome_write_that_committed_after_all_is_no_lost_lease(
        sched, pg_dsn, kind, status, counted):
    """The first write of a failed, snoozed, retried, cancelled or successful attempt
    takes longer than the completer waits (a trigger that sleeps through
    statement_timeout, catching the cut): the completer abandons it (NoAnswer) and writes
    the outcome again, which waits behind the row lock the first write holds, and is
    fenced out once it commits. The row is right; the worker must count the outcome it
    wrote (logged with earlier_write, as a completion already was), not a lost lease."""
    # lease 2 s: statement_timeout 1 s, the completer's bound 2 s; the first write ending
    # the attempt catches the cut and commits at about 3 s
    async with _slow_completion_writes(
            sched, pg_dsn, "OLD.status = 'running' AND NEW.status <> 'running'",
            slow_writes=1, sleep="""BEGIN
                PERFORM pg_sleep(30);
            EXCEPTION WHEN query_canceled THEN
                PERFORM pg_sleep(2);
            END;""") as conn:
        worker, runner = await start(sched, concurrency=2, retry_base_seconds=3600,
                                     retry_max_seconds=3600)
        try:
            job_id = await sched.schedule("ends_as", args=(kind,))
            if kind == "cancel":
                await wait_until(lambda: _is(sched, job_id, "running"), what="job running")
                assert await sched.store.request_cancel(ids=[job_id]) == {job_id: "running"}
            await wait_until(lambda: _ended_once(sched, job_id, status),
                             what=f"the attempt ended, the job {status}")
            await wait_until(lambda: not worker.ctx.held, what="its outcome settled")
            assert await _slow_writes(conn, sched.schema) == 1, "the slow write ran"
        finally:
            await stop(worker, runner)
    assert (worker.stats.lease_lost, getattr(worker.stats, counted)) == (0, 1), worker.stats
