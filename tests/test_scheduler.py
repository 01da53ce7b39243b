"""The Python API and the in-process worker against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import math
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import worker_tasks
from conftest import fast_options, wait_until

from pgsched import (
    ConflictResolution,
    InvalidInput,
    JobConflict,
    JobPriority,
    JobSpec,
    Scheduler,
    Worker,
)
from pgsched.scheduler import new_job_id


async def status(sched: Scheduler, job_id: str) -> str:
    return str((await sched.get_job(job_id))["status"])


async def run_burst(sched: Scheduler, **options) -> Worker:
    worker = Worker(sched.store, sched._dsn, fast_options(burst=True, **options))
    await asyncio.wait_for(worker.run(), 30)
    return worker


async def test_schedule_and_run_async_and_sync_tasks(sched):
    a = await sched.schedule("add", args=(2, 3))
    s = await sched.schedule(worker_tasks.sync_add, kwargs={"a": 4, "b": 5})
    await run_burst(sched)
    assert (await sched.get_job(a))["result"] == 5
    job = await sched.get_job(s)
    assert job["result"] == 9 and job["status"] == "completed" and job["attempts"] == 1


async def test_conflict_modes(sched):
    later = datetime.now(UTC) + timedelta(hours=1)
    job_id = await sched.schedule("add", args=(1, 1), job_id="report-1", execution_time=later)
    assert job_id == "report-1"
    with pytest.raises(JobConflict, match="already exists"):
        await sched.schedule("add", args=(2, 2), job_id="report-1")
    assert await sched.schedule("add", args=(3, 3), job_id="report-1",
                                conflict_resolution=ConflictResolution.IGNORE) == "report-1"
    assert (await sched.get_job("report-1"))["args"] == [1, 1]
    await sched.schedule("add", args=(4, 4), job_id="report-1",
                         conflict_resolution=ConflictResolution.REPLACE)
    job = await sched.get_job("report-1")
    assert job["args"] == [4, 4] and job["execution_time"] < later


async def test_bulk_ignore_returns_none_for_duplicates_and_raise_is_all_or_nothing(sched):
    await sched.schedule("noop", job_id="dup", execution_time=datetime.now(UTC) + timedelta(1))
    specs = [JobSpec("noop", job_id=f"b{i}") for i in range(3)] + [JobSpec("noop", job_id="dup")]
    assert await sched.schedule_bulk(specs) == ["b0", "b1", "b2", None]
    with pytest.raises(JobConflict):
        await sched.schedule_bulk([JobSpec("noop", job_id="new-1"), JobSpec("noop", job_id="dup")],
                                  conflict_resolution="raise")
    assert await sched.get_job("new-1") is None


async def test_priority_critical_runs_first(sched):
    now = datetime.now(UTC) - timedelta(seconds=1)
    normal = [await sched.schedule("noop", execution_time=now - timedelta(seconds=10))
              for _ in range(3)]
    critical = await sched.schedule("noop", execution_time=now, priority=JobPriority.CRITICAL)
    await run_burst(sched, concurrency=1)
    started = {j: (await sched.get_job(j))["started_at"] for j in [*normal, critical]}
    assert started[critical] < min(started[j] for j in normal)


async def test_retries_with_backoff_then_failed_with_every_error_kept(sched):
    job_id = await sched.schedule("fail", kwargs={"message": "nope"}, max_retries=2)
    worker = Worker(sched.store, sched._dsn, fast_options())
    runner = asyncio.create_task(worker.run())
    try:
        job = await wait_until(lambda: _finished(sched, job_id), what="job to fail")
    finally:
        worker.stop()
        await runner
    assert job["status"] == "failed" and job["attempts"] == 3 and job["failures"] == 3
    assert [e["attempt"] for e in job["errors"]] == [1, 2, 3]
    assert "RuntimeError: nope" in job["errors"][-1]["traceback"]
    assert job["last_error"] == "RuntimeError: nope"


async def _finished(sched, job_id):
    job = await sched.get_job(job_id)
    return job if str(job["status"]) in ("completed", "failed", "expired", "cancelled") else None


async def test_timeout_counts_as_failed_attempt(sched):
    job_id = await sched.schedule("sleep", args=(30,), timeout=0.2)
    await run_burst(sched)
    job = await sched.get_job(job_id)
    assert job["status"] == "failed" and "timed out after 0.2s" in job["last_error"]


async def test_misfire_grace_expires_late_jobs_and_none_never_expires(sched):
    old = datetime.now(UTC) - timedelta(minutes=10)
    late = await sched.schedule("noop", execution_time=old, misfire_grace_time=60)
    patient = await sched.schedule("noop", execution_time=old, misfire_grace_time=None)
    await run_burst(sched)
    assert await status(sched, late) == "expired"
    assert await status(sched, patient) == "completed"


async def test_unknown_task_is_put_back_with_clear_error(sched):
    """A rolling deploy: a newer worker may know the task (docs/delivery.md)."""
    job_id = await sched.schedule("not_a_registered_task")
    await run_burst(sched)
    job = await sched.get_job(job_id)
    assert job["status"] == "pending" and job["failures"] == 0
    assert "not registered" in job["last_error"]


async def test_cancel_job(sched):
    job_id = await sched.schedule("noop", execution_time=datetime.now(UTC) + timedelta(hours=1))
    assert await sched.cancel_job(job_id) is True
    assert await sched.cancel_job(job_id) is False
    assert await status(sched, job_id) == "cancelled"


@pytest.mark.parametrize("bad", [
    {"args": (math.nan,)}, {"args": (object(),)}, {"kwargs": {"x": math.inf}},
    {"args": "not-a-list"}, {"execution_time": datetime(2030, 1, 1)},
    {"max_retries": -1}, {"timeout": 0}, {"job_id": ""}, {"priority": "urgent"},
])
async def test_bad_input_is_rejected_before_writing(sched, bad):
    with pytest.raises(InvalidInput):
        await sched.schedule("noop", **bad)
    assert await sched.store.list_jobs() == []


async def test_unregistered_function_is_rejected(sched):
    async def stray() -> None: ...

    with pytest.raises(InvalidInput, match="not a registered task"):
        await sched.schedule(stray)


async def test_enormous_payload_and_hostile_ids(sched):
    with pytest.raises(InvalidInput, match="limit"):
        await sched.schedule("noop", args=("x" * 10_000_000,))
    with pytest.raises(InvalidInput):
        await sched.schedule("x" * 10_000)
    weird = "it's \"quoted\" ünïcødé 🚀; DROP TABLE jobs;--"
    assert await sched.schedule("add", args=(1, 2), job_id=weird) == weird
    await run_burst(sched)
    assert (await sched.get_job(weird))["result"] == 3
    assert await sched.store.list_jobs() != []


async def test_job_added_for_now_starts_quickly_on_idle_worker(sched):
    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.ready.is_set(), what="worker ready")
        await asyncio.sleep(0.2)  # let the listener subscribe
        job_id = await sched.schedule("noop")
        # The poll is 30 s: only LISTEN/NOTIFY can make this pass in time.
        job = await wait_until(lambda: _finished(sched, job_id), timeout=5, what="job done")
        assert job["status"] == "completed"
    finally:
        worker.stop()
        await runner


async def test_future_job_runs_on_timer_not_poll(sched):
    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.ready.is_set(), what="worker ready")
        due = datetime.now(UTC) + timedelta(seconds=1)
        job_id = await sched.schedule("noop", execution_time=due)
        job = await wait_until(lambda: _finished(sched, job_id), timeout=5, what="job done")
        assert job["status"] == "completed" and job["started_at"] >= due
    finally:
        worker.stop()
        await runner


async def test_graceful_shutdown_lets_running_job_finish(sched):
    job_id = await sched.schedule("sleep", args=(0.5,))
    worker = Worker(sched.store, sched._dsn, fast_options())
    runner = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.running_jobs == 1, what="job running")
    worker.stop()
    await runner
    assert await status(sched, job_id) == "completed"


async def test_shutdown_past_grace_puts_job_back_to_pending_without_failure(sched):
    job_id = await sched.schedule("sleep", args=(30,))
    worker = Worker(sched.store, sched._dsn, fast_options(shutdown_grace_seconds=0.2))
    runner = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.running_jobs == 1, what="job running")
    worker.stop()
    await runner
    job = await sched.get_job(job_id)
    assert job["status"] == "pending" and job["failures"] == 0 and job["worker_id"] is None


@pytest.mark.parametrize("bad", [
    {"max_retries": True}, {"args": (math.nan,)}, {"args": "not-a-list"},
    {"execution_time": datetime(2030, 1, 1)}, {"queue": "no spaces"}, {"timeout": 0},
])
async def test_bulk_validates_each_spec_though_the_others_share_their_options(sched, bad):
    # schedule_bulk validates options once for a run of specs holding the same objects:
    # a spec with other objects (True equals 1 but is no whole number) is checked anew.
    good = JobSpec("noop", max_retries=1, queue="q", timeout=5.0)
    odd = JobSpec(**{"func": "noop", "max_retries": 1, "queue": "q", "timeout": 5.0, **bad})
    with pytest.raises(InvalidInput):
        await sched.schedule_bulk([good, good, odd, good], conflict_resolution="raise")
    assert await sched.store.list_jobs() == []
    assert gc.isenabled()  # the collector, paused during the call, is back


async def test_bulk_ids_are_distinct_increasing_version_7_uuids_in_input_order(sched):
    # 1,500 jobs: the id generator's first chunk (64) and two more; plain specs (the fast
    # path) between specs with args.
    specs = [JobSpec("noop", args=(i,)) if i % 7 else JobSpec("noop") for i in range(1500)]
    before = time.time()
    ids = await sched.schedule_bulk(specs)
    assert len(set(ids)) == 1500
    assert ids == sorted(ids)  # each later than the last: COPY appends to the indexes
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 7
               and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    millis = int(ids[0].replace("-", "")[:12], 16)
    assert before - 1 <= millis / 1000 <= time.time() + 1
    args = {job["id"]: job["args"] for job in await sched.store.list_jobs(limit=2000)}
    assert [args[i] for i in ids] == [[i] if i % 7 else [] for i in range(1500)]


def test_single_job_ids_are_version_7_uuids_that_sort_by_time():
    first = new_job_id()
    time.sleep(0.002)
    later = [new_job_id() for _ in range(100)]
    assert all(uuid.UUID(i).version == 7 and str(uuid.UUID(i)) == i for i in later)
    assert len(set(later)) == 100 and all(first < i for i in later)


async def test_heartbeat_shares_a_pool_the_application_built(pg_dsn, schema):
    """A pool the application built may set its connections up in a configure callback
    (SET ROLE, search_path) that a copied connection would lack: the heartbeater then
    uses that pool, and gets a connection of its own only from a pool pgsched opened."""
    from psycopg_pool import AsyncConnectionPool

    from pgsched.store import DedicatedConnection, Store, open_pool

    async def configure(conn):
        await conn.execute("SET application_name = 'the-apps-own'")

    async with AsyncConnectionPool(pg_dsn, kwargs={"autocommit": True}, configure=configure,
                                   open=False) as apps:
        assert Store(apps, schema).own_connection() is None
    ours = await open_pool(pg_dsn)
    try:
        assert isinstance(Store(ours, schema).own_connection(), DedicatedConnection)
    finally:
        await ours.close()


async def test_pgsched_connections_run_without_jit_unless_the_dsn_turns_it_on(pg_dsn):
    """JIT compiles a plan that is only estimated to be dear, which costs pgsched's short
    statements milliseconds each: its connections turn it off, and a DSN's own
    `options` still win."""
    from psycopg.conninfo import make_conninfo

    from pgsched.store import open_pool

    for dsn, expected in ((pg_dsn, "off"), (make_conninfo(pg_dsn, options="-c jit=on"), "on")):
        pool = await open_pool(dsn)
        try:
            async with pool.connection() as conn:
                assert (await (await conn.execute("SHOW jit")).fetchone())[0] == expected
        finally:
            await pool.close()
