"""Adversarial review of planning windows ahead (planner LOOKAHEAD_SECONDS, migration 0016).

Each test is an attack on a promise of docs/recurring.md: a window yields one job, a
changed, paused or removed schedule never runs its old plan, overlap=False never runs two
at once, `pgsched schedules` is truthful, a database upgraded to 0016 keeps its windows,
an awaited window (a job depends on it, a wait watches it: migration 0021) is neither lost
nor run twice when its schedule changes, nor when a worker claims it at the same moment.
Planner passes are given a `now` in 2030 (test_plan_ahead's T), so every window they plan
is still to come for the withdrawal trigger, which reads the real clock.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest
from conftest import fast_options, wait_until
from test_plan_ahead import AHEAD, T, plan_ahead
from test_recurring import add, fire_times, planner, schedule, utc, window_jobs

from pgsched import Scheduler, Worker, ops, periodic, recurring, scheduler, tasks
from pgsched.recurring import define_schedule
from pgsched.worker.planner import SKIP_TOLERANCE


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(recurring, "_SCHEDULES", {})
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    return recurring._SCHEDULES


def active(db, schedule_id):
    return db("SELECT id FROM jobs WHERE schedule_id = %s AND status IN ('pending', 'running') "
              "ORDER BY id", schedule_id)


# -- overlap = false ---------------------------------------------------------------------


async def test_overlap_off_a_run_retried_after_planning_ahead_does_not_run_beside_the_window(
        sched, db):
    # The window at T is planned while no run is active; then an operator retries the
    # schedule's failed earlier run. Without planning ahead the planner would have seen
    # that run at T and skipped the window; now both are pending at T.
    await add(sched, "solo", every="10m", overlap=False)
    earlier = await recurring.trigger_schedule(sched.store, "solo")
    db("UPDATE jobs SET status = 'failed', finished_at = now() WHERE id = %s", earlier)
    await plan_ahead(sched, db, "solo")
    assert await ops.retry_jobs(sched.store, [earlier]) == [earlier]
    (listed,) = await sched.store.list_schedules("solo")
    assert (listed["next_fire_at"], listed["last_job_id"]) == (T, None)  # none has come
    await planner(sched).run_once(now=T)
    assert len(active(db, "solo")) == 1, active(db, "solo")


# -- DST: planned ahead, as at the fire time -------------------------------------------


@pytest.mark.parametrize("expr, tz, start, expected", [
    ("30 1 * * *", "America/New_York", utc(2026, 10, 31, 4),  # 01:30 twice: runs once
     [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]),
    ("*/30 * * * *", "America/New_York", utc(2026, 11, 1, 4, 50),  # elapsed time
     [utc(2026, 11, 1, 5, 0) + timedelta(minutes=30 * i) for i in range(5)]),
    ("30 2 * * *", "America/New_York", utc(2026, 3, 7, 0),  # 02:30 missing: at 03:00
     [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]),
    ("0 2 * * *", "Australia/Lord_Howe", utc(2026, 10, 2, 12),
     [utc(2026, 10, 2, 15, 30), utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 0)]),
])
async def test_cron_across_dst_planned_ahead_fires_as_the_policy_says(sched, db, expr, tz,
                                                                      start, expected):
    # The planner wakes only 3 s before each window: every window is planned ahead.
    await add(sched, "dst", cron=expr, tz=tz, catch_up="all")
    db("UPDATE schedules SET next_fire_at = %s", start)
    p = planner(sched)
    await p.run_once(now=start)
    for i, window in enumerate(expected):
        await p.run_once(now=window - timedelta(seconds=3))
        assert fire_times(db, "dst") == expected[:i + 1]
    assert all(j["execution_time"] == j["fire_time"] for j in window_jobs(db, "dst"))


async def test_a_window_planned_by_sql_withdrawn_with_a_job_awaiting_it_is_not_lost(
        sched, db):
    # A job waits for the planned window (depends_on refuses window ids: SQL only). A new
    # args value under the same timing cancels the window instead of deleting it; the
    # window must still run once, with the new args, not be lost behind its own key.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    db("UPDATE jobs SET has_dependents = true WHERE id = %s", planned["id"])
    db("UPDATE schedules SET args = '[2]' WHERE id = 's'")
    await planner(sched).run_once(now=AHEAD)
    runs = [j for j in window_jobs(db, "s") if j["status"] == "pending"]
    assert [j["args"] for j in runs] == [[2]]


def await_window(db, window_id, dependent="after"):
    """What a job scheduled with depends_on=[window_id] writes (depends_on refuses window
    ids: SQL only); returns the dependent's id."""
    db("INSERT INTO jobs (id, task, execution_time, due_after_dependencies) "
       "VALUES (%s, 'noop', '9999-12-31Z', now())", dependent)
    db("INSERT INTO job_dependencies (job_id, dependency_id) VALUES (%s, %s)",
       dependent, window_id)
    db("UPDATE jobs SET has_dependents = true WHERE id = %s", window_id)
    return dependent


def waiting(db, job_id):
    (job,) = db("SELECT status, due_after_dependencies IS NOT NULL AS waits, last_error "
                "FROM jobs WHERE id = %s", job_id)
    return job["status"], job["waits"]


async def test_an_awaited_window_under_an_unchanged_timing_is_rewritten_in_place(sched, db):
    # Its dependent waits on the same id; the window runs once, with all of the new
    # definition (the grace of a `skip` window too), and is not planned a second time.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    after = await_window(db, planned["id"])
    await replace(every="10m", args=[2], queue="other", priority=7, catch_up="skip")(sched)
    (job,) = window_jobs(db, "s")
    assert (job["id"], job["status"], job["execution_time"]) == (planned["id"], "pending", T)
    assert (job["args"], job["queue"], job["priority"]) == ([2], "other", 7)
    assert job["misfire_grace_seconds"] == SKIP_TOLERANCE.total_seconds()
    assert schedule(db, "s")["next_fire_at"] == T + timedelta(minutes=10)
    await planner(sched).run_once(now=AHEAD)
    assert [j["id"] for j in window_jobs(db, "s")] == [planned["id"]]
    assert waiting(db, after) == ("pending", True)
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", planned["id"])
    assert waiting(db, after) == ("pending", False)  # released


async def test_an_awaited_window_that_a_new_timing_drops_is_cancelled_with_its_dependent(
        sched, db):
    # 12:00 is no window of `7 * * * *`: the window is gone, and its dependent must not
    # wait for ever.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    after = await_window(db, planned["id"])
    await replace(cron="7 * * * *", tz="UTC", args=[2])(sched)
    db("UPDATE schedules SET next_fire_at = %s", T + timedelta(minutes=7))
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "s")
    assert (job["id"], job["status"]) == (planned["id"], "cancelled")
    assert waiting(db, after) == ("cancelled", False)


async def new_timing_with_the_window(sched, db):
    await replace(every="5m", args=[2])(sched)


async def paused_and_resumed(sched, db):
    await recurring.pause_schedule(sched.store, "s")
    db("UPDATE schedules SET args = '[2]'")
    await recurring.resume_schedule(sched.store, "s")


async def removed_and_added_again(sched, db):
    await recurring.remove_schedule(sched.store, "s")
    await add(sched, "s", every="10m", args=[2])


@pytest.mark.parametrize("change", [new_timing_with_the_window, paused_and_resumed,
                                    removed_and_added_again])
async def test_an_awaited_window_withdrawn_and_then_due_again_runs_once(sched, db, change):
    # The window was taken away (its job cancelled, which settles the dependent) and then
    # comes back: its job is the cancelled one's id and key, and it must run, once.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    after = await_window(db, planned["id"])
    await change(sched, db)
    assert waiting(db, after) == ("cancelled", False)
    db("UPDATE schedules SET next_fire_at = %s", T)  # the window comes again
    await planner(sched).run_once(now=AHEAD)
    await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "s")
    assert (job["id"], job["status"], job["args"], job["last_error"]) == (
        planned["id"], "pending", [2], None)


@pytest.mark.parametrize("change, ended", [
    ("UPDATE schedules SET args = '[2]'", False),  # rewritten in place: the wait goes on
    ("UPDATE schedules SET paused = true", True),  # the window goes: the wait ends
])
async def test_a_wait_on_a_planned_window_follows_its_schedule_change(sched, db, change,
                                                                       ended, monkeypatch):
    # Deleted, the job would vanish under its waiter (JobNotFound at the next poll), though
    # the window runs later under the same id.
    monkeypatch.setattr(scheduler, "WAIT_POLL_SECONDS", 0.2)
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    waiter = asyncio.create_task(sched.wait(planned["id"], timeout=30))
    await wait_until(lambda: db("SELECT 1 FROM jobs WHERE id = %s AND awaited", planned["id"]),
                     timeout=10, what="the waiter marked the job")
    db(change)
    if ended:
        assert (await waiter)["status"] == "cancelled"
        return
    await asyncio.sleep(1)  # polls see the job still there
    assert not waiter.done()
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s",
       planned["id"])
    row = await waiter
    assert (row["status"], row["args"]) == ("completed", [2])


async def test_a_triggered_run_cancels_a_watched_planned_window_of_overlap_off_until_its_time(
        sched, db):
    # A triggered run sends an overlap=False window back to its fire time by deleting its
    # job. A watched one is cancelled instead (deleted, its wait would fail), and its wait
    # returns it; at its fire time the planner takes the job over and decides the window
    # then: it runs, the triggered run having ended. (Left planned, as before, a wait long
    # over kept it beside the run: nothing clears `awaited`.)
    await add(sched, "solo", every="10m", overlap=False)
    planned = await plan_ahead(sched, db, "solo")
    waiter = asyncio.create_task(sched.wait(planned["id"], timeout=30))
    await wait_until(lambda: db("SELECT 1 FROM jobs WHERE id = %s AND awaited", planned["id"]),
                     timeout=10, what="the waiter marked the job")
    run = await recurring.trigger_schedule(sched.store, "solo")
    row = await waiter
    assert (row["status"], row["last_error"]) == (
        "cancelled", "cancelled: withdrawn for a run that came first (overlap is off)")
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", run)
    await planner(sched).run_once(now=T)
    assert [(j["id"], j["status"]) for j in window_jobs(db, "solo")] == [
        (planned["id"], "pending")]


async def held(pg_dsn, schema):
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    await conn.execute(f'SET search_path TO "{schema}"')
    return conn


async def test_a_claim_ahead_of_the_rewrite_keeps_its_version_and_its_outcome(
        sched, db, pg_dsn, schema):
    # A worker claims the awaited window (made due early with SQL) while the schedule's
    # args change: the change waits for the claim, then leaves the running job alone and
    # plans nothing again; the worker's completion, fenced on its attempt, goes through.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    after = await_window(db, planned["id"])
    async with await held(pg_dsn, schema) as claimer, \
            Scheduler(pg_dsn, schema=schema) as patient:  # the default lock_timeout
        async with claimer.transaction():
            # what claim_jobs writes for the row it locked
            await claimer.execute(
                "UPDATE jobs SET status = 'running', worker_id = 'w', attempts = 1, "
                "started_at = now(), lease_until = now() + interval '1 minute' "
                "WHERE id = %s AND status = 'pending'", (planned["id"],))
            change = asyncio.create_task(recurring.add_schedule(
                patient.store, define_schedule("noop", schedule_id="s", every="10m",
                                               args=[2]),
                default_tz="UTC", on_conflict="replace"))
            await asyncio.sleep(0.3)
            assert not change.done()
        await change
    (job,) = window_jobs(db, "s")
    assert (job["status"], job["args"], job["attempts"]) == ("running", [1], 1)
    assert schedule(db, "s")["next_fire_at"] == T + timedelta(minutes=10)
    await planner(sched).run_once(now=AHEAD)
    assert len(window_jobs(db, "s")) == 1
    assert await sched.store.complete_jobs(worker_id="w", done=[(planned["id"], 1, "null")]) \
        == {(planned["id"], 1)}
    assert waiting(db, after) == ("pending", False)


async def test_a_claim_behind_the_rewrite_runs_the_new_version_once(sched, db, pg_dsn, schema):
    # The change holds the rewritten row until it commits: a claim meanwhile passes it
    # over (SKIP LOCKED), the next claim takes it with the new args, and only once.
    await add(sched, "s", every="10m", args=[1])
    planned = await plan_ahead(sched, db, "s")
    await_window(db, planned["id"])
    db("UPDATE jobs SET execution_time = now() WHERE id = %s", planned["id"])

    async def claim():
        claimed, _, _ = await sched.store.claim_jobs(worker_id="w", limit=10,
                                                     lease_seconds=60)
        return [(j["id"], j["args"]) for j in claimed]

    async with await held(pg_dsn, schema) as changer:
        async with changer.transaction():
            await changer.execute("UPDATE schedules SET args = '[2]' WHERE id = 's'")
            assert await claim() == []
        assert await claim() == [(planned["id"], [2])]
        assert await claim() == []
    (job,) = window_jobs(db, "s")
    assert (job["status"], job["attempts"]) == ("running", 1)


# -- the listing -------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [True, False])
async def test_listing_shows_the_planned_window_as_next_after_a_triggered_run(
        sched, db, overlap):
    # overlap on: the planned window stays; off: it goes back to be decided at T. Either
    # way T is the next window, no window has come yet, and the triggered run is the last.
    await add(sched, "s", every="10m", overlap=overlap)
    await plan_ahead(sched, db, "s")
    triggered = await recurring.trigger_schedule(sched.store, "s")
    (listed,) = await sched.store.list_schedules("s")
    assert (listed["next_fire_at"], listed["last_fire_at"], listed["last_job_id"]) == (
        T, None, triggered)


# -- every way a schedule changes --------------------------------------------------------


async def test_renaming_a_schedule_with_sql_then_removing_it_leaves_no_planned_window(
        sched, db):
    await add(sched, "s", every="10m")
    await plan_ahead(sched, db, "s")
    db("UPDATE schedules SET id = 'renamed' WHERE id = 's'")
    await recurring.remove_schedule(sched.store, "renamed")
    assert active(db, "s") + active(db, "renamed") == []


def replace(**definition):
    async def change(sched):
        d = define_schedule(definition.pop("task", "noop"), schedule_id="s", **definition)
        assert await recurring.add_schedule(sched.store, d, default_tz="UTC",
                                            on_conflict="replace")
    return change


@pytest.mark.parametrize("change, field, value", [
    (replace(cron="0 12 * * *", tz="Europe/Paris"), "fire_time", T + timedelta(hours=23)),
    (replace(task="add", cron="0 12 * * *", tz="UTC"), "task", "add"),
    (replace(cron="0 12 * * *", tz="UTC", queue="other"), "queue", "other"),
    (replace(cron="0 12 * * *", tz="UTC", priority=7), "priority", 7),
    (replace(cron="0 12 * * *", tz="UTC", kwargs={"k": 1}), "kwargs", {"k": 1}),
])
async def test_a_replace_of_any_field_runs_the_new_definition_not_the_planned_one(
        sched, db, change, field, value):
    await add(sched, "s", cron="0 12 * * *", tz="UTC")
    await plan_ahead(sched, db, "s")
    await change(sched)
    if field == "fire_time":  # a new timezone: the new timing's own next window
        db("UPDATE schedules SET next_fire_at = %s", value)
        await planner(sched).run_once(now=value - timedelta(seconds=3))
    else:
        await planner(sched).run_once(now=AHEAD)
    (job,) = window_jobs(db, "s")
    assert job[field] == value


async def test_overlap_turned_off_with_a_run_active_withdraws_the_planned_window(sched, db):
    await add(sched, "s", every="10m", overlap=True)
    run = await recurring.trigger_schedule(sched.store, "s")  # pending
    planned = await plan_ahead(sched, db, "s")  # overlap on: planned beside the run
    await replace(every="10m", overlap=False)(sched)
    await planner(sched).run_once(now=AHEAD)
    assert window_jobs(db, "s") == []  # to be decided at T
    await planner(sched).run_once(now=T)
    (window,) = window_jobs(db, "s")
    assert (window["id"], window["status"]) == (planned["id"], "cancelled")
    assert run in window["last_error"]


async def test_truncating_schedules_withdraws_the_planned_windows(sched, db):
    await add(sched, "s", every="10m")
    await plan_ahead(sched, db, "s")
    db("TRUNCATE schedules")
    assert active(db, "s") == []


async def test_bulk_pause_with_sql_withdraws_every_planned_window(sched, db):
    for i in range(20):
        await add(sched, f"s{i:02}", every="10m", args=[i])
    db("UPDATE schedules SET next_fire_at = %s", T)
    await planner(sched).run_once(now=AHEAD)
    assert len(db("SELECT id FROM jobs WHERE status = 'pending'")) == 20
    db("UPDATE schedules SET paused = true")
    assert db("SELECT id FROM jobs") == []
    assert {r["next_fire_at"] for r in db("SELECT next_fire_at FROM schedules")} == {T}


async def test_args_changed_while_a_planner_holds_the_row_runs_the_new_args(sched, db, pg_dsn,
                                                                             schema):
    # A planner holds the schedule's row (planning the window ahead) while a replace waits
    # on it: the replace, once through, must see the job the planner committed.
    await add(sched, "s", every="10m", args=[1])
    db("UPDATE schedules SET next_fire_at = %s", T)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as holder, \
            Scheduler(pg_dsn, schema=schema) as patient:  # the default lock_timeout
        await holder.execute(f'SET search_path TO "{schema}"')
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM schedules WHERE id = 's' FOR UPDATE")
            change = asyncio.create_task(recurring.add_schedule(
                patient.store, define_schedule("noop", schedule_id="s", every="10m", args=[2]),
                default_tz="UTC", on_conflict="replace"))
            await asyncio.sleep(0.3)
            assert not change.done()
            # what advance_schedules would have written for the window at T
            await holder.execute(
                "INSERT INTO jobs (id, task, queue, args, kwargs, priority, execution_time, "
                "max_retries, schedule_id, fire_time) VALUES (%s, 'noop', 'default', '[1]', "
                "'{}', 0, %s, 0, 's', %s)", ("s@planned", T, T))
            await holder.execute("UPDATE schedules SET next_fire_at = %s, last_fire_at = %s "
                                 "WHERE id = 's'", (T + timedelta(minutes=10), T))
        await change
    assert [j["args"] for j in window_jobs(db, "s")] == []
    await planner(sched).run_once(now=AHEAD)
    assert [j["args"] for j in window_jobs(db, "s")] == [[2]]


async def test_a_schedule_changed_under_running_workers_never_runs_old_args_later(
        sched, db, registry):
    # Two workers plan a 1 s schedule ahead while its args change every 0.7 s: a window
    # whose fire time comes after a change committed must run with the new args.
    @periodic(every=1, id="tick", args=[0])
    async def tick(n): ...

    workers = [Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
               for _ in range(2)]
    runners = [asyncio.create_task(w.run()) for w in workers]
    changes = []  # (committed no earlier than, committed no later than, args)
    try:
        await wait_until(lambda: window_jobs(db, "tick"), timeout=20, what="a first window")
        for n in range(1, 10):
            before = await sched.store.db_now()
            db("UPDATE schedules SET args = %s::jsonb WHERE id = 'tick'", f"[{n}]")
            changes.append((before, await sched.store.db_now(), [n]))
            await asyncio.sleep(0.7)
        await asyncio.sleep(1.5)
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*runners)
    wrong = []
    for job in window_jobs(db, "tick"):
        if any(lo <= job["fire_time"] <= hi for lo, hi, _ in changes):
            continue  # the change and the window came together: either is right
        in_force = [args for _, hi, args in changes if hi < job["fire_time"]]
        if in_force and job["args"] != in_force[-1]:
            wrong.append((job["id"], job["args"], in_force[-1]))
    assert wrong == []


# -- upgrade path ------------------------------------------------------------------------


async def test_migrating_a_database_with_schedules_and_windows_to_0016(pg_dsn, schema, db):
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as s:
        await s.store.migrate(target=15)
        await add(s, "s", every="10m", args=[1])
        db("UPDATE schedules SET anchor = '2026-01-01Z', "  # T and the last hour are windows
           "next_fire_at = date_trunc('hour', now()) - interval '1 hour'")
        await planner(s).run_once()  # a window that came, on the real clock
        (came,) = window_jobs(db, "s")
        await s.store.migrate()
        await s.store.migrate()  # idempotent
        assert [j["id"] for j in window_jobs(db, "s")] == [came["id"]]
        db("UPDATE schedules SET next_fire_at = %s", T)
        await planner(s).run_once(now=AHEAD)  # now planned ahead
        assert len(window_jobs(db, "s")) == 2
        await recurring.pause_schedule(s.store, "s")
        assert [j["id"] for j in window_jobs(db, "s")] == [came["id"]]
        assert schedule(db, "s")["last_job_id"] == came["id"]


# -- a withdrawn window that is to be decided again at its fire time ----------------------


async def sql_args_change(sched, db):
    db("UPDATE schedules SET args = '[2]' WHERE id = 'solo'")


async def triggered_run(sched, db):
    triggered = await recurring.trigger_schedule(sched.store, "solo")
    await wait_until(lambda: db("SELECT 1 FROM jobs WHERE id = %s AND status = 'completed'",
                                triggered), timeout=10, what="the triggered run done")


@pytest.mark.parametrize("change", [sql_args_change, triggered_run])
async def test_a_window_withdrawn_before_its_fire_time_is_still_decided_at_it(
        sched, db, registry, change):
    # A triggered run (overlap=False) or a definition changed with SQL withdraws the window
    # planned ahead and moves next_fire_at back to it. A sleeping planner must look at it
    # then, not when it planned to wake for the window after (up to 60 s later). Every
    # 10 s: that wake is LOOKAHEAD_SECONDS (5 s) before the window after, 5 s past this
    # window's fire time, later than the 3 s the start is given (and each window waited
    # for costs the suite its length, twice).
    @periodic(every=10, id="solo", overlap=False, args=[1])
    async def solo(n): ...

    def planned():
        return db("SELECT id, fire_time FROM jobs WHERE schedule_id = 'solo' AND "
                  "status = 'pending' AND fire_time > now() + interval '1 second'")

    def window_started(fire_time):
        return db("SELECT args FROM jobs WHERE schedule_id = 'solo' AND fire_time = %s "
                  "AND status IN ('running', 'completed')", fire_time)

    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        (job,) = await wait_until(planned, timeout=30, what="a window planned ahead")
        await change(sched, db)
        late = (job["fire_time"] - await sched.store.db_now()).total_seconds() + 3
        (started,) = await wait_until(lambda: window_started(job["fire_time"]), timeout=late,
                                      what="the window decided and run at its fire time")
    finally:
        worker.stop()
        await runner
    assert started["args"] == ([2] if change is sql_args_change else [1])


# -- a PostgreSQL crash between planning a window and its fire time ----------------------


async def test_a_window_planned_before_a_postgres_crash_runs_once_at_its_fire_time(
        cluster, schema, workers, tmp_path):
    from faults.kit import fault_config, fault_options

    cluster.start()
    dsn = cluster.app_dsn()
    async with Scheduler(dsn, schema=schema, options=fault_options()) as s:
        await s.migrate()
        crew = [workers(fault_config(tmp_path, dsn, schema, poll_seconds=30)) for _ in range(2)]
        await add(s, "ten", every=10, catch_up="all")

        async def rows(query, *params):
            async with s.store.pool.connection() as conn:
                await conn.execute(f'SET search_path TO "{schema}"')
                cur = await conn.execute(query, params)
                return [dict(zip([c.name for c in cur.description], r, strict=True))
                        for r in await cur.fetchall()]

        async def planned():
            return await rows("SELECT id, fire_time FROM jobs WHERE schedule_id = 'ten' AND "
                              "status = 'pending' AND fire_time > now() + interval '2 s'")

        (job,) = await wait_until(planned, timeout=40, what="a window planned ahead")
        cluster.stop("immediate")
        cluster.start()
        await s.store.pool.check()
        fire = job["fire_time"]
        await wait_until(lambda: rows("SELECT 1 FROM jobs WHERE schedule_id = 'ten' AND "
                                      "fire_time > %s AND status = 'completed'", fire),
                         timeout=40, what="the window after the crash and the next one run")
        done = await rows("SELECT id, fire_time, started_at, status FROM jobs "
                          "WHERE schedule_id = 'ten' ORDER BY fire_time")
        alive = [w.proc.poll() is None for w in crew]
        for w in crew:
            w.kill()
        async with s.store.pool.connection() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    times = [j["fire_time"] for j in done]
    assert times == [times[0] + timedelta(seconds=10 * i) for i in range(len(times))]
    assert job["id"] in [j["id"] for j in done]
    assert all(j["started_at"] >= j["fire_time"] for j in done if j["started_at"]), done
    assert alive == [True, True]
