"""The CLI's rough edges found by trying it as a new user (issue 10), one test each, and
its output never letting text from the database drive the terminal (issue 15 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from conftest import write_config
from typer.testing import CliRunner

from pgsched.cli import app

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path, pg_dsn: str, schema: str) -> Path:
    path = write_config(tmp_path, pg_dsn, schema)
    cli(path, "migrate")
    return path


def cli(config: Path | None, *args: str, code: int = 0):
    head = ["--config", str(config)] if config is not None else []
    result = runner.invoke(app, [*head, *args], env={"PGSCHED_DSN": ""})
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def sql(pg_dsn: str, query: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(query)


def test_global_options_work_after_the_command_too(config, tmp_path):
    job = cli(None, "add", "noop", "--config", str(config)).stdout.strip()
    listed = json.loads(cli(None, "ls", "--json", "--config", str(config)).stdout)
    assert [r["id"] for r in listed] == [job]
    # The later one wins: a wrong file before the command, the right one after it.
    missing = tmp_path / "missing.toml"
    again = cli(None, "--config", str(missing), "ls", "-c", str(config), "--json")
    assert [r["id"] for r in json.loads(again.stdout)] == [job]
    empty = cli(None, "ls", "--config", str(config), "--schema", "other_schema", code=1)
    assert "schema" in empty.stderr


@pytest.mark.parametrize("args, says", [
    (["add", "noop", "--priority", "high"], "--priority: 'high' is not a priority"),
    (["add", "noop", "--priority", "10"], "--priority: '10' is not a priority"),
    (["add", "noop", "--retries", "-1"], "--retries: -1 is not in the range"),
    (["ls", "--limit", "0"], "--limit: 0 is not in the range"),
    (["ls", "--nope"], "no such option: --nope"),
    (["show"], "missing argument 'JOB_ID'"),
    (["frobnicate"], "no such command 'frobnicate'"),
])
def test_usage_errors_are_one_line_on_stderr_with_exit_2(config, args, says):
    result = cli(config, *args, code=2)
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and says in line and "--help" in line
    assert "Input should" not in line and "╭" not in line


def test_version_flag_prints_the_version():
    from pgsched import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"{__version__}\n"


def test_ls_shows_attempts_and_failures_a_reader_understands(config, pg_dsn, schema):
    # After a retry the old row read `2/1`: two attempts "of" one allowed.
    job = cli(config, "add", "noop", "--retries", "0").stdout.strip()
    sql(pg_dsn, f"""UPDATE "{schema}".jobs SET status = 'failed', attempts = 2, failures = 0,
                    recoveries = 1, last_error = 'boom' WHERE id = '{job}'""")
    [row] = json.loads(cli(config, "ls", "--json").stdout)
    assert (row["attempts"], row["failures"], row["recoveries"]) == (2, 0, 1)
    lines = cli(config, "ls").stdout.splitlines()
    header = lines[0].split()
    assert header[6:8] == ["attempts", "failures"]
    assert lines[1].split()[6:8] == ["2", "0/1"]


def test_show_counts_failed_attempts_and_the_retry_budget_apart(config, pg_dsn, schema):
    job = cli(config, "add", "noop", "--retries", "1").stdout.strip()
    history = json.dumps([{"attempt": 1, "outcome": "failed", "error": "boom",
                           "at": "2026-01-01T00:00:01+00:00"}])
    # What `pgsched retry` leaves: the failed attempt in history, the budget reset.
    sql(pg_dsn, f"""UPDATE "{schema}".jobs SET attempts = 1, failures = 0,
                    errors = '{history}'::jsonb WHERE id = '{job}'""")
    shown = cli(config, "show", job).stdout
    assert "1 (1 failed, 0 recovered after a lost lease)" in shown
    assert "0 of 2 allowed (counted since the last retry)" in shown


def test_ls_filters_by_queue_and_json_names_it(config):
    a = cli(config, "add", "noop", "--queue", "mail").stdout.strip()
    cli(config, "add", "noop")
    rows = json.loads(cli(config, "ls", "--json", "--queue", "mail").stdout)
    assert [(r["id"], r["queue"]) for r in rows] == [(a, "mail")]
    assert "queue name" in cli(config, "ls", "--queue", "bad name", code=2).stderr


def test_queues_shows_no_lag_when_nothing_is_due(config):
    cli(config, "add", "noop", "--in", "1h")
    lines = cli(config, "queues").stdout.splitlines()
    assert lines[0].split()[5] == "lag" and lines[1].split()[5] == "-"
    [row] = json.loads(cli(config, "queues", "--json").stdout)
    assert row["lag_seconds"] is None


def test_tables_have_no_trailing_spaces_and_align_wide_ids(config):
    cli(config, "add", "noop", "--id", "作業-1")
    cli(config, "add", "noop", "--id", "plain-2")
    lines = cli(config, "ls").stdout.splitlines()
    assert all(line == line.rstrip() for line in lines)
    # The task column starts at the same terminal column on every line.
    from pgsched.cli.app import width

    starts = {width(line[:line.index("noop")]) for line in lines[1:]}
    assert len(starts) == 1


HOSTILE = ("\x1b]8;;https://evil.example/\x1b\\click me\x1b]8;;\x1b\\"  # OSC 8 hyperlink
           "\x1b[2K\rall good\x9b31m\x7f")  # erase line, return, C1 CSI, DEL


def test_text_from_the_database_cannot_drive_the_terminal(config, pg_dsn, schema):
    job = cli(config, "add", "noop", "--id", "hostile").stdout.strip()
    history = json.dumps([{"attempt": 1, "outcome": "failed", "error": HOSTILE,
                           "traceback": f"Traceback\n  line\nRuntimeError: {HOSTILE}",
                           "at": "2026-01-01T00:00:01+00:00"}])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"""UPDATE "{schema}".jobs SET status = 'failed', attempts = 1,
                         last_error = %s, errors = %s::jsonb, task = %s WHERE id = %s""",
                     [HOSTILE, history, "noop", job])
    outputs = {
        "ls": cli(config, "ls").stdout,
        "show": cli(config, "show", job).stdout,
        "show --json": cli(config, "show", job, "--json").stdout,
        "ls --json": cli(config, "ls", "--json").stdout,
        "top": cli(config, "top").stdout,
        "status": cli(config, "status").stdout,
    }
    for name, text in outputs.items():
        raw = [c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) <= 0x9f]
        assert raw == [], f"{name} printed control characters {raw!r}"
    assert "\\x1b]8;;https://evil.example/" in outputs["ls"]
    assert "\\x1b[2K" in outputs["show"] and "\\x9b31m" in outputs["show"]
    # A traceback keeps its lines; only the control characters in them are escaped.
    assert "\n  line\n" in outputs["show"]
    assert json.loads(outputs["show --json"])["last_error"] == HOSTILE


def test_ids_with_control_characters_are_escaped_in_errors(config):
    result = cli(config, "show", "nope\x1b[2Kx", code=1)
    assert "\x1b" not in result.stderr and "nope\\x1b[2Kx" in result.stderr


def test_init_into_a_missing_directory_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["init", "sub/"])
    assert result.exit_code == 2 and "directory sub does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []  # not a file called `sub`
    (tmp_path / "sub").mkdir()
    made = runner.invoke(app, ["init", "sub/"])
    assert made.exit_code == 0 and (tmp_path / "sub" / "pgsched.toml").is_file()


def test_every_command_warns_of_a_password_others_can_read(tmp_path):
    path = tmp_path / "pgsched.toml"
    path.write_text('[database]\ndsn = "postgresql://app:s3cret@localhost:1/db"\n')
    path.chmod(0o644)
    for args in (["config"], ["cron", "* * * * *", "--count", "1"], ["ls"]):
        result = runner.invoke(app, ["--config", str(path), *args], env={"PGSCHED_DSN": ""})
        assert "readable by other users" in result.stderr, args
        assert "s3cret" not in result.stderr + result.stdout, args


def test_config_dsn_prints_the_dsn_commands_use_with_the_password_masked(tmp_path, pg_dsn):
    path = tmp_path / "pgsched.toml"
    path.write_text('[database]\ndsn = "postgresql://app:s3cret@db.example:5433/jobs"\n')
    path.chmod(0o600)
    masked = cli(path, "config", "--dsn").stdout.strip()
    assert masked.startswith("postgresql://app:") and "s3cret" not in masked
    shown = cli(path, "config", "--dsn", "--show-password").stdout.strip()
    assert shown == "postgresql://app:s3cret@db.example:5433/jobs"
    cli(path, "config", "--show-password", code=2)
    # With no DSN anywhere and no embedded server running: one line, nothing created.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pgsched.toml").write_text('[database]\ndata_dir = "pg"\n')
    none = cli(empty / "pgsched.toml", "config", "--dsn", code=1)
    assert none.stderr.startswith("error: no database configured")
    assert list(empty.iterdir()) == [empty / "pgsched.toml"]


def test_pausing_a_paused_schedule_says_so(config):
    cli(config, "add", "noop", "--every", "1h", "--id", "hourly")
    first = cli(config, "pause", "hourly")
    assert first.stdout == "hourly\n" and "already" not in first.stderr
    again = cli(config, "pause", "hourly")
    assert again.stdout == "hourly\n" and "schedule hourly: was already paused" in again.stderr
    cli(config, "resume", "hourly")
    assert "was not paused" in cli(config, "resume", "hourly").stderr


def test_cancel_with_a_misspelt_task_is_refused(config):
    cli(config, "add", "noop")
    result = cli(config, "cancel", "--task", "nop", code=2)
    assert "unknown task 'nop'" in result.stderr
    assert json.loads(cli(config, "ls", "--json").stdout)[0]["status"] == "pending"


def test_a_schema_not_set_up_is_named_in_the_error(config):
    result = cli(config, "--schema", "other_schema", "ls", code=1)
    [line] = result.stderr.splitlines()
    assert "schema other_schema is not set up" in line and "pgsched schema" not in line


@pytest.mark.parametrize("job_id", [" padded", "padded ", "tab\there", "del\x7f"])
def test_job_ids_with_outer_spaces_or_controls_are_refused(config, job_id):
    result = cli(config, "add", "noop", "--id", job_id, code=2)
    assert "invalid job id" in result.stderr
    assert json.loads(cli(config, "ls", "--json").stdout) == []


def test_a_retry_budget_past_the_column_is_refused_not_a_traceback(config):
    # Found by the fuzz test: 2147483648 reached the integer column and raised from psycopg.
    result = cli(config, "add", "noop", "--retries", "2147483648", code=2)
    assert "invalid max_retries" in result.stderr and "Traceback" not in result.stderr


def test_add_at_a_time_past_the_misfire_grace_is_refused_with_a_hint(config):
    result = cli(config, "add", "noop", "--at", "2020-01-01T00:00:00Z", code=2)
    [line] = result.stderr.splitlines()
    assert "beyond the misfire grace" in line and "--misfire-grace none" in line
    assert json.loads(cli(config, "ls", "--json").stdout) == []
    kept = cli(config, "add", "noop", "--at", "2020-01-01T00:00:00Z", "--misfire-grace", "none")
    assert json.loads(cli(config, "ls", "--json").stdout)[0]["id"] == kept.stdout.strip()


def test_add_checks_arguments_against_the_tasks_signature(config, tmp_path):
    # tests/worker_tasks.py: add(a, b) is importable through [worker] tasks.
    bad = cli(config, "add", "add", "--args", "[1]", code=2)
    assert "arguments do not fit task add" in bad.stderr
    cli(config, "add", "add", "--kwargs", '{"c": 1}', "--args", "[1, 2]", code=2)
    lines = tmp_path / "jobs.jsonl"
    lines.write_text('{"task": "add", "args": [1, 2]}\n{"task": "add", "args": [1, 2, 3]}\n')
    mixed = cli(config, "add", "--from", str(lines), code=2)
    assert len(mixed.stdout.split()) == 1 and "line 2: arguments do not fit" in mixed.stderr
    cli(config, "add", "add", "--args", "[1, 2]")
    assert len(json.loads(cli(config, "ls", "--json").stdout)) == 2


async def test_schedule_given_a_function_checks_its_arguments(sched):
    from pgsched import InvalidInput, task

    @task(name="greet_checked")
    def greet(name: str, *, loud: bool = False) -> str:
        return name

    with pytest.raises(InvalidInput, match="arguments do not fit task greet_checked"):
        await sched.schedule(greet, args=["a", "b"])
    with pytest.raises(InvalidInput, match="unexpected keyword argument 'shout'"):
        await sched.schedule(greet, args=["a"], kwargs={"shout": True})
    assert await sched.store.list_jobs() == []
    await sched.schedule(greet, args=["a"], kwargs={"loud": True})


async def test_schedule_given_a_function_and_positional_arguments_alone_schedules(sched):
    """args without kwargs (kwargs=None, the default): check_arguments unpacked None and
    refused every such call as "arguments do not fit"."""
    from pgsched import task

    @task(name="greet_positional")
    def greet(name: str) -> str:
        return name

    job_id = await sched.schedule(greet, args=["a"])
    assert (await sched.get_job(job_id))["args"] == ["a"]


def test_top_piped_prints_one_snapshot_without_the_key_hint(config):
    shown = cli(config, "top").stdout
    assert shown.startswith("pgsched top · schema ") and "q quits" not in shown
