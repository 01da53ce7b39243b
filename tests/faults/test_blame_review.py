"""Review of crash blame (blame): a poison pill that kills real worker processes, run
beside innocent jobs; rows of worker_crashes written by hand; a worker id reused.

- A job that kills its worker every time must end as a poison pill after
  max_recoveries crashes, and an innocent job that ran beside it in every one of those
  crashes must not.
- worker_crashes is read by every recovery: what a runtime-role user writes into it
  must not stop a poison pill from being failed, nor grow the table for ever, nor stall
  the recovery of other workers' jobs.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from conftest import fast_options, wait_until

from pgsched import Scheduler

from .kit import audit_env, counts, fault_config, query, release_file
from .test_recovery_race import _silent_registered_worker_with_a_job, claim_all
from .test_recovery_review import (
    LIVE,
    STARTED_FIRST_LEASE_LAST,
    _dead_worker_holding,
    _recover_params,
    _recoveries,
)

MAX_RECOVERIES = 2


async def _status(sched, job_id: str) -> str:
    return str((await sched.store.get_job(job_id))["status"])


# The innocent is claimed with the pill, in one batch (one started_at). Before suspects
# the lowest id took the blame of every crash: with the innocent's id lower it was failed,
# seen failing with {'a-innocent': ('failed', 2), 'b-pill': ('failed', 2)} after 4
# crashes. Now the first crash, shared, counts against neither: both run alone after it,
# the innocent completes and the pill is counted on each crash it causes alone, so it
# takes one crash more than max_recoveries when it had a neighbour.
@pytest.mark.parametrize("pill, innocent", [
    pytest.param("pill", None, id="alone"),
    pytest.param("a-pill", "b-innocent", id="pill-id-lower"),
    pytest.param("b-pill", "a-innocent", id="innocent-id-lower"),
])
async def test_a_poison_pill_that_kills_its_worker_is_failed_and_its_neighbour_is_not(
        sched, pg_dsn, schema, workers, tmp_path, pill, innocent):
    """Each worker can claim the innocent job (three seconds long) and the pill together
    (concurrency 2); the pill SIGKILLs its worker a second later, and the next worker
    recovers what it held. One worker at a time: a suspect runs alone on it."""
    config = fault_config(tmp_path, pg_dsn, schema, max_recoveries=MAX_RECOVERIES,
                          concurrency=2)
    env = audit_env(pg_dsn, schema)
    if innocent:
        await sched.schedule("sleep_then_record", args=(innocent, 3.0), job_id=innocent)
    await sched.schedule("kill_own_worker", args=(1.0,), job_id=pill)
    crashes = 0
    # Enough crashes for the pill to be failed even if the innocent took the first counts.
    while crashes < 2 * MAX_RECOVERIES + 1:
        worker = workers(config, env=env)

        async def died_or_pill_failed(w=worker) -> bool:
            return w.proc.poll() is not None or await _status(sched, pill) == "failed"

        await wait_until(died_or_pill_failed, timeout=60, what="the pill to kill its worker")
        if worker.proc.poll() is None:
            break  # this worker failed the pill as a poison pill and lives on
        crashes += 1
    await wait_until(lambda: _settled(sched), timeout=60, what="every job finished")
    rows = await query(sched, "SELECT id, status::text, recoveries FROM {schema}.jobs")
    expected = {pill: ("failed", MAX_RECOVERIES)}
    if innocent:
        expected[innocent] = ("completed", 0)
    shared_first_crash = 1 if innocent else 0
    assert ({r["id"]: (r["status"], r["recoveries"]) for r in rows}, crashes) == (
        expected, MAX_RECOVERIES + shared_first_crash)


async def _settled(sched) -> bool:
    active = await counts(sched)
    return active["pending"] == 0 and active["running"] == 0


async def _expire_lease(sched, where: str) -> None:
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second' "
                       f"WHERE {where} RETURNING id")


async def _crash_again_and_again(sched, crashes: int) -> list[str]:
    """The job `hang` freezes the (unregistered) worker LIVE each time it claims it: each
    claim after a counted crash shows the worker alive, so each silence is a new crash."""
    await sched.schedule("noop", job_id="hang")
    statuses = []
    for _ in range(crashes):
        await claim_all(sched, worker_id=LIVE)
        await _expire_lease(sched, "status = 'running'")
        statuses += [str(r["status"]) for r in
                     await sched.store.recover_orphans(max_recoveries=3)]
    return statuses


# 'infinity': written by SQL; a day ahead: counted while the database clock was a day
# fast, then the clock was put right.
@pytest.mark.parametrize("counted_at", ["'infinity'", "now() + interval '1 day'"],
                         ids=["infinity", "a-day-ahead"])
async def test_a_crash_record_dated_in_the_future_keeps_no_poison_pill_from_failing(
        sched, counted_at):
    await query(sched, "INSERT INTO {schema}.worker_crashes VALUES "
                       f"(%s, 'junk', NULL, {counted_at}) RETURNING worker_id", [LIVE])
    assert await _crash_again_and_again(sched, 3) == ["pending", "pending", "failed"]


async def test_a_crash_record_dated_in_the_future_is_pruned(sched):
    """Records are pruned once counted ten leases ago; one dated ahead of the clock never
    gets there, and worker_crashes would keep every such row for ever."""
    await query(sched, "INSERT INTO {schema}.worker_crashes VALUES "
                       "(%s, 'junk', NULL, 'infinity'), ('other', 'junk', NULL, "
                       "now() + interval '1 year') RETURNING worker_id", [LIVE])
    await sched.store.prune_workers(older_than_seconds=20)
    assert await query(sched, "SELECT worker_id FROM {schema}.worker_crashes") == []


async def test_a_crash_record_locked_by_another_session_stalls_no_recovery(sched, pg_dsn):
    """A session holds LIVE's crash record (FOR UPDATE: a report, an operator in psql)
    while LIVE crashes again and a second dead worker's job waits in the same batch. The
    recovery must not wait on the record (nor fail on lock_timeout, again every pass):
    the other worker's job comes back; LIVE's may wait for the lock to go, as a worker
    whose registry row is locked does."""
    await _dead_worker_holding(sched, LIVE, False, {"old": (60, 2)})
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["old"]
    await claim_all(sched, worker_id=LIVE)  # alive again: it takes `old` back
    await _dead_worker_holding(sched, "host:3:dead3", False, {"other": (30, 1)})
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '3 minutes' "
                       "WHERE id = 'old' RETURNING id")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{sched.schema}".worker_crashes '
                             "WHERE worker_id = %s FOR UPDATE", [LIVE])
        async with asyncio.timeout(15):
            recovered = await sched.store.recover_orphans(max_recoveries=3)
        assert "other" in [r["id"] for r in recovered]
        await sched.store.prune_workers(older_than_seconds=0)  # nor does pruning wait
    recovered += await sched.store.recover_orphans(max_recoveries=3)
    assert sorted(r["id"] for r in recovered) == ["old", "other"]
    assert await _recoveries(sched) == {"old": 2, "other": 1}


async def test_a_worker_restarted_under_the_same_id_crashes_anew(sched):
    """Worker(worker_id=...) lets a deployment reuse an id (a pod name). Restarted after a
    crash, it registers again and runs the pill again: that is a second crash. (The pill
    runs alone each time: a crash shared with another job would count against neither.)"""
    await _dead_worker_holding(sched, LIVE, True, {"pill": (60, 1)})
    recovered = await sched.store.recover_orphans(max_recoveries=3)
    assert sorted(r["id"] for r in recovered) == ["pill"]
    await sched.store.register_worker(id=LIVE, host="host", pid=2, version="test",
                                      concurrency=8, queues=None)
    await claim_all(sched, worker_id=LIVE)
    await query(sched, "UPDATE {schema}.workers SET heartbeat_at = now() - interval '1 hour' "
                       "RETURNING id")
    await query(sched, "UPDATE {schema}.jobs SET lease_until = now() - interval '1 second', "
                       "started_at = CASE id WHEN 'pill' THEN started_at - interval '1 minute' "
                       "ELSE started_at END WHERE status = 'running' RETURNING id")
    recovered = await sched.store.recover_orphans(max_recoveries=3)
    assert sorted(r["id"] for r in recovered) == ["pill"]
    assert await _recoveries(sched) == {"pill": 2}


async def test_a_crash_record_locked_by_another_session_stalls_no_prune(sched, pg_dsn):
    """A settled record (counted long ago, its worker runs nothing) that a session holds:
    the prune leaves it for a later one instead of failing on lock_timeout, which would
    keep the registry from being pruned as well."""
    await query(sched, "INSERT INTO {schema}.workers (id, host, pid, version, concurrency, "
                       "heartbeat_at) VALUES ('gone', 'host', 3, 'test', 1, "
                       "now() - interval '1 hour') RETURNING id")
    await query(sched, "INSERT INTO {schema}.worker_crashes VALUES (%s, 'j', NULL, "
                       "now() - interval '1 hour'), ('gone', 'j', NULL, "
                       "now() - interval '1 hour') RETURNING worker_id", [LIVE])
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{sched.schema}".worker_crashes '
                             "WHERE worker_id = %s FOR UPDATE", [LIVE])
        async with asyncio.timeout(15):
            assert await sched.store.prune_workers(older_than_seconds=60) == ["gone"]
        left = await query(sched, "SELECT worker_id FROM {schema}.worker_crashes")
        assert left == [{"worker_id": LIVE}]
    await sched.store.prune_workers(older_than_seconds=60)
    assert await query(sched, "SELECT worker_id FROM {schema}.worker_crashes") == []


async def test_a_crash_left_running_across_the_upgrade_to_worker_crashes_is_counted_once(
        pg_dsn, schema):
    """Jobs of a dead worker still running when 0018 is applied: recovered afterwards in
    batches, the crash is judged once: shared by three jobs, it counts against none (the
    last one back is not a crash of its own). The jobs are claimed by SQL: this code's
    claim needs 0019."""
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as sched:
        await sched.store.migrate(target=16)
        await query(sched, "INSERT INTO {schema}.workers (id, host, pid, version, "
                           "concurrency, heartbeat_at) VALUES (%s, 'host', 2, 'test', 8, "
                           "now() - interval '2 hours') RETURNING id", [LIVE])
        for job_id, (started, lease_ended) in STARTED_FIRST_LEASE_LAST.items():
            await sched.schedule("noop", job_id=job_id)
            await query(sched, "UPDATE {schema}.jobs SET status = 'running', attempts = 1, "
                               "worker_id = %s, heartbeat_at = now() - interval '3 hours', "
                               "started_at = now() - make_interval(mins => %s), "
                               "lease_until = now() - make_interval(mins => %s) "
                               "WHERE id = %s RETURNING id",
                        [LIVE, started, lease_ended, job_id])
        await sched.store.migrate()
        for _ in range(3):
            await sched.store.recover_orphans(max_recoveries=3, limit=1)
        assert await _recoveries(sched) == {"first": 0, "second": 0, "third": 0}


# Seen failing with {'innocent': ('failed', 2)}, pill ('failed', 2) before suspects: both
# claimed in one batch, with one started_at (the claim's now()), so "started first" fell
# to the id. Now a freeze of both counts against neither, and each runs alone after it.
async def test_a_job_that_freezes_live_workers_is_a_poison_pill_and_its_neighbour_is_not(
        sched, pg_dsn, schema, workers, tmp_path):
    """Two live workers; the pill blocks the event loop of whichever runs it for two
    leases, then lets it go on (alive but slow: it heartbeats again later). Each freeze
    is a crash, counted only when the pill was the one job its worker ran; after
    max_recoveries such crashes the pill is failed, and the innocent, recovered with it
    when they shared a worker, is not."""
    config = fault_config(tmp_path, pg_dsn, schema, max_recoveries=MAX_RECOVERIES,
                          concurrency=2)
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    await sched.schedule("freeze_loop", args=(6.0,), job_id="pill")
    await sched.schedule("hold", args=("innocent", release), job_id="innocent")
    pool = [workers(config, env=env) for _ in range(2)]

    async def pill_failed() -> bool:
        return await _status(sched, "pill") == "failed"

    await wait_until(pill_failed, timeout=90, what="the freezing pill to be failed")
    do_release()
    await wait_until(lambda: _settled(sched), timeout=60, what="every job finished")
    rows = await query(sched, "SELECT id, status::text, recoveries FROM {schema}.jobs")
    assert {r["id"]: (r["status"], r["recoveries"]) for r in rows} == {
        "pill": ("failed", MAX_RECOVERIES), "innocent": ("completed", 0)}
    assert all(w.proc.poll() is None for w in pool)


# Which of the three held batches (LIMIT 1 each, taken in lease order) holds `first`,
# the job to blame; and the order the three recoveries commit in.
@pytest.mark.parametrize("culprit_lease", [3, 2, 1], ids=["r1-holds-it", "r2-holds-it",
                                                          "r3-holds-it"])
@pytest.mark.parametrize("commits", [(0, 1, 2), (2, 1, 0), (1, 2, 0)],
                         ids=["in-order", "reversed", "middle-first"])
@pytest.mark.parametrize("counted_before", [False, True], ids=["first-crash", "second-crash"])
async def test_three_recoveries_holding_parts_of_one_shared_crash_count_it_against_none(
        sched, pg_dsn, culprit_lease, commits, counted_before):
    """Three recoveries on their own connections each recover one job of a dead worker
    (gone from the registry) and hold it uncommitted; a fourth runs meanwhile; they
    commit in some order and later passes take the rest. On a second crash (the worker
    showed life after the first was counted) the record is there to be upserted. The
    crash is shared by four jobs: however it is split, no part is counted as a crash of
    its own job."""
    leases = {"first": (30, culprit_lease),
              **{j: (20 - n, lease) for n, (j, lease) in enumerate(
                  zip(["second", "third", "fourth"],
                      [x for x in (3, 2, 1, 0) if x != culprit_lease], strict=True))}}
    await _dead_worker_holding(sched, LIVE, False, leases)
    if counted_before:
        await query(sched, "INSERT INTO {schema}.worker_crashes VALUES (%s, 'x', NULL, "
                           "now() - interval '1 hour') RETURNING worker_id", [LIVE])
    holders = [await psycopg.AsyncConnection.connect(pg_dsn) for _ in range(3)]
    held = []
    try:
        for conn in holders:
            cur = await conn.execute(sched.store._q["recover_orphans"],
                                     _recover_params(sched, 1))
            held += [row[0] for row in await cur.fetchall() if row[0] is not None]
        meanwhile = await sched.store.recover_orphans(max_recoveries=3)
        for n in commits:
            await holders[n].commit()
    finally:
        for conn in holders:
            await conn.close()
    later = []
    for _ in range(4):
        later += await sched.store.recover_orphans(max_recoveries=3)
    recovered = held + [r["id"] for r in meanwhile + later]
    assert sorted(recovered) == ["first", "fourth", "second", "third"], held
    assert await _recoveries(sched) == {"first": 0, "second": 0, "third": 0, "fourth": 0}


async def test_a_crash_counted_before_the_clock_was_stepped_back_is_not_counted_again(sched):
    """A registered worker's crash, split over two passes, counted while the database
    clock was an hour fast: the rest, recovered after the clock was put right, is the
    same crash (same registry heartbeat), shared with `old`: it is not counted as one of
    its own."""
    await _dead_worker_holding(sched, LIVE, True, {"old": (60, 1), "late": (10, -10)})
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["old"]
    await query(sched, "UPDATE {schema}.worker_crashes SET counted_at = counted_at + "
                       "interval '1 hour' RETURNING worker_id")
    await _expire_lease(sched, "id = 'late'")
    assert [r["id"] for r in await sched.store.recover_orphans(max_recoveries=3)] == ["late"]
    assert await _recoveries(sched) == {"old": 0, "late": 0}


# Beyond what Python reads back as it is: the worker loop's next pass must still match.
@pytest.mark.parametrize("beat", ["'infinity'", "'10000-01-01'", "'-infinity'"])
async def test_a_registry_heartbeat_python_cannot_hold_strands_no_job(sched, beat):
    """The worker loop takes a registered worker's jobs once two passes saw it silent
    with the same registry heartbeat, handing the first pass's reading back to the
    second: a heartbeat read back clamped must still be the same one."""
    job_id = await _silent_registered_worker_with_a_job(sched, LIVE)
    await query(sched, f"UPDATE {{schema}}.workers SET heartbeat_at = {beat} RETURNING id")
    sighted: dict = {}
    recovered = []
    for _ in range(3):
        recovery = await sched.store.recover_seen_twice(max_recoveries=3, sighted=sighted)
        sighted = recovery.silent
        recovered += [r["id"] for r in recovery.recovered]
    assert recovered == [job_id]


async def test_a_running_job_without_a_lease_is_recovered(sched):
    """A running row whose lease_until is NULL (written by SQL: every claim and renewal
    writes one) never expires: its dead worker's job would run never again."""
    await _dead_worker_holding(sched, "host:3:dead3", False, {"leaseless": (10, 1)})
    await query(sched, "UPDATE {schema}.jobs SET lease_until = NULL RETURNING id")
    recovered = await sched.store.recover_orphans(max_recoveries=3)
    assert [(r["id"], str(r["status"])) for r in recovered] == [("leaseless", "pending")]


# 'infinity': written by SQL; an hour ahead: renewed while the database clock was an
# hour fast, the crash counted after it was put right.
@pytest.mark.parametrize("beat", ["'infinity'", "now() + interval '1 hour'"],
                         ids=["infinity", "an-hour-ahead"])
async def test_a_job_heartbeat_dated_ahead_is_no_sign_of_life_after_a_crash(sched, beat):
    """A dead worker's crash recovered in LIMIT 1 batches: the rest of it is a new crash
    only if the worker wrote after the record; a job heartbeat dated ahead of the clock
    is no such write, or the last job back, alone by then, would be blamed."""
    await _dead_worker_holding(sched, LIVE, False, {"first": (30, 3), "second": (20, 2),
                                                    "third": (10, 1)})
    await query(sched, f"UPDATE {{schema}}.jobs SET heartbeat_at = {beat} "
                       "WHERE id = 'third' RETURNING id")
    batches = [[r["id"] for r in await sched.store.recover_orphans(max_recoveries=3, limit=1)]
               for _ in range(3)]
    assert batches == [["first"], ["second"], ["third"]]
    assert await _recoveries(sched) == {"first": 0, "second": 0, "third": 0}


async def test_three_live_workers_recovering_one_killed_worker_count_its_shared_crash_against_none(
        sched, pg_dsn, schema, workers, tmp_path):
    """A worker holding 30 jobs is SIGKILLed while three others run: their maintenance
    loops recover its jobs concurrently, in whatever passes and splits the race gives.
    One crash shared by 30 jobs: no count; every job then completes (each alone, as a
    suspect)."""
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    for n in range(30):
        await sched.schedule("hold", args=(f"j{n:02}", release), job_id=f"j{n:02}")
    (tmp_path / "victim").mkdir()
    victim = workers(fault_config(tmp_path / "victim", pg_dsn, schema, concurrency=30),
                     env=env)

    async def all_held() -> list:
        rows = await query(sched, "SELECT id, worker_id, started_at FROM {schema}.jobs "
                                  "WHERE status = 'running' ORDER BY started_at, id")
        return rows if len(rows) == 30 else []

    held = await wait_until(all_held, timeout=30, what="the victim to claim every job")
    victim.kill()
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=2)
    recoverers = [workers(config, env=env) for _ in range(3)]

    async def none_left_with_the_victim() -> bool:
        rows = await query(sched, "SELECT count(*) AS n FROM {schema}.jobs "
                                  "WHERE worker_id = %s AND status = 'running'",
                           [held[0]["worker_id"]])
        return rows[0]["n"] == 0

    await wait_until(none_left_with_the_victim, timeout=60, what="every orphan recovered")
    do_release()
    await wait_until(lambda: _settled(sched), timeout=90, what="every job finished")
    rows = await query(sched, "SELECT id, status::text, recoveries FROM {schema}.jobs")
    assert {r["status"] for r in rows} == {"completed"}
    assert {r["id"]: r["recoveries"] for r in rows if r["recoveries"]} == {}
    assert all(w.proc.poll() is None for w in recoverers)
