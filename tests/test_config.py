"""Tests for pgsched.config: defaults, validation messages, precedence, paths, masking.

Owns the contract that every config problem becomes a one-line ConfigError naming the
file, key and value, and that pgsched.toml.example never drifts from the defaults. Needs
no database; every file lives in tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgsched.config import (
    DatabaseSettings,
    JobSettings,
    LogSettings,
    MetricsSettings,
    QueueSettings,
    Settings,
    VacuumSettings,
    WebSettings,
    WorkerSettings,
    find_config_path,
    load_settings,
    mask_dsn,
    settings_to_toml,
)
from pgsched.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "pgsched.toml.example"
SECTIONS = {
    "database": DatabaseSettings,
    "worker": WorkerSettings,
    "jobs": JobSettings,
    "vacuum": VacuumSettings,
    "log": LogSettings,
    "metrics": MetricsSettings,
    "web": WebSettings,
}
PASSWORD_DSN = "postgresql://app:s3cret@db.internal:5432/jobs"


def write(directory: Path, text: str, name: str = "pgsched.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def load(path: Path | None = None, **kwargs) -> Settings:
    kwargs.setdefault("env", {})
    return load_settings(path, **kwargs)


def error_for(path: Path | None = None, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, **kwargs)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert caught.value.exit_code == 2
    return message


# ---------------------------------------------------------------- defaults and example


def test_no_file_gives_the_dataclass_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = load()
    assert got.database == DatabaseSettings(data_dir=tmp_path / ".pgsched")
    assert got.worker == WorkerSettings()
    assert got.jobs == JobSettings()
    assert got.vacuum == VacuumSettings()
    assert got.log == LogSettings()
    assert (got.path, got.base_dir, got.warnings) == (None, tmp_path, ())


def test_example_is_the_defaults_except_tasks(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    example, defaults = load(EXAMPLE), load()
    assert example.database == defaults.database
    assert example.worker == dataclasses.replace(defaults.worker, tasks="examples.tasks")
    for name in ("jobs", "vacuum", "log", "metrics", "web", "queues"):
        assert getattr(example, name) == getattr(defaults, name)
    assert example.warnings == ()


def test_example_documents_every_field_in_order():
    keys: dict[str, list[str]] = {}
    section = None
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        # The [queues.NAME] example is commented out; its keys are checked like a section's.
        header = re.fullmatch(r"\[(\w+)\]|#\s*\[(queues)\.\w+\]", line)
        if header:
            section = header[1] or header[2]
            keys[section] = []
        key = re.match(r"#?\s*(\w+)\s*=", line)
        if key and section:
            keys[section].append(key[1])
    assert list(keys) == [*SECTIONS, "queues"]
    for name, cls in {**SECTIONS, "queues": QueueSettings}.items():
        assert keys[name] == [f.name for f in dataclasses.fields(cls)], name


def test_example_mentions_embedded_postgres_next_to_the_commented_dsn():
    text = EXAMPLE.read_text(encoding="utf-8")
    assert re.search(r"^# dsn = ", text, re.MULTILINE)
    assert "pip install 'pgsched[embedded]'" in text


def test_a_full_file_is_read_and_converted(tmp_path):
    path = write(
        tmp_path,
        textwrap.dedent("""
        [database]
        dsn = "host=db dbname=jobs"
        schema = "Sched_2"
        data_dir = "/var/lib/pgsched"
        pool_size = 2
        [worker]
        tasks = "myapp.jobs.tasks"
        concurrency = 10000
        lease_seconds = 30
        heartbeat_seconds = 2.5
        shutdown_grace_seconds = 0
        poll_seconds = 1
        retry_base_seconds = 2
        retry_max_seconds = 2
        max_recoveries = 1
        [jobs]
        timezone = "Europe/Berlin"
        misfire_grace_seconds = "None"
        [vacuum]
        enabled = false
        interval_seconds = 60
        retention_days = 0
        failed_retention_days = 0.5
        batch_size = 1
        [log]
        level = "WARNING"
        format = "Json"
    """),
    )
    got = load(path)
    assert got.database == DatabaseSettings(
        "host=db dbname=jobs", "Sched_2", Path("/var/lib/pgsched"), 2
    )
    assert got.worker == WorkerSettings("myapp.jobs.tasks", 10000, 30.0, 2.5, 0.0, 1.0, 2.0, 2.0, 1)
    assert isinstance(got.worker.lease_seconds, float)
    assert got.jobs == JobSettings("Europe/Berlin", None)
    assert got.vacuum == VacuumSettings(False, 60.0, 0.0, 0.5, 1)
    assert got.log == LogSettings("warning", "json")
    assert got.path == path and got.base_dir == tmp_path


# ---------------------------------------------------------------- bad values

# (section, key, TOML literal, how the message shows it, expected reason)
BAD_VALUES = [
    ("database", "dsn", "5", "5", "must be a PostgreSQL connection string"),
    ("database", "dsn", '"  "', '"  "', "remove the key to use the embedded one"),
    ("database", "schema", '"x; drop table jobs"', '"x; drop table jobs"', "must be a letter"),
    ("database", "schema", '"1abc"', '"1abc"', "must be a letter"),
    ("database", "schema", '"' + "a" * 64 + '"', '"' + "a" * 64 + '"', "up to 62"),
    ("database", "schema", '"pgsched\\n"', '"pgsched\\n"', "must be a letter"),
    ("database", "schema", '"pg_jobs"', '"pg_jobs"', 'must not start with "pg_"'),
    ("database", "schema", "true", "true", "must be a letter"),
    ("database", "data_dir", '""', '""', "must be a directory path"),
    ("database", "data_dir", "[1]", "[1]", "must be a directory path"),
    ("database", "pool_size", "1", "1", "must be an integer >= 2"),
    ("database", "pool_size", "4.0", "4.0", "must be an integer >= 2"),
    ("database", "pool_size", "true", "true", "must be an integer >= 2"),
    ("database", "prepare_threshold", "-1", "-1", 'must be an integer >= 0'),
    ("database", "prepare_threshold", '"never"', '"never"', 'or "none" (never prepare'),
    ("database", "prepare_threshold", "false", "false", "must be an integer >= 0"),
    ("database", "listen_dsn", '""', '""', "must be a PostgreSQL connection string"),
    ("worker", "tasks", '""', '""', "must be a dotted module name"),
    ("worker", "tasks", '"my-app.tasks"', '"my-app.tasks"', "must be a dotted module name"),
    ("worker", "tasks", '"src/tasks.txt"', '"src/tasks.txt"', "path to a .py file"),
    ("worker", "tasks", "7", "7", "must be a dotted module name"),
    ("worker", "concurrency", "0", "0", "must be an integer >= 1"),
    ("worker", "concurrency", "10001", "10001", "must be at most 10000"),
    ("worker", "concurrency", '"25"', '"25"', "must be an integer >= 1"),
    ("worker", "concurrency", "true", "true", "must be an integer >= 1"),
    ("worker", "concurrency", "2.5", "2.5", "must be an integer >= 1"),
    ("worker", "lease_seconds", "0", "0", "must be a number > 0"),
    ("worker", "lease_seconds", "true", "true", "must be a number > 0"),
    ("worker", "lease_seconds", "inf", "inf", "must be a finite number > 0"),
    ("worker", "lease_seconds", "nan", "nan", "must be a finite number > 0"),
    ("worker", "lease_seconds", "1" + "0" * 400, "1" + "0" * 76 + "...", "must be at most"),
    ("worker", "heartbeat_seconds", "-1", "-1", "must be a number > 0"),
    ("worker", "heartbeat_seconds", '"10s"', '"10s"', "must be a number > 0"),
    ("worker", "shutdown_grace_seconds", "-0.5", "-0.5", "must be a number >= 0"),
    ("worker", "shutdown_grace_seconds", "false", "false", "must be a number >= 0"),
    ("worker", "poll_seconds", "0.0", "0.0", "must be a number > 0"),
    ("worker", "poll_seconds", "[5]", "[5]", "must be a number > 0"),
    ("worker", "retry_base_seconds", "0", "0", "must be a number > 0"),
    ("worker", "retry_base_seconds", "1979-05-27", "1979-05-27", "must be a number > 0"),
    ("worker", "retry_max_seconds", "-inf", "-inf", "must be a finite number > 0"),
    ("worker", "retry_max_seconds", "{a = 1}", "{a = 1}", "must be a number > 0"),
    ("worker", "max_recoveries", "0", "0", "must be an integer >= 1"),
    ("worker", "max_recoveries", "3000000000", "3000000000", "must be at most 2147483647"),
    ("worker", "max_recoveries", "1.0", "1.0", "must be an integer >= 1"),
    ("jobs", "timezone", '"Mars/Olympus"', '"Mars/Olympus"', "must be an IANA time zone"),
    ("jobs", "timezone", '"../../etc/passwd"', '"../../etc/passwd"', "IANA time zone"),
    ("jobs", "timezone", '""', '""', "IANA time zone"),
    ("jobs", "timezone", "0", "0", "IANA time zone"),
    ("jobs", "misfire_grace_seconds", "0", "0", 'must be a number > 0 or "none"'),
    ("jobs", "misfire_grace_seconds", '"never"', '"never"', 'must be a number > 0 or "none"'),
    ("jobs", "misfire_grace_seconds", "false", "false", 'or "none"'),
    ("vacuum", "enabled", '"yes"', '"yes"', "must be true or false"),
    ("vacuum", "enabled", "1", "1", "must be true or false"),
    ("vacuum", "interval_seconds", "0", "0", "must be a number > 0"),
    ("vacuum", "interval_seconds", "1e12", "1000000000000.0", "must be at most 3155760000"),
    ("vacuum", "retention_days", "-1", "-1", "must be a number >= 0"),
    ("vacuum", "retention_days", "1e6", "1000000.0", "must be at most 36525"),
    ("vacuum", "failed_retention_days", "-0.1", "-0.1", "must be a number >= 0"),
    ("vacuum", "failed_retention_days", '"30"', '"30"', "must be a number >= 0"),
    ("vacuum", "batch_size", "0", "0", "must be an integer >= 1"),
    ("vacuum", "batch_size", "false", "false", "must be an integer >= 1"),
    ("log", "level", '"warn"', '"warn"', 'did you mean "warning"?'),
    ("log", "level", '"verbose"', '"verbose"', "must be one of debug, info, warning, error"),
    ("log", "level", "10", "10", "must be one of debug, info, warning, error"),
    ("log", "format", '"text"', '"text"', "must be one of auto, console, json"),
    ("log", "format", "true", "true", "must be one of auto, console, json"),
    ("worker", "queues", '"emails"', '"emails"', "must be a list of queue names"),
    ("worker", "queues", '["a b"]', '["a b"]', "invalid queue name 'a b'"),
    ("worker", "queues", "[1]", "[1]", "must be a list of queue names"),
    ("metrics", "listen", '"9464"', '"9464"', 'must be "host:port"'),
    ("metrics", "listen", '"localhost:http"', '"localhost:http"', 'must be "host:port"'),
    ("metrics", "listen", '"127.0.0.1:70000"', '"127.0.0.1:70000"', 'must be "host:port"'),
    ("metrics", "listen", "9464", "9464", 'must be "host:port"'),
    ("web", "listen", '"8787"', '"8787"', 'must be "host:port"'),
    ("web", "token", '"short"', '"short"', "at least 16 printable"),
    ("web", "read_token", '"has spaces in it ok"', '"has spaces in it ok"', "without spaces"),
    ("web", "root_path", '"scheduler"', '"scheduler"', 'URL path like "/scheduler"'),
]


@pytest.mark.parametrize(("section", "key", "literal", "shown", "reason"), BAD_VALUES)
def test_bad_value_names_file_key_and_value(tmp_path, section, key, literal, shown, reason):
    path = write(tmp_path, f"[{section}]\n{key} = {literal}\n")
    message = error_for(path)
    assert message.startswith(f"{path}: [{section}] {key} = {shown}: "), message
    assert reason in message


def test_every_field_has_a_bad_value_case():
    covered = {(section, key) for section, key, *_ in BAD_VALUES}
    for name, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert (name, field.name) in covered, (name, field.name)


def test_the_briefs_example_message_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[worker]\nconcurrency = 0\n")
    assert error_for(Path("pgsched.toml")) == (
        "pgsched.toml: [worker] concurrency = 0: must be an integer >= 1"
    )


def test_heartbeat_must_be_below_lease(tmp_path):
    path = write(tmp_path, "[worker]\nlease_seconds = 10\nheartbeat_seconds = 10\n")
    assert error_for(path) == (
        f"{path}: [worker] heartbeat_seconds = 10: must be less than lease_seconds (10); "
        "a worker must renew its lease before the lease expires"
    )


def test_a_short_lease_alone_is_blamed_on_the_lease(tmp_path):
    path = write(tmp_path, "[worker]\nlease_seconds = 5\n")
    message = error_for(path)
    assert message.startswith(f"{path}: [worker] lease_seconds = 5: must be greater than ")
    assert "heartbeat_seconds (10)" in message


def test_retry_max_must_not_be_below_retry_base(tmp_path):
    path = write(tmp_path, "[worker]\nretry_base_seconds = 10\nretry_max_seconds = 9.5\n")
    message = error_for(path)
    assert message.startswith(
        f"{path}: [worker] retry_max_seconds = 9.5: must be at least retry_base_seconds (10)"
    )


# ---------------------------------------------------------------- unknown names


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "[worker]\nconcurency = 4\n")
    assert error_for(path) == (
        f"{path}: [worker] concurency = 4: unknown key; did you mean concurrency?"
    )


def test_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path):
    path = write(tmp_path, "[log]\nzzz = 1\n")
    assert error_for(path) == f"{path}: [log] zzz = 1: unknown key; [log] accepts level, format"


def test_key_in_the_wrong_table_says_where_it_belongs(tmp_path):
    path = write(tmp_path, '[worker]\ntimezone = "UTC"\n')
    assert error_for(path).endswith("unknown key; it belongs in [jobs]")


def test_unknown_table_suggests_the_closest(tmp_path):
    path = write(tmp_path, "[wroker]\nconcurrency = 4\n")
    assert error_for(path) == f"{path}: unknown table [wroker]; did you mean [worker]?"


def test_unknown_table_without_a_close_match_lists_the_tables(tmp_path):
    path = write(tmp_path, "[zzz]\n")
    assert error_for(path) == (
        f"{path}: unknown table [zzz]; the tables are [database], [worker], [jobs], [vacuum], "
        "[log], [metrics], [web], [queues.NAME]"
    )


def test_key_outside_any_table_says_which_table(tmp_path):
    path = write(tmp_path, "concurrency = 4\n")
    assert (
        error_for(path) == f"{path}: concurrency = 4: unknown top-level key; move it under [worker]"
    )


def test_nested_table_is_an_unknown_key(tmp_path):
    path = write(tmp_path, "[worker.extra]\na = 1\n")
    assert error_for(path).startswith(f"{path}: [worker] extra = {{a = 1}}: unknown key")


def test_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, "worker = 3\n")
    assert error_for(path).startswith(f"{path}: worker = 3: must be a table")


def test_odd_key_names_are_quoted_on_one_line(tmp_path):
    path = write(tmp_path, '[log]\n"le\\nvel" = 1\n')
    assert error_for(path).startswith(f'{path}: [log] "le\\nvel" = 1: unknown key')


def test_a_password_in_a_misspelled_key_is_masked(tmp_path):
    path = write(tmp_path, f'[database]\ndns = "{PASSWORD_DSN}"\n')
    message = error_for(path)
    assert "s3cret" not in message
    assert "app:***@db.internal" in message and "did you mean dsn?" in message


# ---------------------------------------------------------------- files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert error_for(path) == (
        f"config file {path} does not exist; create it with `pgsched init` or pass --config"
    )


def test_directory_instead_of_a_file(tmp_path):
    assert "is a directory" in error_for(tmp_path)


def test_parse_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "[worker]\nconcurrency = \n")
    message = error_for(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2, column 15" in message


def test_not_utf8(tmp_path):
    path = tmp_path / "pgsched.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    assert error_for(path) == f"{path}: line 2 is not valid UTF-8; save the file as UTF-8"


def test_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "pgsched.toml"
    path.write_bytes(b'\xef\xbb\xbf[log]\nlevel = "debug"\n')
    assert load(path).log.level == "debug"


def test_deep_nesting_is_a_config_error(tmp_path):
    path = write(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in error_for(path)


def test_huge_integer_literal_is_a_config_error(tmp_path):
    path = write(tmp_path, "[worker]\nconcurrency = " + "9" * 5000 + "\n")
    assert error_for(path).startswith(f"{path}: invalid TOML: ")


def test_find_config_path_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config_path(None, env={}) is None
    local = write(tmp_path, "")
    from_env = write(tmp_path, "", name="env.toml")
    explicit = write(tmp_path, "", name="explicit.toml")
    assert find_config_path(None, env={}) == Path("pgsched.toml")
    assert find_config_path(None, env={"PGSCHED_CONFIG": ""}) == Path("pgsched.toml")
    assert find_config_path(None, env={"PGSCHED_CONFIG": str(from_env)}) == from_env
    assert find_config_path(str(explicit), env={"PGSCHED_CONFIG": str(from_env)}) == explicit
    assert local.exists()


def test_find_config_path_rejects_missing_explicit_or_env_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"does not exist; create it with `pgsched init`"):
        find_config_path(missing, env={})
    with pytest.raises(ConfigError, match=r"\(named by PGSCHED_CONFIG\) does not exist"):
        find_config_path(None, env={"PGSCHED_CONFIG": str(missing)})


# ---------------------------------------------------------------- precedence and overrides


def test_dsn_precedence_override_then_env_then_file(tmp_path):
    path = write(tmp_path, '[database]\ndsn = "host=file"\n')
    env = {"PGSCHED_DSN": "host=env"}
    assert load(path).database.dsn == "host=file"
    assert load(path, env=env).database.dsn == "host=env"
    assert load(path, env={"PGSCHED_DSN": ""}).database.dsn == "host=file"
    got = load(path, env=env, overrides={"database.dsn": "host=flag"})
    assert got.database.dsn == "host=flag"
    assert load(None, env=env).database.dsn == "host=env"


def test_overrides_replace_file_values_and_none_means_not_given(tmp_path):
    path = write(tmp_path, "[worker]\nconcurrency = 7\npoll_seconds = 2\n")
    got = load(path, overrides={"worker.concurrency": 4, "worker.poll_seconds": None})
    assert (got.worker.concurrency, got.worker.poll_seconds) == (4, 2.0)


def test_bad_override_value():
    assert error_for(overrides={"worker.concurrency": 0}) == (
        "override worker.concurrency = 0: must be an integer >= 1"
    )


def test_unknown_override_suggests_the_closest():
    assert error_for(overrides={"worker.concurency": 3}) == (
        "override worker.concurency: unknown setting; did you mean worker.concurrency?"
    )


def test_override_can_break_a_relation_with_the_file(tmp_path):
    path = write(tmp_path, "[worker]\nheartbeat_seconds = 20\n")
    message = error_for(path, overrides={"worker.lease_seconds": 15})
    assert message.startswith(f"{path}: [worker] heartbeat_seconds = 20: must be less than")


# ---------------------------------------------------------------- paths


def test_relative_data_dir_resolves_against_the_config_directory(tmp_path, monkeypatch):
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(config_dir, '[database]\ndata_dir = "state/../pg"\n')
    assert load(Path("etc/pgsched.toml")).database.data_dir == config_dir / "pg"
    assert load(Path("etc/pgsched.toml")).base_dir == config_dir
    assert load(write(config_dir, "", name="empty.toml")).database.data_dir == (
        config_dir / ".pgsched"
    )
    got = load(path, overrides={"database.data_dir": "flagged"})
    assert got.database.data_dir == tmp_path / "flagged"


def test_absolute_and_home_data_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, '[database]\ndata_dir = "~/pg"\n')
    assert load(path).database.data_dir == tmp_path / "home" / "pg"
    other = tmp_path / "elsewhere"
    path = write(tmp_path, f'[database]\ndata_dir = "{other}"\n')
    assert load(path).database.data_dir == other


def test_tasks_file_path_resolves_against_the_config_directory(tmp_path):
    path = write(tmp_path, '[worker]\ntasks = "jobs/tasks.py"\n')
    assert load(path).worker.tasks == str(tmp_path / "jobs" / "tasks.py")


# ---------------------------------------------------------------- masking and rendering


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        (
            "postgres://u:secret@h:5432,h2:5433/db?sslmode=require",
            "postgres://u:***@h:5432,h2:5433/db?sslmode=require",
        ),
        ("postgresql://u:p@ss/w@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:@h/db", "postgresql://u:@h/db"),
        ("postgresql://h:5432/db", "postgresql://h:5432/db"),
        (
            "postgresql:///db?user=u&password=secret&sslmode=require",
            "postgresql:///db?user=u&password=***&sslmode=require",
        ),
        ("host=h user=u password=secret dbname=db", "host=h user=u password=*** dbname=db"),
        ("host=h password = 'se cr\\'et' dbname=db", "host=h password = *** dbname=db"),
        ("host=h sslpassword=secret", "host=h sslpassword=***"),
        ("host=h dbname=db", "host=h dbname=db"),
        ("", ""),
        # libpq reads these passwords where a pattern does not: rebuilt as key=value.
        ("postgresql://u:S3?CRET@h/db", "user=u password=*** dbname=db host=h"),
        ("postgresql://h/db?pass%77ord=S3CRET", "password=*** dbname=db host=h"),
    ],
)
def test_mask_dsn(dsn, masked):
    assert mask_dsn(dsn) == masked


def test_settings_to_toml_round_trips_and_masks_the_password(tmp_path):
    path = write(
        tmp_path,
        f"""
[database]
dsn = "{PASSWORD_DSN}"
[worker]
tasks = "app.tasks"
concurrency = 3
[jobs]
misfire_grace_seconds = "none"
[log]
level = "DEBUG"
""",
    )
    original = load(path)
    text = settings_to_toml(original)
    assert "s3cret" not in text and "app:***@db.internal" in text
    assert 'misfire_grace_seconds = "none"' in text
    again = load(write(tmp_path, text, name="again.toml"))
    assert again.database == dataclasses.replace(original.database, dsn=mask_dsn(PASSWORD_DSN))
    for name in ("worker", "jobs", "vacuum", "log"):
        assert getattr(again, name) == getattr(original, name)


def test_pooler_settings_round_trip_with_the_listen_password_masked(tmp_path):
    path = write(tmp_path, f"""
[database]
dsn = "host=pgbouncer port=6432 dbname=app"
prepare_threshold = "none"
listen_dsn = "{PASSWORD_DSN}"
""")
    os.chmod(path, 0o644)
    original = load(path)
    assert original.database.prepare_threshold is None
    assert original.warnings and "s3cret" not in original.warnings[0]
    text = settings_to_toml(original)
    assert "s3cret" not in text and 'prepare_threshold = "none"' in text
    again = load(write(tmp_path, text, name="again.toml")).database
    assert again.prepare_threshold is None
    assert again.listen_dsn == mask_dsn(PASSWORD_DSN)


def test_settings_to_toml_leaves_out_unset_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    document = tomllib.loads(settings_to_toml(load()))
    assert "dsn" not in document["database"] and "tasks" not in document["worker"]
    assert document["database"]["data_dir"] == str(tmp_path / ".pgsched")


# ---------------------------------------------------------------- permission warning


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_readable_file_with_a_password_warns(tmp_path):
    path = write(tmp_path, f'[database]\ndsn = "{PASSWORD_DSN}"\n')
    assert load(path).warnings == ()
    os.chmod(path, 0o644)
    assert load(path).warnings == (
        f"{path} is readable by other users and contains a database password; "
        f"run: chmod 600 {path}",
    )
    assert "s3cret" not in load(path).warnings[0]


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_readable_file_without_a_password_does_not_warn(tmp_path):
    path = write(tmp_path, '[database]\ndsn = "host=db user=app"\n')
    os.chmod(path, 0o644)
    assert load(path).warnings == ()
    empty = write(tmp_path, "", name="empty.toml")
    os.chmod(empty, 0o644)
    assert load(empty, env={"PGSCHED_DSN": PASSWORD_DSN}).warnings == ()


# ---------------------------------------------------------------- fuzzing

KNOWN = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
toml_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(10**12), max_value=10**12),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["none", "UTC", "Europe/Berlin", "info", "json", "a.b", "x.py", "pg_x"]),
        st.datetimes(),
        st.dates(),
    ),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
sections = st.dictionaries(
    st.sampled_from(sorted(KNOWN)) | st.text(max_size=8),
    st.dictionaries(
        st.sampled_from(sorted({k for keys in KNOWN.values() for k in keys})) | st.text(max_size=8),
        toml_values,
        max_size=4,
    )
    | toml_values,
    max_size=3,
)
toml_ish_text = st.text(
    alphabet=st.sampled_from(list("[]{}=\".,\n #'-_:01259eintfalsurewokdbpcmy")), max_size=120
)


def _loads_or_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pgsched.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load(path)
        except ConfigError as error:
            assert len(str(error).splitlines()) == 1, str(error)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sections)
def test_fuzz_structured_toml_loads_or_raises_config_error(document):
    _loads_or_config_error(tomli_w.dumps(document))


@settings(max_examples=300, deadline=None)
@given(toml_ish_text | st.text(max_size=80))
def test_fuzz_arbitrary_text_loads_or_raises_config_error(text):
    _loads_or_config_error(text)


# ---------------------------------------------------------------- queues and metrics


def test_queue_tables_and_metrics_are_read(tmp_path):
    path = write(tmp_path, textwrap.dedent("""
        [worker]
        queues = ["emails", "reports", "emails"]
        [metrics]
        listen = "[::1]:0"
        [queues.emails]
        concurrency = 5
        [queues."billing.eu"]
        concurrency = 1
        [queues.api]
        global_concurrency = 3
        rate = "100/1m"
    """))
    got = load(path)
    assert got.worker.queues == ("emails", "reports")
    assert got.metrics == MetricsSettings("[::1]:0")
    assert got.queues == {"emails": QueueSettings(5), "billing.eu": QueueSettings(1),
                          "api": QueueSettings(global_concurrency=3, rate="100/1m")}
    again = load(write(tmp_path, settings_to_toml(got), name="again.toml"))
    assert (again.worker, again.metrics, again.queues) == (got.worker, got.metrics, got.queues)


@pytest.mark.parametrize(("text", "expected"), [
    ("[queues.emails]\nconcurrency = 0\n", "[queues.emails] concurrency = 0: must be an integer"),
    ("[queues.emails]\nlimit = 3\n",
     "[queues.emails] limit = 3: unknown key; [queues.NAME] accepts concurrency"),
    ("[queues.emails]\n", "[queues.emails]: no limit given; add concurrency = N"),
    ("[queues.emails]\nglobal_concurrency = 0\n",
     "[queues.emails] global_concurrency = 0: invalid global concurrency 0"),
    ('[queues.emails]\nrate = "100"\n', "[queues.emails] rate = \"100\": invalid rate"),
    ("[queues.emails]\nrate = 100\n", "[queues.emails] rate = 100: invalid rate"),
    ("[queues]\nconcurrency = 5\n", "[queues] concurrency = 5: each queue is a table"),
    ('[queues."a b"]\nconcurrency = 1\n', "[queues.\"a b\"]: invalid queue name 'a b'"),
    ("queues = 3\n", "queues = 3: must be a table of queues"),
])
def test_bad_queue_tables_name_the_table(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_for(path)
    assert message.startswith(f"{path}: "), message
    assert expected in message


def test_web_tokens_are_checked_and_masked(tmp_path):
    path = write(tmp_path, '[web]\ntoken = "short"\n')
    assert "[web] token" in error_for(path) and "at least 16" in error_for(path)
    path = write(tmp_path, '[web]\nroot_path = "/scheduler/"\n')
    assert "root_path" in error_for(path)
    secret = "s3cret-" * 4
    settings = load(write(tmp_path, f'[web]\ntoken = "{secret}"\nroot_path = "/s"\n'))
    assert (settings.web.token, settings.web.root_path) == (secret, "/s")
    assert secret not in settings_to_toml(settings)
