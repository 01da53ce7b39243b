"""The JSON log's level, time and traceback processor (logs._add_level_and_time), which
replaces structlog's add_log_level, TimeStamper and format_exc_info on the per-job path:
pure logic, no database."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest

from pgsched import logs


@pytest.mark.parametrize(("method", "level"), [
    ("info", "info"), ("warn", "warning"), ("warning", "warning"), ("exception", "error"),
    ("debug", "debug"), ("critical", "critical")])
def test_level_is_named_as_structlog_names_it(method, level):
    assert logs._add_level_and_time(None, method, {})["level"] == level


def test_timestamp_is_iso_utc_with_microseconds_across_seconds(monkeypatch):
    # The second's text is kept between calls: a new second must not reuse the old one.
    for ns in (1_764_514_077_461_183_999, 1_764_514_077_999_999_000,
               1_764_514_078_000_001_000, 1_764_514_138_250_000_000):
        monkeypatch.setattr(logs.time, "time_ns", lambda ns=ns: ns)
        stamp = logs._add_level_and_time(None, "info", {})["timestamp"]
        expected = datetime.fromtimestamp(ns // 1000 / 1e6, UTC)
        assert stamp == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_exception_text_is_rendered_into_the_json_line():
    try:
        raise ValueError("bad row")
    except ValueError:
        event = logs._add_level_and_time(None, "exception", {"event": "x", "exc_info": True})
    line = json.loads(logs._render_json(None, "exception", event))
    assert "exc_info" not in line
    assert "ValueError: bad row" in line["exception"]


@pytest.fixture
def json_logs(capsys):
    """pgsched's JSON set-up, as the worker runs it (restored afterwards: it is
    process-wide), and a way to read the lines written, their timestamps blanked."""
    import structlog

    logs.configure("info", "json")
    logs._structlog()
    capsys.readouterr()

    def lines() -> list[str]:
        return [re.sub(r'"timestamp": "[^"]*"', '"timestamp": ""', line)
                for line in capsys.readouterr().err.splitlines()]

    yield lines
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


KEYS = ("job_id", "task", "attempt", "duration_s", "lateness_ms")
ROWS = [("j-1", "noop", 1, 0.0001, 12.5), ("j\"2\\", "tâche ✓", 3, 1e-05, -0.5),
        ("j-3", "noop", 10**20, 2.0, 0.0)]


def test_a_batch_of_events_is_written_as_logger_info_writes_each(json_logs):
    """logs.info_events (the completer's job_completed lines) writes what logger.info
    writes for each row, key for key and in the same order: the bound context first,
    then the row, the event, the context variables, the level and the time."""
    import structlog

    structlog.contextvars.bind_contextvars(worker_id="host:1:abc", region="eu", task="ctx")
    logger = logs.get_logger("pgsched.worker").bind(service="w")
    for row in ROWS:
        logger.info("job_completed", **dict(zip(KEYS, row, strict=True)))
    expected = json_logs()
    logs.info_events(logger, "job_completed", KEYS, ROWS)
    assert json_logs() == expected
    assert json.loads(expected[1])["task"] == "tâche ✓"


@pytest.mark.parametrize("odd", [None, float("nan"), True, 1.5e300 * 1e10])
def test_a_row_the_batch_cannot_encode_itself_is_written_in_its_place(json_logs, odd):
    logger = logs.get_logger("pgsched.worker").bind()
    rows = [ROWS[0], ("j-odd", "noop", 1, odd, 1.0), ROWS[2]]
    for row in rows:
        logger.info("job_completed", **dict(zip(KEYS, row, strict=True)))
    expected = json_logs()
    logs.info_events(logger, "job_completed", KEYS, rows)
    assert json_logs() == expected and len(expected) == 3


def test_a_batch_goes_through_any_other_logging_set_up(json_logs):
    """An application's own structlog configuration (here a test's capture_logs) gets
    each event as logger.info would send it; below info, nothing is written."""
    import structlog

    with structlog.testing.capture_logs() as captured:
        logs.info_events(logs.get_logger("pgsched.worker").bind(), "job_completed", KEYS,
                         ROWS[:2])
    assert [e["job_id"] for e in captured] == ["j-1", "j\"2\\"]
    assert captured[0] == {"event": "job_completed", "log_level": "info",
                           **dict(zip(KEYS, ROWS[0], strict=True))}
    logs.configure("warning", "json")
    logs.info_events(logs.get_logger("pgsched.worker").bind(), "job_completed", KEYS, ROWS)
    assert json_logs() == []


@pytest.mark.parametrize("bound", [{"event": "bound"}, {"level": "debug"},
                                   {"timestamp": "then"}, {"exc_info": False}])
def test_a_logger_bound_with_a_key_the_chain_sets_writes_what_logger_info_writes(
        json_logs, bound):
    """info_events is the general `logger.info` per row: a bound key the chain sets
    itself (event, level, timestamp) or acts on (exc_info) is written as the chain writes
    it, once, not a second time beside the chain's own."""
    logger = logs.get_logger("pgsched.worker").bind(**bound)
    for row in ROWS:
        logger.info("job_completed", **dict(zip(KEYS, row, strict=True)))
    expected = json_logs()
    logs.info_events(logger, "job_completed", KEYS, ROWS)
    assert json_logs() == expected


def test_a_batch_to_a_logger_that_is_no_line_writer_goes_call_by_call(json_logs):
    """pgsched's processors with another logger factory (here structlog's capturing one;
    a journald or syslog logger makes one record per call) is another set-up: each row
    is one `info` call, as logger.info makes it, never the batch joined into one `msg`."""
    import structlog

    captured = structlog.testing.CapturingLoggerFactory()
    structlog.configure(logger_factory=captured)
    logger = logs.get_logger("pgsched.worker").bind()
    logs.info_events(logger, "job_completed", KEYS, ROWS)
    assert [call.method_name for call in captured.logger.calls] == ["info"] * len(ROWS)
    assert [json.loads(call.args[0])["job_id"] for call in captured.logger.calls] == [
        row[0] for row in ROWS]


@pytest.mark.parametrize("variables", [{"event": "ctx"}, {"level": "debug"},
                                       {"timestamp": "then"}, {"exc_info": False},
                                       {"job_id": "other-job", "attempt": 7}])
def test_context_variables_the_chain_or_a_row_sets_are_written_as_logger_info_writes(
        json_logs, variables):
    """Context variables named like a key the chain sets, or like a row's own field (an
    application that started the worker from inside its own job, say): the lines are
    logger.info's, and a row's job_id is never replaced by a context variable's."""
    import structlog

    structlog.contextvars.bind_contextvars(**variables)
    logger = logs.get_logger("pgsched.worker").bind()
    for row in ROWS:
        logger.info("job_completed", **dict(zip(KEYS, row, strict=True)))
    expected = json_logs()
    logs.info_events(logger, "job_completed", KEYS, ROWS)
    assert json_logs() == expected
    assert [json.loads(line)["job_id"] for line in expected] == [row[0] for row in ROWS]
