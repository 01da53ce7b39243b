"""The JSON log's level, time and traceback processor (logs._add_level_and_time), which
replaces structlog's add_log_level, TimeStamper and format_exc_info on the per-job path:
pure logic, no database."""

from __future__ import annotations

import json
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
