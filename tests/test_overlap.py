"""Schedules with overlap=False (@periodic(overlap=False), add --no-overlap): a window whose
previous run is still pending or running is skipped and recorded, never queued behind it,
decided in the planner's statement, so it holds with racing planners and real workers."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from datetime import UTC, datetime, timedelta

import pytest
from conftest import cli_env, run_cli, wait_until, write_config
from test_recurring import PLANNER_CRASH, PLANNER_CRASH_EXIT_CODE, add, planner, stop_all

from pgsched import InvalidInput, Scheduler, recurring
from pgsched.recurring import define_schedule

T = datetime(2030, 1, 1, 12, 5, tzinfo=UTC)


def windows(db, schedule_id):
    return db("SELECT id, fire_time, status::text AS status, last_error, started_at, "
              "finished_at FROM jobs WHERE schedule_id = %s AND fire_time IS NOT NULL "
              "ORDER BY fire_time", schedule_id)


async def test_a_window_skips_while_the_previous_run_is_pending_and_runs_after_it(sched, db):
    await add(sched, "s", every="1m", overlap=False)
    db("UPDATE schedules SET next_fire_at = %s", T)
    p = planner(sched)
    await p.run_once(now=T)
    await p.run_once(now=T + timedelta(minutes=1))
    first, second = windows(db, "s")
    assert (first["status"], first["last_error"]) == ("pending", None)
    assert second["status"] == "cancelled"
    assert second["last_error"] == f"skipped: {first['id']} was still pending or running " \
                                   "(overlap is off)"
    [listed] = await sched.store.list_schedules("s")
    assert (listed["last_job_id"], listed["last_status"]) == (second["id"], "skipped")
    db("UPDATE jobs SET status = 'completed', finished_at = now() WHERE id = %s", first["id"])
    await p.run_once(now=T + timedelta(minutes=2))
    assert [w["status"] for w in windows(db, "s")] == ["completed", "cancelled", "pending"]


async def test_a_running_job_of_the_schedule_skips_the_window_too(sched, db):
    await add(sched, "s", every="1m", overlap=False)
    triggered = await recurring.trigger_schedule(sched.store, "s")
    db("UPDATE jobs SET status = 'running', worker_id = 'w' WHERE id = %s", triggered)
    db("UPDATE schedules SET next_fire_at = %s", T)
    await planner(sched).run_once(now=T)
    [window] = windows(db, "s")
    assert window["status"] == "cancelled" and triggered in window["last_error"]


async def test_overlap_true_still_queues_every_window(sched, db):
    await add(sched, "s", every="1m")
    db("UPDATE schedules SET next_fire_at = %s", T)
    await planner(sched).run_once(now=T)
    await planner(sched).run_once(now=T + timedelta(minutes=1))
    assert [w["status"] for w in windows(db, "s")] == ["pending", "pending"]


async def test_racing_planners_run_the_first_caught_up_window_and_skip_the_rest_once(
        pg_dsn, schema, sched, db):
    await add(sched, "s", every="1m", catch_up="all", overlap=False)
    db("UPDATE schedules SET next_fire_at = %s", T - timedelta(minutes=9))
    others = [Scheduler(pg_dsn, schema=schema) for _ in range(6)]
    for other in others:
        await other.open()
    try:
        results = await asyncio.gather(*(planner(o).run_once(now=T) for o in others))
    finally:
        for other in others:
            await other.close()
    rows = windows(db, "s")
    assert [w["fire_time"] for w in rows] == [T - timedelta(minutes=9 - i) for i in range(10)]
    assert [w["status"] for w in rows] == ["pending"] + ["cancelled"] * 9
    assert all(w["last_error"].startswith(f"skipped: {rows[0]['id']} ") for w in rows[1:])
    # Each window was reported by exactly one planner: none was decided twice.
    reported = sorted(job["id"] for result in results for job in result.jobs)
    assert reported == sorted(w["id"] for w in rows)


def test_overlap_must_be_a_bool():
    with pytest.raises(InvalidInput, match="overlap"):
        define_schedule("noop", schedule_id="s", every="1m", overlap="no")


def test_cli_no_overlap_makes_a_schedule_that_says_so(tmp_path, pg_dsn, schema):
    import json

    config = write_config(tmp_path, pg_dsn, schema)
    assert run_cli("migrate", config=config).returncode == 0
    added = run_cli("add", "noop", "--every", "1h", "--id", "hourly", "--no-overlap",
                    config=config)
    assert added.returncode == 0, added.stderr
    listed = json.loads(run_cli("schedules", "--json", config=config).stdout)
    assert [(s["id"], s["overlap"]) for s in listed] == [("hourly", False)]
    one_off = run_cli("add", "noop", "--no-overlap", config=config)
    assert one_off.returncode == 2 and "--cron" in one_off.stderr


async def test_three_workers_never_run_two_windows_at_once_and_lose_none(
        sched, db, tmp_path, pg_dsn, schema, workers):
    # Each run takes 2.5 s, windows come every second: most must be skipped.
    await add(sched, "slow", task="sleep", args=[2.5], every="1s", catch_up="all",
              overlap=False)
    config = write_config(tmp_path, pg_dsn, schema)
    procs = [workers(config) for _ in range(3)]

    def completed() -> int:
        return sum(w["status"] == "completed" for w in windows(db, "slow"))

    await wait_until(lambda: completed() >= 3, timeout=60, what="three completed runs")
    db("UPDATE schedules SET paused = true")  # no new window from here on
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        await proc.wait()
    rows = windows(db, "slow")
    times = [w["fire_time"] for w in rows]
    assert times == [times[0] + timedelta(seconds=i) for i in range(len(times))], \
        "a window was lost or doubled"
    skipped = [w for w in rows if w["status"] == "cancelled"]
    runs = [w for w in rows if w["status"] != "cancelled"]
    assert skipped and all(w["last_error"].startswith("skipped: ") for w in skipped)
    # Logged by the planner that decided each (one that stopped mid-pass may not have).
    assert 0 < sum(p.log().count("schedule_window_skipped") for p in procs) <= len(skipped)
    finished = [w for w in runs if w["finished_at"] is not None and w["started_at"]]
    finished.sort(key=lambda w: w["started_at"])
    for before, after in itertools.pairwise(finished):
        assert after["started_at"] >= before["finished_at"], (before, after)
    # Only the last run may still be unfinished (the stop released it to pending).
    assert all(w["finished_at"] is not None for w in runs[:-1])


async def test_planners_killed_mid_pass_neither_lose_nor_double_a_skipped_window(
        sched, db, tmp_path, pg_dsn, schema, workers):
    """Adversarial: each planner may exit after deciding a window, before writing it; the
    window must still be decided once, run or skipped, by another planner."""
    await add(sched, "slow", task="sleep", args=[1.5], every="1s", catch_up="all",
              overlap=False)
    # The injected crashes are the planner's, but a window's job running at the time is
    # blamed (it runs alone): three in a row under load failed it as a poison pill and
    # the wait below timed out (seen with 1 allowed in 2 of 3 runs). Never here.
    config = write_config(tmp_path, pg_dsn, schema, max_recoveries=1000)
    crashy = cli_env(PYTHONPATH=str(PLANNER_CRASH), PGSCHED_TEST_PLANNER_CRASH_RATE="0.3")
    procs = [workers(config, env=crashy) for _ in range(3)]
    crashes: list[list[str]] = []

    def restart_the_dead() -> bool:
        for i, proc in enumerate(procs):
            if proc.proc.poll() is not None:
                assert proc.proc.returncode == PLANNER_CRASH_EXIT_CODE, proc.log()[-2000:]
                crashes.extend(event["windows"] for event in map(json.loads, (
                    line for line in proc.log().splitlines() if "planner_crash_injected" in line)))
                procs[i] = workers(config, env=crashy)
        rows = windows(db, "slow")
        return (len(crashes) >= 3 and sum(w["status"] == "completed" for w in rows) >= 3
                and any(w["status"] == "cancelled" for w in rows))

    await wait_until(restart_the_dead, timeout=120, interval=0.1,
                     what="three injected crashes, three runs and a skipped window")
    procs.append(workers(config))  # a clean planner catches up what the crashed ones left
    await stop_all(procs[:-1])
    stopped_at = await sched.store.db_now()
    await wait_until(lambda: all(w["fire_time"] > stopped_at or w["status"] in (
        "completed", "cancelled") for w in windows(db, "slow"))
        and sched_next_fire(db, "slow") > stopped_at, timeout=60,
        what="the clean worker to decide and finish every window up to the stop")
    db("UPDATE schedules SET paused = true")
    await stop_all(procs[-1:])
    rows = [w for w in windows(db, "slow") if w["fire_time"] <= stopped_at]
    times = [w["fire_time"] for w in rows]
    assert times == [times[0] + timedelta(seconds=i) for i in range(len(times))], \
        "a window was lost or doubled"
    in_flight = {datetime.fromisoformat(w) for batch in crashes for w in batch}
    # A window planned ahead may have been in flight with its fire time after the stop:
    # the pause above withdrew it, as it should.
    assert in_flight and {t for t in in_flight if t <= stopped_at} <= set(times), \
        "a window in flight at a crash was lost"
    runs = sorted((w for w in rows if w["status"] == "completed"),
                  key=lambda w: w["started_at"])
    for before, after in itertools.pairwise(runs):
        assert after["started_at"] >= before["finished_at"], (before, after)


def sched_next_fire(db, schedule_id):
    return db("SELECT next_fire_at FROM schedules WHERE id = %s", schedule_id)[0]["next_fire_at"]
