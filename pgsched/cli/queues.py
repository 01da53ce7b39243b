"""The `queues` command: every queue with pending or running jobs, or paused.

Owns: its command-line contract, on the terms of pgsched/cli/app.py. Pausing and resuming
a queue are `pause --queue` and `resume --queue` (pgsched/cli/schedules.py).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from .app import _run, app, command, open_scheduler, print_view, settings_of


@app.command("queues")
@command
def queues_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """Every queue with pending or running jobs, or paused: its jobs due now, scheduled and
    running, how late its oldest due job is, and whether (since when, by whom) it is paused."""
    from .views import DataTable

    settings = settings_of(ctx)

    async def go() -> list[dict[str, Any]]:
        async with open_scheduler(settings) as sched:
            return await sched.store.queue_stats()

    rows = _run(go())
    for row in rows:
        if row["paused_at"] is not None:
            row["paused_at"] = row["paused_at"].isoformat()
        row["lag_seconds"] = round(row["lag_seconds"], 3)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = DataTable(box=None, pad_edge=False)
    for column in ("queue", "state", "due", "scheduled", "running", "lag", "paused"):
        table.add_column(column, overflow="fold")
    for row in rows:
        paused = ""
        if row["paused"]:
            paused = f"since {row['paused_at'][:19]} by {row['paused_by'] or '?'}"
            paused += f": {row['reason']}" if row["reason"] else ""
        table.add_row(row["queue"], "paused" if row["paused"] else "active", str(row["due"]),
                      str(row["scheduled"]), str(row["running"]), f"{row['lag_seconds']:.1f}s",
                      paused)
    print_view(table)
