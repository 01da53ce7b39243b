"""Adversarial review of awaited windows (migration 0021, advance_schedules' `revived` step,
withdrawn_overlap_window).

A window planned ahead that a job waits for is rewritten in place or cancelled when its
schedule changes, and taken over by the planner if the window comes again. The attacks:
the take-over may take only the job the withdrawal cancelled, never one an operator
retried or cancelled, and what it keeps of that job's earlier life must not change how the
window runs; a withdrawal must treat as a plan only a job no worker claimed and no operator
retried, and must see a wait that marks the job while the change waits for it; planners
racing for one take-over make one job. Planner passes are given a `now` in 2030
(test_plan_ahead's T) unless the real clock is the point.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from conftest import wait_until
from test_plan_ahead import AHEAD, T, plan_ahead
from test_plan_ahead_review import await_window, held, waiting
from test_recurring import add, planner, window_jobs

from pgsched import Scheduler, ops, recurring
from pgsched.scheduler import WaitTimedOut


async def withdrawn_and_back(sched, db, schedule_id):
    """Pause the schedule (its awaited window is cancelled) and resume it (the window
    comes again at T)."""
    await recurring.pause_schedule(sched.store, schedule_id)
    await recurring.resume_schedule(sched.store, schedule_id)
    db("UPDATE schedules SET next_fire_at = %s WHERE id = %s", T, schedule_id)


async def test_a_window_an_operator_retried_and_then_cancelled_is_not_taken_over(sched, db):
    # The withdrawn job is retried, then cancelled by the operator before a worker takes
    # it: it is the operator's cancel now, which must hold when the window comes again.
    await add(sched, "s", every="10m")
    planned = await plan_ahead(sched, db, "s")
    await_window(db, planned["id"])
    await recurring.pause_schedule(sched.store, "s")
    assert await ops.retry_jobs(sched.store, [planned["id"]]) == [planned["id"]]
    assert await sched.store.request_cancel(ids=[planned["id"]]) == {
        planned["id"]: "cancelled"}  # what `pgsched cancel` does
    await recurring.resume_schedule(sched.store, "s")
    db("UPDATE schedules SET next_fire_at = %s", T)
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "s")
    assert job["status"] == "cancelled"


async def test_a_taken_over_window_nobody_awaits_is_withdrawn_for_a_triggered_run(sched, db):
    # Its dependent was cancelled with it and its wait ended: once taken over, the window
    # is awaited by nobody, and a triggered run (overlap=False) must send it back to be
    # decided at T like any other, not leave it planned beside the run.
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    await_window(db, planned["id"])
    await withdrawn_and_back(sched, db, "solo")
    await planner(sched).run_once(now=AHEAD)
    assert [j["status"] for j in window_jobs(db, "solo")] == ["pending"]
    await recurring.trigger_schedule(sched.store, "solo")
    await planner(sched).run_once(now=T)
    active = db("SELECT id FROM jobs WHERE schedule_id = 'solo' "
                "AND status IN ('pending', 'running')")
    assert len(active) == 1, active


async def test_a_dependent_retried_after_the_take_over_is_released_by_the_window(sched, db):
    # The dependent was cancelled with the withdrawal; `pgsched retry` puts it back to wait
    # for the window, which now runs: the window's end must release it, not leave it
    # waiting for ever.
    await add(sched, "s", every="10m")
    planned = await plan_ahead(sched, db, "s")
    after = await_window(db, planned["id"])
    await withdrawn_and_back(sched, db, "s")
    await planner(sched).run_once(now=AHEAD)
    assert await ops.retry_jobs(sched.store, [after]) == [after]
    assert waiting(db, after) == ("pending", True)
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", planned["id"])
    assert waiting(db, after) == ("pending", False)


async def test_a_window_whose_wait_timed_out_is_withdrawn_for_a_triggered_run(sched, db):
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    with pytest.raises(WaitTimedOut):
        await sched.wait(planned["id"], timeout=0.5)
    await recurring.trigger_schedule(sched.store, "solo")
    await planner(sched).run_once(now=T)
    active = db("SELECT id FROM jobs WHERE schedule_id = 'solo' "
                "AND status IN ('pending', 'running')")
    assert len(active) == 1, active


async def test_a_change_in_a_transaction_begun_before_the_fire_time_leaves_a_run_window(
        sched, db, pg_dsn, schema):
    # The trigger judges "still to come" by now(), the change's transaction start. A
    # transaction begun before the fire time that changes the schedule after a worker ran
    # the window (and it failed, waiting for its retry) must leave that job alone: taken
    # for a planned window, it was deleted and planned again, and the window ran twice.
    await add(sched, "s", every="10m", args=[1], max_retries=3)
    fire = await sched.store.db_now() + timedelta(seconds=2)
    db("UPDATE schedules SET anchor = %s, next_fire_at = %s", fire, fire)
    await planner(sched).run_once(now=fire - timedelta(seconds=1))
    (planned,) = window_jobs(db, "s")
    async with await held(pg_dsn, schema) as changer, changer.transaction():
        await changer.execute("SELECT now()")
        await wait_until(lambda: db("SELECT 1 WHERE now() > %s", fire), timeout=10,
                         what="the fire time passed")
        # what claim_jobs and then fail_job (a retry) write for the window
        db("UPDATE jobs SET attempts = 1, failures = 1, last_error = 'boom', "
           "execution_time = now() + interval '1 minute', errors = jsonb_build_array("
           "jsonb_build_object('attempt', 1, 'error', 'boom')) WHERE id = %s",
           planned["id"])
        await changer.execute("UPDATE schedules SET args = '[2]' WHERE id = 's'")
    await planner(sched).run_once()
    (job,) = window_jobs(db, "s")
    assert (job["id"], job["attempts"], job["args"]) == (planned["id"], 1, [1])


@pytest.mark.parametrize("change, status, args", [
    ("UPDATE schedules SET paused = true", "cancelled", [1]),  # the window goes
    ("UPDATE schedules SET args = '[2]'", "pending", [2]),  # rewritten in place
])
async def test_a_wait_marking_the_window_while_its_schedule_changes_does_not_keep_the_old_plan(
        sched, db, pg_dsn, schema, change, status, args):
    # A wait marks the planned window (mark_awaited) while the change withdraws it: the
    # withdrawal waits for the mark, and must then treat the job as awaited (cancel or
    # rewrite it), not leave the old plan pending under a paused or changed schedule.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    async with await held(pg_dsn, schema) as waiter, await held(pg_dsn, schema) as changer:
        async with waiter.transaction():
            await waiter.execute("UPDATE jobs SET awaited = true WHERE id = %s",
                                 (planned["id"],))  # what mark_awaited writes
            withdrawal = asyncio.create_task(changer.execute(change))
            await asyncio.sleep(0.3)
            assert not withdrawal.done()
        await withdrawal
    (job,) = window_jobs(db, "s")
    assert (job["status"], job["args"]) == (status, args)


async def test_planners_racing_for_a_window_to_take_over_make_one_job(sched, db, pg_dsn,
                                                                        schema):
    # Three planners find the window due while its cancelled job is held (a retry or a
    # vacuum reading it): one takes it over once the row is free, the others plan nothing.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    await_window(db, planned["id"])
    await withdrawn_and_back(sched, db, "s")
    db("UPDATE schedules SET args = '[2]'")
    # The planners through a client with the default lock_timeout: the fixture's (0.5 s,
    # a worker's) could pass while the test sleeps and commits on a loaded machine.
    async with await held(pg_dsn, schema) as holder, \
            Scheduler(pg_dsn, schema=schema) as patient:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE",
                                 (planned["id"],))
            passes = [asyncio.create_task(planner(patient).run_once(now=AHEAD))
                      for _ in range(3)]
            await asyncio.sleep(0.3)
        await asyncio.gather(*passes)
    await asyncio.gather(*[planner(sched).run_once(now=AHEAD) for _ in range(3)])
    assert [(j["id"], j["status"], j["args"]) for j in window_jobs(db, "s")] == [
        (planned["id"], "pending", [2])]


async def test_a_withdrawn_window_an_operator_retried_is_not_withdrawn_again(sched, db):
    # `pgsched retry` of the withdrawn job makes it the operator's run, due now: a
    # triggered run of the overlap=False schedule must not delete it as a planned window
    # (the paused schedule plans nothing again: the retry would be lost).
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    await_window(db, planned["id"])
    await recurring.pause_schedule(sched.store, "solo")
    assert await ops.retry_jobs(sched.store, [planned["id"]]) == [planned["id"]]
    await recurring.trigger_schedule(sched.store, "solo")
    assert [j["status"] for j in window_jobs(db, "solo")] == ["pending"]
