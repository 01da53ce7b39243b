"""The schedule commands as real `python -m pgsched` processes against a real database:
`add --cron/--every`, `schedules`, `pause`, `resume`, `trigger`, `remove` and `cron`."""

from __future__ import annotations

import json
import signal
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from conftest import run_cli, wait_until, write_config
from psycopg.rows import dict_row

PERIODIC_TASKS = Path(__file__).resolve().parent / "periodic_tasks.py"


@pytest.fixture
def config(tmp_path, pg_dsn, schema, sched):  # sched: the schema is migrated
    return write_config(tmp_path, pg_dsn, schema)


def cli(config, *args):
    return run_cli(*args, config=config)


def listed(config) -> dict[str, dict]:
    result = cli(config, "schedules", "--json")
    assert result.returncode == 0, result.stderr
    return {s["id"]: s for s in json.loads(result.stdout)}


@pytest.fixture
def stored(pg_dsn, schema):
    """The schedules table as {id: row}, read straight from the database."""
    def read() -> dict[str, dict]:
        with psycopg.connect(pg_dsn, row_factory=dict_row) as conn:
            rows = conn.execute(f'SELECT s.*, j.status::text AS last_status FROM "{schema}".'
                                f'schedules s LEFT JOIN "{schema}".jobs j '
                                "ON j.id = s.last_job_id").fetchall()
        return {row["id"]: row for row in rows}

    return read


async def test_add_creates_schedules_and_schedules_lists_them(config):
    made = cli(config, "add", "noop", "--every", "15m", "--id", "cleanup")
    assert made.returncode == 0 and made.stdout == "cleanup\n", made.stderr
    made = cli(config, "add", "add", "--cron", "0 9 * * MON-FRI", "--tz", "America/New_York",
               "--id", "report", "--args", "[1, 2]", "--retries", "2", "--timeout", "300",
               "--catch-up", "skip")
    assert made.returncode == 0 and made.stdout == "report\n", made.stderr
    schedules = listed(config)
    cleanup, report = schedules["cleanup"], schedules["report"]
    assert cleanup["every"] == "15m" and cleanup["tz"] is None and cleanup["cron"] is None
    assert cleanup["state"] == "active" and cleanup["origin"] == "cli"
    assert datetime.fromisoformat(cleanup["next_fire_at"]).timestamp() % 900 == 0
    assert report["cron"] == "0 9 * * MON-FRI" and report["tz"] == "America/New_York"
    assert report["args"] == [1, 2] and report["max_retries"] == 2 and report["timeout"] == 300
    assert report["catch_up"] == "skip" and report["last_status"] is None
    local = datetime.fromisoformat(report["next_fire_at"]).astimezone(ZoneInfo("America/New_York"))
    assert (local.hour, local.minute) == (9, 0) and local.weekday() < 5
    table = cli(config, "schedules")
    assert table.returncode == 0
    assert "cron 0 9 * * MON-FRI" in table.stdout and "every 15m" in table.stdout


async def test_add_conflict_modes(config, stored):
    assert cli(config, "add", "noop", "--every", "15m", "--id", "s").returncode == 0
    again = cli(config, "add", "noop", "--every", "30m", "--id", "s")
    assert again.returncode == 1 and "already exists" in again.stderr
    kept = cli(config, "add", "noop", "--every", "30m", "--id", "s", "--on-conflict", "ignore")
    assert kept.returncode == 0 and kept.stdout == "s\n" and "left as it was" in kept.stderr
    assert stored()["s"]["every"] == timedelta(minutes=15)
    replaced = cli(config, "add", "noop", "--every", "30m", "--id", "s",
                   "--on-conflict", "replace")
    assert replaced.returncode == 0 and stored()["s"]["every"] == timedelta(minutes=30)


@pytest.mark.parametrize("args, message", [
    (["--cron", "61 * * * *", "--id", "x"], "minute field"),
    (["--cron", "0 9 * * *", "--tz", "Mars/Base", "--id", "x"], "unknown time zone"),
    (["--every", "0", "--id", "x"], "at most once a second"),
    (["--every", "-5m", "--id", "x"], "negative"),
    (["--cron", "* * * * *", "--every", "1m", "--id", "x"], "not both"),
    (["--every", "1m"], "--id"),
    (["--every", "1m", "--id", "x", "--at", "2030-01-01T00:00Z"], "--at applies to one-off"),
    (["--every", "1m", "--id", "x", "--tz", "UTC"], "cron schedules only"),
    (["--tz", "UTC", "--id", "x"], "add --cron or --every"),
    (["--every", "1m", "--id", "x", "--catch-up", "sometimes"], "catch_up"),
])
async def test_bad_schedule_input_exits_2_and_writes_nothing(config, stored, args, message):
    result = cli(config, "add", "noop", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert stored() == {}


async def test_unknown_task_is_refused(config, stored):
    result = cli(config, "add", "no_such_task", "--every", "1m", "--id", "x")
    assert result.returncode == 2 and "unknown task" in result.stderr
    assert stored() == {}


async def test_pause_resume_trigger_remove(config, stored, sched):
    assert cli(config, "add", "noop", "--every", "1h", "--id", "hourly").returncode == 0
    assert cli(config, "pause", "hourly").stdout == "hourly\n"
    assert stored()["hourly"]["paused"] is True
    assert listed(config)["hourly"]["next_fire_at"] is None  # no next fire while paused
    assert cli(config, "resume", "hourly").returncode == 0
    assert stored()["hourly"]["paused"] is False
    triggered = cli(config, "trigger", "hourly")
    assert triggered.returncode == 0 and triggered.stdout.startswith("hourly@trigger-")
    job_id = triggered.stdout.strip()
    assert (await sched.get_job(job_id))["task"] == "noop"
    assert stored()["hourly"]["last_job_id"] == job_id
    assert cli(config, "remove", "hourly").stdout == "hourly\n"
    assert stored() == {}
    for command in ("pause", "resume", "trigger", "remove"):
        result = cli(config, command, "hourly")
        assert result.returncode == 1 and "no schedule 'hourly'" in result.stderr, command
    assert [j["id"] for j in await sched.store.list_jobs()] == [job_id]


def test_cron_prints_fire_times_with_the_dst_policy():
    result = run_cli("cron", "30 1 * * *", "--tz", "America/New_York",
                     "--after", "2026-10-31T12:00", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "2026-11-01T01:30:00-04:00  EDT  2026-11-01T05:30:00Z",  # once, the first 01:30
        "2026-11-02T01:30:00-05:00  EST  2026-11-02T06:30:00Z",
    ]
    result = run_cli("cron", "30 2 * * *", "--tz", "America/New_York",
                     "--after", "2026-03-08T00:00", "--count", "1", "--json")
    assert json.loads(result.stdout) == [
        {"local": "2026-03-08T03:00:00-04:00", "zone": "EDT", "utc": "2026-03-08T07:00:00Z"}]


@pytest.mark.parametrize("args, message", [
    (["61 * * * *"], "minute field"),
    (["* * * * *", "--tz", "Nowhere/Town"], "unknown time zone"),
    (["* * * * *", "--after", "yesterday"], "invalid time"),
    (["* * * * *", "--count", "0"], "--count"),
])
def test_cron_bad_input_exits_2(args, message):
    result = run_cli("cron", *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


async def test_worker_runs_cli_and_code_schedules(tmp_path, pg_dsn, schema, sched, workers,
                                                 stored):
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(PERIODIC_TASKS))
    added = cli(config, "add", "tick", "--every", "1s", "--id", "from-cli", "--catch-up", "all")
    assert added.returncode == 0, added.stderr
    worker = workers(config)

    await wait_until(lambda: all(stored().get(s, {}).get("last_status") == "completed"
                                 for s in ("tick", "from-cli")),
                     timeout=30, what="both schedules to run")
    schedules = listed(config)
    assert schedules["tick"]["origin"] == "code" and schedules["from-cli"]["origin"] == "cli"
    assert schedules["tick"]["last_status"] == "completed" and schedules["tick"]["last_run_at"]
    redefine = cli(config, "add", "tick", "--every", "1m", "--id", "tick",
                   "--on-conflict", "replace")
    assert redefine.returncode == 1 and "defined in code" in redefine.stderr
    removed = cli(config, "remove", "tick")
    assert removed.returncode == 0 and "next worker to start creates it again" in removed.stderr
    worker.signal(signal.SIGINT)
    assert await worker.wait() == 0


async def test_a_user_job_id_in_a_window_namespace_never_takes_the_window(
        config, tmp_path, sched, workers):
    made = cli(config, "add", "noop", "--every", "2s", "--id", "m1", "--catch-up", "all")
    assert made.returncode == 0, made.stderr  # all: a slow worker start skips no window
    fire = listed(config)["m1"]["next_fire_at"]
    window = f"m1@{datetime.fromisoformat(fire).astimezone(ZoneInfo('UTC')):%Y-%m-%dT%H:%M:%SZ}"
    taken = cli(config, "add", "noop", "--id", window, "--at", "2099-01-01T00:00Z")
    assert taken.returncode == 2, taken.stdout + taken.stderr
    assert "reserved for schedule windows" in taken.stderr and "Traceback" not in taken.stderr
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"task": "noop", "id": f"m1@trigger-{'0' * 12}"}) + "\n")
    from_file = cli(config, "add", "--from", str(lines), "--strict")
    assert from_file.returncode == 2 and "reserved" in from_file.stderr, from_file.stderr
    ordinary = cli(config, "add", "noop", "--id", "alice@example.com", "--at", "2099-01-01T00:00Z")
    assert ordinary.returncode == 0, ordinary.stderr  # only the window pattern is reserved

    workers(config)
    job = await wait_until(lambda: sched.store.get_job(window), what="the window's own job")
    assert job["schedule_id"] == "m1" and job["fire_time"] is not None
