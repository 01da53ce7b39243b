"""The operator commands: show, retry, status, top, workers, init, config, and the
helpers behind `add --from` and vacuum's progress bar.

Owns: their command-line contract, on the same terms as pgsched/cli.py: data on stdout
(tables, ids, JSON with --json), messages and progress bars on stderr (bars only when
stderr is a terminal), exit 0 on success, 1 when the operation failed (a job not found
or not retryable, a file that exists), 2 for bad input. The commands are registered on
cli.app by importing this module at the end of cli.py.

Invariants: every option is validated before a connection is opened; `add --from`
validates every line before it writes any, and `init` never overwrites a file (it
creates it exclusively, so two concurrent runs cannot both write).

Failure: as in cli.py, a PgschedError or a connection error becomes one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from .cli import _ctx, _run, app, command, err, open_scheduler, out, task_checker
from .config import Settings, load_settings, settings_to_toml
from .dashboard import dashboard_view, job_view, run_live, status_view, workers_table
from .errors import InvalidInput, JobNotFound, PgschedError
from .logs import configure
from .ops import (
    RETRYABLE_STATUSES,
    Rejected,
    gather,
    job_json,
    parse_job_lines,
    retry_jobs,
    retry_matching,
    starter_config,
    worker_json,
)
from .scheduler import ConflictResolution, JobSpec
from .store import Store
from .worker.context import DB_ERRORS
from .worker.maintenance import vacuum

BULK_CHUNK = 1000
MAX_REJECTS_SHOWN = 20

Retryable = StrEnum("Retryable", {s: s for s in RETRYABLE_STATUSES})


def _settings(ctx: typer.Context) -> Settings:
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    return settings


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _print_ids(ids: list[str]) -> None:
    # Plain writes: rich's print costs ~0.2 ms a line, which a 100k-line file notices.
    if ids:
        sys.stdout.write("\n".join(ids) + "\n")


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """advance(n) for a progress bar on stderr; a no-op when stderr is not a terminal,
    so logs and pipes never fill with redraws."""
    if not err.is_terminal:
        yield lambda _n: None
        return
    if total is None:
        columns: tuple[Any, ...] = (SpinnerColumn(), TextColumn("{task.description}"),
                                    TextColumn("{task.completed}"), TimeElapsedColumn())
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- show --------------------------------------------------------------------------------


@app.command()
@command
def show(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job to show.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Everything about one job: fields, result, and every attempt with its error."""
    settings = _settings(ctx)

    async def go() -> tuple[dict[str, Any] | None, datetime]:
        async with open_scheduler(settings) as sched:
            return await sched.store.get_job(job_id), await sched.store.db_now()

    job, now = _run(go())
    if job is None:
        raise JobNotFound(f"job {job_id}: not found")
    data = job_json(job, now)
    if as_json:
        _print_json(data)
    else:
        out.print(job_view(data))


# -- retry -------------------------------------------------------------------------------


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
    if job_ids and status:
        raise InvalidInput("give job ids or --status, not both")
    if not job_ids and not status:
        raise InvalidInput("give job ids, or --status failed|expired|cancelled to retry many")
    if job_ids and (task_name or queue):
        raise InvalidInput("--task and --queue filter --status; with job ids give only the ids")
    settings = _settings(ctx)
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
    _print_ids(retried)
    err.print(f"retried {len(retried)} job{'' if len(retried) == 1 else 's'}", markup=False)
    problems = [j for j in wanted if j not in set(retried)]
    for job_id in problems:
        reason = (f"is {others[job_id]}; only failed, expired or cancelled jobs can be retried"
                  if job_id in others else "not found")
        err.print(f"error: job {job_id}: {reason}", markup=False)
    if problems:
        raise typer.Exit(1)


# -- status, top, workers ----------------------------------------------------------------


@app.command()
@command
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Jobs per queue and status, the oldest due job's lag, jobs finished in the last
    minute and hour, and the workers with their heartbeats and running jobs."""
    settings = _settings(ctx)

    async def go():
        async with open_scheduler(settings) as sched:
            return await gather(sched.store, stale_after=settings.worker.lease_seconds)

    snapshot = _run(go())
    if as_json:
        _print_json(snapshot.to_json())
    else:
        out.print(status_view(snapshot))


@app.command()
@command
def top(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(
        min=0.2, max=3600, help="Seconds between refreshes.")] = 1.0,
    rows: Annotated[int, typer.Option(
        min=1, max=1000, help="Most rows per job list (fewer if the screen is short).")] = 10,
) -> None:
    """Live dashboard: workers, running jobs, next due jobs, recent failures, throughput.
    q or Ctrl-C quits. When stdout is not a terminal it prints one snapshot and exits."""
    settings = _settings(ctx)
    title = f"pgsched top · schema {settings.database.schema} · q quits"

    async def go() -> None:
        async with open_scheduler(settings) as sched:
            async def fetch():
                return await gather(sched.store, stale_after=settings.worker.lease_seconds,
                                    dashboard=True, rows=rows)

            if not out.is_terminal:
                out.print(dashboard_view(await fetch(), title=title))
                return

            def render(snapshot):
                return dashboard_view(snapshot, title=title, height=out.size.height)

            await run_live(fetch, render, out, interval=interval, errors=DB_ERRORS)

    _run(go())


@app.command()
@command
def workers(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """The worker registry: id, host, pid, version, queues, running jobs / concurrency,
    start time, last heartbeat. Workers silent for a lease are stale; the daemons prune
    workers silent for ten leases."""
    settings = _settings(ctx)
    stale_after = settings.worker.lease_seconds

    async def go() -> tuple[list[dict[str, Any]], datetime]:
        async with open_scheduler(settings) as sched:
            return await sched.store.list_workers(), await sched.store.db_now()

    rows, now = _run(go())
    if as_json:
        _print_json([worker_json(w, stale_after) for w in rows])
    elif rows:
        out.print(workers_table(rows, now=now, stale_after=stale_after))
    else:
        err.print("no worker registered", markup=False)


# -- init, config ------------------------------------------------------------------------


@app.command()
@command
def init(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(
        help="File to create, or a directory to create pgsched.toml in.")] = Path("pgsched.toml"),
    tasks: Annotated[str | None, typer.Option(
        help="Your task module (dotted name or .py path), written as [worker] tasks.")] = None,
) -> None:
    """Write a commented starter pgsched.toml; never overwrites. The global --dsn, if
    given, is written as [database] dsn (the file is created readable by you only)."""
    if path.is_dir():
        path = path / "pgsched.toml"
    if not path.parent.is_dir():
        raise InvalidInput(f"directory {path.parent} does not exist: create it first")
    dsn = _ctx(ctx).dsn
    # The values must pass the same checks as when the file is read later.
    load_settings(None, env={}, overrides={"worker.tasks": tasks, "database.dsn": dsn})
    text = starter_config(tasks=tasks, dsn=dsn)
    try:
        # O_EXCL: refuses an existing file (or symlink) even if it appears meanwhile; mode
        # 600 because the file is where a DSN with a password ends up.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PgschedError(f"{path} already exists: remove it or choose another path") \
            from None
    except OSError as exc:
        raise PgschedError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)
    out.print(str(path), markup=False)
    hint = "set [worker] tasks, then" if tasks is None else "next:"
    err.print(f"wrote {path}; {hint} run `pgsched migrate` and `pgsched worker`", markup=False)


@app.command("config")
@command
def show_config(ctx: typer.Context) -> None:
    """Print the effective configuration (file, PGSCHED_DSN, flags) as TOML, with any
    password masked."""
    sys.stdout.write(settings_to_toml(_ctx(ctx).settings()))


# -- helpers for commands defined in cli.py ----------------------------------------------


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
    lines = _read_lines(source)
    mode = ConflictResolution.parse(on_conflict)
    known = task_checker(settings)

    async def go() -> tuple[list[str | None], list[Rejected]]:
        async with open_scheduler(settings) as sched:
            def check(spec: JobSpec) -> None:
                known(str(spec.func))
                sched.validate(spec)

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
    _print_ids(added)
    skipped = len(ids) - len(added)
    why = "ignored as duplicates" if mode is ConflictResolution.IGNORE \
        else "not replaced (running)"
    summary = f"added {len(added)}, {skipped} {why}, rejected {len(rejected)}"
    if rejected and strict:
        summary = f"added nothing (--strict), rejected {len(rejected)}"
    err.print(summary, markup=False)
    for r in rejected[:MAX_REJECTS_SHOWN]:
        err.print(f"error: line {r.line}: {r.error}", markup=False)
    if len(rejected) > MAX_REJECTS_SHOWN:
        err.print(f"... and {len(rejected) - MAX_REJECTS_SHOWN} more rejected lines",
                  markup=False)
    if rejected:
        raise typer.Exit(2)


async def vacuum_with_progress(store: Store, *, retention_seconds: dict[str, float],
                               batch_size: int) -> dict[str, int]:
    """vacuum(), with a bar on stderr when it is a terminal (the total is counted first,
    which costs one more scan, so only then)."""
    total = None
    if err.is_terminal:
        total = 0
        for s, age in retention_seconds.items():
            total += await store.count_vacuumable(status=s, older_than_seconds=age)
    with progress("vacuuming", total) as advance:
        return await vacuum(store, retention_seconds=retention_seconds, batch_size=batch_size,
                            on_batch=lambda _status, n: advance(n))
