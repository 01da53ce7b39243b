"""Job commands: `add` (one job, many with --from, or a recurring schedule), `ls`, `show`,
`retry`, `cancel`.

Owns: their command-line contract, on the terms of pgsched/cli/app.py: data on stdout (ids,
tables, JSON), messages on stderr; every input is validated before a connection is opened,
so bad input exits 2 and writes nothing; `add --from` validates every line before it writes
any. A job or id not found exits 1.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import InvalidInput, JobNotFound
from ..queues import validate_queue_name
from .app import (
    _run,
    app,
    command,
    for_option,
    note,
    open_scheduler,
    open_store,
    parse_statuses,
    print_ids,
    print_json,
    print_table,
    print_view,
    progress,
    say,
    settings_of,
)

if TYPE_CHECKING:
    from ..config import Settings

BULK_CHUNK = 1000
MAX_REJECTS_SHOWN = 20
WAIT_POLL_SECONDS = 0.2


class Retryable(StrEnum):
    failed = "failed"
    expired = "expired"
    cancelled = "cancelled"


# -- add -------------------------------------------------------------------------------


class OnConflict(StrEnum):
    raise_ = "raise"
    ignore = "ignore"
    replace_ = "replace"  # `replace` would hide str.replace

def check_priority(value: str | None) -> str | None:
    """--priority is a usage error when it is no priority, like a bad choice."""
    from ..tasks import JobPriority

    if value is not None:
        try:
            JobPriority.parse(value)
        except InvalidInput:
            raise typer.BadParameter(
                f"{value!r} is not a priority: use 0 (first) to 9, critical or normal"
            ) from None
    return value

def parse_json_arg(text: str, option: str, kind: type) -> Any:
    from ..store import decode_json

    value = decode_json(text, option)
    if not isinstance(value, kind):
        expected = "an array, like '[1, \"a\"]'" if kind is list else "an object, like '{\"k\": 1}'"
        raise InvalidInput(f"{option} must be {expected}")
    return value

def parse_misfire(text: str | None) -> Any:
    from ..scheduler import UNSET
    from ..timing import parse_duration

    if text is None:
        return UNSET
    if text.strip().lower() == "none":
        return None
    seconds = for_option("--misfire-grace", parse_duration, text).total_seconds()
    if seconds <= 0:
        raise InvalidInput(f"--misfire-grace {text!r} must be > 0, or none")
    return seconds

@app.command()
@command
def add(
    ctx: typer.Context,
    task_name: Annotated[str | None, typer.Argument(
        metavar="TASK", help="Registered task name.")] = None,
    args: Annotated[str, typer.Option("--args", help="JSON array of arguments.")] = "[]",
    kwargs: Annotated[str, typer.Option("--kwargs", help="JSON object of keyword args.")] = "{}",
    at: Annotated[str | None, typer.Option(
        "--at", help="ISO 8601 time; without an offset it is read in [jobs] timezone.")] = None,
    in_: Annotated[str | None, typer.Option(
        "--in", help="Delay like 90s, 5m, 2h, 1d, 1h30m.")] = None,
    job_id: Annotated[str | None, typer.Option("--id", help="Job id (default: a UUID).")] = None,
    on_conflict: Annotated[OnConflict | None, typer.Option(
        help="When the id exists [default: raise; with --from: ignore].")] = None,
    priority: Annotated[str | None, typer.Option(
        callback=check_priority,
        help="0 (claimed first) to 9, or a name: critical (1), normal (5).")] = None,
    retries: Annotated[int | None, typer.Option(min=0, help="Max retries.")] = None,
    timeout: Annotated[float | None, typer.Option(min=0.001, help="Seconds.")] = None,
    misfire_grace: Annotated[str | None, typer.Option(
        help="Seconds (or a duration) after its due time a job may still start, or none.")] = None,
    from_file: Annotated[str | None, typer.Option(
        "--from", metavar="FILE", help="Add one job per JSON line of FILE (- for stdin).")] = None,
    strict: Annotated[bool, typer.Option(
        help="With --from: add nothing if any line is rejected.")] = False,
    cron: Annotated[str | None, typer.Option(
        help="Make a recurring schedule: cron expression (check it with `pgsched cron`).")] = None,
    every: Annotated[str | None, typer.Option(
        help="Make a recurring schedule: interval like 30s, 15m, 1d.")] = None,
    tz: Annotated[str | None, typer.Option(
        help="Time zone of --cron (default: [jobs] timezone).")] = None,
    catch_up: Annotated[str | None, typer.Option(
        help="Schedules: latest (default), skip or all missed windows.")] = None,
    queue: Annotated[str | None, typer.Option(
        help="Queue (default: the task's @task(queue=...), else 'default').")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait until the job ends and print it as JSON; exit 0 if it "
        "completed, 1 if it failed, was cancelled or expired, 124 on --wait-timeout.")] = False,
    wait_timeout: Annotated[str | None, typer.Option(
        help="With --wait: give up after this long (e.g. 30s, 5m); the job runs on.")] = None,
    unique_for: Annotated[str | None, typer.Option(
        help="Add nothing if a pending or running job with the same key was added in the "
             "same period of this length (like 5m); print that job's id.")] = None,
    unique_key: Annotated[str | None, typer.Option(
        help="With --unique-for: the key (default: the task and its arguments).")] = None,
    no_overlap: Annotated[bool, typer.Option(
        "--no-overlap", help="Schedules: skip a window while the previous run is still "
                             "pending or running.")] = False,
    depends_on: Annotated[list[str] | None, typer.Option(
        "--depends-on", metavar="ID",
        help="Wait until this job completed (repeatable); cancelled if it does not.")] = None,
) -> None:
    """Schedule a job, or with --cron/--every a recurring schedule (then --id names it);
    prints only the id, so JOB=$(pgsched add ...) works (with --wait: the ended job)."""
    from ..scheduler import UNSET, ConflictResolution, unique_seconds
    from ..tasks import JobPriority
    from ..timing import parse_duration, parse_time

    settings = settings_of(ctx)
    if wait_timeout is not None and not wait:
        raise InvalidInput("--wait-timeout needs --wait")
    if wait and (from_file is not None or cron is not None or every is not None):
        raise InvalidInput("--wait waits for one job: leave out --from, --cron and --every")
    wait_seconds = (for_option("--wait-timeout", parse_duration, wait_timeout).total_seconds()
                    if wait_timeout is not None else None)
    if from_file is not None:
        per_job = {"TASK": task_name, "--args": args != "[]", "--kwargs": kwargs != "{}",
                   "--at": at, "--in": in_, "--id": job_id, "--priority": priority,
                   "--retries": retries, "--timeout": timeout, "--misfire-grace": misfire_grace,
                   "--unique-for": unique_for, "--unique-key": unique_key,
                   "--depends-on": depends_on}
        given = next((name for name, value in per_job.items() if value), None)
        if given:
            raise InvalidInput(f"{given} describes one job; with --from put it in each line")
        add_from_file(settings, from_file, on_conflict=(on_conflict or OnConflict.ignore).value,
                      strict=strict)
        return
    if task_name is None:
        raise InvalidInput("give a TASK to schedule, or --from FILE to add many jobs")
    arg_list = parse_json_arg(args, "--args", list)
    kwarg_map = parse_json_arg(kwargs, "--kwargs", dict)
    if (cron is not None or every is not None or tz is not None or catch_up is not None
            or no_overlap):
        if depends_on:
            raise InvalidInput("--depends-on applies to one job, not to a recurring schedule")
        return add_schedule(
            settings, task_name, cron=cron, every=every, tz=tz, catch_up=catch_up,
            overlap=not no_overlap,
            args=arg_list, kwargs=kwarg_map, schedule_id=job_id,
            on_conflict=(on_conflict or OnConflict.raise_).value,
            priority=priority, retries=retries, timeout=timeout,
            job_options={"--at": at, "--in": in_, "--misfire-grace": misfire_grace,
                         "--unique-for": unique_for, "--unique-key": unique_key})
    if at is not None and in_ is not None:
        raise InvalidInput("use either --at or --in, not both")
    when = None  # due now, on the database clock
    if at is not None:
        when = for_option("--at", parse_time, at, tz=settings.jobs.timezone)
    elif in_ is not None:
        when = datetime.now(UTC) + for_option("--in", parse_duration, in_)
    grace = parse_misfire(misfire_grace)
    if at is not None and when is not None:
        _refuse_expired(at, when, settings.jobs.misfire_grace_seconds if grace is UNSET
                        else grace)
    if queue is not None:
        validate_queue_name(queue)
    priority_value = JobPriority.parse(priority) if priority is not None else None
    unique_period = None if unique_for is None else for_option(
        "--unique-for", parse_duration, unique_for)
    unique_seconds(unique_period, unique_key)
    _check_task_known(settings, task_name, arg_list, kwarg_map)

    async def go() -> str | tuple[dict[str, Any], datetime]:
        async with open_scheduler(settings) as sched:
            added = await sched.schedule(
                task_name, execution_time=when, args=arg_list, kwargs=kwarg_map,
                priority=priority_value,
                max_retries=retries, job_id=job_id,
                conflict_resolution=ConflictResolution.parse(
                    (on_conflict or OnConflict.raise_).value),
                misfire_grace_time=grace, timeout=UNSET if timeout is None else timeout,
                queue=queue, unique_for=unique_period, unique_key=unique_key,
                depends_on=depends_on or (),
            )
            if not wait:
                return added
            ended = await sched.wait(added, timeout=wait_seconds)
            assert ended is not None
            return ended, await sched.store.db_now()

    result = _run(go())
    if isinstance(result, str):
        say(result)
        return
    print_ended(*result)


def print_ended(job: dict[str, Any], now: datetime) -> None:
    """A job waited for, as `show --json` prints it; exit 1 unless it completed."""
    from ..ops import job_json

    print_json(job_json(job, now))
    if str(job["status"]) != "completed":
        raise typer.Exit(1)


def _refuse_expired(at: str, when: datetime, grace: float | None) -> None:
    """A job due longer ago than its misfire grace would expire without running: say so
    instead of exiting 0."""
    late = (datetime.now(UTC) - when).total_seconds()
    if grace is not None and late > grace:
        raise InvalidInput(
            f"--at {at} is {late:.0f}s in the past, beyond the misfire grace of {grace:g}s: "
            "the job would expire at once; add --misfire-grace none (or a longer grace) to "
            "run it anyway")


def _check_task_known(settings: Settings, name: str, args: Any = None,
                      kwargs: Any = None) -> None:
    from ..ops import task_checker

    task_checker(settings)(name, args, kwargs)



def add_schedule(
    settings: Settings,
    task_name: str,
    *,
    cron: str | None,
    every: str | None,
    tz: str | None,
    catch_up: str | None,
    overlap: bool,
    args: list[Any],
    kwargs: dict[str, Any],
    schedule_id: str | None,
    on_conflict: str,
    priority: str | None,
    retries: int | None,
    timeout: float | None,
    job_options: dict[str, str | None],
) -> None:
    """`pgsched add TASK --cron EXPR | --every DURATION --id ID`: prints the schedule id."""
    from .. import recurring

    for option, value in job_options.items():
        if value is not None:
            raise InvalidInput(f"{option} applies to one-off jobs; a schedule's jobs run at "
                               "its fire times")
    if cron is None and every is None:
        raise InvalidInput("--tz, --catch-up and --no-overlap describe a schedule: add --cron "
                           "or --every")
    if schedule_id is None:
        raise InvalidInput("name the schedule with --id; pause, trigger and remove use it")
    _check_task_known(settings, task_name, args, kwargs)
    definition = recurring.define_for_task(
        task_name, schedule_id=schedule_id, cron=cron, every=every, tz=tz, args=args,
        kwargs=kwargs, catch_up=catch_up or "latest", overlap=overlap, priority=priority,
        max_retries=retries, timeout=timeout)

    async def go() -> bool:
        async with open_scheduler(settings) as sched:
            return await recurring.add_schedule(
                sched.store, definition, default_tz=settings.jobs.timezone,
                on_conflict=on_conflict)

    if not _run(go()):
        note(f"schedule {schedule_id} exists; left as it was")
    say(schedule_id)


def _read_lines(source: str) -> list[str]:
    try:
        if source == "-":
            return sys.stdin.read().splitlines()
        return Path(source).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{source} is not UTF-8 text: {exc.reason} at byte {exc.start}") \
            from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror}") from None

def add_from_file(settings: Settings, source: str, *, on_conflict: str, strict: bool) -> None:
    """`pgsched add --from FILE`: one job per JSON line; see README-operations.md.

    Every line is checked first (JSON, keys, times, the scheduler's own validation and,
    when the task module imports here, the task name). By default the valid lines are
    added and each rejected line is reported with its number; with strict, one rejected
    line means nothing is added. Either way the exit code is 2 if any line was rejected.
    """
    from ..ops import parse_job_lines, task_checker
    from ..scheduler import ConflictResolution

    lines = _read_lines(source)
    mode = ConflictResolution.parse(on_conflict)
    known = task_checker(settings)

    async def go() -> tuple[list[str | None], list[Any]]:
        async with open_scheduler(settings) as sched:
            def check(spec: Any) -> None:
                known(str(spec.func))
                sched.validate(spec)  # args and kwargs are a list and an object from here
                known(str(spec.func), spec.args, spec.kwargs)

            specs, rejected = parse_job_lines(lines, tz=settings.jobs.timezone,
                                              now=datetime.now(UTC), check=check)
            if rejected and strict:
                return [], rejected
            # RAISE must be all or nothing, so it is one transaction; otherwise chunks
            # commit as they go and the bar moves.
            chunk = len(specs) if mode is ConflictResolution.RAISE else BULK_CHUNK
            ids: list[str | None] = []
            with progress("adding jobs", len(specs)) as advance:
                for start in range(0, len(specs), max(chunk, 1)):
                    batch = specs[start:start + chunk]
                    ids += await sched.schedule_bulk(batch, conflict_resolution=mode)
                    advance(len(batch))
            return ids, rejected

    ids, rejected = _run(go())
    added = [i for i in ids if i is not None]
    print_ids(added)
    skipped = len(ids) - len(added)
    why = "ignored as duplicates" if mode is ConflictResolution.IGNORE \
        else "not replaced (running)"
    summary = f"added {len(added)}, {skipped} {why}, rejected {len(rejected)}"
    if rejected and strict:
        summary = f"added nothing (--strict), rejected {len(rejected)}"
    note(summary)
    for r in rejected[:MAX_REJECTS_SHOWN]:
        note(f"error: line {r.line}: {r.error}")
    if len(rejected) > MAX_REJECTS_SHOWN:
        note(f"... and {len(rejected) - MAX_REJECTS_SHOWN} more rejected lines")
    if rejected:
        raise typer.Exit(2)


# -- ls --------------------------------------------------------------------------------




def _first_line(text: str | None, limit: int) -> str:
    line = (text or "").strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[:limit - 1] + "…"


@app.command("ls")
@command
def ls(
    ctx: typer.Context,
    status: Annotated[list[str] | None, typer.Option(
        "--status", "-s", help="Filter by status (repeatable).")] = None,
    task_name: Annotated[str | None, typer.Option("--task", help="Filter by task.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Filter by queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100000, help="At most this many.")] = 50,
    since: Annotated[str | None, typer.Option(
        help="Only jobs created since a duration ago (30m, 2d) or a time (ISO 8601).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List jobs, newest first (by creation time). `attempts` counts every run; `failures`
    is failures so far of the max_retries + 1 allowed (a retry starts it again)."""
    from ..store import STATUSES

    settings = settings_of(ctx)
    statuses = parse_statuses(status, STATUSES)
    if queue is not None:
        validate_queue_name(queue)
    created_since = None
    if since is not None:
        from ..ops import parse_since

        created_since = parse_since(since, tz=settings.jobs.timezone, now=datetime.now(UTC))

    async def go() -> list[dict[str, Any]]:
        async with open_store(settings) as store:
            return await store.list_jobs(statuses=statuses, task=task_name, queue=queue,
                                         limit=limit + 1, since=created_since)

    from ..jobjson import job_to_json

    rows = [job_to_json(row) for row in _run(go())]
    more = len(rows) > limit
    rows = rows[:limit]
    if as_json:
        print_json(rows)
        return
    print_table(
        ("id", "task", "queue", "status", "execution_time", "priority", "attempts", "failures",
         "last_error"),
        [(row["id"], row["task"], row["queue"], row["status"],
          row["execution_time"] if row["waiting_for"] is None
          else "waits for " + ", ".join(row["waiting_for"]),
          row["priority"], row["attempts"], f"{row['failures']}/{row['max_retries'] + 1}",
          _first_line(row["last_error"], 60)) for row in rows])
    if more:
        note(f"showing the newest {limit}; use --limit or --since to see others")


# -- show ------------------------------------------------------------------------------


@app.command()
@command
def show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job to show.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Everything about one job: fields, result, and every attempt with its error."""
    from ..ops import job_json
    from .views import job_view

    settings = settings_of(ctx)

    async def go() -> tuple[dict[str, Any] | None, datetime]:
        async with open_scheduler(settings) as sched:
            return await sched.store.get_job(job_id), await sched.store.db_now()

    job, now = _run(go())
    if job is None:
        raise JobNotFound(f"job {job_id}: not found")
    data = job_json(job, now)
    if as_json:
        print_json(data)
    else:
        print_view(job_view(data))


# -- retry -----------------------------------------------------------------------------


@app.command()
@command
def retry(
    ctx: typer.Context,
    job_ids: Annotated[list[str] | None, typer.Argument(
        metavar="JOB_ID", help="Jobs to retry.")] = None,
    status: Annotated[list[Retryable] | None, typer.Option(
        "--status", "-s", help="Retry every job in this status (repeatable).")] = None,
    task_name: Annotated[str | None, typer.Option(
        "--task", help="With --status: only this task.")] = None,
    queue: Annotated[str | None, typer.Option(
        "--queue", help="With --status: only this queue.")] = None,
) -> None:
    """Put failed, expired or cancelled jobs back to pending, due now, with a fresh retry
    budget (earlier attempts stay in their history); prints the ids retried."""
    from ..ops import retry_jobs, retry_matching

    if job_ids and status:
        raise InvalidInput("give job ids or --status, not both")
    if not job_ids and not status:
        raise InvalidInput("give job ids, or --status failed|expired|cancelled to retry many")
    if job_ids and (task_name or queue):
        raise InvalidInput("--task and --queue filter --status; with job ids give only the ids")
    settings = settings_of(ctx)
    wanted = list(dict.fromkeys(job_ids or []))

    async def go() -> tuple[list[str], dict[str, str]]:
        async with open_scheduler(settings) as sched:
            if wanted:
                done = set(await retry_jobs(sched.store, wanted))
                # In the order given, like cancel; the others are explained below.
                return ([j for j in wanted if j in done],
                        await sched.store.job_statuses([j for j in wanted if j not in done]))
            with progress("retrying", None) as advance:
                return await retry_matching(
                    sched.store, statuses=[s.value for s in dict.fromkeys(status or [])],
                    task=task_name, queue=queue, on_batch=advance), {}

    retried, others = _run(go())
    print_ids(retried)
    note(f"retried {len(retried)} job{'' if len(retried) == 1 else 's'}")
    problems = [j for j in wanted if j not in set(retried)]
    for job_id in problems:
        reason = (f"is {others[job_id]}; only failed, expired or cancelled jobs can be retried"
                  if job_id in others else "not found")
        note(f"error: job {job_id}: {reason}")
    if problems:
        raise typer.Exit(1)


# -- cancel ----------------------------------------------------------------------------


@app.command()
@command
def cancel(
    ctx: typer.Context,
    job_ids: Annotated[list[str] | None, typer.Argument(
        metavar="[JOB_ID]...", help="Jobs to cancel.", show_default=False)] = None,
    task_name: Annotated[str | None, typer.Option(
        "--task", help="Cancel every pending or running job of this task.")] = None,
    queue: Annotated[str | None, typer.Option(
        help="Cancel every pending or running job in this queue.")] = None,
    wait: Annotated[str | None, typer.Option(
        help="Wait this long (e.g. 30s) for running jobs to end, and report how they did.")
    ] = None,
) -> None:
    """Cancel jobs. Pending jobs are cancelled at once; a running job's worker is told to
    stop it and records it as cancelled (if that worker is gone, the job is cancelled when
    its lease expires). Prints the ids; exit 1 if a given id was not found or had already
    finished, or with --wait if a running job did not end cancelled in time."""
    from ..timing import parse_duration

    settings = settings_of(ctx)
    ids = list(job_ids or [])
    if ids and (task_name or queue):
        raise InvalidInput("give job ids, or --task/--queue, not both")
    if not ids and not (task_name or queue):
        raise InvalidInput("nothing to cancel: give job ids, --task NAME or --queue NAME")
    if task_name is not None:
        from ..ops import task_checker

        task_checker(settings)(task_name)  # a typo is refused, not a silent "0 cancelled"
    if queue is not None:
        validate_queue_name(queue)
    wait_seconds = (for_option("--wait", parse_duration, wait).total_seconds()
                    if wait is not None else None)

    async def go() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        async with open_scheduler(settings) as sched:
            done = await sched.store.request_cancel(
                ids=ids or None, task=task_name, queue=queue)
            others = await sched.store.job_statuses([j for j in ids if j not in done])
            running = [j for j, status in done.items() if status == "running"]
            final = {}
            if wait_seconds is not None and running:
                final = await _wait_for_end(sched.store, running, wait_seconds)
            return done, others, final

    done, others, final = _run(go())
    for job_id in dict.fromkeys(ids) if ids else done:  # ids in the order given
        if job_id in done:
            say(job_id)
    running = [j for j, status in done.items() if status == "running"]
    problems = 0
    if ids:
        for job_id in running:
            if job_id not in final:
                note(f"job {job_id}: running; its worker was asked to stop it")
        for job_id in (j for j in dict.fromkeys(ids) if j not in done):
            problems += 1
            reason = f"already {others[job_id]}" if job_id in others else "not found"
            note(f"error: job {job_id}: {reason}")
    else:
        note(f"cancelled {len(done) - len(running)} pending jobs; asked workers to stop "
             f"{len(running)} running jobs")
    for job_id, status in final.items():
        if status == "cancelled":
            continue
        problems += 1
        if status == "running":
            note(f"error: job {job_id}: still running after {wait}; it ends cancelled "
                 "when its worker stops it or its lease expires")
        else:
            note(f"error: job {job_id}: ended {status} before it could be cancelled")
    if problems:
        raise typer.Exit(1)

async def _wait_for_end(store: Any, job_ids: list[str], seconds: float) -> dict[str, str]:
    """Poll until none of the jobs is running or the time is up; their last statuses."""
    import asyncio

    deadline = time.monotonic() + seconds
    while True:
        statuses = await store.job_statuses(job_ids)
        if all(s != "running" for s in statuses.values()) or time.monotonic() >= deadline:
            return {j: statuses.get(j, "deleted") for j in job_ids}
        await asyncio.sleep(WAIT_POLL_SECONDS)
