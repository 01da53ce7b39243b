"""Recurring schedules: the `@periodic` decorator and the operations on stored schedules.

Owns: the process-wide registry of schedules defined in code; validating a definition
(cron or interval, time zone, catch-up mode, job options, arguments) before anything
reaches the database; turning a definition into a row and a stored row back into a
timing object; the ids of the jobs that windows make; and the operations behind the CLI
(add, list, pause, resume, trigger, remove).

Invariants:
- A schedule lives in the database. Code schedules (origin 'code') are upserted by every
  worker at start; one the code no longer defines is disabled, never deleted. Schedules
  made with the CLI (origin 'cli') are never touched by code, and the CLI never redefines
  a code schedule (it may pause, resume, trigger or remove it).
- Exactly one job per window: a window's job is `<schedule id>@<fire time, UTC>` and
  carries (schedule_id, fire_time), which a unique index guards (see worker/planner.py).
- Fire times come from pgsched.timing; nothing here does calendar arithmetic.

Failure: a bad definition raises InvalidInput naming the option and the fix, at import
time for @periodic and before any connection for the CLI. An unknown id raises
ScheduleNotFound; a clash the conflict mode does not allow raises ScheduleConflict.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .errors import InvalidInput, ScheduleConflict, ScheduleNotFound
from .payload import encode_arguments
from .store import NewSchedule, Store
from .tasks import JobPriority, Task, check_task_options, get_task, task, validate_task_name
from .timing import (
    CATCH_UP_MODES,
    EPOCH_UTC,
    CronSchedule,
    IntervalSchedule,
    Schedule,
    format_duration,
    parse_duration,
    parse_timezone,
)

# No '@': it separates the schedule id from the fire time in window job ids.
_SCHEDULE_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")
# Shorter intervals would make the planner the busiest part of every worker.
MIN_INTERVAL = timedelta(seconds=1)


@dataclass(frozen=True)
class ScheduleDefinition:
    """A validated schedule as written in code or on the command line."""

    id: str
    task: str
    cron: str | None
    tz: str | None  # cron only; None: the worker's [jobs] timezone, resolved at sync
    every: timedelta | None
    anchor: datetime
    args_json: str
    kwargs_json: str
    priority: int
    max_retries: int
    timeout: float | None
    queue: str
    catch_up: str
    enabled: bool = True
    overlap: bool = True  # False: skip a window while the previous run is active

    def timing(self, default_tz: str) -> Schedule:
        if self.cron is not None:
            return cron_schedule(self.cron, self.tz or default_tz)
        assert self.every is not None
        return IntervalSchedule(self.every, self.anchor)

    def row(self, *, default_tz: str, now: datetime) -> NewSchedule:
        """The row to write; its first window is the first fire time after `now`."""
        return NewSchedule(
            id=self.id, task=self.task, cron=self.cron,
            tz=None if self.cron is None else (self.tz or default_tz),
            every=self.every, anchor=self.anchor, args=self.args_json,
            kwargs=self.kwargs_json, priority=self.priority, max_retries=self.max_retries,
            timeout_seconds=self.timeout, queue=self.queue, catch_up=self.catch_up,
            enabled=self.enabled, next_fire_at=self.timing(default_tz).next_after(now),
            overlap=self.overlap,
        )


def validate_schedule_id(schedule_id: object) -> str:
    if not isinstance(schedule_id, str) or not _SCHEDULE_ID_RE.fullmatch(schedule_id):
        shown = repr(schedule_id)
        shown = shown if len(shown) <= 60 else shown[:56] + "...'"
        raise InvalidInput(
            f"invalid schedule id {shown}: use 1 to 200 letters, digits, '_', '.', ':' or '-'"
        )
    return schedule_id


def parse_every(value: object) -> timedelta:
    """An interval given as a timedelta, a number of seconds or a duration like 15m."""
    if isinstance(value, str):
        every = parse_duration(value)
    elif isinstance(value, timedelta):
        every = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            every = timedelta(seconds=value)
        except (OverflowError, ValueError):
            raise InvalidInput(f"invalid interval {value!r}: it is out of range") from None
    else:
        raise InvalidInput(
            f"invalid interval {value!r}: use a timedelta, a number of seconds or text like 15m"
        )
    if every < MIN_INTERVAL:
        shown = format_duration(every) if every >= timedelta(0) else "a negative duration"
        raise InvalidInput(f"invalid interval {shown}: a schedule fires at most once a second; "
                           "use 1s or more")
    IntervalSchedule(every)  # the upper bound and the rest of timing's checks
    return every


def define_schedule(
    task_name: str,
    *,
    schedule_id: str,
    cron: str | None = None,
    every: object = None,
    tz: str | None = None,
    anchor: datetime | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    priority: JobPriority | int | str = JobPriority.NORMAL,
    max_retries: int = 0,
    timeout: float | None = None,
    queue: str = "default",
    catch_up: str = "latest",
    enabled: bool = True,
    overlap: bool = True,
) -> ScheduleDefinition:
    """Validate everything about a schedule; raises InvalidInput for the first problem."""
    validate_task_name(task_name)
    validate_schedule_id(schedule_id)
    if (cron is None) == (every is None):
        raise InvalidInput("give a schedule either cron= (--cron) or every= (--every), not "
                           + ("both" if cron is not None else "neither"))
    if cron is not None:
        if anchor is not None:
            raise InvalidInput("anchor= applies to every= schedules; a cron expression is "
                               "already aligned to the clock")
        if tz is not None:
            tz = parse_timezone(tz).key
        CronSchedule(cron, tz or "UTC")  # validates the expression
        interval = None
    else:
        if tz is not None:
            raise InvalidInput("a time zone (tz= / --tz) applies to cron schedules only; "
                               "intervals are elapsed time, aligned to their anchor")
        interval = parse_every(every)
    if anchor is not None and (not isinstance(anchor, datetime) or anchor.utcoffset() is None):
        raise InvalidInput(f"invalid anchor {anchor!r}: use a timezone-aware datetime")
    anchor = (anchor or EPOCH_UTC).astimezone(UTC)
    if catch_up not in CATCH_UP_MODES:
        raise InvalidInput(f"invalid catch_up {catch_up!r}: use one of {', '.join(CATCH_UP_MODES)}")
    if not isinstance(enabled, bool):
        raise InvalidInput(f"invalid enabled {enabled!r}: use True or False")
    if not isinstance(overlap, bool):
        raise InvalidInput(f"invalid overlap {overlap!r}: use True or False")
    check_task_options(max_retries, timeout)
    args_json, kwargs_json = encode_arguments(args, kwargs)
    if not isinstance(queue, str) or not queue:
        raise InvalidInput(f"invalid queue {queue!r}: use a non-empty name")
    return ScheduleDefinition(
        id=schedule_id, task=task_name, cron=cron, tz=tz, every=interval, anchor=anchor,
        args_json=args_json, kwargs_json=kwargs_json,
        priority=int(JobPriority.parse(priority)), max_retries=max_retries,
        timeout=None if timeout is None else float(timeout), queue=queue,
        catch_up=catch_up, enabled=enabled, overlap=overlap,
    )


# -- @periodic -------------------------------------------------------------------------

_SCHEDULES: dict[str, tuple[ScheduleDefinition, str]] = {}  # id -> (definition, defined by)


def define_for_task(
    task_name: str, *, priority: str | int | None, max_retries: int | None,
    timeout: float | None, **definition: Any,
) -> ScheduleDefinition:
    """define_schedule for an operator's schedule (CLI, web): options not given come from
    the task's @task options when its module is importable here, else the defaults."""
    known = get_task(task_name)
    return define_schedule(
        task_name, **definition,
        priority=priority if priority is not None else (
            known.priority if known else JobPriority.NORMAL),
        max_retries=max_retries if max_retries is not None else (
            known.max_retries if known else 0),
        timeout=timeout if timeout is not None else (known.timeout if known else None),
        queue=known.queue if known else "default",
    )


def periodic(
    *,
    every: timedelta | float | str | None = None,
    cron: str | None = None,
    tz: str | None = None,
    id: str | None = None,
    name: str | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    priority: JobPriority | int | str | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
    queue: str | None = None,
    catch_up: str = "latest",
    enabled: bool = True,
    anchor: datetime | None = None,
    overlap: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run the decorated function on a schedule; it is also registered as a task.

    `every=` (timedelta, seconds or "15m"; windows aligned to `anchor`, default the Unix
    epoch) or `cron=` (5 fields, optional 6th for seconds, read in `tz`, default
    [jobs] timezone). `id` defaults to the task name; give one to each @periodic when a
    function has several. `priority`, `max_retries`, `timeout` and `queue` default to the
    task's options; when this decorator registers the task they become its options too.
    `catch_up` is latest, skip or all (see README.md, Recurring jobs). `enabled=False`
    keeps the schedule in the database but stops it firing. `overlap=False`: a window
    whose previous run is still pending or running is skipped (recorded as a cancelled
    job with a 'skipped: ...' error), never queued behind it (docs/job-control.md).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        registered_as = getattr(fn, "__pgsched_task__", None)
        existing = get_task(registered_as) if registered_as else None
        if existing is not None and name is not None and name != existing.name:
            raise InvalidInput(f"{fn.__qualname__} is already the task {existing.name!r}; "
                               "drop name= or make them match")
        # The task's options are the defaults; a task this decorator creates has none yet.
        defaults = existing or Task(validate_task_name(name or fn.__name__), fn)
        definition = define_schedule(
            defaults.name, schedule_id=defaults.name if id is None else id, cron=cron,
            every=every, tz=tz, anchor=anchor, args=args, kwargs=kwargs,
            priority=defaults.priority if priority is None else priority,
            max_retries=defaults.max_retries if max_retries is None else max_retries,
            timeout=defaults.timeout if timeout is None else timeout,
            queue=defaults.queue if queue is None else queue,
            catch_up=catch_up, enabled=enabled, overlap=overlap,
        )
        owner = f"{fn.__module__}.{fn.__qualname__}"
        previous = _SCHEDULES.get(definition.id)
        # Re-importing a module defines the same function again: that is no clash.
        if previous is not None and previous[1] != owner:
            raise InvalidInput(f"schedule id {definition.id!r} is defined twice ({previous[1]} "
                               f"and {owner}): give each @periodic its own id=")
        if existing is None:
            task(fn, name=defaults.name, max_retries=definition.max_retries,
                 timeout=definition.timeout, priority=definition.priority,
                 queue=definition.queue)
        _SCHEDULES[definition.id] = (definition, owner)
        return fn

    return decorate


def registered_schedules() -> dict[str, ScheduleDefinition]:
    return {schedule_id: entry[0] for schedule_id, entry in _SCHEDULES.items()}


# -- stored schedules ------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def cron_schedule(expr: str, tz: str) -> CronSchedule:
    """Parsing a cron expression costs more than using it; the planner asks often."""
    return CronSchedule(expr, tz)


def timing_of(row: dict[str, Any]) -> Schedule:
    """The timing object of a stored schedule row (InvalidInput if it no longer parses)."""
    if row["cron"] is not None:
        return cron_schedule(row["cron"], row["tz"])
    return IntervalSchedule(row["every"], row["anchor"])


def format_instant(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def window_job_id(schedule_id: str, fire_time: datetime) -> str:
    return f"{schedule_id}@{format_instant(fire_time)}"


# The job ids schedules make: `<schedule id>@<fire time>` for windows (a time starts
# with a digit) and `<schedule id>@trigger-<hex>` for `pgsched trigger`. Users may not
# take them (scheduler.validate_job_id): the planner's insert skips an id that exists,
# so a user's job with a window's id would silently stand in for the window.
_RESERVED_JOB_ID_RE = re.compile(rf"{_SCHEDULE_ID_RE.pattern}@(?:[0-9]|trigger-)")


def is_schedule_job_id(job_id: str) -> bool:
    return "@" in job_id and _RESERVED_JOB_ID_RE.match(job_id) is not None


async def sync_code_schedules(store: Store, default_tz: str) -> list[dict[str, Any]]:
    """Write this process's @periodic schedules; returns [{id, change}] where change is
    created, updated, disabled (gone from the code) or cli_owned (left alone)."""
    now = await store.db_now()
    rows = [d.row(default_tz=default_tz, now=now)
            for _, d in sorted(registered_schedules().items())]
    return await store.sync_code_schedules(rows)


async def add_schedule(
    store: Store, definition: ScheduleDefinition, *, default_tz: str, on_conflict: str
) -> bool:
    """Create a CLI schedule; True if written, False if `ignore` kept an existing one."""
    now = await store.db_now()
    row = definition.row(default_tz=default_tz, now=now)
    if await store.insert_schedule(row, replace=on_conflict == "replace"):
        return True
    if on_conflict == "ignore":
        return False
    found = await store.list_schedules(definition.id)
    if found and found[0]["origin"] == "code":
        raise ScheduleConflict(
            f"schedule {definition.id!r} is defined in code (@periodic): change it there; "
            f"`pgsched pause {definition.id}` stops it")
    raise ScheduleConflict(
        f"schedule {definition.id!r} already exists: use --on-conflict ignore or replace")


async def pause_schedule(store: Store, schedule_id: str) -> dict[str, Any]:
    return _found(await store.pause_schedule(schedule_id), schedule_id)


async def resume_schedule(store: Store, schedule_id: str) -> dict[str, Any]:
    return _found(await store.resume_schedule(schedule_id), schedule_id)


async def trigger_schedule(store: Store, schedule_id: str) -> str:
    """Enqueue one extra run now; returns its job id."""
    job_id = f"{schedule_id}@trigger-{uuid.uuid4().hex[:12]}"
    return _found(await store.trigger_schedule(schedule_id, job_id), schedule_id)


async def remove_schedule(store: Store, schedule_id: str) -> dict[str, Any]:
    return _found(await store.remove_schedule(schedule_id), schedule_id)


def _found(value: Any, schedule_id: str) -> Any:
    if value is None:
        raise ScheduleNotFound(f"no schedule {schedule_id!r}: see `pgsched schedules`")
    return value
