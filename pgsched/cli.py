"""The `pgsched` command: thin typer commands that parse, call the API, and print.

Owns: the command-line contract. Data goes to stdout (a job id, a table, JSON), messages
to stderr. Exit codes: 0 success, 1 the operation failed (job not found, conflict,
database unreachable), 2 bad input or usage. A PgschedError is printed as one line
without a traceback (`--debug` or PGSCHED_DEBUG=1 shows it); anything else is a bug and
keeps its traceback.

Every command reads the same settings (config file, environment, flags) through
`_Context.settings`, and validates all input before it opens a connection, so bad input
never writes anything.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import psycopg
import psycopg_pool
import typer
from rich.console import Console

from . import __version__
from .config import (
    Settings,
    command_line_dsn_warning,
    find_config_path,
    load_settings,
    mask_dsn,
)
from .dashboard import DataTable
from .errors import InvalidInput, PgschedError
from .logs import configure, get_logger
from .queues import parse_queue_list, validate_queue_name
from .scheduler import UNSET, ConflictResolution, Scheduler
from .store import FINISHED_STATUSES, STATUSES, decode_json, validate_identifier
from .tasks import JobPriority, get_task, load_tasks, validate_task_name
from .timing import parse_duration, parse_time
from .worker import WorkerOptions

app = typer.Typer(
    help="pgsched: a PostgreSQL-backed job scheduler. Data on stdout, messages on stderr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped output (scripts, `| less`) gets a wide fixed width instead of rich's 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
log = get_logger("pgsched.cli")


@dataclass
class _Context:
    config: str | None
    dsn: str | None
    schema: str | None
    debug: bool
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self, **overrides: object) -> Settings:
        if self._settings is None or overrides:
            merged: dict[str, object] = {k: v for k, v in overrides.items() if v is not None}
            if self.dsn is not None:
                merged["database.dsn"] = self.dsn
            if self.schema is not None:
                merged["database.schema"] = self.schema
            settings = load_settings(find_config_path(self.config), overrides=merged)
            if overrides:
                return settings
            self._settings = settings
        return self._settings


def _ctx(ctx: typer.Context) -> _Context:
    return ctx.obj


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn pgsched errors into one line on stderr and the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx") or next(a for a in args if isinstance(a, typer.Context))
        debug = _ctx(ctx).debug
        try:
            return fn(*args, **kwargs)
        except PgschedError as exc:
            if debug:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            if debug:
                raise
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _fail(f"database unreachable: {mask_dsn(detail)}", 1) from None
        except psycopg.errors.UndefinedTable:
            if debug:
                raise
            raise _fail("the pgsched schema is not set up: run `pgsched migrate` first", 1) \
                from None
        except psycopg.errors.InsufficientPrivilege as exc:
            if debug:
                raise
            raise _fail(
                f"{str(exc).strip().splitlines()[0]}: the database role lacks a privilege "
                "pgsched needs; as the schema's owner run `pgsched migrate --grant ROLE`", 1,
            ) from None

    return wrapper


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def _run_worker(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(), on uvloop when it is installed (`pip install 'pgsched[uvloop]'`):
    its event loop costs the worker less CPU per job (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def resolve_dsn(settings: Settings, *, announce: bool = False) -> str:
    if settings.database.dsn:
        return settings.database.dsn
    from .embedded import embedded_dsn

    dsn = embedded_dsn(settings.database.data_dir)
    (log.info if announce else log.debug)(
        "embedded_database", data_dir=str(settings.database.data_dir),
        note="development database; set [database] dsn for production")
    return dsn


@asynccontextmanager
async def open_scheduler(settings: Settings, *, pool_size: int = 2):
    misfire = settings.jobs.misfire_grace_seconds
    async with Scheduler(
        resolve_dsn(settings), schema=settings.database.schema, misfire_grace_time=misfire,
        pool_size=pool_size,
    ) as sched:
        yield sched


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option("--config", "-c", envvar="PGSCHED_CONFIG",
                                               help="Path to pgsched.toml.")] = None,
    dsn: Annotated[str | None, typer.Option(help="PostgreSQL DSN (or PGSCHED_DSN).")] = None,
    schema: Annotated[str | None, typer.Option(help="Schema holding pgsched's tables.")] = None,
    debug: Annotated[bool, typer.Option(envvar="PGSCHED_DEBUG",
                                        help="Show tracebacks for errors.")] = False,
) -> None:
    """pgsched: a PostgreSQL-backed job scheduler."""
    if dsn and (warning := command_line_dsn_warning(dsn)):
        err.print(f"warning: {warning}", markup=False)
    ctx.obj = _Context(config=config, dsn=dsn, schema=schema, debug=debug)


# -- migrate -----------------------------------------------------------------------------


@app.command()
@command
def migrate(
    ctx: typer.Context,
    grant: Annotated[list[str] | None, typer.Option(
        "--grant", metavar="ROLE", help="Also let ROLE run worker, add and ls in the schema "
        "(no DDL); repeatable.")] = None,
) -> None:
    """Create or upgrade pgsched's schema; prints the schema version."""
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    roles = [validate_identifier(role, "role name") for role in grant or []]

    async def go() -> int:
        async with open_scheduler(settings) as sched:
            return await sched.migrate(grant=roles)

    out.print(_run(go()))


# -- worker ------------------------------------------------------------------------------


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


def worker_options(settings: Settings, *, burst: bool = False) -> WorkerOptions:
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
        queue_concurrency=tuple((q, s.concurrency) for q, s in settings.queues.items()),
        metrics_listen=settings.metrics.listen, systemd_notify=True,
    )


async def _serve(settings: Settings, options: WorkerOptions, migrate_schema: bool) -> None:
    pool_size = max(2, settings.database.pool_size)
    sched = Scheduler(
        resolve_dsn(settings, announce=True), schema=settings.database.schema, options=options,
        misfire_grace_time=settings.jobs.misfire_grace_seconds, pool_size=pool_size,
        application_name="pgsched-worker",
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
             action="stopping now" if worker._stopping.is_set() else "graceful shutdown")
    worker.stop()


# -- add ---------------------------------------------------------------------------------


class OnConflict(StrEnum):
    raise_ = "raise"
    ignore = "ignore"
    replace = "replace"


class Priority(StrEnum):
    normal = "normal"
    critical = "critical"


def parse_json_arg(text: str, option: str, kind: type) -> Any:
    value = decode_json(text, option)
    if not isinstance(value, kind):
        expected = "an array, like '[1, \"a\"]'" if kind is list else "an object, like '{\"k\": 1}'"
        raise InvalidInput(f"{option} must be {expected}")
    return value


def for_option(option: str, parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a parser and name the option in its error, so the user knows what to fix."""
    try:
        return parse(*args, **kwargs)
    except InvalidInput as exc:
        raise InvalidInput(f"{option}: {exc}") from None


def parse_misfire(text: str | None) -> Any:
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
    priority: Annotated[Priority | None, typer.Option(help="normal or critical.")] = None,
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
) -> None:
    """Schedule a job, or with --cron/--every a recurring schedule (then --id names it);
    prints only the id, so JOB=$(pgsched add ...) works."""
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    if from_file is not None:
        per_job = {"TASK": task_name, "--args": args != "[]", "--kwargs": kwargs != "{}",
                   "--at": at, "--in": in_, "--id": job_id, "--priority": priority,
                   "--retries": retries, "--timeout": timeout, "--misfire-grace": misfire_grace}
        given = next((name for name, value in per_job.items() if value), None)
        if given:
            raise InvalidInput(f"{given} describes one job; with --from put it in each line")
        from .cli_ops import add_from_file

        add_from_file(settings, from_file, on_conflict=(on_conflict or OnConflict.ignore).value,
                      strict=strict)
        return
    if task_name is None:
        raise InvalidInput("give a TASK to schedule, or --from FILE to add many jobs")
    arg_list = parse_json_arg(args, "--args", list)
    kwarg_map = parse_json_arg(kwargs, "--kwargs", dict)
    if cron is not None or every is not None or tz is not None or catch_up is not None:
        from .cli_recurring import add_schedule

        return add_schedule(
            settings, task_name, cron=cron, every=every, tz=tz, catch_up=catch_up,
            args=arg_list, kwargs=kwarg_map, schedule_id=job_id,
            on_conflict=(on_conflict or OnConflict.raise_).value,
            priority=priority.value if priority else None, retries=retries, timeout=timeout,
            job_options={"--at": at, "--in": in_, "--misfire-grace": misfire_grace})
    if at is not None and in_ is not None:
        raise InvalidInput("use either --at or --in, not both")
    when = None  # due now, on the database clock
    if at is not None:
        when = for_option("--at", parse_time, at, tz=settings.jobs.timezone)
    elif in_ is not None:
        when = datetime.now(UTC) + for_option("--in", parse_duration, in_)
    grace = parse_misfire(misfire_grace)
    if queue is not None:
        validate_queue_name(queue)
    _check_task_known(settings, task_name)

    async def go() -> str:
        async with open_scheduler(settings) as sched:
            return await sched.schedule(
                task_name, execution_time=when, args=arg_list, kwargs=kwarg_map,
                priority=JobPriority.parse(priority.value) if priority else None,
                max_retries=retries, job_id=job_id,
                conflict_resolution=ConflictResolution.parse(
                    (on_conflict or OnConflict.raise_).value),
                misfire_grace_time=grace, timeout=UNSET if timeout is None else timeout,
                queue=queue,
            )

    out.print(_run(go()), markup=False)


def _check_task_known(settings: Settings, name: str) -> None:
    task_checker(settings)(name)


def task_checker(settings: Settings) -> Callable[[str], None]:
    """A check rejecting invalid task names, and unknown ones when the task module can be
    imported here."""
    module = settings.worker.tasks
    if module is not None:
        try:
            load_tasks(module, settings.base_dir)
        except InvalidInput as exc:
            log.debug("task_module_unavailable", error=str(exc))
            module = None

    def check(name: str) -> None:
        validate_task_name(name)  # first: a hostile name must not be echoed back in full
        if module is not None and get_task(name) is None:
            raise InvalidInput(
                f"unknown task {name!r}: it is not registered in {settings.worker.tasks}"
            )

    return check


# -- ls ----------------------------------------------------------------------------------

LS_KEYS = ("id", "task", "status", "execution_time", "priority", "attempts", "max_retries",
           "args", "kwargs", "result", "last_error", "created_at", "started_at", "finished_at",
           "worker_id")


def job_to_json(row: dict[str, Any]) -> dict[str, Any]:
    data = {key: row.get(key) for key in LS_KEYS}
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
    data["priority"] = JobPriority(row["priority"]).name.lower() \
        if row["priority"] in {p.value for p in JobPriority} else row["priority"]
    data["status"] = str(row["status"])
    return data


def parse_statuses(statuses: list[str] | None, allowed: tuple[str, ...]) -> list[str] | None:
    if not statuses:
        return None
    for status in statuses:
        if status not in allowed:
            raise InvalidInput(f"unknown status {status!r}: use one of {', '.join(allowed)}")
    return statuses


@app.command("ls")
@command
def ls(
    ctx: typer.Context,
    status: Annotated[list[str] | None, typer.Option(
        "--status", "-s", help="Filter by status (repeatable).")] = None,
    task_name: Annotated[str | None, typer.Option("--task", help="Filter by task.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100000, help="At most this many.")] = 50,
    since: Annotated[str | None, typer.Option(
        help="Only jobs created since a duration ago (30m, 2d) or a time (ISO 8601).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
) -> None:
    """List jobs, newest first (by creation time)."""
    from .ops import parse_since

    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    statuses = parse_statuses(status, STATUSES)
    created_since = None if since is None else parse_since(
        since, tz=settings.jobs.timezone, now=datetime.now(UTC))

    async def go() -> list[dict[str, Any]]:
        async with open_scheduler(settings) as sched:
            return await sched.store.list_jobs(statuses=statuses, task=task_name,
                                               limit=limit + 1, since=created_since)

    rows = [job_to_json(row) for row in _run(go())]
    more = len(rows) > limit
    rows = rows[:limit]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = DataTable(box=None, pad_edge=False)
    for column in ("id", "task", "status", "execution_time", "priority", "attempts",
                   "last_error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["id"], row["task"], row["status"], row["execution_time"],
                      str(row["priority"]), f"{row['attempts']}/{row['max_retries'] + 1}",
                      (row["last_error"] or "")[:60])
    out.print(table)
    if more:
        err.print(f"showing the newest {limit}; use --limit or --since to see others",
                  markup=False)


# -- vacuum ------------------------------------------------------------------------------


@app.command()
@command
def vacuum(
    ctx: typer.Context,
    older_than: Annotated[str | None, typer.Option(
        help="Delete finished jobs older than this (default: [vacuum] retention).")] = None,
    status: Annotated[list[str] | None, typer.Option(
        "--status", "-s", help="Only these finished statuses (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Count, delete nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete finished jobs past their retention; prints the count per status."""
    from .cli_ops import vacuum_with_progress
    from .worker.maintenance import retention_by_status

    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    statuses = parse_statuses(status, FINISHED_STATUSES) or list(FINISHED_STATUSES)
    retention = retention_by_status(settings.vacuum.retention_days,
                                    settings.vacuum.failed_retention_days)
    if older_than is not None:
        seconds = for_option("--older-than", parse_duration, older_than).total_seconds()
        retention = dict.fromkeys(retention, seconds)
    retention = {s: retention[s] for s in statuses}

    async def go() -> dict[str, int]:
        async with open_scheduler(settings) as sched:
            if dry_run:
                return {s: await sched.store.count_vacuumable(status=s, older_than_seconds=age)
                        for s, age in retention.items()}
            return await vacuum_with_progress(sched.store, retention_seconds=retention,
                                              batch_size=settings.vacuum.batch_size)

    counts = _run(go())
    if as_json:
        sys.stdout.write(json.dumps(counts) + "\n")
        return
    verb = "would delete" if dry_run else "deleted"
    for s, n in counts.items():
        out.print(f"{s}: {n}")
    err.print(f"{verb} {sum(counts.values())} jobs", markup=False)


@app.command()
def version() -> None:
    """Print pgsched's version."""
    out.print(__version__)


from . import cli_ops, cli_queues, cli_recurring  # noqa: E402,F401  (register their commands)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
