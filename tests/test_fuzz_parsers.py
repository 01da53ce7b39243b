"""Hypothesis fuzzing of everything the CLI parses: durations, times, JSON arguments,
config files and cron expressions. Each input either parses or raises a clean one-line
InvalidInput (ConfigError is one); anything else, a traceback, is a bug. The last test
drives the real `pgsched add` command in-process with fuzzed options."""

from __future__ import annotations

import json
import math
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pgsched.cli import app
from pgsched.cli.jobs import parse_json_arg, parse_misfire
from pgsched.config import Settings, load_settings
from pgsched.errors import InvalidInput
from pgsched.timing import CronSchedule, parse_duration, parse_time

FUZZ = settings(max_examples=300, deadline=None)
AFTER = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)
ZONES = ["UTC", "Europe/London", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata",
         "Nowhere/Special", "", "../../etc/passwd", "utc"]


def parses_or_clean_error(fn, *args, **kwargs):
    """fn(...)'s result, or None after checking the InvalidInput it raised is clean."""
    try:
        return fn(*args, **kwargs)
    except InvalidInput as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 2000, message
        return None


durations = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"\s*-?\d{0,20}(\.\d{0,8})?\s*(ms|s|m|h|d|w|y|)\s*", fullmatch=True),
    st.lists(st.tuples(st.integers(0, 10**9), st.sampled_from(["d", "h", "m", "s", "ms"])),
             max_size=6).map(lambda parts: "".join(f"{n}{u}" for n, u in parts)),
)


@FUZZ
@given(durations)
@example("1h30m")
@example("9" * 60 + "d")
@example("1e309")
def test_durations(text):
    value = parses_or_clean_error(parse_duration, text)
    assert value is None or (isinstance(value, timedelta) and value >= timedelta(0))
    misfire = parses_or_clean_error(parse_misfire, text)
    assert misfire is None or (isinstance(misfire, float) and misfire > 0)


times = st.one_of(
    st.text(max_size=40),
    st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat(sep=" ", timespec="minutes")),
    st.from_regex(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?(Z|[+-]\d{2}:\d{2})?",
                  fullmatch=True),
)


@FUZZ
@given(times, st.sampled_from(ZONES))
@example("0001-01-01T00:00:00+14:00", "UTC")
@example("9999-12-31T23:59", "Pacific/Kiritimati")
@example("2026-03-08 02:30", "America/New_York")
def test_times(text, zone):
    value = parses_or_clean_error(parse_time, text, tz=zone)
    assert value is None or value.tzinfo is UTC


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                   max_size=4),
    max_leaves=12,
)
json_texts = st.one_of(st.text(max_size=60), json_values.map(json.dumps),
                       json_values.map(lambda v: json.dumps(v)[:-1]))


@FUZZ
@given(json_texts)
@example("[NaN]")
@example('{"a": -Infinity}')
@example("[" * 5000 + "]" * 5000)
def test_json_arguments(text):
    for kind, option in ((list, "--args"), (dict, "--kwargs")):
        value = parses_or_clean_error(parse_json_arg, text, option, kind)
        if value is not None:
            assert isinstance(value, kind)
            # Whatever parses is plain JSON that round-trips: no NaN, no Infinity.
            assert json.loads(json.dumps(value, allow_nan=False)) == value


cron_fields = st.one_of(
    st.sampled_from(["*", "?", "L", "0", "59", "60", "*/15", "1-5", "5-1", "9-9", "jan",
                     "MON-FRI", "sun,sat", "1,2,3", "*/0", "-1", "#", "1#2", "H", "R"]),
    st.from_regex(r"[0-9*/,\-]{1,8}", fullmatch=True),
)
crons = st.one_of(
    st.text(max_size=40),
    st.lists(cron_fields, min_size=1, max_size=7).map(" ".join),
    st.sampled_from(["@hourly", "@daily", "@yearly", "@reboot", "0 0 30 2 *", "0 0 29 2 *",
                     "0 0 31 4,6 *", "0 0 31 2 mon"]),
)


@settings(max_examples=400, deadline=None)
@given(crons, st.sampled_from(ZONES))
def test_cron_expressions(expr, zone):
    schedule = parses_or_clean_error(CronSchedule, expr, zone)
    if schedule is not None:
        fire = parses_or_clean_error(schedule.next_after, AFTER)
        assert fire is None or (fire.tzinfo is UTC and fire > AFTER)


toml_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=20),
    st.sampled_from(["none", "postgresql://u:pw@h/db", "1h", "UTC", "a b", "x;y"]),
    st.datetimes(),
)
known = {"database": ["dsn", "schema", "data_dir", "pool_size"],
         "worker": ["tasks", "concurrency", "lease_seconds", "heartbeat_seconds",
                    "poll_seconds", "max_recoveries"],
         "jobs": ["timezone", "misfire_grace_seconds"],
         "vacuum": ["enabled", "retention_days", "batch_size"],
         "log": ["level", "format"], "bogus": ["x"]}
documents = st.dictionaries(
    st.sampled_from(list(known)),
    st.sampled_from(list(known)).flatmap(lambda section: st.dictionaries(
        st.sampled_from([*known[section], "typo"]),
        toml_scalars | st.lists(toml_scalars, max_size=3), max_size=4)),
    max_size=4,
)
config_texts = st.one_of(
    documents.map(tomli_w.dumps),
    st.text(max_size=200),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    documents.map(lambda d: tomli_w.dumps(d)[: len(tomli_w.dumps(d)) // 2]),
)


@FUZZ
@given(config_texts)
@example("[worker]\nconcurrency = 99999999999999999999999\n")
@example("\ufeff[database]\nschema = \"x\\\"; DROP\"\n")
@example("[database]\ndsn = \"postgresql://u:secret-pw@h/db\"\nschema = 5\n")
def test_config_files(text):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pgsched.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        path.chmod(0o600)
        loaded = parses_or_clean_error(load_settings, path, env={})
    assert loaded is None or isinstance(loaded, Settings)
    if loaded is None and "secret-pw" in text:
        with pytest.raises(InvalidInput) as caught, tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "pgsched.toml"
            path.write_text(text)
            load_settings(path, env={})
        assert "secret-pw" not in str(caught.value)


# -- the real command, in-process ------------------------------------------------------------

cli_options = st.fixed_dictionaries({}, optional={
    "--in": durations, "--at": times, "--args": json_texts, "--kwargs": json_texts,
    "--misfire-grace": durations | st.just("none"),
    "--id": st.text(max_size=300), "--priority": st.text(max_size=10),
    "--retries": st.integers(-5, 2**40).map(str),
})


@pytest.fixture
def restore_logging():
    yield
    structlog.reset_defaults()  # the CLI configured logging onto CliRunner's streams


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(["add", "noop", "", "x" * 300, "a b", "os.system"]) | st.text(
    max_size=20), options=cli_options)
def test_add_command_parses_or_refuses_cleanly(pg_dsn, migrated_schema, restore_logging,
                                               task, options):
    argv = ["--dsn", pg_dsn, "--schema", migrated_schema, "add", task]
    for option, value in options.items():
        argv += [option, value]
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exc_info
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    if result.exit_code == 0:
        assert result.stdout.strip()
    elif "Usage:" in result.stderr:
        assert "Error: Invalid value" in result.stderr  # click refused an option's type
    else:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.fixture
def migrated_schema(pg_dsn, schema):
    result = CliRunner().invoke(app, ["--dsn", pg_dsn, "--schema", schema, "migrate"])
    assert result.exit_code == 0, result.stderr
    yield schema
    structlog.reset_defaults()


def test_floats_are_finite_in_the_fuzzed_json():
    # Guard for the strategy above: it does produce NaN and Infinity to be refused.
    assert math.isnan(json.loads("NaN")) and parses_or_clean_error(
        parse_json_arg, "[NaN]", "--args", list) is None
