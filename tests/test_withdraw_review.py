"""Adversarial review of withdrawn_overlap_window's cancel (commit 4ecc81e): a run
triggered (or retried) on an overlap=False schedule cancels the awaited window planned
ahead, and the planner takes that job over at its fire time (`revived`).

The attacks: a wait marking the window while the trigger withdraws it, a schedule change
racing with the withdrawal (lock order), what `pgsched schedules` shows meanwhile, an
operator's cancel or retry of the withdrawn job before its fire time, the take-over while
the triggered run is still active, two triggers at once. Planner passes are given a `now`
in 2030 (test_plan_ahead's T) unless the real clock is the point.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from conftest import wait_until
from test_plan_ahead import AHEAD, T, plan_ahead
from test_plan_ahead_review import held
from test_recurring import add, planner, schedule, window_jobs

from pgsched import Scheduler, ops, recurring
from pgsched.errors import JobNotFound
from pgsched.recurring import define_schedule

WITHDRAWN = "cancelled: withdrawn for a run that came first (overlap is off)"


def active(db, schedule_id):
    return [r["id"] for r in db(
        "SELECT id FROM jobs WHERE schedule_id = %s AND status IN ('pending', 'running') "
        "ORDER BY id", schedule_id)]


async def withdrawn_awaited(sched, db, schedule_id):
    """Plan the window at T ahead, let a wait mark it and time out, trigger a run: the
    window's job is cancelled by the withdrawal. (window job, triggered run id)"""
    planned = await plan_ahead(sched, db, schedule_id)
    db("UPDATE jobs SET awaited = true WHERE id = %s", planned["id"])  # mark_awaited's write
    run = await recurring.trigger_schedule(sched.store, schedule_id)
    (job,) = window_jobs(db, schedule_id)
    assert (job["status"], job["last_error"]) == ("cancelled", WITHDRAWN)
    return planned, run


async def test_a_wait_marking_the_window_while_a_run_is_triggered_does_not_keep_it_beside_the_run(
        sched, db, pg_dsn, schema):
    # mark_awaited holds the window's row while trigger_schedule runs: the trigger's
    # snapshot saw the job unmarked, its DELETE waits for the mark and then finds it
    # awaited, and its UPDATE (filtered on the snapshot's awaited) passes over it: the
    # window stayed planned, next_fire_at after it, and ran at T beside the triggered run.
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    # The trigger through a client with the default lock_timeout: the fixture's (0.5 s, a
    # worker's) could pass while the test sleeps and commits on a loaded machine.
    async with await held(pg_dsn, schema) as waiter, \
            Scheduler(pg_dsn, schema=schema) as patient:
        async with waiter.transaction():
            await waiter.execute("UPDATE jobs SET awaited = true WHERE id = %s",
                                 (planned["id"],))  # what mark_awaited writes
            trigger = asyncio.create_task(recurring.trigger_schedule(patient.store, "solo"))
            await asyncio.sleep(0.3)
            assert not trigger.done()
        run = await trigger
    (job,) = window_jobs(db, "solo")
    assert (job["status"], job["last_error"]) == ("cancelled", WITHDRAWN)
    assert schedule(db, "solo")["next_fire_at"] == T
    await planner(sched).run_once(now=T)
    assert active(db, "solo") == [run], active(db, "solo")


async def trigger_run(store, db):
    return await recurring.trigger_schedule(store, "solo")


async def retry_run(store, db):
    (earlier,) = db("SELECT id FROM jobs WHERE id = 'solo@earlier'")
    assert await ops.retry_jobs(store, [earlier["id"]]) == [earlier["id"]]


@pytest.mark.parametrize("make_run", [trigger_run, retry_run])
async def test_a_schedule_change_racing_with_a_new_run_does_not_deadlock(
        sched, db, pg_dsn, schema, make_run):
    # The run's statement locked the window's job (its DELETE or UPDATE) and then the
    # schedule's row (next_fire_at back); a schedule change (pause_schedule locks the row
    # FOR UPDATE and then updates it) locks the row and then, in 0021's trigger, the
    # window's job. Here the change's transaction holds the row first, as
    # pause_schedule's statement does between its two steps. The pool's default
    # lock_timeout (5 s) outlasts PostgreSQL's deadlock_timeout (1 s).
    await add(sched, "solo", every="10m", overlap=False, args=[1])
    db("INSERT INTO jobs (id, task, execution_time, schedule_id, status, finished_at) "
       "VALUES ('solo@earlier', 'noop', now(), 'solo', 'failed', now())")
    planned = await plan_ahead(sched, db, "solo")
    db("UPDATE jobs SET awaited = true WHERE id = %s", planned["id"])
    async with await held(pg_dsn, schema) as changer, \
            Scheduler(pg_dsn, schema=schema) as patient:
        async with changer.transaction():
            await changer.execute(
                "SELECT 1 FROM schedules WHERE id = 'solo' FOR NO KEY UPDATE")
            run = asyncio.create_task(make_run(patient.store, db))
            await wait_until(lambda: db(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND backend_type = 'client backend' AND pid <> %s",
                changer.info.backend_pid),
                timeout=10, what="the run's statement waits for the schedule's row")
            await changer.execute("UPDATE schedules SET paused = true WHERE id = 'solo'")
        await run
    (job,) = window_jobs(db, "solo")
    assert job["status"] == "cancelled"


async def test_schedules_shows_a_window_withdrawn_as_cancelled_as_still_to_come(sched, db):
    # Withdrawn by deleting its job, the window is shown as the next one (list_schedules:
    # `ahead`), not as the last run; cancelled instead, it must be shown the same way.
    await add(sched, "solo", every="10m", overlap=False)
    await plan_ahead(sched, db, "solo")
    run = await recurring.trigger_schedule(sched.store, "solo")
    (deleted,) = await sched.store.list_schedules("solo")
    await add(sched, "watched", every="10m", overlap=False)
    _, watched_run = await withdrawn_awaited(sched, db, "watched")
    (cancelled,) = await sched.store.list_schedules("watched")
    shown = ("next_fire_at", "last_fire_at", "last_status")
    assert [deleted[k] for k in shown] == [T, None, "pending"]
    assert deleted["last_job_id"] == run
    assert [cancelled[k] for k in shown] == [T, None, "pending"]
    assert cancelled["last_job_id"] == watched_run


async def test_an_operator_cancel_of_the_withdrawn_window_holds_at_its_fire_time(sched, db):
    # `pgsched cancel` of the window's job once the withdrawal cancelled it: the operator
    # does not want that window; the take-over at T must not run it anyway.
    await add(sched, "solo", every="10m", overlap=False)
    planned, run = await withdrawn_awaited(sched, db, "solo")
    answer = await sched.store.request_cancel(ids=[planned["id"]])
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", run)
    await planner(sched).run_once(now=T)
    (job,) = window_jobs(db, "solo")
    assert (answer, job["status"]) == ({planned["id"]: "cancelled"}, "cancelled")


async def test_an_operator_cancel_of_a_window_a_pause_withdrew_holds_when_it_comes_back(
        sched, db):
    # The same for a window a schedule change withdrew (0021's trigger cancels a watched
    # one): cancelled by id while paused, it stays cancelled once the schedule is resumed
    # and the window comes, with the operator's error, and the window makes no other job.
    await add(sched, "s", every="10m")
    planned = await plan_ahead(sched, db, "s")
    db("UPDATE jobs SET awaited = true WHERE id = %s", planned["id"])
    await recurring.pause_schedule(sched.store, "s")
    assert await sched.cancel_job(planned["id"])  # the Python API's cancel, as `pgsched cancel`
    await recurring.resume_schedule(sched.store, "s")
    db("UPDATE schedules SET next_fire_at = %s WHERE id = 's'", T)
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "s")
    assert (job["status"], job["last_error"]) == (
        "cancelled", "cancelled: by an operator after its window was withdrawn")


async def test_an_operator_retry_of_the_withdrawn_window_makes_one_job_for_it(sched, db):
    # `pgsched retry` of the withdrawn job before T: it is the operator's run, due now;
    # at T the planner neither takes it over nor plans a second job for the window.
    await add(sched, "solo", every="10m", overlap=False)
    planned, run = await withdrawn_awaited(sched, db, "solo")
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", run)
    assert await ops.retry_jobs(sched.store, [planned["id"]]) == [planned["id"]]
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s",
       planned["id"])
    await planner(sched).run_once(now=T)
    (job,) = window_jobs(db, "solo")
    assert (job["id"], job["status"]) == (planned["id"], "completed")
    assert schedule(db, "solo")["next_fire_at"] > T


async def test_the_take_over_while_the_triggered_run_is_active_skips_the_window(sched, db):
    # At T the triggered run still runs: the window's job is taken over as skipped (one
    # entry in its history), and `pgsched schedules` shows it as the last window.
    await add(sched, "solo", every="10m", overlap=False)
    planned, run = await withdrawn_awaited(sched, db, "solo")
    await planner(sched).run_once(now=T)
    (job,) = window_jobs(db, "solo")
    assert (job["id"], job["status"], job["awaited"]) == (planned["id"], "cancelled", False)
    assert job["last_error"] == f"skipped: {run} was still pending or running (overlap is off)"
    assert [e["outcome"] for e in job["errors"]] == ["skipped"]
    assert active(db, "solo") == [run]
    row = schedule(db, "solo")
    assert (row["last_fire_at"], row["last_job_id"]) == (T, planned["id"])
    (listed,) = await sched.store.list_schedules("solo")
    assert (listed["next_fire_at"], listed["last_fire_at"], listed["last_job_id"],
            listed["last_status"]) == (T + timedelta(minutes=10), T, planned["id"], "skipped")
    # a wait on it now returns the skip
    assert (await sched.wait(planned["id"], timeout=5))["last_error"] == job["last_error"]


async def test_two_triggers_at_once_withdraw_the_window_once(sched, db):
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    db("UPDATE jobs SET awaited = true WHERE id = %s", planned["id"])
    runs = await asyncio.gather(*[recurring.trigger_schedule(sched.store, "solo")
                                  for _ in range(4)])
    (job,) = window_jobs(db, "solo")
    assert (job["status"], job["last_error"]) == ("cancelled", WITHDRAWN)
    assert schedule(db, "solo")["next_fire_at"] == T
    for r in runs:
        db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", r)
    await planner(sched).run_once(now=T)
    assert active(db, "solo") == [planned["id"]]


async def test_a_retried_run_withdraws_an_awaited_window_as_a_trigger_does(sched, db):
    await add(sched, "solo", every="10m", overlap=False)
    earlier = await recurring.trigger_schedule(sched.store, "solo")
    db("UPDATE jobs SET status = 'failed', finished_at = now() WHERE id = %s", earlier)
    planned = await plan_ahead(sched, db, "solo")
    waiter = asyncio.create_task(sched.wait(planned["id"], timeout=30))
    await wait_until(lambda: db("SELECT 1 FROM jobs WHERE id = %s AND awaited", planned["id"]),
                     timeout=10, what="the waiter marked the job")
    assert await ops.retry_jobs(sched.store, [earlier]) == [earlier]
    row = await waiter
    assert (row["status"], row["last_error"]) == ("cancelled", WITHDRAWN)
    assert schedule(db, "solo")["next_fire_at"] == T
    await planner(sched).run_once(now=T)
    assert active(db, "solo") == [earlier]
    (job,) = window_jobs(db, "solo")
    assert job["status"] == "cancelled" and job["last_error"].startswith("skipped: ")



async def test_a_change_after_the_withdrawal_is_what_the_take_over_runs(sched, db):
    # The window's job is cancelled, not pending: 0021 does not rewrite it. At T the
    # planner takes it over with the schedule's definition as it is then.
    await add(sched, "solo", every="10m", overlap=False, args=[1])
    planned, run = await withdrawn_awaited(sched, db, "solo")
    d = define_schedule("noop", schedule_id="solo", every="10m", overlap=False, args=[2],
                        priority=7)
    assert await recurring.add_schedule(sched.store, d, default_tz="UTC",
                                        on_conflict="replace")
    assert schedule(db, "solo")["next_fire_at"] == T
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", run)
    await planner(sched).run_once(now=T)
    (job,) = window_jobs(db, "solo")
    assert (job["id"], job["status"], job["args"], job["priority"]) == (
        planned["id"], "pending", [2], 7)



async def test_a_wait_begun_while_a_trigger_deletes_the_window_finds_no_job(
        sched, db, pg_dsn, schema):
    # A decision (docs/recurring.md): withdrawn_overlap_window deletes a window's job that
    # no wait has marked, as 0021 does, so a wait that begins while the trigger's
    # transaction holds it (mark_awaited waits for the row, then finds none) raises
    # JobNotFound: there is no such job then. The planner makes it again under the same
    # id at its fire time, and a wait begun then waits for it. (Cancelling every withdrawn
    # window instead would keep the id, at the cost of a cancelled job in the history for
    # every trigger of an overlap=False schedule.)
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    async with await held(pg_dsn, schema) as triggering, \
            Scheduler(pg_dsn, schema=schema) as patient:  # the default lock_timeout
        async with triggering.transaction():
            # trigger_schedule's statement, in a transaction that commits a moment later
            await triggering.execute(sched.store._q["trigger_schedule"], {
                "id": "solo", "job_id": "solo@trigger-held", "channel": sched.store.channel})
            waiter = asyncio.create_task(patient.wait(planned["id"], timeout=30))
            await wait_until(lambda: db(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%%SET awaited = true%%'"),
                timeout=10, what="the wait waits for the window's row")
        with pytest.raises(JobNotFound):
            await waiter
        db("UPDATE jobs SET status = 'completed', finished_at = now() "
           "WHERE id = 'solo@trigger-held'")
        await planner(sched).run_once(now=T)
        assert [(j["id"], j["status"]) for j in window_jobs(db, "solo")] == [
            (planned["id"], "pending")]


async def test_a_claim_of_the_window_while_a_run_is_triggered_keeps_the_claimed_run(
        sched, db, pg_dsn, schema):
    # A worker claims the window (made due early with SQL) while the trigger withdraws
    # it: the trigger waits for the claim and leaves the running job alone (it is a run
    # now, not a plan), so next_fire_at stays after it and T is not planned again.
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    db("UPDATE jobs SET awaited = true, execution_time = now() WHERE id = %s", planned["id"])
    async with await held(pg_dsn, schema) as claimer, \
            Scheduler(pg_dsn, schema=schema) as patient:  # the default lock_timeout
        async with claimer.transaction():
            await claimer.execute(  # what claim_jobs writes for the row it locked
                "UPDATE jobs SET status = 'running', worker_id = 'w', attempts = 1, "
                "started_at = now(), lease_until = now() + interval '1 minute' "
                "WHERE id = %s AND status = 'pending'", (planned["id"],))
            trigger = asyncio.create_task(recurring.trigger_schedule(patient.store, "solo"))
            await asyncio.sleep(0.3)
        run = await trigger
    (job,) = window_jobs(db, "solo")
    assert (job["status"], job["attempts"], job["last_error"]) == ("running", 1, None)
    assert schedule(db, "solo")["next_fire_at"] > T
    await planner(sched).run_once(now=T)
    assert active(db, "solo") == sorted([run, planned["id"]])


async def test_a_window_whose_dependent_ended_is_withdrawn_and_taken_over(sched, db):
    # has_dependents stays once set; a dependent added with SQL that has ended waits for
    # nothing: the watched window is cancelled for the triggered run like any other (its
    # end settles nobody) and taken over at T, where it runs, the run having ended.
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    db("INSERT INTO jobs (id, task, execution_time, status, finished_at) "
       "VALUES ('after', 'noop', now(), 'completed', now())")
    db("INSERT INTO job_dependencies (job_id, dependency_id) VALUES ('after', %s)",
       planned["id"])
    db("UPDATE jobs SET has_dependents = true, awaited = true WHERE id = %s", planned["id"])
    run = await recurring.trigger_schedule(sched.store, "solo")
    (job,) = window_jobs(db, "solo")
    assert (job["status"], job["last_error"]) == ("cancelled", WITHDRAWN)
    assert db("SELECT status FROM jobs WHERE id = 'after'")[0]["status"] == "completed"
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", run)
    await planner(sched).run_once(now=T)
    assert active(db, "solo") == [planned["id"]]
