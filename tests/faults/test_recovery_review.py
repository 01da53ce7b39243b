"""Review of orphan recovery (lockrace): what a registry-row lock and a split crash do.

- A registry row held by a share lock (FOR SHARE: a report that means to keep what it
  read) keeps the worker's heartbeat UPDATE waiting just as FOR UPDATE does; recovery
  must count the row as locked for every lock strength, or the live worker queued on it
  loses its jobs at the unlock.
- A crash is judged once, whichever pass recovers it: a dead worker's jobs whose leases
  end in different recovery passes (one claimed after its last heartbeat), that come back
  in LIMIT batches, or that two recoveries running at once split between them (SKIP
  LOCKED) are one crash shared by several jobs, which counts against none of them (the
  last one recovered is not a crash of its own). A worker that showed life after its
  crash was judged (a claim, a heartbeat) and then falls silent again has crashed again,
  and is counted again when it ran one job.
"""

from __future__ import annotations

import asyncio
import random

import psycopg
import pytest
from conftest import wait_until

from pgsched.store import ERRORS_KEPT_FIRST, ERRORS_KEPT_LAST

from .kit import query
from .test_recovery_race import (
    _silent_registered_worker_with_a_job,
    _waiting_on,
    claim_all,
)

LIVE = "host:2:live2"


# FOR KEY SHARE (a foreign key check) does not hold the heartbeat's UPDATE, which
# changes no key: nothing to wait for, nothing to spare.
@pytest.mark.parametrize("strength", ["FOR UPDATE", "FOR NO KEY UPDATE", "FOR SHARE"])
async def test_a_registry_row_locked_with_any_strength_keeps_a_queued_worker_alive(
        sched, pg_dsn, strength):
    job_id = await _silent_registered_worker_with_a_job(sched, LIVE)
    workers = f'"{sched.schema}".workers'
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as beat:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f"SELECT 1 FROM {workers} WHERE id = %s {strength}", [LIVE])
            # The live worker's heartbeater, queued for its row (heartbeat_worker).
            queued = asyncio.create_task(beat.execute(
                f"UPDATE {workers} SET heartbeat_at = clock_timestamp() WHERE id = %s",
                [LIVE]))
            await wait_until(lambda: _waiting_on(sched, locker.info.backend_pid),
                             what="the heartbeat to queue for the locked registry row")
            first = await sched.store.recover_seen_twice(max_recoveries=3, sighted={})
            second = await sched.store.recover_seen_twice(max_recoveries=3,
                                                          sighted=first.silent)
        await queued  # the locker let go (committed or rolled back): the beat is written
    assert (first.silent, second.recovered) == ({}, [])
    job = await sched.store.get_job(job_id)
    assert (str(job["status"]), job["worker_id"], job["recoveries"]) == ("running", LIVE, 0)


async def test_a_crash_split_across_recovery_passes_is_judged_once(sched):
    """The worker claimed `late` after its last heartbeat, then died: `late`'s lease ends
    after `old`'s, so they come back in different passes. One crash of two jobs: counted
    against neither, though `late` is the only job left when it comes back."""
    old = await sched.schedule("noop", job_id="old")
    await query(sched, "INSERT INTO {schema}.workers (id, host, pid, version, concurrency, "
                       "heartbeat_at) VALUES (%s, 'host', 2, 'test', 2, "
                       "now() - interval '1 hour') RETURNING id", [LIVE])
    await claim_all(sched, worker_id=LIVE)
    late = await sched.schedule("noop", job_id="late")
    await claim_all(sched, worker_id=LIVE)
    await query(sched, "UPDATE {schema}.jobs SET started_at = now() - interval '1 hour', "
                       "lease_until = now() - interval '1 second' WHERE id = %s "
                       "RETURNING id", [old])
    recovered = await sched.store.recover_orphans(max_recoveries=3)
    assert [r["id"] for r in recovered] == [old]
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second' "
                       "WHERE id = %s RETURNING id", [late])
    recovered = await sched.store.recover_orphans(max_recoveries=3)
    assert [r["id"] for r in recovered] == [late]
    rows = await query(sched, "SELECT id, recoveries FROM {schema}.jobs ORDER BY id")
    assert {r["id"]: r["recoveries"] for r in rows} == {late: 0, old: 0}


async def test_a_dead_worker_whose_registry_heartbeat_is_in_the_future_is_recovered(sched):
    """A registry heartbeat ahead of the database's clock (written by hand, or before the
    server's clock was stepped back) is no proof of life: a live worker overwrites it
    within a heartbeat."""
    job_id = await _silent_registered_worker_with_a_job(sched, LIVE)
    await query(sched, "UPDATE {schema}.workers SET heartbeat_at = now() + interval '1 year' "
                       "RETURNING id")
    recovered = await sched.store.recover_orphans(max_recoveries=3)
    assert [r["id"] for r in recovered] == [job_id]


async def _dead_worker_holding(sched, worker_id: str, registered: bool,
                               jobs: dict[str, tuple[int, int]]) -> None:
    """A worker that died holding `jobs`: id -> (started, lease ended), minutes ago each."""
    if registered:
        await query(sched, "INSERT INTO {schema}.workers (id, host, pid, version, "
                           "concurrency, heartbeat_at) VALUES (%s, 'host', 2, 'test', 8, "
                           "now() - interval '2 hours') RETURNING id", [worker_id])
    for job_id in jobs:
        await sched.schedule("noop", job_id=job_id)
    await claim_all(sched, worker_id=worker_id)
    for job_id, (started, lease_ended) in jobs.items():
        await query(sched, "UPDATE {schema}.jobs SET "
                           "started_at = now() - make_interval(mins => %s), "
                           "lease_until = now() - make_interval(mins => %s) "
                           "WHERE id = %s RETURNING id", [started, lease_ended, job_id])


async def _recoveries(sched) -> dict[str, int]:
    rows = await query(sched, "SELECT id, recoveries FROM {schema}.jobs")
    return {r["id"]: r["recoveries"] for r in rows}


# `first` started first and its lease ended last: LIMIT 1 takes the jobs in lease order.
STARTED_FIRST_LEASE_LAST = {"first": (30, 1), "second": (20, 2), "third": (10, 3)}


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "gone"])
async def test_a_shared_crash_recovered_in_limit_batches_counts_against_none(
        sched, registered):
    await _dead_worker_holding(sched, LIVE, registered, STARTED_FIRST_LEASE_LAST)
    batches = [[r["id"] for r in await sched.store.recover_orphans(max_recoveries=3, limit=1)]
               for _ in range(3)]
    assert batches == [["third"], ["second"], ["first"]]
    assert await _recoveries(sched) == {"first": 0, "second": 0, "third": 0}


def _recover_params(sched, limit: int) -> dict:
    return {"max_recoveries": 3, "limit": limit, "channel": sched.store.channel,
            "seen_twice": False, "sighted_workers": [], "sighted_beats": [],
            "errors_first": ERRORS_KEPT_FIRST, "errors_last": ERRORS_KEPT_LAST}


# Leases end in the order the held batch (LIMIT 1) takes: `first` (the one to blame) is
# held by the recovery that has not committed yet, or recovered by the other one.
@pytest.mark.parametrize("leases", [
    {"first": (30, 3), "second": (20, 2), "third": (10, 1)},
    {"first": (30, 1), "second": (20, 2), "third": (10, 3)},
], ids=["holder-takes-first", "other-takes-first"])
@pytest.mark.parametrize("registered", [True, False], ids=["registered", "gone"])
async def test_a_crash_split_between_two_concurrent_recoveries_is_judged_once(
        sched, pg_dsn, registered, leases):
    """One recovery holds one of the dead worker's jobs (recovered, not committed) while
    another runs: the second skips the held row (SKIP LOCKED), or, for a registered
    worker, the whole worker (its registry row is held); passes after the commit take
    the rest. The crash, shared by three jobs, counts against none of them."""
    await _dead_worker_holding(sched, LIVE, registered, leases)
    held_first = leases["first"][1] == 3
    async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
        cur = await holder.execute(sched.store._q["recover_orphans"], _recover_params(sched, 1))
        held = [row[0] for row in await cur.fetchall() if row[0] is not None]
        assert held == ["first" if held_first else "third"]
        meanwhile = await sched.store.recover_orphans(max_recoveries=3)
        await holder.commit()
    later = await sched.store.recover_orphans(max_recoveries=3)
    recovered = held + [r["id"] for r in meanwhile + later]
    assert sorted(recovered) == ["first", "second", "third"]
    assert await _recoveries(sched) == {"first": 0, "second": 0, "third": 0}


async def test_concurrent_recoveries_in_small_batches_count_each_crash_once(sched):
    """Dead workers, registered and gone, each holding jobs started and expired in a
    shuffled order, recovered by four recoveries at once (each on its own connection)
    taking two jobs a pass, until none is left: each crash judged once, counted against
    the job of each worker that ran one (every third), against none for the others."""
    rng = random.Random(14)
    alone = set()
    for n in range(6):
        worker = f"host:{n}:dead{n}"
        starts, leases = rng.sample(range(1, 60), 5), rng.sample(range(1, 60), 5)
        jobs = {f"w{n}-j{i}": (starts[i], leases[i]) for i in range(1 if n % 3 == 0 else 5)}
        await _dead_worker_holding(sched, worker, n % 2 == 0, jobs)
        if len(jobs) == 1:
            alone |= set(jobs)
    recovered: list[str] = []
    for _ in range(30):
        passes = await asyncio.gather(*(sched.store.recover_orphans(max_recoveries=3, limit=2)
                                        for _ in range(4)))
        recovered += [r["id"] for found in passes for r in found]
        if len(recovered) == 22:
            break
    assert sorted(recovered) == sorted(f"w{n}-j{i}" for n in range(6)
                                       for i in range(1 if n % 3 == 0 else 5))
    counted = {job_id for job_id, n in (await _recoveries(sched)).items() if n}
    assert counted == alone
    assert all(n <= 1 for n in (await _recoveries(sched)).values())


async def test_a_registry_row_pruned_between_passes_starts_no_new_crash(sched):
    """The worker leaves the registry (pruned, ten leases silent) while one of its jobs
    is still running: the rest, recovered from a worker now gone, is the same crash, and
    the prune kept the record of it. Once it holds nothing, the record goes too."""
    await _dead_worker_holding(sched, LIVE, True, {"old": (60, 1), "late": (10, -10)})
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["old"]
    assert await sched.store.prune_workers(older_than_seconds=0) == [LIVE]
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second' "
                       "WHERE id = 'late' RETURNING id")
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["late"]
    assert await _recoveries(sched) == {"old": 0, "late": 0}
    crashes = "SELECT worker_id, job_id FROM {schema}.worker_crashes"
    assert await query(sched, crashes) == [{"worker_id": LIVE, "job_id": None}]
    assert await sched.store.prune_workers(older_than_seconds=0) == []
    assert await query(sched, crashes) == []


async def test_a_worker_seen_alive_after_its_crash_was_counted_crashes_again(sched):
    """Judged dead (a frozen event loop) while it ran two jobs (a shared crash, counted
    against neither), the worker came back: it wrote a registry heartbeat, then froze
    for good. The job left from the first time is the only one it runs in the next
    crash, and is counted: a job that keeps freezing its worker still ends as a poison
    pill."""
    await _dead_worker_holding(sched, LIVE, True, {"hang": (60, 1), "kept": (50, -10)})
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["hang"]
    await query(sched, "UPDATE {schema}.workers SET heartbeat_at = now() - interval '1 hour' "
                       "RETURNING id")
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second' "
                       "WHERE id = 'kept' RETURNING id")
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["kept"]
    assert await _recoveries(sched) == {"hang": 0, "kept": 1}


async def test_a_job_that_freezes_the_same_worker_again_and_again_is_a_poison_pill(sched):
    """A worker never registered (nothing to write but its claims) gets its recovered job
    back each time: each claim after a counted crash shows it alive, so each silence is
    a new crash, and the third fails the job."""
    job_id = await sched.schedule("noop", job_id="hang")
    statuses = []
    for _ in range(3):
        await claim_all(sched, worker_id=LIVE)
        await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second' "
                           "RETURNING id")
        statuses += [str(r["status"]) for r in
                     await sched.store.recover_orphans(max_recoveries=3)]
    assert statuses == ["pending", "pending", "failed"]
    assert (await sched.store.get_job(job_id))["recoveries"] == 3
