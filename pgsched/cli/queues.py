"""The `queues` command: every queue with pending or running jobs, or paused.

Owns: its command-line contract, on the terms of pgsched/cli/app.py. Pausing and resuming
a queue are `pause --queue` and `resume --queue` (pgsched/cli/schedules.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .app import _run, app, command, open_scheduler, print_json, print_table, settings_of


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
        lines.append((row["queue"], "paused" if row["paused"] else "active", row["due"],
                      row["scheduled"], row["running"], _lag(row), paused))
    print_table(("queue", "state", "due", "scheduled", "running", "lag", "paused"), lines)


def _lag(row: dict[str, Any]) -> str:
    """How late the oldest due job is, like `status`: "-" when none is due."""
    from ..ops import human_seconds

    return human_seconds(row["lag_seconds"]) if row["due"] else "-"
