"""The `queues` command: every queue with pending or running jobs, or paused; and
`queue limit`, a queue's global limits (global_concurrency, rate).

Owns: its command-line contract, on the terms of pgsched/cli/app.py. Pausing and resuming
a queue are `pause --queue` and `resume --queue` (pgsched/cli/schedules.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..errors import InvalidInput
from ..queues import check_global_concurrency, parse_rate, validate_queue_name
from .app import (
    _run,
    app,
    command,
    for_option,
    open_scheduler,
    print_json,
    print_table,
    say,
    settings_of,
    who,
)


@app.command("queues")
@command
def queues_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """Every queue with pending or running jobs, or paused: its jobs due now, scheduled and
    running, how late its oldest due job is, and whether (since when, by whom) it is paused."""
    settings = settings_of(ctx)

    async def go() -> list[dict[str, Any]]:
        async with open_scheduler(settings) as sched:
            return await sched.store.queue_stats()

    from ..ops import queue_to_json

    rows = [queue_to_json(row) for row in _run(go())]
    if as_json:
        print_json(rows)
        return
    lines = []
    for row in rows:
        paused = ""
        if row["paused"]:
            paused = f"since {row['paused_at'][:19]} by {row['paused_by'] or '?'}"
            paused += f": {row['reason']}" if row["reason"] else ""
        more = "+" if row["capped"] else ""  # counted up to Store.COUNT_LIMIT
        lines.append((row["queue"], "paused" if row["paused"] else "active",
                      f"{row['due']}{more}", f"{row['scheduled']}{more}", row["running"],
                      _lag(row), paused))
    print_table(("queue", "state", "due", "scheduled", "running", "lag", "paused"), lines)


def _lag(row: dict[str, Any]) -> str:
    """How late the oldest due job is, like `status`: "-" when none is due."""
    from ..ops import human_seconds

    return human_seconds(row["lag_seconds"]) if row["due"] else "-"


queue_app = typer.Typer(help="One queue's settings that every worker follows.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(queue_app, name="queue")

_NONE = "none"


@queue_app.command("limit")
@command
def queue_limit(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(
        metavar="NAME",
        help="The queue; without one, every queue's global limits are listed.")] = None,
    global_concurrency: Annotated[str | None, typer.Option(
        "--global-concurrency", metavar="N|none",
        help="At most N jobs of the queue running in the whole cluster; none removes it.")]
        = None,
    rate: Annotated[str | None, typer.Option(
        metavar="JOBS/PERIOD|none",
        help="At most JOBS started in any PERIOD, like 100/1m; none removes it.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove both global limits.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Set, remove or show a queue's global limits (every worker's claims obey them at
    once). Without options: show them."""
    settings = settings_of(ctx)
    if name is not None:
        validate_queue_name(name)
    if clear and (global_concurrency is not None or rate is not None):
        raise InvalidInput("--clear removes both limits: give it alone, or give "
                           "--global-concurrency none / --rate none")
    changes: dict[str, Any] = {}
    if global_concurrency is not None or clear:
        changes.update(set_concurrency=True, global_concurrency=_concurrency(
            _NONE if clear else global_concurrency))
    if rate is not None or clear:
        changes.update(set_rate=True, rate=None if clear or rate == _NONE else for_option(
            "--rate", parse_rate, rate))
    if changes and name is None:
        raise InvalidInput("name the queue whose limits to change: pgsched queue limit NAME "
                           "--global-concurrency N")

    async def go() -> list[dict[str, Any]]:
        async with open_scheduler(settings) as sched:
            if changes:
                assert name is not None
                row = await sched.store.set_queue_limits(name, set_by=who(), **changes)
                return [row] if row else []
            return await sched.store.queue_limits(name)

    from ..ops import queue_limits_to_json

    rows = [queue_limits_to_json(row) for row in _run(go())]
    if as_json:
        print_json(rows if name is None else (rows[0] if rows else None))
        return
    if name is not None and not rows:
        say(f"{name}: no global limits")
        return
    print_table(("queue", "global concurrency", "running", "rate", "started in window",
                 "set by"),
                [(r["queue"], r["global_concurrency"] or "-", r["running"], r["rate"] or "-",
                  r["started_in_window"] if r["rate"] else "-",
                  f"{r['set_by'] or '?'} at {r['set_at'][:19]}") for r in rows])


def _concurrency(text: str | None) -> int | None:
    if text is None or text.strip().lower() == _NONE:
        return None
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"--global-concurrency: {text!r} is not a whole number; give N "
                           "(1 or more) or none") from None
    return for_option("--global-concurrency", check_global_concurrency, value)
