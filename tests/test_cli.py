"""The core CLI commands against a real PostgreSQL, including their bad-input paths."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import typer.main
from conftest import WORKER_TASKS, cli_env, finished_jobs, run_cli, write_config
from typer.testing import CliRunner

from pgsched.cli import app
from pgsched.cli.app import COMMAND_MODULES
from pgsched.store import migrations

LATEST = migrations()[-1][0]

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str, schema: str) -> Path:
    path = write_config(tmp_path, pg_dsn, schema)
    assert cli(path, "migrate").stdout.strip() == str(LATEST)
    return path


def cli(config: Path, *args: str, code: int = 0):
    result = runner.invoke(app, ["--config", str(config), *args], env={"PGSCHED_DSN": ""})
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def jobs(pg_dsn: str, schema: str) -> list[dict]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return conn.execute(f'SELECT * FROM "{schema}".jobs ORDER BY created_at').fetchall()


def test_migrate_is_idempotent(config):
    assert cli(config, "migrate").stdout.strip() == str(LATEST)


def test_add_prints_only_the_job_id_and_stores_the_job(config, pg_dsn, schema):
    result = cli(config, "add", "add", "--args", "[1, 2]", "--in", "1h30m", "--retries", "2",
                 "--priority", "critical", "--timeout", "5", "--misfire-grace", "none")
    job_id = result.stdout.strip()
    [job] = jobs(pg_dsn, schema)
    assert job["id"] == job_id and job["args"] == [1, 2] and job["max_retries"] == 2
    assert job["priority"] == 1 and job["timeout_seconds"] == 5
    assert job["misfire_grace_seconds"] is None
    delay = job["execution_time"] - datetime.now(UTC)
    assert timedelta(minutes=89) < delay <= timedelta(minutes=90)


def test_add_at_with_offset_and_naive_time_in_configured_zone(config, pg_dsn, schema, tmp_path):
    cli(config, "add", "noop", "--at", "2030-01-02T03:04:05+02:00", "--id", "offset")
    text = config.read_text() + '\n[jobs]\ntimezone = "America/New_York"\n'
    config.write_text(text)
    cli(config, "add", "noop", "--at", "2030-07-01 09:00", "--id", "naive")
    times = {j["id"]: j["execution_time"] for j in jobs(pg_dsn, schema)}
    assert times["offset"] == datetime(2030, 1, 2, 1, 4, 5, tzinfo=UTC)
    assert times["naive"] == datetime(2030, 7, 1, 13, 0, tzinfo=UTC)  # EDT is UTC-4


def test_add_conflict_modes(config, pg_dsn, schema):
    cli(config, "add", "add", "--args", "[1,1]", "--id", "j1", "--in", "1h")
    result = cli(config, "add", "add", "--args", "[2,2]", "--id", "j1", code=1)
    assert "already exists" in result.stderr
    ignored = cli(config, "add", "add", "--args", "[1,1]", "--id", "j1", "--on-conflict", "ignore")
    assert ignored.stdout.strip() == "j1"
    cli(config, "add", "add", "--args", "[3,3]", "--id", "j1", "--on-conflict", "replace")
    assert [j["args"] for j in jobs(pg_dsn, schema)] == [[3, 3]]


@pytest.mark.parametrize("args, message", [
    (["--args", "[1,"], "--args is not valid JSON"),
    (["--args", "[NaN]"], "NaN is not JSON"),
    (["--args", '{"a": 1}'], "--args must be an array"),
    (["--kwargs", "[1]"], "--kwargs must be an object"),
    (["--at", "yesterday-ish"], "invalid time"),
    (["--in", "5 parsecs"], "invalid duration"),
    (["--in", "5m", "--at", "2030-01-01T00:00Z"], "either --at or --in"),
    (["--misfire-grace", "-3"], "misfire"),
    (["--id", ""], "invalid job id"),
])
def test_add_bad_input_exits_2_and_writes_nothing(config, pg_dsn, schema, args, message):
    result = cli(config, "add", "noop", *args, code=2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert jobs(pg_dsn, schema) == []


@pytest.mark.parametrize("args", [["--retries", "-1"], ["--priority", "urgent"],
                                  ["--on-conflict", "merge"], ["--timeout", "0"]])
def test_add_bad_options_are_usage_errors(config, pg_dsn, schema, args):
    cli(config, "add", "noop", *args, code=2)
    assert jobs(pg_dsn, schema) == []


def test_add_unknown_task_is_rejected_when_the_module_is_importable(config, pg_dsn, schema):
    result = cli(config, "add", "no_such_task", code=2)
    assert "unknown task 'no_such_task'" in result.stderr
    assert jobs(pg_dsn, schema) == []


def test_cancel_reports_each_id(config):
    pending = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    done = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    cli(config, "cancel", done)
    result = cli(config, "cancel", pending, done, "missing", code=1)
    assert result.stdout.split() == [pending]
    assert f"job {done}: already cancelled" in result.stderr
    assert "job missing: not found" in result.stderr


def test_ls_json_has_the_documented_keys_and_filters(config):
    a = cli(config, "add", "add", "--args", "[1,2]", "--in", "1h").stdout.strip()
    b = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    cli(config, "cancel", b)
    rows = json.loads(cli(config, "ls", "--json").stdout)
    assert [r["id"] for r in rows] == [b, a]  # newest first
    assert list(rows[0]) == ["id", "task", "queue", "status", "execution_time", "priority",
                             "attempts", "failures", "recoveries", "max_retries", "args",
                             "kwargs", "result", "last_error", "created_at", "started_at",
                             "finished_at", "worker_id", "waiting_for"]
    assert datetime.fromisoformat(rows[1]["execution_time"]).tzinfo is not None
    only = json.loads(cli(config, "ls", "--json", "--status", "pending", "--task", "add").stdout)
    assert [r["id"] for r in only] == [a]
    assert a in cli(config, "ls").stdout
    assert "unknown status 'done'" in cli(config, "ls", "--status", "done", code=2).stderr


def test_vacuum_deletes_old_finished_jobs_only(config, pg_dsn, schema):
    old = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    new = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    keep = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    cli(config, "cancel", old, new)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"""UPDATE "{schema}".jobs SET finished_at = now() - interval '8 days'
                         WHERE id = %s""", [old])
    dry = json.loads(cli(config, "vacuum", "--dry-run", "--json").stdout)
    assert dry["cancelled"] == 1 and sum(dry.values()) == 1
    assert len(jobs(pg_dsn, schema)) == 3
    assert "cancelled: 1" in cli(config, "vacuum").stdout
    assert {j["id"] for j in jobs(pg_dsn, schema)} == {new, keep}
    cli(config, "vacuum", "--older-than", "0s", "--status", "cancelled")
    assert {j["id"] for j in jobs(pg_dsn, schema)} == {keep}
    assert "unknown status 'pending'" in cli(config, "vacuum", "--status", "pending",
                                               code=2).stderr


def test_vacuum_leaves_a_table_another_vacuum_holds_to_autovacuum_in_one_line(
        config, pg_dsn, schema):
    from pgsched.cli.operate import RECLAIM_AFTER_ROWS

    finished_jobs(pg_dsn, schema, RECLAIM_AFTER_ROWS, "held-")
    with psycopg.connect(pg_dsn) as holder:  # what a running VACUUM or migration holds
        holder.execute(f'LOCK TABLE "{schema}".jobs IN SHARE UPDATE EXCLUSIVE MODE')
        done = cli(config, "vacuum", "--older-than", "1h")
    assert done.stdout.splitlines()[0] == f"completed: {RECLAIM_AFTER_ROWS}"
    said = done.stderr.strip().splitlines()
    assert said[-1].startswith("jobs table not vacuumed (canceling statement due to lock "
                               "timeout)"), said
    assert jobs(pg_dsn, schema) == []


def test_add_behind_a_row_another_session_holds_says_so_not_unreachable(
        config, pg_dsn, schema):
    """A lock_timeout is no unreachable database: the line must say what held the command
    up and what to do, and exit 1 with nothing written."""
    parent = cli(config, "add", "noop", "--in", "1h").stdout.strip()
    with psycopg.connect(pg_dsn) as holder:  # an operator's session, or a long transaction
        holder.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE', [parent])
        said = cli(config, "add", "noop", "--depends-on", parent, code=1).stderr.strip()
    assert len(said.splitlines()) == 1, said
    assert "unreachable" not in said and "another session" in said, said
    assert [j["id"] for j in jobs(pg_dsn, schema)] == [parent]


def test_config_errors_are_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope.toml"
    result = runner.invoke(app, ["--config", str(missing), "ls"])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[worker\nconcurrency = 1\n")
    result = runner.invoke(app, ["--config", str(broken), "ls"])
    assert result.exit_code == 2 and "broken.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_without_task_module_is_a_config_error(tmp_path, pg_dsn, schema):
    path = write_config(tmp_path, pg_dsn, schema)
    path.write_text(path.read_text().replace(f'tasks = "{WORKER_TASKS}"\n', ""))
    result = runner.invoke(app, ["--config", str(path), "worker"])
    assert result.exit_code == 2 and "no task module configured" in result.stderr


def test_unreachable_database_exit_1_without_password(tmp_path):
    dsn = "postgresql://app:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=2"
    result = run_cli("--dsn", dsn, "ls", env={**os.environ, "PGSCHED_CONFIG": ""})
    assert result.returncode == 1, result.stderr
    warning, error = result.stderr.splitlines()  # the password in --dsn is warned about
    assert "--dsn carries a password" in warning and error.startswith("error: ")
    assert "s3cret-pw" not in result.stderr
    assert "Traceback" not in result.stderr


# What `pgsched ls` has no use for: the pool and the worker, the scheduler and the operator
# read models with what they import, and every other command's module.
NOT_FOR_LS = ("psycopg_pool", "pgsched.worker", "pgsched.scheduler", "pgsched.ops",
              "pgsched.recurring", "pgsched.timing", "pgsched.cli.operate",
              "pgsched.cli.schedules", "pgsched.cli.queues", "pgsched.cli.top",
              "pgsched.cli.web", "pgsched.cli.views", "rich")


def test_ls_reads_over_one_connection_and_loads_nothing_else(config):
    """`ls` (a read command) makes one plain connection and imports only its own command:
    what it does not use (NOT_FOR_LS) is never imported, so it never costs start-up time."""
    job_id = cli(config, "add", "noop").stdout.strip()
    report = ("import atexit, sys; atexit.register(lambda: print('loaded:', *sorted("
              f"m for m in {NOT_FOR_LS!r} if m in sys.modules), "
              "file=sys.stderr)); from pgsched.cli import main; main()")
    result = subprocess.run(
        [sys.executable, "-c", report, "--config", str(config), "ls", "--json"],
        capture_output=True, text=True, env=cli_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert [row["id"] for row in json.loads(result.stdout)] == [job_id]
    assert result.stderr.splitlines()[-1] == "loaded:"


def test_every_command_is_in_the_table_of_lazily_loaded_commands():
    """app.py imports a command's module when the command is used, by COMMAND_MODULES: a
    command missing there, or listed under the wrong module, would vanish from pgsched."""
    for module in set(COMMAND_MODULES.values()):
        importlib.import_module(f"pgsched.cli.{module}")
    registered = {info.name or typer.main.get_command_name(info.callback.__name__):
                  info.callback.__module__ for info in app.registered_commands}
    for group in app.registered_groups:  # `pgsched queue limit`: the group's commands' module
        modules = {info.callback.__module__ for info in group.typer_instance.registered_commands}
        assert len(modules) == 1, (group.name, modules)
        registered[group.name] = modules.pop()
    assert registered == {name: f"pgsched.cli.{module}"
                          for name, module in COMMAND_MODULES.items()}


def test_python_dash_m_and_usage_errors_exit_2():
    assert run_cli("--help").returncode == 0
    assert run_cli("add").returncode == 2
    assert run_cli("no-such-command").returncode == 2
