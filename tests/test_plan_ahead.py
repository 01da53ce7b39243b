"""Windows planned ahead of their fire time (planner LOOKAHEAD_SECONDS, migration 0016):
a window is planned once, a few seconds early, and never starts before its fire time; a
schedule paused, removed, disabled or redefined after its window was planned does not run
the old plan, whichever path changed it; overlap=False is not blocked by the schedule's
own planned window. (Three worker processes racing with planning ahead: test_recurring.)

Planner passes are given a `now` in 2030: the database clock is never that late, so every
window they plan is still to come for the withdrawal trigger, which reads the real clock.
The worker tests run on the wall clock with intervals of one to three seconds.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from conftest import fast_options, wait_until
from test_recurring import add, fire_times, planner, schedule, window_jobs

from pgsched import Worker, periodic, recurring, tasks
from pgsched.recurring import define_schedule
from pgsched.worker import planner as planner_module
from pgsched.worker.planner import LOOKAHEAD_SECONDS

T = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # the next window of the schedules below
LOOKAHEAD = timedelta(seconds=LOOKAHEAD_SECONDS)
AHEAD = T - LOOKAHEAD + timedelta(seconds=1)  # a planner pass just inside the lookahead


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(recurring, "_SCHEDULES", {})
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    return recurring._SCHEDULES


async def plan_ahead(sched, db, schedule_id):
    """Move the schedule's next window to T and let a pass plan it ahead; its job."""
    db("UPDATE schedules SET next_fire_at = %s WHERE id = %s", T, schedule_id)
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, schedule_id)
    return job


# -- the planner -----------------------------------------------------------------------


async def test_a_window_is_planned_once_within_the_lookahead_and_due_at_its_fire_time(
        sched, db):
    assert LOOKAHEAD_SECONDS >= 2  # what lets the window exist before T
    await add(sched, "ten", every="10m", catch_up="skip")
    db("UPDATE schedules SET next_fire_at = %s", T)
    p = planner(sched)
    result = await p.run_once(now=T - LOOKAHEAD - timedelta(seconds=1))
    assert window_jobs(db, "ten") == []  # not yet within the lookahead
    assert result.wake_at == T - LOOKAHEAD

    result = await p.run_once(now=AHEAD)
    (job,) = window_jobs(db, "ten")
    assert (job["id"], job["status"]) == ("ten@2030-01-01T12:00:00Z", "pending")
    assert job["execution_time"] == job["fire_time"] == T  # due at its fire time, not now
    assert job["misfire_grace_seconds"] == 60  # skip: on time, so it runs
    row = schedule(db, "ten")
    assert (row["next_fire_at"], row["last_fire_at"]) == (T + timedelta(minutes=10), T)
    assert result.wake_at == T + timedelta(minutes=10) - LOOKAHEAD
    for now in (AHEAD, T - timedelta(seconds=1), T):  # later passes add nothing
        await p.run_once(now=now)
    assert fire_times(db, "ten") == [T]


async def test_only_one_window_is_planned_ahead_and_only_once_the_previous_one_came(
        sched, db):
    await add(sched, "second", every="1s")
    db("UPDATE schedules SET next_fire_at = %s", T)
    p = planner(sched)
    for _ in range(3):  # T+1s .. T+4s are within the lookahead too, but T has not come
        await p.run_once(now=AHEAD)
    assert fire_times(db, "second") == [T]
    result = await p.run_once(now=T)
    assert fire_times(db, "second") == [T, T + timedelta(seconds=1)]
    assert schedule(db, "second")["last_fire_at"] == T + timedelta(seconds=1)
    assert result.wake_at == T + timedelta(seconds=1)  # when that window comes


def replace(schedule_id, **definition):
    async def change(sched):
        d = define_schedule("noop", schedule_id=schedule_id, **definition)
        assert await recurring.add_schedule(sched.store, d, default_tz="UTC",
                                            on_conflict="replace")
    return change


@pytest.mark.parametrize("change, replanned_args", [
    pytest.param(lambda sched: recurring.pause_schedule(sched.store, "s"), None, id="pause"),
    pytest.param(lambda sched: recurring.remove_schedule(sched.store, "s"), None, id="remove"),
    pytest.param(replace("s", every="10m", args=[2]), [2], id="new-args"),
    pytest.param(replace("s", every="10m", args=[1], catch_up="all"), [1], id="new-catch-up"),
    pytest.param(replace("s", every="20m", args=[1]), None, id="new-interval"),
    pytest.param(replace("s", cron="*/10 * * * *", args=[1]), None, id="now-cron"),
])
async def test_a_change_after_planning_ahead_withdraws_the_old_plan(
        sched, db, change, replanned_args):
    await add(sched, "s", every="10m", args=[1])
    before = await plan_ahead(sched, db, "s")
    await change(sched)
    assert db("SELECT id FROM jobs WHERE id = %s", before["id"]) == []
    row = schedule(db, "s")
    if replanned_args is None:
        return
    # Same timing: the window is planned again, under the new definition.
    assert row["next_fire_at"] == T and row["last_job_id"] is None
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "s")
    assert (job["id"], job["args"], job["status"]) == (before["id"], replanned_args, "pending")


async def test_sync_disabling_or_redefining_a_code_schedule_withdraws_its_planned_window(
        sched, db, registry):
    @periodic(every="10m", id="coded", args=[1])
    async def coded(): ...

    await recurring.sync_code_schedules(sched.store, "UTC")
    first = await plan_ahead(sched, db, "coded")

    @periodic(every="10m", id="coded", args=[2])
    async def coded(): ...  # noqa: F811  (the next deploy's definition)

    await recurring.sync_code_schedules(sched.store, "UTC")
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "coded")
    assert (job["id"], job["args"]) == (first["id"], [2])

    registry.clear()  # the decorator is gone: the schedule is disabled
    await recurring.sync_code_schedules(sched.store, "UTC")
    assert window_jobs(db, "coded") == []


async def test_a_change_made_with_sql_withdraws_the_planned_window_too(sched, db):
    await add(sched, "s", every="10m")
    job = await plan_ahead(sched, db, "s")
    db("UPDATE schedules SET updated_at = now() + interval '1 s'")  # no definition change
    assert window_jobs(db, "s") == [job]
    db("UPDATE schedules SET priority = 1")
    assert window_jobs(db, "s") == []


async def test_a_claimed_window_stays_and_one_awaited_by_a_job_is_cancelled_not_deleted(sched, db):
    await add(sched, "a", every="10m")
    await add(sched, "b", every="10m")
    db("UPDATE schedules SET next_fire_at = %s", T)
    await planner(sched).run_once(now=AHEAD)
    (running,), (awaited,) = window_jobs(db, "a"), window_jobs(db, "b")
    db("UPDATE jobs SET status = 'running', worker_id = 'w', started_at = now() "
       "WHERE id = %s", running["id"])
    # depends_on refuses window ids; a dependency written with SQL marks the job so.
    db("UPDATE jobs SET has_dependents = true WHERE id = %s", awaited["id"])
    for schedule_id in ("a", "b"):
        await recurring.pause_schedule(sched.store, schedule_id)
    assert [j["status"] for j in window_jobs(db, "a")] == ["running"]
    (cancelled,) = window_jobs(db, "b")
    assert cancelled["status"] == "cancelled"
    assert "schedule changed" in cancelled["last_error"]


async def test_overlap_off_plans_ahead_only_without_an_active_run(sched, db):
    await add(sched, "solo", every="10m", overlap=False)
    triggered = await recurring.trigger_schedule(sched.store, "solo")  # pending, due now
    db("UPDATE schedules SET next_fire_at = %s", T)
    p = planner(sched)
    result = await p.run_once(now=AHEAD)
    assert window_jobs(db, "solo") == []  # whether it overlaps is decided at T
    # On the database clock T - LOOKAHEAD is still to come: the planner looks again then,
    # when the run may be over (test_overlap_off_looks_again_when_it_could_plan_ahead).
    assert result.wake_at == T - LOOKAHEAD
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", triggered)
    job = await plan_ahead(sched, db, "solo")
    assert job["status"] == "pending"


async def test_overlap_off_looks_again_when_it_could_plan_ahead(sched, db):
    """A pass that finds an overlap=False schedule's run active wakes the planner when the
    next window could first be planned ahead (nothing else does when the run ends), and at
    the window itself once that moment has passed. Seen in the full suite: a window planned
    less than a second ahead was still pending at the pass, the planner slept until the
    next window's fire time, and that window was never planned ahead."""
    await add(sched, "solo", every="10m", overlap=False)
    await recurring.trigger_schedule(sched.store, "solo")  # pending, due now: an active run
    now = await sched.store.db_now()
    for ahead in (30, 3):  # the lookahead begins in 25 s; it has begun
        db("UPDATE schedules SET next_fire_at = %s, last_fire_at = %s",
           now + timedelta(seconds=ahead), now - timedelta(seconds=10))
        wake_at, _ = await sched.store.next_schedule_fire(LOOKAHEAD_SECONDS)
        assert wake_at == now + timedelta(seconds=ahead) - (LOOKAHEAD if ahead > 5 else
                                                            timedelta(0)), ahead


# -- a real worker ----------------------------------------------------------------------


async def run_worker_until(sched, predicate, what, timeout=30):
    # A 30 s poll: only the planner's own timing and the due-time timers can start jobs.
    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        return await wait_until(predicate, timeout=timeout, what=what)
    finally:
        worker.stop()
        await runner


def settled(db, schedule_id):
    return [j for j in window_jobs(db, schedule_id) if j["status"] != "pending"]


async def test_planned_windows_run_once_and_never_before_their_fire_time(sched, db, registry):
    @periodic(every=1, id="each-second", catch_up="all")
    async def each_second(): ...

    await run_worker_until(sched, lambda: len(settled(db, "each-second")) >= 4,
                           "four windows run")
    jobs = window_jobs(db, "each-second")
    times = [j["fire_time"] for j in jobs]
    assert times == [times[0] + timedelta(seconds=i) for i in range(len(times))]
    done = [j for j in jobs if j["status"] == "completed"]
    assert len(done) >= 4
    assert all(j["started_at"] >= j["fire_time"] == j["execution_time"] for j in done)
    ahead = [j for j in jobs if j["created_at"] < j["fire_time"]]
    assert len(ahead) >= 2, "no window was planned ahead"


@pytest.mark.parametrize("lookahead", [LOOKAHEAD_SECONDS, 1.5])
async def test_overlap_off_is_not_blocked_by_its_own_planned_window(
        sched, db, registry, monkeypatch, lookahead):
    # Each run takes 0.3 s of its 2 s. 5 s: the next window is within the lookahead as
    # soon as the last one comes, while its run is active: the next window must wait for
    # its fire time (the run has ended by then), not be skipped ahead of it. 1.5 s: the
    # last run has ended when the next window comes within the lookahead.
    monkeypatch.setattr(planner_module, "LOOKAHEAD_SECONDS", lookahead)

    @periodic(every=2, id="solo", overlap=False)
    async def solo():
        await asyncio.sleep(0.3)

    await run_worker_until(sched, lambda: len(settled(db, "solo")) >= 4, "four windows decided")
    statuses = [(j["status"], j["last_error"]) for j in settled(db, "solo")]
    assert all(status == "completed" for status, _ in statuses), statuses
    if lookahead < 2:
        assert any(j["created_at"] < j["fire_time"] for j in window_jobs(db, "solo"))


async def test_pausing_a_running_worker_s_planned_window_never_runs_it(sched, db, registry):
    @periodic(every=3, id="slow")
    async def slow(): ...

    def planned():
        return db("SELECT id, fire_time FROM jobs WHERE schedule_id = 'slow' AND "
                  "status = 'pending' AND fire_time > now() + interval '1 second'")

    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        (job,) = await wait_until(planned, timeout=20, what="a window planned ahead")
        await recurring.pause_schedule(sched.store, "slow")
        paused_at = await sched.store.db_now()
        await wait_until(lambda: db("SELECT now() > %s + interval '1 second' AS past",
                                    job["fire_time"])[0]["past"],
                         timeout=10, what="the withdrawn window's fire time")
    finally:
        worker.stop()
        await runner
    assert [j for j in window_jobs(db, "slow") if j["fire_time"] > paused_at] == []


async def test_a_window_planned_ahead_never_counts_as_a_run_before_it(sched, db):
    # next_fire_at moved back with SQL (no definition change, so nothing is withdrawn):
    # the earlier window is decided while the later one is planned; only runs of earlier
    # windows (and triggered runs) can overlap it.
    await add(sched, "solo", every="10m", overlap=False)
    later = await plan_ahead(sched, db, "solo")
    db("UPDATE schedules SET next_fire_at = %s", T - timedelta(minutes=10))
    await planner(sched).run_once(now=T - timedelta(minutes=10))
    earlier, planned = window_jobs(db, "solo")
    assert (earlier["status"], earlier["last_error"]) == ("pending", None)
    assert planned["id"] == later["id"] and planned["status"] == "pending"


async def test_schedules_listing_shows_a_planned_window_as_the_next_not_the_last(sched, db):
    await add(sched, "s", every="10m")
    db("UPDATE schedules SET next_fire_at = %s", T - timedelta(minutes=10))
    await planner(sched).run_once(now=T - timedelta(minutes=10))  # the previous window
    (previous,) = window_jobs(db, "s")
    await planner(sched).run_once(now=AHEAD)
    assert fire_times(db, "s") == [T - timedelta(minutes=10), T]
    (listed,) = await sched.store.list_schedules("s")
    assert listed["next_fire_at"] == T
    assert (listed["last_job_id"], listed["last_fire_at"], listed["last_run_at"],
            listed["last_status"]) == (previous["id"], previous["fire_time"],
                                       previous["execution_time"], "pending")
    assert schedule(db, "s")["next_fire_at"] == T + timedelta(minutes=10)  # as stored


async def test_a_triggered_run_sends_an_overlap_off_planned_window_back_to_its_fire_time(
        sched, db):
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    triggered = await recurring.trigger_schedule(sched.store, "solo")
    assert window_jobs(db, "solo") == []  # decided before the triggered run existed
    assert schedule(db, "solo")["next_fire_at"] == T
    p = planner(sched)
    await p.run_once(now=AHEAD)
    assert window_jobs(db, "solo") == []  # not planned ahead again
    await p.run_once(now=T)  # the triggered run is still pending at the fire time
    (window,) = window_jobs(db, "solo")
    assert window["id"] == planned["id"] and window["status"] == "cancelled"
    assert triggered in window["last_error"]
