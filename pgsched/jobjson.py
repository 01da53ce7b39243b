"""Job rows as JSON: what `pgsched ls --json` prints for a job, and the web API's job
objects and events.

Owns: `job_to_json` (the keys of a listed job), `to_jsonable` (datetimes as ISO 8601 text,
recursively) and `priority_name`. Kept apart from ops.py, which imports the scheduler,
schedules and timing: `pgsched ls` needs only this, and pays for nothing else at start-up.

Invariants: the output holds only JSON types; a priority outside JobPriority stays the
number it is (never an error: the row came from the database, not from the user).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .tasks import JobPriority

# What `pgsched ls --json` prints for a job (and the web API's job objects).
LS_KEYS = ("id", "task", "queue", "status", "execution_time", "priority", "attempts",
           "failures", "recoveries", "max_retries", "args", "kwargs", "result", "last_error",
           "created_at", "started_at", "finished_at", "worker_id", "waiting_for")


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return value


def priority_name(value: int) -> str | int:
    try:
        return JobPriority(value).name.lower()
    except ValueError:
        return value


def job_to_json(row: dict[str, Any]) -> dict[str, Any]:
    data = {key: row.get(key) for key in LS_KEYS}
    data["priority"] = priority_name(row["priority"])
    data["status"] = str(row["status"])
    return to_jsonable(data)
