"""Rules the store enforces for every caller, against a real PostgreSQL: the fence survives
a replace, recovery and release wake idle workers, stored priorities are 0-9, and a job's
error history stays bounded."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import wait_until

from pgsched.store import ERRORS_KEPT_FIRST, ERRORS_KEPT_LAST, TRACEBACK_MAX_CHARS

W = "worker-a"


async def claim_one(sched, worker_id: str = W, lease_seconds: float = 60.0,
                    suspects: bool = False) -> dict:
    """One job; with `suspects`, a suspect (a job put back by recovery)."""
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id=worker_id, limit=1, lease_seconds=lease_seconds, suspects=suspects)
    [row] = claimed
    return row


async def lapse_and_recover(sched, job_id: str) -> None:
    async with sched.store.pool.connection() as conn:
        await conn.execute(
            f'UPDATE "{sched.schema}".jobs SET lease_until = now() - interval \'1 s\''
            " WHERE id = %s", [job_id])
    await sched.store.recover_orphans(max_recoveries=5)


async def test_replace_keeps_the_fence_so_a_recovered_runs_late_completion_is_rejected(sched):
    await sched.schedule("noop", job_id="j")
    first = await claim_one(sched)
    assert first["attempts"] == 1
    await lapse_and_recover(sched, "j")
    await sched.schedule("noop", job_id="j", conflict_resolution="replace")
    second = await claim_one(sched)
    assert second["attempts"] > first["attempts"]
    # The first run finishes late, under the same worker id (a worker that reclaimed it).
    late = await sched.store.complete_jobs(worker_id=W, done=[("j", 1, '"stale"')])
    assert late == set(), "a completion of the replaced run passed the fence"
    assert await sched.store.complete_jobs(
        worker_id=W, done=[("j", second["attempts"], '"fresh"')]) == {("j", second["attempts"])}
    assert (await sched.get_job("j"))["result"] == "fresh"


async def test_replaced_job_that_ran_before_still_expires_past_its_grace(sched):
    await sched.schedule("noop", job_id="j")
    await claim_one(sched)
    await lapse_and_recover(sched, "j")
    past = datetime.now(UTC) - timedelta(hours=1)
    await sched.schedule("noop", job_id="j", conflict_resolution="replace",
                         execution_time=past, misfire_grace_time=1)
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id=W, limit=1, lease_seconds=60)
    assert [row["expired"] for row in claimed] == [True]


async def test_retried_job_that_was_recovered_before_expires_past_its_grace(sched):
    await sched.schedule("noop", job_id="j", max_retries=1, misfire_grace_time=1)
    await claim_one(sched)
    await lapse_and_recover(sched, "j")
    attempt = (await claim_one(sched, suspects=True))["attempts"]
    await sched.store.fail_job(worker_id=W, job_id="j", attempt=attempt, error="boom",
                               traceback=None, retry_delay_seconds=0)
    await asyncio.sleep(1.2)
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id=W, limit=1, lease_seconds=60)
    assert [row["expired"] for row in claimed] == [True]


async def test_recovered_job_is_never_expired(sched):
    await sched.schedule("noop", job_id="j", misfire_grace_time=1)
    await claim_one(sched)
    await asyncio.sleep(1.2)
    await lapse_and_recover(sched, "j")
    assert (await claim_one(sched, suspects=True))["expired"] is False


@pytest.fixture
async def listener(pg_dsn, sched):
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    await conn.execute(f'LISTEN "{sched.store.channel}"')
    received: list[str] = []

    async def collect():
        async for notify in conn.notifies():
            received.append(notify.payload)

    task = asyncio.create_task(collect())
    yield received
    task.cancel()
    await conn.close()


async def test_release_wakes_idle_workers_with_a_due_epoch(sched, listener):
    await sched.schedule("noop", job_id="j")
    row = await claim_one(sched)
    await wait_until(lambda: listener, what="the enqueue's notify")
    listener.clear()
    assert await sched.store.release_jobs(worker_id=W, held=[("j", row["attempts"])]) == {"j"}
    [payload] = await wait_until(lambda: listener, timeout=5, what="a notify after release")
    assert float(payload) <= datetime.now(UTC).timestamp() + 1


async def test_orphan_recovery_wakes_idle_workers_with_a_due_epoch(sched, listener):
    await sched.schedule("noop", job_id="j")
    await claim_one(sched)
    await wait_until(lambda: listener, what="the enqueue's notify")
    listener.clear()
    await lapse_and_recover(sched, "j")
    [payload] = await wait_until(lambda: listener, timeout=5, what="a notify after recovery")
    assert float(payload) <= datetime.now(UTC).timestamp() + 1


@pytest.mark.parametrize("priority", [-1, 10])
async def test_priority_outside_0_to_9_is_refused_by_the_table(sched, priority):
    async with sched.store.pool.connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(
                f'INSERT INTO "{sched.schema}".jobs (id, task, priority, execution_time)'
                " VALUES ('x', 'noop', %s, now())", [priority])
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(
                f'INSERT INTO "{sched.schema}".schedules (id, task, every, origin,'
                " next_fire_at, priority) VALUES ('s', 'noop', '1 minute', 'cli', now(), %s)",
                [priority])


async def test_error_history_keeps_the_first_and_last_attempts_with_short_tracebacks(sched):
    retries = ERRORS_KEPT_FIRST + ERRORS_KEPT_LAST + 5
    await sched.schedule("noop", job_id="j", max_retries=retries)
    for n in range(1, retries + 2):
        attempt = (await claim_one(sched))["attempts"]
        await sched.store.fail_job(worker_id=W, job_id="j", attempt=attempt, error=f"e{n}",
                                   traceback="x" * (TRACEBACK_MAX_CHARS * 2),
                                   retry_delay_seconds=0)
    job = await sched.get_job("j")
    assert job["status"] == "failed"
    kept = [e["attempt"] for e in job["errors"]]
    last = retries + 1
    assert kept == [*range(1, ERRORS_KEPT_FIRST + 1),
                    *range(last - ERRORS_KEPT_LAST + 1, last + 1)]
    assert all(len(e["traceback"]) <= TRACEBACK_MAX_CHARS for e in job["errors"])
    assert job["errors"][-1]["traceback"].endswith("x")  # the end of a traceback is kept


async def test_a_batch_of_completions_writes_ids_and_results_as_they_are(sched):
    """complete_jobs sends its arrays as literals: ids and results holding what an array
    literal quotes or escapes (quotes, backslashes, commas, braces, spaces, NULL, non-ASCII)
    complete the right jobs with their results intact."""
    ids = ['a"b', "c\\d", "e,f", "{g}", "h i", "NULL", "ñ✓", "plain"]
    results = ['"x\\"y"', '"back\\\\slash"', '{"a": [1, "}"]}', "null", '"NULL"', '"ñ✓"',
               '[{"k": "{,}"}]', "3"]
    for job_id in ids:
        await sched.schedule("noop", job_id=job_id)
    claimed, _, _ = await sched.store.claim_jobs(worker_id=W, limit=len(ids), lease_seconds=60)
    attempts = {row["id"]: row["attempts"] for row in claimed}
    assert sorted(attempts) == sorted(ids)
    done = [(job_id, attempts[job_id], result) for job_id, result in zip(ids, results,
                                                                          strict=True)]
    assert await sched.store.complete_jobs(worker_id=W, done=done) == \
        {(job_id, attempts[job_id]) for job_id in ids}
    for job_id, result in zip(ids, results, strict=True):
        job = await sched.get_job(job_id)
        assert (job["status"], job["result"]) == ("completed", json.loads(result)), job_id
