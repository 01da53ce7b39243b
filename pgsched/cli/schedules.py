"""Schedule commands: `schedules`, `pause`, `resume`, `trigger`, `remove`, `cron`.

Owns: their command-line contract, on the terms of pgsched/cli/app.py; the work is done by
pgsched.recurring. `pause` and `resume` take a schedule id or --queue (then every worker
stops or starts claiming from that queue). Every input is validated before a connection is
opened, so bad input exits 2 and writes nothing; an unknown schedule id exits 1.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import InvalidInput
from ..queues import validate_queue_name
from .app import (
    _ctx,
    _run,
    app,
    command,
    note,
    open_scheduler,
    print_json,
    print_table,
    say,
    settings_of,
    who,
)

if TYPE_CHECKING:
    from ..config import Settings

ID_ARGUMENT = typer.Argument(metavar="ID", help="Schedule id (see `pgsched schedules`).")




def _store_call(settings: Settings, operation: Any, *args: Any) -> Any:
    async def go() -> Any:
        async with open_scheduler(settings) as sched:
            return await operation(sched.store, *args)

    return _run(go())

@app.command()
@command
def schedules(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List recurring schedules: definition, next fire time, last run and its status."""
    from ..ops import schedule_to_json
    from ..store import Store

    rows = [schedule_to_json(r) for r in _store_call(settings_of(ctx), Store.list_schedules)]
    if as_json:
        print_json(rows)
        return
    print_table(
        ("id", "task", "schedule", "tz", "next_fire_at", "last_run_at", "last_status", "state",
         "origin"),
        [(row["id"], row["task"],
          f"cron {row['cron']}" if row["cron"] else f"every {row['every']}", row["tz"] or "-",
          row["next_fire_at"] or "-", row["last_run_at"] or "-", row["last_status"] or "-",
          row["state"], row["origin"]) for row in rows])

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
    from .. import recurring

    _one_target(schedule_id, queue)
    if queue:
        return pause_queues_command(ctx, queue, reason)
    row = _store_call(settings_of(ctx), recurring.pause_schedule, schedule_id)
    if row["was_paused"]:
        note(f"schedule {schedule_id}: was already paused")
    _note_disabled(row)
    say(schedule_id)

@app.command()
@command
def resume(ctx: typer.Context, schedule_id: OptionalId = None,
           queue: QueueOption = None) -> None:
    """Let a paused schedule fire again from its next window (missed ones are not run), or
    (--queue) workers claim from a paused queue again."""
    from .. import recurring

    _one_target(schedule_id, queue)
    if queue:
        return resume_queues_command(ctx, queue)
    row = _store_call(settings_of(ctx), recurring.resume_schedule, schedule_id)
    if not row["was_paused"]:
        note(f"schedule {schedule_id}: was not paused")
    _note_disabled(row)
    say(schedule_id)

def _note_disabled(row: dict[str, Any]) -> None:
    if not row["enabled"]:
        note(f"note: schedule {row['id']} is disabled in code (enabled=False, or its "
             "@periodic was removed); it fires only once the code enables it")



def _each_queue(ctx: typer.Context, queues: list[str], act: Any, unchanged: str) -> None:
    """Validate the names, run `act(store, names)` (returns the names it changed), print
    every name on stdout and `unchanged` on stderr for those it did not change."""
    settings = settings_of(ctx)
    names = list(dict.fromkeys(validate_queue_name(q) for q in queues))

    async def go() -> set[str]:
        async with open_scheduler(settings) as sched:
            return await act(sched.store, names)

    changed = _run(go())
    for name in names:
        say(name)
        if name not in changed:
            note(f"queue {name}: {unchanged}")

def pause_queues_command(ctx: typer.Context, queues: list[str], reason: str | None) -> None:
    """Stop every worker from claiming from `queues` until they are resumed."""
    _each_queue(ctx, queues, lambda store, names: store.pause_queues(
        names, paused_by=who(), reason=reason), "was already paused")

def resume_queues_command(ctx: typer.Context, queues: list[str]) -> None:
    """Let workers claim from `queues` again (idle workers are woken at once)."""
    _each_queue(ctx, queues, lambda store, names: store.resume_queues(names), "was not paused")


@app.command()
@command
def trigger(ctx: typer.Context, schedule_id: Annotated[str, ID_ARGUMENT]) -> None:
    """Run a schedule's task now as one extra job (its windows do not change); prints
    the job id."""
    from .. import recurring

    say(_store_call(settings_of(ctx), recurring.trigger_schedule, schedule_id))

@app.command()
@command
def remove(ctx: typer.Context, schedule_id: Annotated[str, ID_ARGUMENT]) -> None:
    """Delete a schedule; jobs of windows that came stay (one planned ahead is withdrawn)."""
    from .. import recurring

    row = _store_call(settings_of(ctx), recurring.remove_schedule, schedule_id)
    if row["origin"] == "code":
        note(f"note: {schedule_id} is defined in code (@periodic): the next worker to "
             "start creates it again; remove the decorator, or use `pgsched pause`")
    say(schedule_id)

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
    from .. import recurring
    from ..timing import CronSchedule, parse_time

    settings = _ctx(ctx).settings()
    schedule = CronSchedule(expr, tz or settings.jobs.timezone)
    start = parse_time(after, tz=schedule.tz) if after is not None else datetime.now(UTC)
    times = [(t.astimezone(schedule.tz), t) for t in schedule.fire_times(start, count)]
    if as_json:
        data = [{"local": local.isoformat(), "zone": local.tzname(),
                 "utc": recurring.format_instant(t)} for local, t in times]
        print_json(data)
        return
    for local, t in times:
        say(f"{local.isoformat()}  {local.tzname()}  {recurring.format_instant(t)}")
