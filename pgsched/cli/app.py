"""The `pgsched` typer app and what every command shares: the global options, the settings,
errors turned into exit codes, and output helpers. Command modules import this one.

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
import contextlib
import functools
import json
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import psycopg
import psycopg_pool
import typer
from rich.console import Console

from ..config import Settings, find_config_path, load_settings, mask_dsn
from ..errors import InvalidInput, PgschedError
from ..logs import configure, get_logger
from ..scheduler import Scheduler

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


def resolve_dsn(settings: Settings, *, announce: bool = False) -> str:
    if settings.database.dsn:
        return settings.database.dsn
    from ..embedded import embedded_dsn

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
    ctx.obj = _Context(config=config, dsn=dsn, schema=schema, debug=debug)


# -- helpers the command modules share --------------------------------------------------


def settings_of(ctx: typer.Context) -> Settings:
    """The command's settings, with logging configured from them."""
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    return settings


def for_option(option: str, parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a parser and name the option in its error, so the user knows what to fix."""
    try:
        return parse(*args, **kwargs)
    except InvalidInput as exc:
        raise InvalidInput(f"{option}: {exc}") from None


def parse_statuses(statuses: list[str] | None, allowed: tuple[str, ...]) -> list[str] | None:
    if not statuses:
        return None
    for status in statuses:
        if status not in allowed:
            raise InvalidInput(f"unknown status {status!r}: use one of {', '.join(allowed)}")
    return statuses


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def print_ids(ids: list[str]) -> None:
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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    if total is None:
        columns: tuple[Any, ...] = (SpinnerColumn(), TextColumn("{task.description}"),
                                    TextColumn("{task.completed}"), TimeElapsedColumn())
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)

def main() -> None:
    app()

