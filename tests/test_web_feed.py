"""Unit tests of the change feed's pure parts (pgsched/web/feed.py): publishing once per
change, replay by Last-Event-ID, and dropping a client that stops reading. The database
side is covered by tests/test_web_api.py against a real service."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pgsched.web.feed import CLOSE, ChangeFeed

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


def row(job_id: str, status: str, attempts: int = 0) -> dict:
    return {"id": job_id, "task": "t", "queue": "q", "status": status, "priority": 5,
            "attempts": attempts, "max_retries": 0, "execution_time": NOW, "created_at": NOW,
            "started_at": None, "finished_at": None, "worker_id": None, "last_error": None}


@pytest.fixture
def feed() -> ChangeFeed:
    return ChangeFeed(store=None, dsn="", buffer=3, queue_size=2)  # type: ignore[arg-type]


def test_a_change_is_published_once_however_often_a_look_reads_it(feed):
    feed._publish_jobs([row("a", "pending")])
    feed._publish_jobs([row("a", "pending")])  # the overlap reads it again
    feed._publish_jobs([row("a", "running", 1)])
    feed._publish_jobs([row("a", "pending", 1)])  # a retry: same status, new attempt
    assert [(e.kind, e.data.count('"pending"')) for e in feed._events] == [
        ("job", 1), ("job", 0), ("job", 1)]
    assert feed._events[-1].data.startswith('{"id":"a"')
    assert '"priority":"normal"' in feed._events[-1].data


def test_replay_returns_what_was_missed_or_none_when_it_is_gone(feed):
    for n in range(5):
        feed.publish("job", {"n": n})
    boot = feed.last_id.partition(":")[0]
    assert [e.id for e in feed.replay(f"{boot}:3")] == [f"{boot}:4", f"{boot}:5"]
    assert feed.replay(f"{boot}:5") == []
    assert feed.replay(f"{boot}:1") is None  # only the last 3 are held
    assert feed.replay(f"{boot}:9") is None  # from the future: not ours
    assert feed.replay("other:4") is None  # another process (a restart)
    assert feed.replay("4") is None


def test_a_client_that_stops_reading_is_dropped_with_close(feed):
    slow, quick = feed.subscribe(), feed.subscribe()
    for n in range(3):
        feed.publish("job", {"n": n})
        quick.get_nowait()
    assert feed.clients == 1  # the slow one's queue (2) overflowed
    items = [slow.get_nowait() for _ in range(slow.qsize())]
    assert items[-1] is CLOSE
    feed.close_streams()
    assert quick.get_nowait() is CLOSE and feed.clients == 0
