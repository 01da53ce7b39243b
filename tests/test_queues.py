"""Queues against a real PostgreSQL: serving some queues, pausing, per-queue limits, and
how much of the jobs table a claim reads."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import claim_params, fast_options, wait_until

from pgsched import InvalidInput, JobPriority, Scheduler, Worker, task
from pgsched.queues import capped_free_slots, parse_queue_list, saturated
from pgsched.tasks import get_task


def past() -> datetime:
    """A minute ago, at call time: a constant taken at import would drift past the
    default 300 s misfire grace in a long test run, and the jobs would expire."""
    return datetime.now(UTC) - timedelta(minutes=1)


async def status(sched: Scheduler, job_id: str) -> str:
    return str((await sched.get_job(job_id))["status"])


async def run_burst(sched: Scheduler, **options: Any) -> Worker:
    worker = Worker(sched.store, sched._dsn, fast_options(burst=True, **options))
    await asyncio.wait_for(worker.run(), 30)
    return worker


async def test_worker_claims_only_from_its_queues(sched):
    a = await sched.schedule("noop", queue="a")
    b = await sched.schedule("noop", queue="b")
    plain = await sched.schedule("noop")
    await run_burst(sched, queues=("a",))
    assert [await status(sched, j) for j in (a, b, plain)] == ["completed", "pending", "pending"]
    await run_burst(sched)  # a worker of every queue finds the rest
    assert {await status(sched, j) for j in (b, plain)} == {"completed"}


async def test_task_queue_is_the_default_and_an_explicit_queue_wins(sched):
    @task(name="emails_only", queue="emails")
    async def emails_only() -> None: ...

    by_task = await sched.schedule("emails_only")
    explicit = await sched.schedule("emails_only", queue="bulk")
    assert (await sched.get_job(by_task))["queue"] == "emails"
    assert (await sched.get_job(explicit))["queue"] == "bulk"


@pytest.mark.parametrize("bad", ["", "a b", "a,b", "ü", "x" * 101, "-lead"])
async def test_bad_queue_names_are_rejected_before_writing(sched, bad):
    with pytest.raises(InvalidInput, match="invalid queue name"):
        await sched.schedule("noop", queue=bad)
    with pytest.raises(InvalidInput, match="invalid queue name"):
        task(name=f"t_{abs(hash(bad))}", queue=bad)(lambda: None)
    assert await sched.store.list_jobs() == []


async def test_paused_queue_is_skipped_and_resume_wakes_idle_workers(sched):
    assert await sched.store.pause_queues(["held"], paused_by="test", reason="smtp down") \
        == {"held"}
    assert await sched.store.pause_queues(["held"]) == set()  # already paused
    held = await sched.schedule("noop", queue="held", execution_time=past())
    free = await sched.schedule("noop", execution_time=past())
    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        # Both were due in the same claim: only the pause can have left `held` behind.
        await wait_until(lambda: status_is(sched, free, "completed"), what="free job done")
        assert await status(sched, held) == "pending"
        rows = {r["queue"]: r for r in await sched.store.queue_stats()}
        assert rows["held"]["paused"] and rows["held"]["due"] == 1
        assert rows["held"]["reason"] == "smtp down" and rows["held"]["lag_seconds"] >= 59
        assert await sched.store.resume_queues(["held", "never-paused"]) == {"held"}
        # The poll is 30 s: only the NOTIFY sent by resume can make this pass in time.
        await wait_until(lambda: status_is(sched, held, "completed"), timeout=5,
                         what="resumed job done")
    finally:
        worker.stop()
        await runner


async def status_is(sched: Scheduler, job_id: str, wanted: str) -> bool:
    return await status(sched, job_id) == wanted


async def test_per_queue_concurrency_holds_within_a_worker(sched):
    # The registered function's own module: tests/worker_tasks.py may also have been
    # imported by path (as the worker does), and that copy has its own PEAK.
    peak = get_task("track").func.__globals__["PEAK"]
    peak.clear()
    # The slow jobs are due first: without the limit they would fill the slots first.
    for i in range(6):
        await sched.schedule("track", args=("slow", 0.3), queue="slow",
                             execution_time=past() - timedelta(seconds=10 - i))
    for _ in range(6):
        await sched.schedule("track", args=("fast", 0.3), queue="fast", execution_time=past())
    await run_burst(sched, concurrency=8, queue_concurrency=(("slow", 2),))
    assert peak["slow"] == 2
    assert peak["fast"] == 6
    assert {str(j["status"]) for j in await sched.store.list_jobs()} == {"completed"}


async def test_priority_then_due_time_order_holds_across_queues(sched):
    old = await sched.schedule("noop", queue="a", execution_time=past() - timedelta(seconds=30))
    newer = await sched.schedule("noop", queue="b", execution_time=past())
    urgent = await sched.schedule("noop", queue="c", execution_time=past() + timedelta(seconds=5),
                                  priority=JobPriority.CRITICAL)
    await run_burst(sched, concurrency=1)
    started = [(await sched.get_job(j))["started_at"] for j in (urgent, old, newer)]
    assert started == sorted(started)


def rows_read_from_jobs(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of the jobs table returned or filtered out, all loops."""
    total = 0
    if plan.get("Relation Name") == "jobs":
        loops = plan.get("Actual Loops", 1)
        total += (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * loops
    for child in plan.get("Plans", []):
        total += rows_read_from_jobs(child)
    return total


async def explain_claim(sched: Scheduler, **params: Any) -> int:
    store = sched.store
    async with store.pool.connection() as conn, conn.transaction(force_rollback=True):
        cur = await conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + store._q["claim_jobs"],
            claim_params(**params))
        plan = (await cur.fetchone())[0][0]["Plan"]
    return rows_read_from_jobs(plan)


async def test_a_queue_listed_twice_is_claimed_from_once(sched):
    """WorkerOptions(queues=...) is public and not deduplicated: a queue named twice was
    walked twice, the second walk locking the same rows again (a transaction never skips
    its own locks), so a claim of 2 took the same job twice and came back with one, short,
    with jobs due (the worker then sleeps until a wake-up; its own let-go woke it at
    every claim: one job a claim)."""
    async with sched.store.pool.connection() as conn:
        await conn.execute(
            f'INSERT INTO "{sched.schema}".jobs (id, task, queue, execution_time) '
            "SELECT 'j' || g, 'noop', 'q1', now() - interval '1 minute' "
            "FROM generate_series(1, 5) g")
    claimed, _, _ = await sched.store.claim_jobs(worker_id="w", limit=2, lease_seconds=30,
                                                 queues=["q1", "q1"])
    assert sorted(c["id"] for c in claimed) == ["j1", "j2"]


async def test_claim_reads_neither_paused_backlogs_nor_other_workers_queues(sched):
    """Structural, not timed: a filter-based claim would read thousands of rows here."""
    async with sched.store.pool.connection() as conn:
        for queue, count, offset in (("paused", 3000, -3600), ("other", 3000, -3600),
                                     ("a", 20, -60), ("later", 3000, 86400)):
            await conn.execute(
                f'INSERT INTO "{sched.schema}".jobs (id, task, queue, execution_time) '
                "SELECT %s || g, 'noop', %s, now() + make_interval(secs => %s + g) "
                "FROM generate_series(1, %s) g", [queue, queue, offset, count])
        await conn.execute(f'ANALYZE "{sched.schema}".jobs')
    await sched.store.pause_queues(["paused"])
    assert await explain_claim(sched, queues=["a"]) < 100
    # Every queue: 'other' and 'a' are due (10 each may be locked), nothing paused is read.
    assert await explain_claim(sched, queues=None) < 100


def test_queue_list_parsing_and_caps():
    assert parse_queue_list(" a, b ,a") == ("a", "b")
    with pytest.raises(InvalidInput, match="--queues is empty"):
        parse_queue_list(" , ")
    with pytest.raises(InvalidInput, match="--queues: invalid queue name 'a b'"):
        parse_queue_list("a b")
    assert capped_free_slots({"b": 2, "a": 3}, {"a": 5, "b": 1}) == (["a", "b"], [0, 1])
    assert saturated({"a": 1}, {"a": 1}, None)
    assert not saturated({"a": 1}, {"a": 1}, ["b"])  # not served: never claimed from
    assert not saturated({"a": 2}, {"a": 1}, ["a"])
