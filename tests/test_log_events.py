"""Every structlog event pgsched emits is in the documented event table (docs/log-events.md),
and the table lists nothing that is not emitted: people alert on these names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENTS_PAGE = ROOT / "docs" / "log-events.md"
# log.info("name", ...), and the `(log.info if x else log.debug)("name", ...)` form.
EVENT_CALL = re.compile(r'log\.(?:debug|info|warning|error)\)?\(\s*"([a-z_]+)"')
TABLE_ROW = re.compile(r"^\| `([a-z_]+)` \|", re.MULTILINE)


def emitted() -> set[str]:
    return {name for path in (ROOT / "pgsched").rglob("*.py")
            for name in EVENT_CALL.findall(path.read_text(encoding="utf-8"))}


def event_rows(path: Path) -> set[str]:
    """Rows of the tables on a page whose header starts with `| event |`."""
    names: set[str] = set()
    for table in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        if table.lstrip().startswith("| event |"):
            names |= set(TABLE_ROW.findall(table))
    return names


def documented() -> set[str]:
    """Event rows on every page of the manual (a topic page may list its own events)."""
    return set().union(*(event_rows(path) for path in sorted((ROOT / "docs").rglob("*.md"))))


def test_every_emitted_event_is_documented_and_nothing_else():
    found, listed = emitted(), documented()
    assert len(found) > 30  # the pattern still matches how the code logs
    assert len(event_rows(EVENTS_PAGE)) > 30  # the table lives on the log events page
    assert sorted(found - listed) == [], "document these events"
    assert sorted(listed - found) == [], "these documented events are never emitted"


async def test_job_events_carry_job_id_task_and_attempt(tmp_path, pg_dsn, schema, sched,
                                                       workers):
    # The README promises job_id, task and attempt on job events; the completer's events
    # (job_completed, job_failed, job_retry_scheduled, ...) carried only job_id.
    import json

    from conftest import wait_until, write_config

    await sched.schedule("fail", job_id="f", max_retries=1)
    await sched.schedule("noop", job_id="n")
    worker = workers(write_config(tmp_path, pg_dsn, schema, retry_base_seconds=0.05))

    def job_events() -> list[dict]:
        events = [json.loads(line) for line in worker.log().splitlines()
                  if line.startswith("{")]
        return [e for e in events if e.get("job_id")]

    await wait_until(lambda: {"job_failed", "job_completed", "job_retry_scheduled"}
                     <= {e["event"] for e in job_events()}, what="job events")
    by_event = {e["event"]: e for e in job_events()}
    assert (by_event["job_failed"]["task"], by_event["job_failed"]["attempt"]) == ("fail", 2)
    assert (by_event["job_retry_scheduled"]["task"],
            by_event["job_retry_scheduled"]["attempt"]) == ("fail", 1)
    assert (by_event["job_completed"]["task"], by_event["job_completed"]["attempt"]) \
        == ("noop", 1)
    missing = [e["event"] for e in job_events() if not {"task", "attempt"} <= set(e)]
    assert missing == []
