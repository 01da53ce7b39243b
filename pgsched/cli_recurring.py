"""The `pgsched` commands for recurring schedules.

Owns: `schedules`, `pause`, `resume`, `trigger`, `remove`, `cron`, and the schedule branch
of `add` (cli.add calls `add_schedule` when --cron or --every is given). Thin like
cli.py: every input is validated before a connection is opened, so bad input exits 2
and writes nothing; the work is done by pgsched.recurring. Data on stdout, notes on
stderr; an unknown schedule id exits 1.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from . import recurring
from .cli import _check_task_known, _ctx, _run, app, command, err, open_scheduler, out
from .cli_queues import pause_queues_command, resume_queues_command
from .config import Settings
from .errors import InvalidInput
from .logs import configure
from .ops import schedule_to_json
from .store import Store
from .timing import CronSchedule, parse_time

ID_ARGUMENT = typer.Argument(metavar="ID", help="Schedule id (see `pgsched schedules`).")


def add_schedule(
    settings: Settings,
    task_name: str,
    *,
    cron: str | None,
    every: str | None,
    tz: str | None,
    catch_up: str | None,
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
    for option, value in job_options.items():
        if value is not None:
            raise InvalidInput(f"{option} applies to one-off jobs; a schedule's jobs run at "
                               "its fire times")
    if cron is None and every is None:
        raise InvalidInput("--tz and --catch-up describe a schedule: add --cron or --every")
    if schedule_id is None:
        raise InvalidInput("name the schedule with --id; pause, trigger and remove use it")
    _check_task_known(settings, task_name)
    definition = recurring.define_for_task(
        task_name, schedule_id=schedule_id, cron=cron, every=every, tz=tz, args=args,
        kwargs=kwargs, catch_up=catch_up or "latest", priority=priority,
        max_retries=retries, timeout=timeout)

    async def go() -> bool:
        async with open_scheduler(settings) as sched:
            return await recurring.add_schedule(
                sched.store, definition, default_tz=settings.jobs.timezone,
                on_conflict=on_conflict)

    if not _run(go()):
        err.print(f"schedule {schedule_id} exists; left as it was", markup=False)
    out.print(schedule_id, markup=False)


def _store_call(settings: Settings, operation: Any, *args: Any) -> Any:
    async def go() -> Any:
        async with open_scheduler(settings) as sched:
            return await operation(sched.store, *args)

    return _run(go())


def _settings(ctx: typer.Context) -> Settings:
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    return settings


@app.command()
@command
def schedules(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List recurring schedules: definition, next fire time, last run and its status."""
    rows = [schedule_to_json(r) for r in _store_call(_settings(ctx), Store.list_schedules)]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("id", "task", "schedule", "tz", "next_fire_at", "last_run_at",
                   "last_status", "state", "origin"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shown = f"cron {row['cron']}" if row["cron"] else f"every {row['every']}"
        table.add_row(row["id"], row["task"], shown, row["tz"] or "-",
                      row["next_fire_at"] or "-", row["last_run_at"] or "-",
                      row["last_status"] or "-", row["state"], row["origin"])
    out.print(table)


OptionalId = Annotated[str | None, typer.Argument(
    metavar="ID", help="Schedule id (or use --queue).", show_default=False)]
QueueOption = Annotated[list[str] | None, typer.Option(
    "--queue", "-q", help="Queue name instead of a schedule (repeatable).", show_default=False)]


def _one_target(schedule_id: str | None, queues: list[str] | None) -> None:
    if (schedule_id is None) == (not queues):
        raise InvalidInput("give either a schedule ID or --queue NAME")


@app.command()
@command
def pause(
    ctx: typer.Context,
    schedule_id: OptionalId = None,
    queue: QueueOption = None,
    reason: Annotated[str | None, typer.Option(
        help="With --queue: shown by `pgsched queues`.")] = None,
) -> None:
    """Stop a schedule firing, or (--queue) every worker claiming from a queue, until
    `pgsched resume`. Running jobs finish; a paused queue's jobs stay pending (they may
    expire past their misfire grace). Exit 1 for an unknown schedule id."""
    _one_target(schedule_id, queue)
    if queue:
        return pause_queues_command(ctx, queue, reason)
    _note_disabled(_store_call(_settings(ctx), recurring.pause_schedule, schedule_id))
    out.print(schedule_id, markup=False)


@app.command()
@command
def resume(ctx: typer.Context, schedule_id: OptionalId = None,
           queue: QueueOption = None) -> None:
    """Let a paused schedule fire again from its next window (missed ones are not run), or
    (--queue) workers claim from a paused queue again."""
    _one_target(schedule_id, queue)
    if queue:
        return resume_queues_command(ctx, queue)
    _note_disabled(_store_call(_settings(ctx), recurring.resume_schedule, schedule_id))
    out.print(schedule_id, markup=False)


def _note_disabled(row: dict[str, Any]) -> None:
    if not row["enabled"]:
        err.print(f"note: schedule {row['id']} is disabled in code (enabled=False, or its "
                  "@periodic was removed); it fires only once the code enables it",
                  markup=False)


@app.command()
@command
def trigger(ctx: typer.Context, schedule_id: Annotated[str, ID_ARGUMENT]) -> None:
    """Run a schedule's task now as one extra job (its windows do not change); prints
    the job id."""
    out.print(_store_call(_settings(ctx), recurring.trigger_schedule, schedule_id),
              markup=False)


@app.command()
@command
def remove(ctx: typer.Context, schedule_id: Annotated[str, ID_ARGUMENT]) -> None:
    """Delete a schedule; jobs it already enqueued stay."""
    row = _store_call(_settings(ctx), recurring.remove_schedule, schedule_id)
    if row["origin"] == "code":
        err.print(f"note: {schedule_id} is defined in code (@periodic): the next worker to "
                  "start creates it again; remove the decorator, or use `pgsched pause`",
                  markup=False)
    out.print(schedule_id, markup=False)


@app.command("cron")
@command
def cron_times(
    ctx: typer.Context,
    expr: Annotated[str, typer.Argument(metavar="EXPR", help="Cron expression (quote it).")],
    tz: Annotated[str | None, typer.Option(
        help="Time zone (default: [jobs] timezone).")] = None,
    after: Annotated[str | None, typer.Option(
        help="Start after this ISO time (default now); without an offset it is read in "
             "--tz.")] = None,
    count: Annotated[int, typer.Option(min=1, max=1000, help="How many fire times.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """Print the next fire times of a cron expression as pgsched fires them, daylight
    saving included: local time, zone abbreviation, UTC instant."""
    settings = _ctx(ctx).settings()
    schedule = CronSchedule(expr, tz or settings.jobs.timezone)
    start = parse_time(after, tz=schedule.tz) if after is not None else datetime.now(UTC)
    times = [(t.astimezone(schedule.tz), t) for t in schedule.fire_times(start, count)]
    if as_json:
        data = [{"local": local.isoformat(), "zone": local.tzname(),
                 "utc": recurring.format_instant(t)} for local, t in times]
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for local, t in times:
        out.print(f"{local.isoformat()}  {local.tzname()}  {recurring.format_instant(t)}",
                  markup=False)
