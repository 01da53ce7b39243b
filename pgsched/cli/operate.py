"""Operation commands: `migrate`, `worker`, `vacuum`, `status`, `workers`, `init`,
`config`, `version`.

Owns: their command-line contract, on the terms of pgsched/cli/app.py. `init` never
overwrites a file (it creates it exclusively, so two concurrent runs cannot both write);
`worker` runs until SIGTERM/SIGINT and exits 0 after a graceful shutdown.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .. import __version__
from ..errors import InvalidInput, PgschedError
from ..logs import configure
from ..queues import parse_queue_list
from .app import (
    _ctx,
    _run,
    app,
    command,
    err,
    for_option,
    log,
    note,
    open_scheduler,
    parse_statuses,
    print_json,
    print_view,
    progress,
    resolve_dsn,
    say,
    settings_of,
)

if TYPE_CHECKING:
    from ..config import Settings
    from ..store import Store
    from ..worker import WorkerOptions

# -- migrate ---------------------------------------------------------------------------


@app.command()
@command
def migrate(
    ctx: typer.Context,
    grant: Annotated[list[str] | None, typer.Option(
        "--grant", metavar="ROLE", help="Also let ROLE run worker, add and ls in the schema "
        "(no DDL); repeatable.")] = None,
) -> None:
    """Create or upgrade pgsched's schema; prints the schema version."""
    from ..store import validate_identifier

    settings = settings_of(ctx)
    roles = [validate_identifier(role, "role name") for role in grant or []]

    async def go() -> int:
        async with open_scheduler(settings) as sched:
            return await sched.migrate(grant=roles)

    say(_run(go()))


# -- worker ----------------------------------------------------------------------------


@app.command()
@command
def worker(
    ctx: typer.Context,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Jobs run at once.")] = None,
    queues: Annotated[str | None, typer.Option(
        help="Claim only from these queues, comma-separated (default: every queue).")] = None,
    burst: Annotated[bool, typer.Option(help="Run the jobs due now, then exit.")] = False,
    migrate_schema: Annotated[bool, typer.Option(
        "--migrate/--no-migrate", help="Apply pending migrations at start.")] = True,
) -> None:
    """Run the worker daemon: claim due jobs and run them until SIGTERM/SIGINT."""
    from ..tasks import load_tasks

    settings = _ctx(ctx).settings(**{
        "worker.concurrency": concurrency,
        "worker.queues": list(parse_queue_list(queues)) if queues is not None else None,
    })
    configure(settings.log.level, settings.log.format)
    for warning in settings.warnings:
        log.warning("config_warning", message=warning)
    if settings.worker.tasks is None:
        raise InvalidInput(
            "no task module configured: set [worker] tasks in pgsched.toml (e.g. "
            "tasks = \"examples.tasks\")"
        )
    load_tasks(settings.worker.tasks, settings.base_dir)
    options = worker_options(settings, burst=burst)
    _run_worker(_serve(settings, options, migrate_schema))


def _run_worker(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(), on uvloop when it is installed (`pip install 'pgsched[uvloop]'`):
    its event loop costs the worker less CPU per job (docs/performance.md)."""
    # Never start the loop inside the `except`: every exception raised while it runs
    # (a task's included) would carry the ImportError as its context, and each stored
    # traceback would mention uvloop.
    try:
        import uvloop
    except ImportError:
        uvloop = None
    return _run(coro) if uvloop is None else uvloop.run(coro)


def worker_options(settings: Settings, *, burst: bool = False) -> WorkerOptions:
    from ..worker import WorkerOptions

    w, v = settings.worker, settings.vacuum
    return WorkerOptions(
        concurrency=w.concurrency, lease_seconds=w.lease_seconds,
        heartbeat_seconds=w.heartbeat_seconds, shutdown_grace_seconds=w.shutdown_grace_seconds,
        poll_seconds=w.poll_seconds, retry_base_seconds=w.retry_base_seconds,
        retry_max_seconds=w.retry_max_seconds, max_recoveries=w.max_recoveries, burst=burst,
        vacuum_enabled=v.enabled, vacuum_interval_seconds=v.interval_seconds,
        retention_days=v.retention_days, failed_retention_days=v.failed_retention_days,
        vacuum_batch_size=v.batch_size, timezone=settings.jobs.timezone,
        queues=w.queues or None,
        queue_concurrency=tuple((q, s.concurrency) for q, s in settings.queues.items()
                                if s.concurrency is not None),
        global_limits=tuple((q, s.global_concurrency, s.rate) for q, s in settings.queues.items()
                            if s.global_concurrency is not None or s.rate is not None),
        metrics_listen=settings.metrics.listen, systemd_notify=True,
    )

async def _serve(settings: Settings, options: WorkerOptions, migrate_schema: bool) -> None:
    import asyncio

    from ..scheduler import Scheduler

    pool_size = max(2, settings.database.pool_size)
    db = settings.database
    if db.prepare_threshold is None and db.listen_dsn is None:
        # prepare_threshold = "none" is how a pgsched behind a transaction pooler is set
        # up, and there a LISTEN hears nothing: say why wake-ups take poll_seconds.
        log.warning("listen_through_pooler", poll_seconds=options.poll_seconds,
                    note="prepare_threshold is none but no [database] listen_dsn is set: "
                         "behind PgBouncer in transaction mode this worker hears no "
                         "wake-ups and polls; set listen_dsn to a direct connection")
    sched = Scheduler(
        resolve_dsn(settings, start_embedded=True), schema=db.schema,
        options=options, misfire_grace_time=settings.jobs.misfire_grace_seconds,
        pool_size=pool_size, application_name="pgsched-worker",
        prepare_threshold=db.prepare_threshold, listen_dsn=db.listen_dsn,
    )
    await sched.open()
    try:
        if migrate_schema:
            await sched.migrate()
        worker = await sched.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, worker, signum)
        await sched.wait()
        if worker.schema_outdated:
            raise PgschedError("the schema is older than this pgsched: run `pgsched migrate`")
    finally:
        await sched.close()
    if worker.abandoned_threads or worker.abandoned_tasks:
        # Threads running sync tasks cannot be interrupted and a task that ignores
        # cancellation cannot be stopped; Python and asyncio.run() would wait for them at
        # exit. Their jobs were already put back to pending.
        if worker.abandoned_threads:
            log.warning("sync_tasks_abandoned", count=worker.abandoned_threads)
        sys.stderr.flush()
        os._exit(0)

def _on_signal(worker: Any, signum: int) -> None:
    log.info("signal_received", signal=signal.Signals(signum).name,
             action="stopping now" if worker.stopping else "graceful shutdown")
    worker.stop()


# -- vacuum ----------------------------------------------------------------------------

# A run that deleted this many jobs ends with VACUUM (ANALYZE) of the table: until a vacuum
# removes their dead versions, every claim steps over their entries in the pending index
# (docs/operations.md). Fewer are left to autovacuum, which the table's 1% scale factor
# (migration 0009) triggers soon after, at its next visit of the database.
RECLAIM_AFTER_ROWS = 10_000


@app.command()
@command
def vacuum(
    ctx: typer.Context,
    older_than: Annotated[str | None, typer.Option(
        help="Delete finished jobs older than this (default: [vacuum] retention).")] = None,
    status: Annotated[list[str] | None, typer.Option(
        "--status", "-s", help="Only these finished statuses (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Count, delete nothing.")] = False,
    reclaim: Annotated[bool, typer.Option(
        help=f"After deleting {RECLAIM_AFTER_ROWS:,} jobs or more, VACUUM (ANALYZE) the jobs "
             "table (as its owner; another role is told and skips it).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete finished jobs past their retention; prints the count per status."""
    from ..store import FINISHED_STATUSES
    from ..timing import parse_duration
    from ..worker.maintenance import retention_by_status

    settings = settings_of(ctx)
    statuses = parse_statuses(status, FINISHED_STATUSES) or list(FINISHED_STATUSES)
    retention = retention_by_status(settings.vacuum.retention_days,
                                    settings.vacuum.failed_retention_days)
    if older_than is not None:
        seconds = for_option("--older-than", parse_duration, older_than).total_seconds()
        retention = dict.fromkeys(retention, seconds)
    retention = {s: retention[s] for s in statuses}

    async def go() -> tuple[dict[str, int], str | None]:
        # One connection: it runs one query at a time, and the VACUUM after the deletes
        # must run where they did (Store.reclaim_jobs).
        async with open_scheduler(settings, pool_size=1) as sched:
            if dry_run:
                return {s: await sched.store.count_vacuumable(status=s, older_than_seconds=age)
                        for s, age in retention.items()}, None
            counts = await vacuum_with_progress(sched.store, retention_seconds=retention,
                                                batch_size=settings.vacuum.batch_size)
            if not reclaim or sum(counts.values()) < RECLAIM_AFTER_ROWS:
                return counts, None
            skipped = await sched.store.reclaim_jobs()
            return counts, (f"jobs table not vacuumed ({skipped}): autovacuum will reclaim it;"
                            " run `pgsched vacuum` as the table's owner to do it now"
                            if skipped else "jobs table vacuumed and analyzed")

    counts, reclaimed = _run(go())
    if as_json:
        print_json(counts, indent=None)
    else:
        for s, n in counts.items():
            say(f"{s}: {n}")
        note(f"{'would delete' if dry_run else 'deleted'} {sum(counts.values())} jobs")
    if reclaimed:
        note(reclaimed)


async def vacuum_with_progress(store: Store, *, retention_seconds: dict[str, float],
                               batch_size: int) -> dict[str, int]:
    """vacuum(), with a bar on stderr when it is a terminal (the total is counted first,
    which costs one more scan, so only then)."""
    from ..worker.maintenance import vacuum as vacuum_jobs

    total = None
    if err.is_terminal:
        total = 0
        for s, age in retention_seconds.items():
            total += await store.count_vacuumable(status=s, older_than_seconds=age)
    with progress("vacuuming", total) as advance:
        return await vacuum_jobs(store, retention_seconds=retention_seconds,
                                 batch_size=batch_size, on_batch=lambda _status, n: advance(n))


# -- status, workers -------------------------------------------------------------------


@app.command()
@command
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    exact: Annotated[bool, typer.Option(
        "--exact", help="Count finished jobs per queue even on a big table (reads every "
                        "row: seconds at millions of jobs).")] = False,
) -> None:
    """Jobs per queue and status, the oldest due job's lag, jobs finished in the last
    minute and hour, and the workers with their heartbeats and running jobs. Above
    100,000 jobs, finished jobs are the planner's estimate (~) unless --exact."""
    from ..ops import gather
    from .views import status_view

    settings = settings_of(ctx)

    async def go():
        async with open_scheduler(settings) as sched:
            return await gather(sched.store, stale_after=settings.worker.lease_seconds,
                                exact=exact)

    snapshot = _run(go())
    if as_json:
        print_json(snapshot.to_json())
    else:
        print_view(status_view(snapshot))

@app.command()
@command
def workers(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """The worker registry: id, host, pid, version, queues, running jobs / concurrency,
    start time, last heartbeat. Workers silent for a lease are stale; the daemons prune
    workers silent for ten leases."""
    from ..ops import worker_json
    from .views import workers_table

    settings = settings_of(ctx)
    stale_after = settings.worker.lease_seconds

    async def go() -> tuple[list[dict[str, Any]], datetime]:
        async with open_scheduler(settings) as sched:
            return await sched.store.list_workers(), await sched.store.db_now()

    rows, now = _run(go())
    if as_json:
        print_json([worker_json(w, stale_after) for w in rows])
    elif rows:
        print_view(workers_table(rows, now=now, stale_after=stale_after))
    else:
        note("no worker registered")


# -- init, config, version -------------------------------------------------------------


@app.command()
@command
def init(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(
        metavar="PATH",
        help="File to create, or a directory (existing, or ending in /) to create "
             "pgsched.toml in.")] = "pgsched.toml",
    tasks: Annotated[str | None, typer.Option(
        help="Your task module (dotted name or .py path), written as [worker] tasks.")] = None,
) -> None:
    """Write a commented starter pgsched.toml; never overwrites. The global --dsn, if
    given, is written as [database] dsn (the file is created readable by you only)."""
    from ..config import load_settings
    from ..ops import starter_config

    path = Path(target)
    # Path() drops a trailing slash, which is how `init sub/` says "a directory".
    if path.is_dir() or target.endswith(("/", os.sep)):
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
    say(str(path))
    hint = "set [worker] tasks, then" if tasks is None else "next:"
    steps = ("run `pgsched migrate` and `pgsched worker`" if dsn else
             "run `pgsched worker` (with no [database] dsn it starts the embedded development "
             "server and migrates it)")
    note(f"wrote {path}; {hint} {steps}")

@app.command("config")
@command
def show_config(
    ctx: typer.Context,
    dsn: Annotated[bool, typer.Option(
        "--dsn", help="Print only the DSN the other commands would connect with (the "
        "embedded server's when it runs), for psql or the Python API.")] = False,
    show_password: Annotated[bool, typer.Option(
        help="With --dsn: print the password instead of ***.")] = False,
) -> None:
    """Print the effective configuration (file, PGSCHED_DSN, flags) as TOML, with any
    password masked; with --dsn, only the DSN."""
    from ..config import mask_dsn, settings_to_toml

    if show_password and not dsn:
        raise InvalidInput("--show-password goes with --dsn")
    settings = _ctx(ctx).settings()
    if not dsn:
        sys.stdout.write(settings_to_toml(settings))
        return
    resolved = resolve_dsn(settings)
    say(resolved if show_password else mask_dsn(resolved))


@app.command()
def version() -> None:
    """Print pgsched's version (also `pgsched --version`)."""
    sys.stdout.write(f"{__version__}\n")
