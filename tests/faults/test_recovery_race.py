"""Fault 3: orphan recovery racing a completion, at the statement level.

recover_orphans locks the orphans it picks (FOR UPDATE SKIP LOCKED) and repeats the lease
test in its UPDATE; every write after a claim is fenced on (id, attempt, worker, status).
So the interleaving "recovery reads the row, a completion commits, recovery writes"
cannot happen: either the completion holds the row lock first (recovery skips the row,
the completion wins) or recovery does (the completion waits, then finds the row no longer
its own and writes nothing). Both orders are forced below, then raced for real.
"""

from __future__ import annotations

import asyncio

import psycopg
from conftest import wait_until

from pgsched import JobSpec, Scheduler
from pgsched.store import ERRORS_KEPT_FIRST, ERRORS_KEPT_LAST

from .kit import lease_expiries, query

W = "host:1:stale1"


async def claim_all(sched, worker_id=W, lease_seconds=60.0):
    """Every due job, suspects included (one suspect claim each: a worker would run each
    alone, a test takes them all at once)."""
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id=worker_id, limit=1000, lease_seconds=lease_seconds)
    while sched.store.suspect_due:
        suspect, _, _ = await sched.store.claim_jobs(
            worker_id=worker_id, limit=1, lease_seconds=lease_seconds, suspects=True)
        claimed += suspect
        if not suspect:
            break
    return claimed


async def expire_leases(sched):
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second' "
                       "WHERE status = 'running' RETURNING id")


async def test_completion_holding_the_row_wins(sched, pg_dsn):
    job_id = await sched.schedule("noop")
    await claim_all(sched)
    await expire_leases(sched)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as completing:
        cur = await completing.execute(sched.store._q["complete_jobs"], {
            "worker_id": W, "ids": [job_id], "attempts": [1], "results": ['"mine"']})
        assert [r[0] for r in await cur.fetchall()] == [job_id]  # written, not committed
        assert await sched.store.recover_orphans(max_recoveries=3) == []
        await completing.commit()
    job = await sched.store.get_job(job_id)
    assert (job["status"], job["result"], job["recoveries"]) == ("completed", "mine", 0)


async def test_recovery_holding_the_row_wins_and_the_late_completion_writes_nothing(
        sched, pg_dsn):
    job_id = await sched.schedule("noop")
    await claim_all(sched)
    await expire_leases(sched)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as recovering:
        cur = await recovering.execute(sched.store._q["recover_orphans"], {
            "max_recoveries": 3, "limit": 1000, "channel": sched.store.channel,
            "seen_twice": False, "sighted_workers": [], "sighted_beats": [],
            "errors_first": ERRORS_KEPT_FIRST, "errors_last": ERRORS_KEPT_LAST})
        assert [r[0] for r in await cur.fetchall()] == [job_id]
        # Through a pool with the default lock_timeout (LOCK_TIMEOUT_SECONDS), not the
        # fixture's 0.5 s, which seeing the wait and committing could pass on a loaded
        # machine (LockNotAvailable: no race made).
        async with Scheduler(pg_dsn, schema=sched.schema) as patient:
            late = asyncio.create_task(patient.store.complete_jobs(
                worker_id=W, done=[(job_id, 1, '"late"')]))
            blocker = recovering.info.backend_pid
            await wait_until(lambda: _waiting_on(sched, blocker),
                             what="the completion to wait on the recovery's row lock")
            await recovering.commit()
            assert await late == set()
    job = await sched.store.get_job(job_id)
    assert (job["status"], job["result"], job["worker_id"], job["recoveries"]) == \
        ("pending", None, None, 1)


async def _waiting_on(sched, backend_pid: int) -> bool:
    rows = await query(sched, "SELECT pid FROM pg_stat_activity "
                              "WHERE %s = ANY(pg_blocking_pids(pid))", [backend_pid])
    return bool(rows)


async def test_raced_for_real_exactly_one_side_wins_each_job(sched):
    wins = {"completion": 0, "recovery": 0}
    for round_ in range(8):
        ids = [f"r{round_}-{i}" for i in range(50)]
        await sched.schedule_bulk([JobSpec("noop", job_id=i) for i in ids])
        await claim_all(sched)
        await expire_leases(sched)
        completed_pairs, recovered = await asyncio.gather(
            sched.store.complete_jobs(worker_id=W, done=[(i, 1, '"done"') for i in ids]),
            sched.store.recover_orphans(max_recoveries=3))
        recovered_ids = {r["id"] for r in recovered}
        completed = {job_id for job_id, _ in completed_pairs}
        assert completed.isdisjoint(recovered_ids)
        assert completed | recovered_ids == set(ids)
        rows = await query(sched, "SELECT * FROM {schema}.jobs WHERE id = ANY(%s)", [ids])
        for row in rows:
            expected = "completed" if row["id"] in completed else "pending"
            assert str(row["status"]) == expected, row
            assert lease_expiries(row) == (row["id"] in recovered_ids), row
        # One worker's orphans, recovered in one statement: one crash of 50 jobs (the
        # recovery's snapshot sees the completion's rows before it commits, or none of
        # them recovered), counted against none.
        assert sum(row["recoveries"] for row in rows) == 0
        wins["completion"] += len(completed)
        wins["recovery"] += len(recovered_ids)
        await query(sched, "DELETE FROM {schema}.jobs RETURNING id")
    print(f"race winners over 400 jobs: {wins}")


async def test_recovery_leaves_live_leases_alone(sched):
    job_id = await sched.schedule("noop")
    await claim_all(sched)
    assert await sched.store.recover_orphans(max_recoveries=3) == []
    assert (await sched.store.get_job(job_id))["status"] == "running"


async def test_stale_attempt_is_fenced_even_when_the_same_worker_reclaims(sched):
    """Fencing on the attempt, not only the worker: a worker that got its own recovered
    job back cannot record the first attempt's outcome over the second attempt."""
    job_id = await sched.schedule("noop", max_retries=3)
    await claim_all(sched)
    await expire_leases(sched)
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == [job_id]
    assert [j["attempts"] for j in await claim_all(sched)] == [2]
    store = sched.store
    assert await store.complete_jobs(worker_id=W, done=[(job_id, 1, '"stale"')]) == set()
    assert await store.fail_job(worker_id=W, job_id=job_id, attempt=1, error="stale",
                                traceback=None, retry_delay_seconds=0) is None
    assert await store.heartbeat_jobs(worker_id=W, held=[(job_id, 1)], lease_seconds=60) == {}
    assert await store.release_jobs(worker_id=W, held=[(job_id, 1)]) == set()
    job = await store.get_job(job_id)
    assert (job["status"], job["attempts"], job["failures"], job["result"]) == \
        ("running", 2, 0, None)
    assert await store.complete_jobs(worker_id=W, done=[(job_id, 2, '"fresh"')]) \
        == {(job_id, 2)}



async def _wait_past_grace(sched, job_id, grace):
    await wait_until(lambda: _db_past(sched, job_id, grace),
                     what="the database clock past the job's misfire grace")


async def _db_past(sched, job_id, grace):
    rows = await query(sched, "SELECT now() > execution_time + make_interval(secs => %s) "
                              "AS past FROM {schema}.jobs WHERE id = %s", [grace, job_id])
    return rows[0]["past"]


async def test_a_started_job_put_back_by_a_crash_or_shutdown_is_not_expired(sched):
    """The misfire grace skips a job that could not start in time. A job that did start
    and lost its worker (recovery) or was interrupted by a shutdown (release) must run
    again, however late: expiring it would lose it."""
    recovered = await sched.schedule("noop", misfire_grace_time=2, job_id="recovered")
    released = await sched.schedule("noop", misfire_grace_time=2, job_id="released")
    assert {j["id"] for j in await claim_all(sched)} == {recovered, released}
    await _wait_past_grace(sched, recovered, 2)
    await expire_leases(sched)
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() + interval '1 minute' "
                       "WHERE id = %s RETURNING id", [released])
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == [recovered]
    assert await sched.store.release_jobs(worker_id=W, held=[(released, 1)]) == {released}
    again = await claim_all(sched, worker_id="host:2:fresh")
    assert sorted((j["id"], j["expired"], j["attempts"]) for j in again) == \
        [(recovered, False, 2), (released, False, 2)]


async def test_a_job_never_started_within_its_grace_still_expires(sched):
    job_id = await sched.schedule("noop", misfire_grace_time=0.5)
    await _wait_past_grace(sched, job_id, 0.5)
    assert [(j["id"], j["expired"]) for j in await claim_all(sched)] == [(job_id, True)]


async def _silent_registered_worker_with_a_job(sched, worker_id: str = "host:2:live2"):
    """A registered worker whose heartbeat and job lease are both over a lease old: as
    after someone held its registry and job rows locked for longer than a lease."""
    job_id = await sched.schedule("noop")
    await query(sched, "INSERT INTO {schema}.workers (id, host, pid, version, concurrency, "
                       "heartbeat_at) VALUES (%s, 'host', 2, 'test', 1, "
                       "now() - interval '1 hour') RETURNING id", [worker_id])
    await claim_all(sched, worker_id=worker_id)
    await expire_leases(sched)
    return job_id


async def test_a_locked_registry_row_is_not_silent(sched, pg_dsn):
    """Whoever holds a worker's registry row (its own queued heartbeat, or someone
    keeping it from writing) keeps its jobs; recovered once the row is free."""
    job_id = await _silent_registered_worker_with_a_job(sched)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{sched.schema}".workers FOR UPDATE')
        assert await sched.store.recover_orphans(max_recoveries=3) == []
        recovery = await sched.store.recover_seen_twice(max_recoveries=3, sighted={})
        assert recovery == ([], {})
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == [job_id]


async def test_the_worker_loop_takes_a_registered_workers_jobs_when_seen_silent_twice(sched):
    worker_id = "host:2:live2"
    job_id = await _silent_registered_worker_with_a_job(sched, worker_id)
    store = sched.store
    first = await store.recover_seen_twice(max_recoveries=3, sighted={})
    assert first.recovered == [] and list(first.silent) == [worker_id]
    # It wrote a heartbeat between the passes (then was kept from writing again): the
    # second pass has not seen the same silence twice, and waits for a third.
    await query(sched, "UPDATE {schema}.workers SET heartbeat_at = heartbeat_at + "
                       "interval '1 minute' RETURNING id")
    second = await store.recover_seen_twice(max_recoveries=3, sighted=first.silent)
    assert second.recovered == [] and second.silent != first.silent
    third = await store.recover_seen_twice(max_recoveries=3, sighted=second.silent)
    assert [r["id"] for r in third.recovered] == [job_id]
    assert third.recovered[0].keys() == {
        "id", "task", "queue", "status", "attempts", "previous_worker"}


async def test_the_worker_loop_takes_an_unregistered_workers_jobs_at_first_sight(sched):
    job_id = await sched.schedule("noop")
    await claim_all(sched)  # W never registered: gone, nothing left to write
    await expire_leases(sched)
    recovery = await sched.store.recover_seen_twice(max_recoveries=3, sighted={})
    assert [r["id"] for r in recovery.recovered] == [job_id] and recovery.silent == {}
