"""Commands that act on running daemons: `cancel`, `pause --queue`, `resume --queue`, `queues`.

Owns: cancelling jobs from the shell, pending or running (a running job's worker is
notified, stops the task and records the job `cancelled`), and pausing and resuming
queues for every worker at once. Registered on pgsched.cli's app when cli.py imports
this module.

`pause_queues_command` and `resume_queues_command` hold the queue forms of `pause` and
`resume`, so a `pause` command that also pauses schedules by id can call them for
`--queue`.

Exit codes follow cli.py: 0 done, 1 something asked for could not be done (a job id not
found or already finished, a cancel still pending after --wait), 2 bad input. Bad input
is rejected before any connection is opened.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import socket
import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from .cli import _ctx, _run, app, command, err, for_option, open_scheduler, out
from .errors import InvalidInput
from .logs import configure
from .queues import validate_queue_name
from .tasks import validate_task_name
from .timing import parse_duration

WAIT_POLL_SECONDS = 0.2

# -- cancel ------------------------------------------------------------------------------


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
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    ids = list(job_ids or [])
    if ids and (task_name or queue):
        raise InvalidInput("give job ids, or --task/--queue, not both")
    if not ids and not (task_name or queue):
        raise InvalidInput("nothing to cancel: give job ids, --task NAME or --queue NAME")
    if task_name is not None:
        validate_task_name(task_name)
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
            out.print(job_id, markup=False)
    running = [j for j, status in done.items() if status == "running"]
    problems = 0
    if ids:
        for job_id in running:
            if job_id not in final:
                err.print(f"job {job_id}: running; its worker was asked to stop it",
                          markup=False)
        for job_id in (j for j in dict.fromkeys(ids) if j not in done):
            problems += 1
            reason = f"already {others[job_id]}" if job_id in others else "not found"
            err.print(f"error: job {job_id}: {reason}", markup=False)
    else:
        err.print(f"cancelled {len(done) - len(running)} pending jobs; asked workers to stop "
                  f"{len(running)} running jobs", markup=False)
    for job_id, status in final.items():
        if status == "cancelled":
            continue
        problems += 1
        if status == "running":
            err.print(f"error: job {job_id}: still running after {wait}; it ends cancelled "
                      "when its worker stops it or its lease expires", markup=False)
        else:
            err.print(f"error: job {job_id}: ended {status} before it could be cancelled",
                      markup=False)
    if problems:
        raise typer.Exit(1)


async def _wait_for_end(store: Any, job_ids: list[str], seconds: float) -> dict[str, str]:
    """Poll until none of the jobs is running or the time is up; their last statuses."""
    deadline = time.monotonic() + seconds
    while True:
        statuses = await store.job_statuses(job_ids)
        if all(s != "running" for s in statuses.values()) or time.monotonic() >= deadline:
            return {j: statuses.get(j, "deleted") for j in job_ids}
        await asyncio.sleep(WAIT_POLL_SECONDS)


# -- pause and resume --------------------------------------------------------------------


def _who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (containers)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _each_queue(ctx: typer.Context, queues: list[str], act: Any, unchanged: str) -> None:
    """Validate the names, run `act(store, names)` (returns the names it changed), print
    every name on stdout and `unchanged` on stderr for those it did not change."""
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    names = list(dict.fromkeys(validate_queue_name(q) for q in queues))

    async def go() -> set[str]:
        async with open_scheduler(settings) as sched:
            return await act(sched.store, names)

    changed = _run(go())
    for name in names:
        out.print(name, markup=False)
        if name not in changed:
            err.print(f"queue {name}: {unchanged}", markup=False)


def pause_queues_command(ctx: typer.Context, queues: list[str], reason: str | None) -> None:
    """Stop every worker from claiming from `queues` until they are resumed."""
    _each_queue(ctx, queues, lambda store, names: store.pause_queues(
        names, paused_by=_who(), reason=reason), "was already paused")


def resume_queues_command(ctx: typer.Context, queues: list[str]) -> None:
    """Let workers claim from `queues` again (idle workers are woken at once)."""
    _each_queue(ctx, queues, lambda store, names: store.resume_queues(names), "was not paused")


QueueOption = Annotated[list[str], typer.Option(
    "--queue", "-q", help="Queue name (repeatable).", show_default=False)]


# `pause`/`resume` themselves live in cli_recurring.py: one command takes a schedule id
# or --queue, and calls the functions above for queues.


# -- queues ------------------------------------------------------------------------------


@app.command("queues")
@command
def queues_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """Every queue with pending or running jobs, or paused: its jobs due now, scheduled and
    running, how late its oldest due job is, and whether (since when, by whom) it is paused."""
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)

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
    table = Table(box=None, pad_edge=False)
    for column in ("queue", "state", "due", "scheduled", "running", "lag", "paused"):
        table.add_column(column, overflow="fold")
    for row in rows:
        paused = ""
        if row["paused"]:
            paused = f"since {row['paused_at'][:19]} by {row['paused_by'] or '?'}"
            paused += f": {row['reason']}" if row["reason"] else ""
        table.add_row(row["queue"], "paused" if row["paused"] else "active", str(row["due"]),
                      str(row["scheduled"]), str(row["running"]), f"{row['lag_seconds']:.1f}s",
                      Text(paused))  # a reason is free text: never rich markup
    out.print(table)
