"""Cancelling pending and running jobs against a real PostgreSQL: the NOTIFY path, the
heartbeat fallback, a dead worker's lease, and the fenced writes that must not retry or
re-run a job whose cancel was requested."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import fast_options, wait_until

from pgsched import Scheduler, Worker


def past() -> datetime:
    """A minute ago, at call time: a constant taken at import would drift past the
    default 300 s misfire grace in a long test run, and the jobs would expire."""
    return datetime.now(UTC) - timedelta(minutes=1)


async def job(sched: Scheduler, job_id: str) -> dict[str, Any]:
    return await sched.get_job(job_id)


async def ended(sched: Scheduler, job_id: str) -> dict[str, Any] | None:
    row = await sched.get_job(job_id)
    return row if str(row["status"]) not in ("pending", "running") else None


async def claim_as_ghost(sched: Scheduler, lease_seconds: float = 60.0) -> list[dict[str, Any]]:
    """Claim due jobs for a worker that will never heartbeat (a crashed process)."""
    jobs, _, _ = await sched.store.claim_jobs(worker_id="ghost", limit=100,
                                              lease_seconds=lease_seconds)
    return jobs


async def start(sched: Scheduler, **options: Any) -> tuple[Worker, asyncio.Task[None]]:
    worker = Worker(sched.store, sched._dsn, fast_options(**options))
    runner = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.ready.is_set() and worker.listening, what="worker ready")
    return worker, runner


async def test_running_job_is_cancelled_through_notify(sched):
    # Heartbeats every 20 s: only the NOTIFY can make the cancel land within the timeout.
    worker, runner = await start(sched, heartbeat_seconds=20, lease_seconds=60)
    try:
        job_id = await sched.schedule("sleep", args=(60,), max_retries=3)
        await wait_until(lambda: worker.running_jobs == 1, what="job running")
        assert await sched.store.request_cancel(ids=[job_id]) == {job_id: "running"}
        row = await wait_until(lambda: ended(sched, job_id), timeout=5, what="job ended")
        assert str(row["status"]) == "cancelled" and row["failures"] == 0
        assert row["errors"][-1]["error"] == "cancelled on request while running"
        assert row["finished_at"] is not None and row["lease_until"] is None
        # The worker carries on with the next job.
        after = await sched.schedule("add", args=(1, 2))
        row = await wait_until(lambda: ended(sched, after), what="next job")
        assert row["result"] == 3
    finally:
        worker.stop()
        await runner


async def test_missed_notify_is_caught_by_the_heartbeat(sched):
    worker, runner = await start(sched, heartbeat_seconds=0.3)
    try:
        job_id = await sched.schedule("sleep", args=(60,))
        await wait_until(lambda: worker.running_jobs == 1, what="job running")
        async with sched.store.pool.connection() as conn:  # the flag without a NOTIFY
            await conn.execute(f'UPDATE "{sched.schema}".jobs SET cancel_requested_at = now() '
                               "WHERE id = %s", [job_id])
        row = await wait_until(lambda: ended(sched, job_id), timeout=10, what="job ended")
        assert str(row["status"]) == "cancelled"
    finally:
        worker.stop()
        await runner


async def test_sync_task_is_cancelled_and_its_slot_freed(sched):
    worker, runner = await start(sched, concurrency=1)
    try:
        job_id = await sched.schedule("sync_sleep", args=(1.5,))
        await wait_until(lambda: worker.running_jobs == 1, what="job running")
        await sched.store.request_cancel(ids=[job_id])
        row = await wait_until(lambda: ended(sched, job_id), what="job ended")
        assert str(row["status"]) == "cancelled" and row["result"] is None
        assert worker.running_jobs == 0
    finally:
        worker.stop()
        await runner


async def test_cancel_of_a_dead_workers_job_ends_cancelled_at_lease_expiry(sched):
    job_id = await sched.schedule("record", args=("never",), execution_time=past())
    assert [j["id"] for j in await claim_as_ghost(sched, lease_seconds=0.3)] == [job_id]
    assert await sched.store.request_cancel(ids=[job_id]) == {job_id: "running"}
    janitor = Worker(sched.store, sched._dsn, fast_options())
    done = await wait_until(janitor.maintenance.run_once, timeout=10, what="recovery")
    assert done == {"recovered": 1}
    row = await job(sched, job_id)
    assert str(row["status"]) == "cancelled" and row["worker_id"] is None
    assert "cancel was requested" in row["last_error"]
    # Cancelled, not pending: a worker finds nothing to run.
    assert await claim_as_ghost(sched) == []


async def test_failure_after_a_cancel_request_is_not_retried(sched):
    job_id = await sched.schedule("fail", max_retries=5, execution_time=past())
    [claimed] = await claim_as_ghost(sched)
    await sched.store.request_cancel(ids=[job_id])
    row = await sched.store.fail_job(worker_id="ghost", job_id=job_id,
                                     attempt=claimed["attempts"], error="RuntimeError: boom",
                                     traceback=None, retry_delay_seconds=0)
    assert str(row["status"]) == "cancelled"
    stored = await job(sched, job_id)
    assert stored["failures"] == 1 and stored["finished_at"] is not None
    assert stored["errors"][-1]["error"] == "RuntimeError: boom"


async def test_release_at_shutdown_honours_a_cancel_request(sched):
    keep = await sched.schedule("noop", execution_time=past())
    stop = await sched.schedule("noop", execution_time=past() - timedelta(seconds=1))
    claimed = {j["id"]: j["attempts"] for j in await claim_as_ghost(sched)}
    await sched.store.request_cancel(ids=[stop])
    released = await sched.store.release_jobs(worker_id="ghost", held=list(claimed.items()))
    assert released == {keep, stop}
    assert str((await job(sched, keep))["status"]) == "pending"
    assert str((await job(sched, stop))["status"]) == "cancelled"


async def test_a_new_attempt_starts_without_the_old_cancel_request(sched):
    job_id = await sched.schedule("noop", job_id="again", execution_time=past())
    await claim_as_ghost(sched)
    await sched.store.request_cancel(ids=[job_id])
    async with sched.store.pool.connection() as conn:  # an operator puts it back by hand
        await conn.execute(f'UPDATE "{sched.schema}".jobs SET status = \'pending\', '
                           "worker_id = NULL WHERE id = %s", [job_id])
    [claimed] = await claim_as_ghost(sched)
    assert (await job(sched, job_id))["cancel_requested_at"] is None
    held = (job_id, claimed["attempts"])
    assert await sched.store.heartbeat_jobs(worker_id="ghost", held=[held],
                                            lease_seconds=60) == {held: False}


async def test_bulk_cancel_by_task_and_queue_notifies_each_worker_once(sched, pg_dsn):
    running = await sched.schedule("noop", queue="q", execution_time=past() - timedelta(hours=1),
                                   misfire_grace_time=None)
    await claim_as_ghost(sched)
    pending = [await sched.schedule("noop", queue="q") for _ in range(5)]
    other_task = await sched.schedule("add", args=(1, 1), queue="q",
                                      execution_time=past() + timedelta(hours=1))
    other_queue = await sched.schedule("noop", queue="r",
                                       execution_time=past() + timedelta(hours=1))
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{sched.store.channel}"')
        done = await sched.store.request_cancel(task="noop", queue="q", batch_size=2)
        payloads = []
        async for notify in listener.notifies(timeout=0.5):
            payloads.append(notify.payload)
    assert done == {**dict.fromkeys(pending, "cancelled"), running: "running"}
    assert [p for p in payloads if p.startswith("cancel:")] == ["cancel:ghost"]
    assert {str((await job(sched, j))["status"]) for j in (other_task, other_queue)} == {"pending"}
    # Asking again changes nothing and notifies no one: the running job is already marked.
    assert await sched.store.request_cancel(task="noop", queue="q") == {}
    # By id, the marked running job is still reported (the caller named it).
    assert await sched.store.request_cancel(ids=[running, "nope"]) == {running: "running"}
