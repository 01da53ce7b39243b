"""Adversarial tests of issue 13's claim and planner features (dependencies, global
limits, unique jobs) against a real PostgreSQL: the cases the feature tests did not try.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg
import pytest
from conftest import audit_env, run_cli, wait_until, write_config
from test_dependencies import claim, complete, status
from test_limits import audited_spans, max_overlap, running

from pgsched import ConflictResolution, InvalidInput, Scheduler
from pgsched.store import MAX_DEPENDENCY_CHAIN, Store, open_pool


async def test_a_completed_dependency_vacuumed_while_its_dependent_waits_still_counts(sched):
    """c waits for a (completed long ago) and b (still to run). Vacuuming a must not turn
    "a completed" into "a no longer exists": c is released when b completes."""
    a = await sched.schedule("noop", job_id="a")
    await complete(sched.store, (await claim(sched.store))[0])
    b = await sched.schedule("noop", job_id="b")
    c = await sched.schedule("noop", job_id="c", depends_on=[a, b])
    assert await sched.store.count_vacuumable(status="completed", older_than_seconds=-1) == 0
    assert await sched.store.vacuum_jobs(status="completed", older_than_seconds=-1,
                                         limit=10) == 0
    await complete(sched.store, (await claim(sched.store))[0])
    assert (await sched.get_job(b))["status"] == "completed"
    assert await status(sched, c) == "pending", (await sched.get_job(c))["last_error"]
    assert [j["id"] for j in await claim(sched.store)] == [c]
    assert await sched.store.vacuum_jobs(status="completed", older_than_seconds=-1,
                                         limit=10) == 2  # a and b, once c no longer waits


@pytest.mark.parametrize("x_deps", [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")])
async def test_completion_batches_settling_shared_dependents_in_opposite_orders(
        sched, pg_dsn, schema, x_deps):
    """Worker one completes [a, b] in one batch, worker two [c, d]. The xs wait for one
    job of each batch, the ys for the other two: when the first batch's triggers lock the
    xs then the ys and the second's the ys then the xs, both batches must still be
    recorded; PostgreSQL's deadlock detector aborted one of them (DeadlockDetected, which
    the worker took for the database being unavailable and retried after a back-off).
    The trigger order within a batch follows the rows' physical order, so each of the
    four ways of sharing the dependents is tried. A third connection holding x0 lines
    the two batches up."""
    width = 10
    for dep in "abcd":
        await sched.schedule("noop", job_id=dep)
    claimed = {j["id"]: j for j in await claim(sched.store, worker="w")}
    assert claimed.keys() == set("abcd")
    # Marked as awaited in this order, the rows of a and d move behind b and c.
    await sched.schedule("noop", job_id="z1", depends_on=["a"])
    await sched.schedule("noop", job_id="z2", depends_on=["d"])
    y_deps = [d for d in "abcd" if d not in x_deps]
    for i in range(width):
        await sched.schedule("noop", job_id=f"x{i}", depends_on=list(x_deps))
        await sched.schedule("noop", job_id=f"y{i}", depends_on=y_deps)
    stores = [Store(await open_pool(pg_dsn), schema=schema) for _ in range(2)]
    try:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as gate:
            await gate.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                               ["x0"])
            first = asyncio.create_task(stores[0].complete_jobs(worker_id="w", done=[
                (i, claimed[i]["attempts"], "null") for i in "ab"]))
            await asyncio.sleep(0.3)
            second = asyncio.create_task(stores[1].complete_jobs(worker_id="w", done=[
                (i, claimed[i]["attempts"], "null") for i in "cd"]))
            await asyncio.sleep(0.3)
            await gate.rollback()
            results = await asyncio.gather(first, second, return_exceptions=True)
    finally:
        for store in stores:
            await store.pool.close()
    assert not [r for r in results if isinstance(r, BaseException)], results
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        cur = await conn.execute(
            f'SELECT count(*) FROM "{schema}".jobs WHERE due_after_dependencies IS NULL '
            "AND status = 'pending'")
        assert (await cur.fetchone())[0] == 2 * width + 2


async def test_the_end_of_the_first_job_of_the_longest_chain_allowed_settles_it(sched):
    """Each cancel fires the trigger for the next job in the chain, nested inside the
    statement that ended the first: with a thousand waiting jobs PostgreSQL's stack ran
    out and the cancel (or a worker's failure, or orphan recovery's verdict) failed. A
    chain is now refused past MAX_DEPENDENCY_CHAIN waiting jobs, before it is written."""
    await sched.schedule("noop", job_id="j0000")
    last = 0
    for i in range(1, 1000):
        try:
            await sched.schedule("noop", job_id=f"j{i:04}", depends_on=[f"j{i - 1:04}"])
        except InvalidInput as exc:
            assert f"more than {MAX_DEPENDENCY_CHAIN} waiting jobs" in str(exc)
            assert await sched.get_job(f"j{i:04}") is None
            break
        last = i
    assert await sched.cancel_job("j0000")
    assert await status(sched, f"j{last:04}") == "cancelled"
    assert last == MAX_DEPENDENCY_CHAIN


async def test_retried_jobs_never_wait_for_each_other(sched):
    """a waited for b, then was replaced (it waits for nothing, its record stays as
    history); b, vacuumed, is scheduled again under its id to wait for a. a fails, b is
    cancelled, and `pgsched retry` of both made each wait for the other, for ever: now
    the cycle is cancelled, with the reason."""
    await sched.schedule("noop", job_id="b")
    await sched.schedule("noop", job_id="a", depends_on=["b"])
    await sched.schedule("noop", job_id="a", conflict_resolution=ConflictResolution.REPLACE)
    claimed = {j["id"]: j for j in await claim(sched.store)}
    await complete(sched.store, claimed["b"])
    assert await sched.store.vacuum_jobs(status="completed", older_than_seconds=-1,
                                         limit=10) == 1
    await sched.schedule("noop", job_id="b", depends_on=["a"])
    await sched.store.fail_job_now(worker_id="w", job_id="a", attempt=claimed["a"]["attempts"],
                                   error="boom", traceback=None)
    assert await status(sched, "b") == "cancelled"
    await sched.store.retry_jobs(statuses=["failed", "cancelled"], ids=["a", "b"],
                                 cutoff=datetime.now(UTC), limit=10)
    waiting = [(await sched.get_job(j))["due_after_dependencies"] is not None for j in "ab"]
    assert waiting == [False, False]
    assert [await status(sched, j) for j in "ab"] == ["cancelled", "cancelled"]
    assert "waits for itself" in (await sched.get_job("a"))["last_error"] + str(
        (await sched.get_job("b"))["last_error"])


@pytest.mark.parametrize("batch", [["y", "z"], ["z", "y"]])
async def test_a_dependent_scheduled_while_a_batch_completes_its_dependency(
        sched, pg_dsn, schema, batch):
    """The new job waits for a (itself waiting for z) and z. Scheduling locks a, then z;
    the completion batch [y, z] locks z (and y), then z's trigger locks a to settle it.
    Both must succeed: PostgreSQL aborted one of them as a deadlock. A third connection
    holding y lines them up (the batch visits its rows in physical order, z's first here;
    both orders of the batch's list are tried)."""
    for dep in ("y", "z"):
        await sched.schedule("noop", job_id=dep)
    claimed = {j["id"]: j for j in await claim(sched.store, worker="w")}
    await sched.schedule("noop", job_id="a", depends_on=["z"])
    await sched.schedule("noop", job_id="b", depends_on=["y"])  # y's row moves behind z's
    store = Store(await open_pool(pg_dsn), schema=schema)
    # An application's Scheduler: its lock_timeout (5 s) outlasts deadlock_timeout (1 s)
    app = Scheduler(pg_dsn, schema=schema)
    await app.open()
    try:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as gate:
            await gate.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                               ["y"])
            completing = asyncio.create_task(store.complete_jobs(worker_id="w", done=[
                (i, claimed[i]["attempts"], "null") for i in batch]))
            await asyncio.sleep(0.3)
            scheduling = asyncio.create_task(
                app.schedule("noop", job_id="n", depends_on=["a", "z"]))
            await asyncio.sleep(0.3)
            await gate.rollback()
            results = await asyncio.gather(completing, scheduling, return_exceptions=True)
    finally:
        await store.pool.close()
        await app.close()
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert await status(sched, "z") == "completed"
    assert sorted(j["id"] for j in await claim(sched.store)) == ["a", "b"]


async def test_global_concurrency_holds_while_the_limit_changes_and_jobs_are_cancelled(
        sched, pg_dsn, schema, tmp_path, workers):
    """Three workers on a queue limited to 2; meanwhile the limit is lowered to 1 and
    raised again, and running jobs are cancelled (a sync task cannot be stopped, so its
    job keeps running until it returns): never more than 2 run at once, from the audit."""
    config = write_config(tmp_path, pg_dsn, schema, concurrency=8)
    config.write_text(config.read_text() + "\n[queues.lim]\nglobal_concurrency = 2\n")
    env = audit_env(pg_dsn, schema)
    ids = [await sched.schedule("span", args=(f"k{i}", 0.2), queue="lim") for i in range(24)]
    for _ in range(3):
        workers(config, env=env)
    await wait_until(lambda: running(pg_dsn, schema, "lim"), what="a limited job running")
    for concurrency in ("1", "2"):
        result = run_cli("queue", "limit", "lim", "--global-concurrency", concurrency,
                         config=config)
        assert result.returncode == 0, result.stderr
        for job_id in ids:
            if (await sched.get_job(job_id))["status"] == "running":
                await sched.cancel_job(job_id)
                break
        await asyncio.sleep(0.5)
    await wait_until(lambda: jobs_over(sched, ids), timeout=90, what="24 limited jobs over")
    spans = audited_spans(pg_dsn, schema)
    assert len(spans) >= 20 and all(end is not None for _, end in spans)
    assert max_overlap(spans) <= 2


async def jobs_over(sched, ids) -> bool:
    return all(ended in ("completed", "cancelled")
               for ended in [(await sched.get_job(i))["status"] for i in ids])
