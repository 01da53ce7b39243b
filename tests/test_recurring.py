"""Recurring schedules against a real PostgreSQL: syncing @periodic definitions, catch-up
after an outage, DST nights through the planner, the schedule operations, and real
worker processes racing for the same windows (also while being killed).

Time is never slept through: outages are simulated by moving next_fire_at into the past
and DST nights by handing the planner a `now`. Only the worker tests run on the wall
clock, with a 1-second interval. The unit tests of the fire-time rules themselves are in
the timing module's tests.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import cli_env, fast_options, wait_until, write_config

from pgsched import (
    InvalidInput,
    ScheduleConflict,
    ScheduleNotFound,
    Scheduler,
    Worker,
    periodic,
    recurring,
    tasks,
)
from pgsched.recurring import define_schedule
from pgsched.store import _bind, migrations
from pgsched.worker import planner as planner_module
from pgsched.worker.planner import CATCH_UP_LIMIT, SKIP_TOLERANCE

PERIODIC_TASKS = Path(__file__).resolve().parent / "periodic_tasks.py"
# On PYTHONPATH, makes a worker's planner exit between computing and writing windows.
PLANNER_CRASH = Path(__file__).resolve().parent / "faults" / "planner_crash"
PLANNER_CRASH_EXIT_CODE = 86  # faults/planner_crash/sitecustomize.py
T = datetime(2030, 1, 1, 12, 5, tzinfo=UTC)  # the clock of planner passes given a `now`


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def registry(monkeypatch):
    """Empty @periodic and copied task registries, so definitions stay in one test."""
    monkeypatch.setattr(recurring, "_SCHEDULES", {})
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    return recurring._SCHEDULES


def planner(sched):
    return Worker(sched.store, sched._dsn, fast_options()).planner


async def add(sched, schedule_id, *, task="noop", **definition):
    d = define_schedule(task, schedule_id=schedule_id, **definition)
    assert await recurring.add_schedule(sched.store, d, default_tz="UTC", on_conflict="raise")


def window_jobs(db, schedule_id):
    return db("SELECT * FROM jobs WHERE schedule_id = %s AND fire_time IS NOT NULL "
              "ORDER BY fire_time", schedule_id)


def fire_times(db, schedule_id):
    return [j["fire_time"] for j in window_jobs(db, schedule_id)]


def schedule(db, schedule_id):
    rows = db("SELECT * FROM schedules WHERE id = %s", schedule_id)
    return rows[0] if rows else None


# -- @periodic ---------------------------------------------------------------------------


def test_periodic_registers_the_task_and_its_schedule(registry):
    @periodic(every=timedelta(minutes=15))
    async def cleanup_temp_files(): ...

    @periodic(cron="0 9 * * MON-FRI", tz="America/New_York", max_retries=2, timeout=300)
    def market_open_report(): ...

    assert tasks.get_task("cleanup_temp_files").func is cleanup_temp_files
    report = tasks.get_task("market_open_report")
    assert report.max_retries == 2 and report.timeout == 300
    defined = recurring.registered_schedules()
    assert defined["cleanup_temp_files"].every == timedelta(minutes=15)
    assert defined["cleanup_temp_files"].tz is None  # the worker's [jobs] timezone
    assert defined["market_open_report"].tz == "America/New_York"
    assert defined["market_open_report"].max_retries == 2


def test_periodic_on_an_existing_task_keeps_its_options_and_needs_distinct_ids(registry):
    @periodic(every=60, id="hourly-b", args=["b"])
    @periodic(every=60, id="hourly-a", args=["a"], priority="critical")
    @tasks.task(max_retries=4, queue="reports")
    def export(name): ...

    defined = recurring.registered_schedules()
    assert defined["hourly-a"].max_retries == 4 and defined["hourly-a"].queue == "reports"
    assert defined["hourly-a"].priority == 1 and defined["hourly-b"].priority == 5
    assert tasks.get_task("export").priority == 5  # the task itself is unchanged
    with pytest.raises(InvalidInput, match="defined twice"):
        @periodic(every=60, id="hourly-a")
        def other(): ...


@pytest.mark.parametrize("options, message", [
    ({"cron": "* * * * *", "every": 60}, "not both"),
    ({}, "neither"),
    ({"cron": "61 * * * *"}, "minute field"),
    ({"cron": "0 9 * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
    ({"every": 0}, "at most once a second"),
    ({"every": -5}, "negative"),
    ({"every": "-5m"}, "negative"),
    ({"every": 0.5}, "at most once a second"),
    ({"every": 60, "tz": "UTC"}, "cron schedules only"),
    ({"every": 60, "catch_up": "sometimes"}, "catch_up"),
    ({"every": 60, "args": [float("nan")]}, "JSON"),
    ({"every": 60, "id": "a@b"}, "schedule id"),
    ({"every": 60, "anchor": datetime(2030, 1, 1)}, "anchor"),
    ({"cron": "0 * * * *", "anchor": utc(2030, 1, 1)}, "anchor"),
])
def test_bad_periodic_definitions_are_refused_and_register_nothing(registry, options, message):
    with pytest.raises(InvalidInput, match=message):
        @periodic(**options)
        def refused(): ...

    assert tasks.get_task("refused") is None and recurring.registered_schedules() == {}


# -- syncing code schedules at worker start --------------------------------------------


async def test_sync_upserts_keeps_places_and_disables_what_the_code_dropped(sched, registry, db):
    @periodic(every=60, id="minutely")
    async def job_a(): ...

    @periodic(cron="0 9 * * *", tz="Europe/London", id="morning")
    async def job_b(): ...

    await add(sched, "from-cli", every="1h")
    changes = await recurring.sync_code_schedules(sched.store, "UTC")
    assert sorted((c["id"], c["change"]) for c in changes) == [
        ("minutely", "created"), ("morning", "created")]
    now = await sched.store.db_now()
    minutely, morning = schedule(db, "minutely"), schedule(db, "morning")
    assert minutely["origin"] == "code" and minutely["next_fire_at"].timestamp() % 60 == 0
    assert now < minutely["next_fire_at"] <= now + timedelta(seconds=60)
    local = morning["next_fire_at"].astimezone(recurring.cron_schedule("0 9 * * *",
                                                                       "Europe/London").tz)
    assert (local.hour, local.minute) == (9, 0) and morning["tz"] == "Europe/London"

    # A restart with the same code keeps each schedule's place, even an overdue one.
    overdue = utc(2020, 1, 1, 0, 0)
    db("UPDATE schedules SET next_fire_at = %s WHERE id = 'minutely'", overdue)
    assert await recurring.sync_code_schedules(sched.store, "UTC") == []
    assert schedule(db, "minutely")["next_fire_at"] == overdue

    # Changing only the arguments keeps the place; changing the timing starts afresh.
    @periodic(every=60, id="minutely", args=[1])
    async def job_a(): ...  # noqa: F811 - a redeploy of the same function

    await recurring.sync_code_schedules(sched.store, "UTC")
    assert schedule(db, "minutely")["next_fire_at"] == overdue
    assert schedule(db, "minutely")["args"] == [1]

    @periodic(every=120, id="minutely", args=[1])
    async def job_a(): ...  # noqa: F811

    assert await recurring.sync_code_schedules(sched.store, "UTC") == [
        {"id": "minutely", "change": "updated"}]
    moved = schedule(db, "minutely")["next_fire_at"]
    assert moved > now and moved.timestamp() % 120 == 0

    # Gone from the code: disabled, not deleted; the CLI schedule is untouched.
    cli_before = schedule(db, "from-cli")
    del registry["morning"]
    assert await recurring.sync_code_schedules(sched.store, "UTC") == [
        {"id": "morning", "change": "disabled"}]
    assert schedule(db, "morning")["enabled"] is False
    assert schedule(db, "from-cli") == cli_before

    # Back in the code: enabled again from the next window, no catch-up for the gap.
    db("UPDATE schedules SET next_fire_at = %s WHERE id = 'morning'", overdue)

    @periodic(cron="0 9 * * *", tz="Europe/London", id="morning")
    async def job_b(): ...  # noqa: F811

    assert await recurring.sync_code_schedules(sched.store, "UTC") == [
        {"id": "morning", "change": "updated"}]
    assert schedule(db, "morning")["enabled"] and schedule(db, "morning")["next_fire_at"] > now


async def test_sync_leaves_cli_schedules_and_pauses_alone(sched, registry, db):
    await add(sched, "shared-id", every="1h")
    await recurring.sync_code_schedules(sched.store, "UTC")

    @periodic(every=60, id="shared-id")
    async def clash(): ...

    @periodic(every=60, id="paused-one")
    async def mine(): ...

    changes = await recurring.sync_code_schedules(sched.store, "UTC")
    assert {"id": "shared-id", "change": "cli_owned"} in changes
    assert schedule(db, "shared-id")["every"] == timedelta(hours=1)
    await recurring.pause_schedule(sched.store, "paused-one")

    @periodic(every=120, id="paused-one")
    async def mine(): ...  # noqa: F811

    await recurring.sync_code_schedules(sched.store, "UTC")
    assert schedule(db, "paused-one")["paused"] is True  # a deploy does not undo a pause


async def test_code_cron_without_tz_uses_the_worker_default(sched, registry, db):
    @periodic(cron="0 9 * * *")
    async def breakfast(): ...

    await recurring.sync_code_schedules(sched.store, "Asia/Tokyo")
    assert schedule(db, "breakfast")["tz"] == "Asia/Tokyo"


# -- the planner: windows, catch-up, DST ---------------------------------------------


@pytest.mark.parametrize("mode, expected", [
    ("latest", [utc(2030, 1, 1, 12, 0)]),
    ("skip", []),
    ("all", [utc(2030, 1, 1, 11, 0) + timedelta(minutes=10 * i) for i in range(7)]),
])
async def test_catch_up_after_an_outage(sched, db, mode, expected):
    await add(sched, "ten", every="10m", catch_up=mode)
    # The workers were down from 11:00 to 12:05 (T): seven windows were missed.
    db("UPDATE schedules SET next_fire_at = %s", utc(2030, 1, 1, 11, 0))
    p = planner(sched)
    await p.run_once(now=T)
    jobs = window_jobs(db, "ten")
    assert [j["fire_time"] for j in jobs] == expected
    assert all(j["execution_time"] == j["fire_time"] for j in jobs)
    assert all(j["id"] == f"ten@{j['fire_time']:%Y-%m-%dT%H:%M:%S}Z" for j in jobs)
    assert schedule(db, "ten")["next_fire_at"] == utc(2030, 1, 1, 12, 10)
    if expected:
        assert schedule(db, "ten")["last_fire_at"] == expected[-1]
    await p.run_once(now=T)  # a second pass at the same time finds nothing to do
    assert len(window_jobs(db, "ten")) == len(expected)


async def test_catch_up_all_is_bounded_by_the_limit(sched, db):
    await add(sched, "second", every="1s", catch_up="all")
    db("UPDATE schedules SET next_fire_at = %s", T - timedelta(hours=1))
    await planner(sched).run_once(now=T)
    assert fire_times(db, "second") == [
        T - timedelta(seconds=CATCH_UP_LIMIT - 1 - i) for i in range(CATCH_UP_LIMIT)]
    assert schedule(db, "second")["next_fire_at"] == T + timedelta(seconds=1)


async def test_skip_runs_an_on_time_window_and_lets_it_expire_if_not_started(sched, db):
    await add(sched, "ten", every="10m", catch_up="skip")
    db("UPDATE schedules SET next_fire_at = %s", utc(2030, 1, 1, 12, 0))
    await planner(sched).run_once(now=utc(2030, 1, 1, 12, 0, 30))
    (job,) = window_jobs(db, "ten")
    assert job["fire_time"] == utc(2030, 1, 1, 12, 0)
    assert job["misfire_grace_seconds"] == SKIP_TOLERANCE.total_seconds()


@pytest.mark.parametrize("expr, tz, start, end, expected", [
    # fall back, fixed hour: 01:30 happens twice and runs once, at its first occurrence
    ("30 1 * * *", "America/New_York", utc(2026, 10, 31, 4), utc(2026, 11, 2, 12),
     [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]),
    ("30 1 * * *", "Europe/London", utc(2026, 10, 24, 0), utc(2026, 10, 26, 6),
     [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]),
    # fall back, stepped hour: elapsed time, both passes of the repeated hour
    ("*/30 * * * *", "America/New_York", utc(2026, 11, 1, 4, 50), utc(2026, 11, 1, 7, 10),
     [utc(2026, 11, 1, 5, 0) + timedelta(minutes=30 * i) for i in range(5)]),
    # spring forward: 02:30 does not exist and runs once, when the gap ends (03:00 EDT)
    ("30 2 * * *", "America/New_York", utc(2026, 3, 7, 0), utc(2026, 3, 9, 12),
     [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]),
    # Lord Howe moves 30 minutes: 02:00 is skipped on 4 October, runs at 02:30 (+11)
    ("0 2 * * *", "Australia/Lord_Howe", utc(2026, 10, 2, 12), utc(2026, 10, 4, 18),
     [utc(2026, 10, 2, 15, 30), utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 0)]),
])
async def test_planner_fires_cron_across_dst_as_the_policy_says(sched, db, expr, tz, start,
                                                                 end, expected):
    await add(sched, "dst", cron=expr, tz=tz, catch_up="all")
    db("UPDATE schedules SET next_fire_at = %s", start)
    p, now = planner(sched), start
    while now <= end:  # a planner waking every 20 minutes through the night
        await p.run_once(now=now)
        now += timedelta(minutes=20)
    assert fire_times(db, "dst") == expected


async def test_planner_survives_a_schedule_that_no_longer_parses(sched, db):
    await add(sched, "broken", cron="0 * * * *", tz="UTC")
    await add(sched, "fine", every="10m")
    # As if tzdata lost the zone after an upgrade.
    db("UPDATE schedules SET tz = 'Gone/Zone' WHERE id = 'broken'")
    db("UPDATE schedules SET next_fire_at = %s", T - timedelta(minutes=5))
    await planner(sched).run_once(now=T)
    assert schedule(db, "broken")["next_fire_at"] > T and fire_times(db, "broken") == []
    assert fire_times(db, "fine") == [T - timedelta(minutes=5)]


async def test_a_planner_stalled_in_its_transaction_is_cut_off_and_writes_nothing(
        sched, db, monkeypatch):
    await add(sched, "ten", every="10m")
    db("UPDATE schedules SET next_fire_at = %s", utc(2030, 1, 1, 12, 0))
    p = planner(sched)
    monkeypatch.setattr(planner_module, "IDLE_TIMEOUT_SECONDS", 0.3)
    plan = p._plan

    def stalled(row):
        time.sleep(1)  # the whole process stands still, as under SIGSTOP
        return plan(row)

    p._plan = stalled
    # The server ended the session: for the planner a lost connection, retried later.
    with pytest.raises(psycopg.OperationalError, match="idle-in-transaction"):
        await p.run_once(now=T)
    assert fire_times(db, "ten") == []
    assert schedule(db, "ten")["next_fire_at"] == utc(2030, 1, 1, 12, 0)
    p._plan = plan
    await p.run_once(now=T)
    assert fire_times(db, "ten") == [utc(2030, 1, 1, 12, 0)]


# -- operations ------------------------------------------------------------------------


async def test_pause_resume_trigger_remove(sched, db):
    now = await sched.store.db_now()
    # Hourly, with windows half an hour away from now so none falls inside the test.
    await add(sched, "hourly", every="1h", anchor=now + timedelta(minutes=30))
    first = schedule(db, "hourly")["next_fire_at"]
    p = planner(sched)

    await recurring.pause_schedule(sched.store, "hourly")
    await p.run_once(now=first + timedelta(hours=5))
    assert fire_times(db, "hourly") == []  # paused: nothing fires

    # Paused for hours: resuming does not run the windows missed meanwhile.
    db("UPDATE schedules SET next_fire_at = %s", first - timedelta(hours=5))
    await recurring.resume_schedule(sched.store, "hourly")
    await p.run_once()
    assert fire_times(db, "hourly") == []
    assert schedule(db, "hourly")["next_fire_at"] == first

    job_id = await recurring.trigger_schedule(sched.store, "hourly")
    again = await recurring.trigger_schedule(sched.store, "hourly")
    assert job_id != again and job_id.startswith("hourly@trigger-")
    job = await sched.get_job(job_id)
    assert job["schedule_id"] == "hourly" and job["fire_time"] is None
    assert job["status"] == "pending" and job["task"] == "noop"
    (listed,) = await sched.store.list_schedules()
    assert listed["next_fire_at"] == first  # a trigger is not a window
    assert listed["last_job_id"] == again and listed["last_status"] == "pending"

    await recurring.remove_schedule(sched.store, "hourly")
    assert await sched.store.list_schedules() == []
    assert await sched.get_job(job_id) is not None  # enqueued jobs stay
    for operation in (recurring.pause_schedule, recurring.resume_schedule,
                      recurring.trigger_schedule, recurring.remove_schedule):
        with pytest.raises(ScheduleNotFound, match="no schedule 'hourly'"):
            await operation(sched.store, "hourly")


async def test_add_conflict_modes(sched, registry, db):
    await add(sched, "s", every="1h", args=[1])
    with pytest.raises(ScheduleConflict, match="already exists"):
        await add(sched, "s", every="2h")
    d = define_schedule("noop", schedule_id="s", every="2h", args=[2])
    assert not await recurring.add_schedule(sched.store, d, default_tz="UTC", on_conflict="ignore")
    assert schedule(db, "s")["args"] == [1]
    await recurring.pause_schedule(sched.store, "s")
    assert await recurring.add_schedule(sched.store, d, default_tz="UTC", on_conflict="replace")
    replaced = schedule(db, "s")
    assert replaced["every"] == timedelta(hours=2) and replaced["args"] == [2]
    assert replaced["next_fire_at"].timestamp() % 7200 == 0 and replaced["paused"]

    @periodic(every=60, id="coded")
    async def coded(): ...

    await recurring.sync_code_schedules(sched.store, "UTC")
    d = define_schedule("noop", schedule_id="coded", every="2h")
    with pytest.raises(ScheduleConflict, match="defined in code"):
        await recurring.add_schedule(sched.store, d, default_tz="UTC", on_conflict="replace")
    assert schedule(db, "coded")["every"] == timedelta(minutes=1)


async def test_unique_key_allows_one_job_per_window_whoever_inserts_it(sched, db):
    window = utc(2030, 1, 1, 12, 0)
    await add(sched, "ten", every="10m")
    db("UPDATE schedules SET next_fire_at = %s", window)
    # Another planner (here: a hand-written row) already made this window's job.
    db("INSERT INTO jobs (id, task, execution_time, schedule_id, fire_time) "
       "VALUES ('someone-else', 'noop', %s, 'ten', %s)", window, window)
    await planner(sched).run_once(now=T)
    assert [j["id"] for j in window_jobs(db, "ten")] == ["someone-else"]
    assert schedule(db, "ten")["next_fire_at"] == window + timedelta(minutes=10)
    with pytest.raises(psycopg.errors.UniqueViolation):
        db("INSERT INTO jobs (id, task, execution_time, schedule_id, fire_time) "
           "VALUES ('a-third', 'noop', now(), 'ten', %s)", window)


# -- in-process worker -----------------------------------------------------------------


async def test_worker_fires_on_time_and_wakes_for_a_new_schedule(sched, registry, db):
    @periodic(every=1, id="each-second", catch_up="all")
    async def each_second(): ...

    # With a 30 s poll, only the planner's timer and its NOTIFY can pass this test.
    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    runner = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: len([j for j in window_jobs(db, "each-second")
                                      if j["status"] == "completed"]) >= 3,
                         timeout=15, what="three windows completed")
        # A schedule added elsewhere while the planner sleeps: NOTIFY wakes it.
        await add(sched, "cli-made", every="1s", catch_up="all")
        await wait_until(lambda: fire_times(db, "cli-made"), timeout=10,
                         what="a window of the new schedule")
    finally:
        worker.stop()
        await runner
    jobs = window_jobs(db, "each-second")
    assert all(j["execution_time"] == j["fire_time"] for j in jobs)
    assert all(j["fire_time"].microsecond == 0 for j in jobs)
    completed = [j for j in jobs if j["status"] == "completed"]
    assert all(j["started_at"] >= j["fire_time"] for j in completed)


async def test_worker_stops_on_a_schema_without_schedules_until_migrated(pg_dsn, schema):
    number, name, text = migrations()[0]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # a schema left at version 1
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".schema_migrations (version integer PRIMARY KEY,'
                     " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(_bind(text, schema))
        conn.execute(f'INSERT INTO "{schema}".schema_migrations VALUES (%s, %s)', [number, name])
    async with Scheduler(pg_dsn, schema=schema) as old:
        job_id = await old.schedule("noop", execution_time=T)
        await asyncio.wait_for(Worker(old.store, old._dsn, fast_options()).run(), 20)
        assert await old.migrate() == migrations()[-1][0]
        job = await old.get_job(job_id)
        assert job["status"] == "pending" and job["schedule_id"] is None


# -- worker processes ------------------------------------------------------------------


def assert_one_job_per_window(db, schedule_id, every=timedelta(seconds=1)):
    """Fire times run on the grid without a gap and without a repeat; returns them."""
    times = fire_times(db, schedule_id)
    assert times, "no window fired"
    assert times == [times[0] + i * every for i in range(len(times))], "lost or doubled"
    jobs = window_jobs(db, schedule_id)
    assert all(j["execution_time"] == j["fire_time"] for j in jobs)
    return times


def completed_windows(db, schedule_id):
    return db("SELECT count(*) AS n FROM jobs WHERE schedule_id = %s AND status = 'completed'",
              schedule_id)[0]["n"]


async def stop_all(procs):
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        await proc.wait()


async def test_three_workers_one_job_per_window_through_a_restart(
        sched, db, tmp_path, pg_dsn, schema, workers):
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(PERIODIC_TASKS))
    procs = [workers(config) for _ in range(3)]
    await wait_until(lambda: completed_windows(db, "tick") >= 4, timeout=30,
                     what="four windows with three workers")
    killed = procs[0]
    killed.proc.kill()  # SIGKILL mid-way; a fresh process takes its place
    procs[0] = workers(config)
    seen = completed_windows(db, "tick")
    await wait_until(lambda: completed_windows(db, "tick") >= seen + 4, timeout=30,
                     what="four more windows after the restart")
    await stop_all(procs)
    times = assert_one_job_per_window(db, "tick")
    assert len(times) >= 8
    # The windows raced for were planned ahead of their fire time (planner lookahead).
    assert any(j["created_at"] < j["fire_time"] for j in window_jobs(db, "tick"))
    # No planner believes it inserted a window another one inserted (a planner logs only
    # the rows its statement returned; the killed one may have died before logging).
    enqueued = [p.log().count("schedule_window_enqueued") for p in [killed, *procs]]
    assert sum(enqueued) <= len(times), enqueued


async def test_planners_killed_between_computing_and_inserting_lose_and_double_nothing(
        sched, db, tmp_path, pg_dsn, schema, workers):
    """Issue 5, item 10: each planner may exit right after computing a window, before
    writing it; the others (and restarted ones) must still enqueue it, once."""
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(PERIODIC_TASKS))
    crashy = cli_env(PYTHONPATH=str(PLANNER_CRASH), PGSCHED_TEST_PLANNER_CRASH_RATE="0.4")
    procs = [workers(config, env=crashy) for _ in range(3)]
    crashes: list[list[str]] = []  # the windows each crashed planner had computed

    def restart_the_dead() -> bool:
        for i, proc in enumerate(procs):
            if proc.proc.poll() is not None:
                assert proc.proc.returncode == PLANNER_CRASH_EXIT_CODE, proc.log()[-2000:]
                crashes.extend(event["windows"] for event in map(json.loads, (
                    line for line in proc.log().splitlines() if "planner_crash_injected" in line)))
                procs[i] = workers(config, env=crashy)
        return len(crashes) >= 3 and completed_windows(db, "tick") >= 8

    await wait_until(restart_the_dead, timeout=90, interval=0.1,
                     what="three injected crashes and eight windows")
    # A clean worker takes over: it must enqueue every window up to now, including those
    # the crashed planners had computed, and finish what they left running.
    procs.append(workers(config))
    await stop_all(procs[:-1])
    stopped_at = await sched.store.db_now()

    def caught_up() -> bool:
        if schedule(db, "tick")["next_fire_at"] <= stopped_at:
            return False
        return all(j["status"] == "completed" for j in window_jobs(db, "tick")
                   if j["fire_time"] <= stopped_at)

    await wait_until(caught_up, timeout=30, what="the clean worker to catch up")
    await stop_all(procs[-1:])
    times = assert_one_job_per_window(db, "tick")
    in_flight = {datetime.fromisoformat(w) for windows in crashes for w in windows}
    # A window planned ahead may have been in flight with its fire time after the stop,
    # beyond what the clean worker had to catch up.
    assert in_flight and {t for t in in_flight if t <= stopped_at} <= set(times), \
        "a window in flight at a crash was lost"
