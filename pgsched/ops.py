"""What the operator commands know: snapshots of the system, a job's attempt history,
bulk retry, job files for `add --from`, and the starter configuration. Nothing here
prints; pgsched/cli/ turns these values into text.

Owns:
- `Snapshot`: one consistent-enough look at counts, throughput, workers and (for the
  dashboard) running, upcoming and failed jobs, gathered through the store's read-only
  operator queries. Ages are measured against the database clock, so a client with a
  skewed clock still shows true lags.
- `attempt_history`: every attempt of a job, reconstructed from its errors history and
  its current state (an attempt number with no record was interrupted by a shutdown).
- `retry_jobs` / `retry_matching`: failed, expired or cancelled jobs back to pending.
- `parse_job_lines`: JSON Lines into JobSpecs, each bad line rejected with its number.
- `starter_config`: the text `pgsched init` writes.

Invariants: a bulk retry never picks up a job it already retried in this run (it only
takes jobs that ended before it started). A job file line is either turned into a
complete JobSpec or rejected as a whole; nothing is written for a rejected line.

Failure: InvalidInput (exit 2) for bad input, naming the line or option; database errors
propagate to the CLI, which reports them in one line.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, overload

import tomli_w

from . import recurring
from .config import Settings
from .errors import InvalidInput
from .jobjson import priority_name, to_jsonable
from .logs import get_logger
from .queues import Rate
from .scheduler import UNSET, JobSpec
from .store import BULK_BATCH, FINISHED_STATUSES, STATUSES, Store, decode_json
from .tasks import PRIORITIES, JobPriority, get_task, load_tasks, validate_task_name
from .timing import MAX_DURATION, format_duration, parse_duration, parse_time

log = get_logger("pgsched.ops")

RETRYABLE_STATUSES = ("failed", "expired", "cancelled")
RETRY_BATCH = BULK_BATCH
# `status` counts every job exactly up to this table size (planner's estimate): about
# 20 ms of counting on the 2-core test machine. Above it, finished jobs are estimated.
EXACT_COUNT_ROWS = 100_000


def human_seconds(seconds: float) -> str:
    """A short age or duration for tables: 0.25s, 42s, 5m12s, 3h05m, 2d04h."""
    seconds = abs(seconds)
    if seconds < 10:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


# -- snapshots ---------------------------------------------------------------------------


def queue_counts(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows of (queue, status, jobs, due, oldest_due[, capped]) as {queue: {status: n, due,
    oldest_due, capped}}; `capped`: pending and due are lower bounds (Store.COUNT_LIMIT)."""
    queues: dict[str, dict[str, Any]] = {}
    for row in rows:
        counts = queues.setdefault(row["queue"], {**dict.fromkeys(STATUSES, 0), "due": 0,
                                                  "oldest_due": None, "capped": False})
        counts[row["status"]] = row["jobs"]
        if row["status"] == "pending":
            counts["due"], counts["oldest_due"] = row["due"], row["oldest_due"]
            counts["capped"] = row.get("capped", False)
    return queues


@dataclass
class Snapshot:
    db_now: datetime
    queues: dict[str, dict[str, Any]]
    throughput: dict[str, int]
    workers: list[dict[str, Any]]
    stale_after: float  # a worker silent for longer than this is shown as stale
    running: list[dict[str, Any]] = field(default_factory=list)
    upcoming: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # set by the dashboard when a refresh failed
    # `status` on a big table: finished jobs per status as the planner estimates them,
    # instead of per-queue counts (which are then left out)
    estimated: dict[str, int] | None = None

    @property
    def totals(self) -> dict[str, Any]:
        totals: dict[str, Any] = {**dict.fromkeys(STATUSES, 0), "due": 0, "oldest_due": None,
                                  "capped": False}
        for counts in self.queues.values():
            for key in (*STATUSES, "due"):
                totals[key] += counts[key]
            totals["capped"] |= counts["capped"]
            due = counts["oldest_due"]
            if due is not None and (totals["oldest_due"] is None or due < totals["oldest_due"]):
                totals["oldest_due"] = due
        return totals

    def lag(self, oldest_due: datetime | None) -> float | None:
        """Seconds the oldest due job has waited, or None when nothing is due."""
        return None if oldest_due is None else max(0.0, (self.db_now - oldest_due)
                                                   .total_seconds())

    def to_json(self) -> dict[str, Any]:
        def with_lag(counts: dict[str, Any]) -> dict[str, Any]:
            if self.estimated is not None:  # not counted: null, not a misleading 0
                counts = {**counts, **dict.fromkeys(FINISHED_STATUSES)}
            return {**counts, "lag_seconds": self.lag(counts["oldest_due"])}

        t = self.throughput
        data: dict[str, Any] = {
            "db_now": self.db_now,
            "queues": {name: with_lag(c) for name, c in self.queues.items()},
            "totals": with_lag(self.totals),
            "throughput": {
                "last_minute": {s: t[f"{s}_1m"] for s in ("completed", "failed", "expired")},
                "last_hour": {s: t[f"{s}_1h"] for s in ("completed", "failed", "expired")},
            },
            "workers": [worker_json(w, self.stale_after) for w in self.workers],
        }
        if self.estimated is not None:
            data["finished_estimated"] = self.estimated
        return to_jsonable(data)


def worker_is_live(worker: dict[str, Any], stale_after: float) -> bool:
    return worker["heartbeat_age"] <= stale_after


def worker_json(row: dict[str, Any], stale_after: float) -> dict[str, Any]:
    keys = ("id", "host", "pid", "version", "concurrency", "queues", "started_at",
            "heartbeat_at", "running")
    return to_jsonable({**{k: row[k] for k in keys},
                        "heartbeat_age_seconds": round(row["heartbeat_age"], 3),
                        "live": worker_is_live(row, stale_after)})


async def gather(store: Store, *, stale_after: float, dashboard: bool = False,
                 rows: int = 10, active_only: bool = False, exact: bool = False) -> Snapshot:
    """A snapshot for `status` or the dashboard (active counts, job lists).

    `status` counts every row exactly when the table is small (up to EXACT_COUNT_ROWS by
    the planner's estimate) or `exact` is set; on a bigger table it counts pending and
    running jobs (as `top` does) and takes finished jobs per status from the planner's
    estimate (Snapshot.estimated). `active_only`: pending and running only."""
    estimated = None
    active = dashboard or active_only
    if not active and not exact:
        estimates = await store.finished_estimates()
        if estimates["rows"] > EXACT_COUNT_ROWS:
            active, estimated = True, {s: estimates[s] for s in FINISHED_STATUSES}
    snapshot = Snapshot(
        db_now=await store.db_now(),
        queues=queue_counts(await store.job_counts(active_only=active)),
        throughput=await store.throughput(),
        workers=await store.list_workers(),
        stale_after=stale_after,
        estimated=estimated,
    )
    if dashboard:
        snapshot.running = await store.running_jobs(limit=rows)
        snapshot.upcoming = await store.next_jobs(
            limit=rows, priorities=PRIORITIES)
        snapshot.failures = await store.recent_failures(limit=max(3, rows // 2))
    return snapshot


# -- one job -----------------------------------------------------------------------------


def _instant(value: Any) -> datetime | None:
    if isinstance(value, datetime) or value is None:
        return value
    return datetime.fromisoformat(value)  # jsonb renders timestamptz as ISO 8601


def attempt_history(job: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """Every attempt of a job, oldest first: attempt, worker_id, started_at, ended_at,
    duration_seconds, outcome, error, traceback.

    Failed and orphaned attempts come from the errors history. The last attempt of a
    running, completed or cancelled job comes from the row itself. Any other attempt
    number without a record was interrupted when its worker shut down (release does not
    count a failure and writes no history).
    """
    history: dict[int, dict[str, Any]] = {}
    for entry in job.get("errors") or []:
        if entry.get("outcome") == "retried":
            continue  # an operator's retry, recorded between attempts: not an attempt
        started, ended = _instant(entry.get("started_at")), _instant(entry.get("at"))
        history[entry["attempt"]] = {
            "attempt": entry["attempt"], "worker_id": entry.get("worker_id"),
            "started_at": started, "ended_at": ended,
            "outcome": entry.get("outcome", "failed"),
            "error": entry.get("error"), "traceback": entry.get("traceback"),
        }
    last, status = job["attempts"], str(job["status"])
    for number in range(1, last + 1):
        if number in history:
            continue
        attempt: dict[str, Any] = {
            "attempt": number, "worker_id": None, "started_at": None, "ended_at": None,
            "outcome": "interrupted", "error": "worker shut down; the job was put back",
            "traceback": None,
        }
        if number == last and status in ("running", "completed", "cancelled"):
            attempt.update(worker_id=job["worker_id"], started_at=job["started_at"],
                           ended_at=job["finished_at"], outcome=status, error=None)
        elif number == last and status == "pending" and job["started_at"] is not None:
            attempt.update(started_at=job["started_at"])
        history[number] = attempt
    result = [history[n] for n in sorted(history)]
    for attempt in result:
        start, end = attempt["started_at"], attempt["ended_at"]
        if attempt["outcome"] == "running":
            end = now
        attempt["duration_seconds"] = (
            round((end - start).total_seconds(), 3) if start and end else None)
    return result


JOB_KEYS = ("id", "task", "queue", "status", "priority", "args", "kwargs", "execution_time",
            "created_at", "started_at", "finished_at", "attempts", "failures", "recoveries",
            "suspect", "reserved_until", "max_retries", "timeout_seconds",
            "misfire_grace_seconds", "worker_id", "lease_until", "heartbeat_at", "result",
            "last_error", "depends_on", "waiting_for", "due_after_dependencies")


def queue_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A queue_stats row as `pgsched queues --json` prints it."""
    return {**row, "paused_at": row["paused_at"].isoformat() if row["paused_at"] else None,
            # Like `status`: no lag when nothing is due (a 0 would read as "on time").
            "lag_seconds": round(row["lag_seconds"], 3) if row["due"] else None}


def queue_limits_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A queue's global limits as `pgsched queue limit --json` prints them."""
    rate = (str(Rate(row["rate_jobs"], row["rate_period_seconds"]))
            if row["rate_jobs"] is not None else None)
    return {"queue": row["queue"], "global_concurrency": row["global_concurrency"],
            "rate": rate, "running": row["running"],
            "started_in_window": row["started_in_window"],
            "set_at": row["set_at"].isoformat(), "set_by": row["set_by"]}


def schedule_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A schedule as `pgsched schedules --json` prints it."""
    state = "disabled" if not row["enabled"] else "paused" if row["paused"] else "active"
    data = {
        "id": row["id"], "task": row["task"], "cron": row["cron"], "tz": row["tz"],
        "every": format_duration(row["every"]) if row["every"] is not None else None,
        "anchor": row["anchor"] if row["every"] is not None else None,
        "catch_up": row["catch_up"], "overlap": row["overlap"], "state": state,
        "origin": row["origin"],
        # A paused or disabled schedule has no next fire time until it is active again.
        "next_fire_at": row["next_fire_at"] if state == "active" else None,
        "last_fire_at": row["last_fire_at"], "last_job_id": row["last_job_id"],
        "last_run_at": row["last_run_at"], "last_status": row["last_status"],
        "args": row["args"], "kwargs": row["kwargs"],
        "priority": priority_name(row["priority"]), "max_retries": row["max_retries"],
        "timeout": row["timeout_seconds"], "queue": row["queue"],
        "created_at": row["created_at"], "updated_at": row["updated_at"],
    }
    return {k: recurring.format_instant(v) if isinstance(v, datetime) else v
            for k, v in data.items()}


def task_checker(settings: Settings) -> Callable[..., None]:
    """check(name, args=None, kwargs=None) rejecting invalid task names and, when the task
    module can be imported here, unknown tasks and arguments that do not fit the function."""
    module = settings.worker.tasks
    if module is not None:
        try:
            load_tasks(module, settings.base_dir)
        except InvalidInput as exc:
            log.debug("task_module_unavailable", error=str(exc))
            module = None

    def check(name: str, args: Any = None, kwargs: Any = None) -> None:
        validate_task_name(name)  # first: a hostile name must not be echoed back in full
        if module is None:
            return
        task = get_task(name)
        if task is None:
            raise InvalidInput(
                f"unknown task {name!r}: it is not registered in {settings.worker.tasks}"
            )
        if args is not None or kwargs is not None:
            task.check_arguments(args or [], kwargs or {})

    return check


def job_json(job: dict[str, Any], now: datetime) -> dict[str, Any]:
    data = {key: job.get(key) for key in JOB_KEYS}
    data["status"] = str(job["status"])
    data["priority"] = priority_name(job["priority"])
    data["history"] = attempt_history(job, now)
    return to_jsonable(data)


# -- retry -------------------------------------------------------------------------------


async def retry_jobs(store: Store, ids: list[str]) -> list[str]:
    """Retry the given jobs that are failed, expired or cancelled; returns those retried."""
    return await store.retry_jobs(statuses=RETRYABLE_STATUSES, ids=ids,
                                  cutoff=await store.db_now(), limit=len(ids))


async def retry_matching(
    store: Store, *, statuses: list[str], task: str | None, queue: str | None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Retry every job matching the filters, batch by batch (no statement locks many rows)."""
    cutoff = await store.db_now()
    retried: list[str] = []
    while True:
        batch = await store.retry_jobs(statuses=statuses, task=task, queue=queue,
                                       cutoff=cutoff, limit=RETRY_BATCH)
        retried += batch
        if on_batch is not None:
            on_batch(len(batch))
        if len(batch) < RETRY_BATCH:
            return retried


# -- job files (add --from) --------------------------------------------------------------

LINE_KEYS = ("task", "args", "kwargs", "at", "in", "id", "priority", "retries", "timeout",
             "misfire_grace", "queue")


@dataclass(frozen=True)
class Rejected:
    line: int
    error: str


@overload
def _seconds_or_none(value: Any, key: str, *, none_ok: Literal[False]) -> float: ...


@overload
def _seconds_or_none(value: Any, key: str, *, none_ok: bool) -> float | None: ...


def _seconds_or_none(value: Any, key: str, *, none_ok: bool) -> float | None:
    """Seconds from a number or a duration string; null or "none" only where allowed."""
    if value is None or (none_ok and isinstance(value, str) and value.lower() == "none"):
        if not none_ok:
            raise InvalidInput(f'"{key}" cannot be null')
        return None
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not 0 <= value <= MAX_DURATION.total_seconds():
        raise InvalidInput(
            f'"{key}" must be a number of seconds (at most 100 years) or a duration like "90s"')
    return float(value)


def parse_job_line(text: str, *, tz: str, now: datetime) -> JobSpec:
    """One JSON object (a line of a job file) as a JobSpec; InvalidInput names the key."""
    data = decode_json(text, "the line")
    if not isinstance(data, dict):
        raise InvalidInput('each line must be a JSON object like {"task": "name"}')
    return job_spec_from_object(data, tz=tz, now=now)


def job_spec_from_object(data: dict[str, Any], *, tz: str, now: datetime) -> JobSpec:
    """A decoded job-file object (keys LINE_KEYS) as a JobSpec; the web API's POST
    /api/jobs maps its body onto the same keys, so both accept exactly what `add` does."""
    unknown = sorted(set(data) - set(LINE_KEYS))
    if unknown:
        raise InvalidInput(f"unknown key {unknown[0]!r}: use {', '.join(LINE_KEYS)}")
    if "task" not in data:
        raise InvalidInput('"task" is missing')
    if not isinstance(data["task"], str):
        raise InvalidInput('"task" must be a string')
    validate_task_name(data["task"])
    if "at" in data and "in" in data:
        raise InvalidInput('use either "at" or "in", not both')
    when: datetime | None = None  # due now, on the database clock (not this machine's)
    if "at" in data:
        if not isinstance(data["at"], str):
            raise InvalidInput('"at" must be an ISO 8601 time as a string')
        when = parse_time(data["at"], tz=tz)
    elif "in" in data:
        when = now + timedelta(seconds=_seconds_or_none(data["in"], "in", none_ok=False))
    for key in ("id", "queue"):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise InvalidInput(f'"{key}" must be a non-empty string')
    retries = data.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        raise InvalidInput('"retries" must be a whole number >= 0')
    priority = data.get("priority")
    return JobSpec(
        func=data["task"], execution_time=when, args=data.get("args", []),
        kwargs=data.get("kwargs", {}),
        priority=JobPriority.parse(priority) if priority is not None else None,
        max_retries=retries, job_id=data.get("id"),
        timeout=(_seconds_or_none(data["timeout"], "timeout", none_ok=True)
                 if "timeout" in data else UNSET),
        misfire_grace_time=(_seconds_or_none(data["misfire_grace"], "misfire_grace",
                                             none_ok=True)
                            if "misfire_grace" in data else UNSET),
        queue=data.get("queue"),
    )


def parse_job_lines(
    lines: Iterable[str], *, tz: str, now: datetime, check: Callable[[JobSpec], None],
) -> tuple[list[JobSpec], list[Rejected]]:
    """Every non-blank line as a JobSpec that `check` accepts, or a Rejected with its
    1-based line number. `check` applies the scheduler's own validation (JSON payload,
    size, id, known task), so an accepted line is one schedule_bulk writes."""
    specs: list[JobSpec] = []
    rejected: list[Rejected] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            spec = parse_job_line(line, tz=tz, now=now)
            check(spec)
        except InvalidInput as exc:
            rejected.append(Rejected(number, str(exc)))
            continue
        specs.append(spec)
    return specs, rejected


# -- starter configuration (pgsched init) ------------------------------------------------

_TASKS_LINE = re.compile(r"^tasks = .*$", re.MULTILINE)
_DSN_LINE = re.compile(r"^# dsn = .*$", re.MULTILINE)


def _toml_value(key: str, value: str) -> str:
    return tomli_w.dumps({key: value}).strip()


def starter_config(*, tasks: str | None = None, dsn: str | None = None) -> str:
    """The commented starter pgsched.toml: pgsched.toml.example (packaged as
    starter.toml, so the two can never differ) with the task module and the DSN filled
    in, or left as commented placeholders."""
    text = importlib.resources.files("pgsched").joinpath("starter.toml").read_text("utf-8")
    if not _TASKS_LINE.search(text) or not _DSN_LINE.search(text):
        raise RuntimeError("starter.toml lost its `tasks = ` or `# dsn = ` line")
    tasks_line = (_toml_value("tasks", tasks) if tasks is not None
                  else "# " + _toml_value("tasks", "myapp.tasks"))
    text = _TASKS_LINE.sub(lambda _: tasks_line, text, count=1)
    if dsn is not None:
        text = _DSN_LINE.sub(lambda _: _toml_value("dsn", dsn), text, count=1)
    return text


def parse_since(text: str, *, tz: str, now: datetime) -> datetime:
    """--since: a duration back from now (30m, 2d) or a time (ISO 8601, [jobs] timezone)."""
    try:
        return now - parse_duration(text)
    except InvalidInput:
        pass
    try:
        return parse_time(text, tz=tz)
    except InvalidInput:
        raise InvalidInput(
            f"invalid --since {text!r}: use a duration like 30m or 2d, or a time like "
            "2026-03-08T14:30Z"
        ) from None
