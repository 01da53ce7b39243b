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
