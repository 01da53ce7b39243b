"""Due-time latency (issue 11): what the fetcher's timer and the claims planned on a small
table may and may not do, against a real PostgreSQL and the real in-process Worker.

- No body starts before its due time, however the timer is tuned (FINE_TIMER_SECONDS,
  TIMER_MARGIN_SECONDS): the claim takes only jobs due at its own now().
- The fine step of the timer blocks the event loop for at most a millisecond: a worker
  waiting for a job due seconds later still serves its other tasks.
- Claims planned below PREPARED_CLAIM_ROWS run prepared but are never given a generic
  plan (the plan made for a small table is the one that threshold avoids), and the
  session setting that ensures it is set back for the statements prepared for their
  generic plans.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import LoopGaps, fast_options, wait_until

from pgsched import JobSpec, Scheduler, Worker, current_job, task
from pgsched import store as store_module
from pgsched.store import OneConnection, Store, open_connection, open_pool

# job id -> (time.time() at the body's start, its due time as an epoch)
STARTED: dict[str, tuple[float, float]] = {}


@task
async def due_stamp() -> None:
    job = current_job()
    STARTED[job.id] = (time.time(), job.scheduled_at.timestamp())


async def _run_worker(sched: Scheduler, **options) -> tuple[Worker, asyncio.Task[None]]:
    worker = Worker(sched.store, sched._dsn, fast_options(**options))
    runner = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.ready.is_set() and worker.listening, what="worker ready")
    return worker, runner


async def test_no_body_starts_before_its_due_time(sched):
    """Jobs due at distinct instants a few milliseconds apart, all known to the worker
    before the first is due (it sleeps on its timer): each body starts at or after its
    due time, read on the same clock (worker, test and server share the machine)."""
    worker, runner = await _run_worker(sched, poll_seconds=30)
    try:
        base = await sched.store.db_now() + timedelta(seconds=0.5)
        ids = await sched.schedule_bulk([
            JobSpec("due_stamp", job_id=f"due-{i}", execution_time=base + timedelta(
                seconds=i * 0.013)) for i in range(40)])
        await wait_until(lambda: all(i in STARTED for i in ids), timeout=20,
                         what="every timed job started")
        early = {i: round((STARTED[i][1] - STARTED[i][0]) * 1000, 3) for i in ids
                 if STARTED[i][0] < STARTED[i][1]}
        assert early == {}, f"bodies started before their due time (ms early): {early}"
    finally:
        worker.stop()
        await asyncio.wait_for(runner, 30)


async def test_waiting_for_a_due_time_does_not_block_the_event_loop(sched):
    """The worker waits 2 s for a job on its timer; a task beside it on the same loop
    ticking every 10 ms is never held up for long (a timer that slept its wait out with
    time.sleep would hold it for the whole wait)."""
    worker, runner = await _run_worker(sched, poll_seconds=30)
    ticker = LoopGaps(0.01)
    try:
        due = await sched.store.db_now() + timedelta(seconds=2)
        (job,) = await sched.schedule_bulk([JobSpec("due_stamp", execution_time=due)])
        await wait_until(lambda: job in STARTED, timeout=20, what="the timed job")
        assert STARTED[job][0] >= STARTED[job][1]
        assert ticker.longest() < 1.0, f"the event loop was held for {ticker.longest():.3f} s"
    finally:
        await ticker.stop()
        worker.stop()
        await asyncio.wait_for(runner, 30)


async def _claim_statements(store: Store) -> list[tuple[int, int]]:
    """(generic plans, custom plans) of each prepared claim statement on the store's one
    connection."""
    async with store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %s", ["%FOR UPDATE SKIP LOCKED%"])
        return [tuple(row) for row in await cur.fetchall()]


async def _plan_cache_mode(store: Store) -> str:
    async with store.pool.connection() as conn:
        return (await (await conn.execute("SHOW plan_cache_mode")).fetchone())[0]


async def test_claims_on_a_small_table_are_never_planned_generic(
        sched, one_connection_store):
    """A store on one connection claims a dozen times from a table the statistics count
    small (never analysed): each claim is planned for its run (custom), never by the
    generic plan PostgreSQL would otherwise adopt after five runs of a prepared
    statement."""
    store = one_connection_store
    later = await sched.store.db_now() + timedelta(hours=1)
    await sched.schedule_bulk([JobSpec("noop", execution_time=later)
                               for _ in range(50)])
    for i in range(12):
        if i % 3 == 0:
            await sched.schedule("noop")
        await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
    assert not store._claim_prepared  # the case under test: below the threshold
    statements = await _claim_statements(store)
    assert statements, "the claims ran as unnamed statements: parsed at every run"
    assert [generic for generic, _ in statements] == [0] * len(statements)
    assert sum(custom for _, custom in statements) >= 12
    assert await _plan_cache_mode(store) == "force_custom_plan"


async def test_a_completion_prepared_for_its_generic_plan_sets_the_session_back(
        sched, one_connection_store, monkeypatch):
    """Above PREPARED_COMPLETE_ROWS (here: any count) the completion runs prepared for
    its generic plan: on a connection a small-table claim switched, it switches back
    first."""
    monkeypatch.setattr(store_module, "PREPARED_COMPLETE_ROWS", -1)
    store = one_connection_store
    job = await sched.schedule("noop")
    (claimed,), _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
    assert not store._claim_prepared and store._complete_prepared
    assert await _plan_cache_mode(store) == "force_custom_plan"
    done = await store.complete_jobs(worker_id="w", done=[(job, claimed["attempts"], "null")])
    assert done == {(job, claimed["attempts"])}
    assert await _plan_cache_mode(store) == "auto"
    # From now on the claims (still below PREPARED_CLAIM_ROWS) run unnamed: no switch
    # back and forth with the completions at every claim.
    await sched.schedule("noop")
    await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
    assert not store._claim_prepared
    assert await _plan_cache_mode(store) == "auto"


async def test_claims_above_the_threshold_get_their_generic_plan(
        sched, one_connection_store, monkeypatch):
    """Once the statistics count enough pending rows (here: any count), the claims run
    prepared as before, on a session set back from the small table's custom plans:
    PostgreSQL adopts the generic plan that spares planning each claim."""
    store = one_connection_store
    later = await sched.store.db_now() + timedelta(hours=1)
    await sched.schedule_bulk([JobSpec("noop", execution_time=later)
                               for _ in range(50)])
    await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
    assert await _plan_cache_mode(store) == "force_custom_plan"
    monkeypatch.setattr(store_module, "PREPARED_CLAIM_ROWS", -1)
    for _ in range(12):
        await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
    assert store._claim_prepared
    assert await _plan_cache_mode(store) == "auto"
    assert any(generic > 0 for generic, _ in await _claim_statements(store))


async def test_a_store_that_never_prepares_never_sets_the_session(sched, pg_dsn):
    """Behind a transaction pooler (prepare_threshold None) nothing is prepared, and a
    session setting would reach whichever client gets that server connection next: the
    claims are planned as unnamed statements and the session is left alone."""
    pool = await open_pool(pg_dsn, max_size=1, prepare_threshold=None)
    try:
        store = Store(pool, sched.schema)
        for _ in range(3):
            await sched.schedule("noop")
            await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert await _plan_cache_mode(store) == "auto"
        assert await _claim_statements(store) == []
    finally:
        await pool.close()


async def test_a_switch_a_rollback_undid_is_made_again(sched, pg_dsn):
    """A claim run inside a transaction on a caller's connection (Store.using) switches
    the session inside it, and the rollback undoes that: the next claim on the connection
    must switch again, or after five runs PostgreSQL adopts the generic plan."""
    conn = await open_connection(pg_dsn)
    try:
        later = await sched.store.db_now() + timedelta(hours=1)
        await sched.schedule_bulk([JobSpec("noop", execution_time=later)
                                   for _ in range(50)])
        with Store.using(OneConnection(conn)):
            async with conn.transaction(force_rollback=True):
                await sched.store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
            for _ in range(8):
                await sched.schedule("noop")
                await sched.store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        cur = await conn.execute(
            "SELECT generic_plans FROM pg_prepared_statements WHERE statement LIKE %s",
            ["%FOR UPDATE SKIP LOCKED%"])
        assert [row[0] for row in await cur.fetchall()] == [0]
    finally:
        await conn.close()
