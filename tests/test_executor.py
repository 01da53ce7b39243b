"""Pure logic of the executor: storable error text and results PostgreSQL can hold."""

from __future__ import annotations

from pgsched.store import TRACEBACK_MAX_CHARS, clip_traceback
from pgsched.worker.executor import (
    ERROR_MAX_CHARS,
    _failed,
    failed,
    result_outcome,
    storable,
)


def test_storable_escapes_nul_and_lone_surrogates():
    assert storable("a\x00b", 100) == "a\\x00b"
    assert storable("x\ud800y", 100) == "x\\ud800y"
    assert storable("plain", 100) == "plain"


def test_storable_cuts_to_the_limit_and_says_how_much():
    text = storable("e" * 5000, ERROR_MAX_CHARS)
    assert len(text) == ERROR_MAX_CHARS
    assert text.endswith(f"... [{5000 - ERROR_MAX_CHARS} more characters cut]")


def test_failed_caps_the_error_and_escapes_the_traceback_the_store_clips():
    outcome = failed("\x00" * 3000, "t\x00" * 100_000)
    assert len(outcome.error) <= ERROR_MAX_CHARS and "\x00" not in outcome.error
    assert "\x00" not in outcome.traceback
    assert len(clip_traceback(outcome.traceback)) == TRACEBACK_MAX_CHARS


def test_result_with_a_nul_fails_and_an_escaped_backslash_does_not():
    assert not result_outcome("a\x00b").ok
    assert not result_outcome({"k": ["\\\x00"]}).ok  # backslash, then a real NUL
    ok = result_outcome("\\u0000")  # a backslash and the text u0000: storable
    assert ok.ok and ok.result_json == '"\\\\u0000"'
    assert "NUL" in result_outcome("\x00").error


def test_a_retry_or_fail_that_misbehaves_is_a_plain_failure():
    import pgsched

    class Sneaky(pgsched.Retry):
        def __init__(self):
            Exception.__init__(self, "sneaky")

        @property
        def delay(self):
            raise ValueError("no delay for you")

    class Mute(pgsched.Fail):
        def __init__(self):
            Exception.__init__(self, "mute")

        def __str__(self):
            raise RuntimeError("no str")

        @property
        def reason(self):
            raise RuntimeError("no reason")

    outcome = _failed(Sneaky())
    assert not outcome.ok and outcome.snooze_seconds is None
    assert "reading it raised ValueError: no delay for you" in outcome.error
    outcome = _failed(Mute())
    assert outcome.final and outcome.error == "Fail: <reason str() failed>"
