"""The `pgsched` typer app and what every command shares: the global options, the settings,
errors turned into exit codes, and output helpers. Command modules import this one.

Owns: the command-line contract. Data goes to stdout (a job id, a table, JSON), messages
to stderr. Exit codes: 0 success, 1 the operation failed (job not found, conflict,
database unreachable), 2 bad input or usage. A PgschedError or a usage error is printed
as one line without a traceback (`--debug` or PGSCHED_DEBUG=1 shows it); anything else is
a bug and keeps its traceback.

Invariants:
- `--config`, `--dsn` and `--schema` are accepted before and after the command name (the
  later one wins); every command reads its settings through `settings_of`.
- Only `worker` (and `web`) start the embedded PostgreSQL; the other commands use one that
  already runs, or fail with one line saying how to configure a database.
- Everything printed that came from the database or the user goes through `safe()` (or a
  renderer that uses it), so control characters can never drive the terminal.
- Start-up is cheap: this module and the command modules import the library, psycopg and
  rich inside the commands that need them, so `--version` and `--help` load none of them;
  a command module is imported only when one of its commands is used (COMMAND_MODULES).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import getpass
import importlib
import inspect
import json
import os
import re
import socket
import sys
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    MutableMapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.main
from typer.core import TyperGroup

from .. import __version__
from ..errors import DatabaseUnavailable, InvalidInput, PgschedError
from ..logs import configure, get_logger

if TYPE_CHECKING:
    from rich.console import Console

    from ..config import Settings
    from ..store import Store

log = get_logger("pgsched.cli")


# -- output ------------------------------------------------------------------------------

# C0 controls but newline, DEL and C1 controls (ESC opens an escape sequence, 0x9b is a
# one-byte CSI on some terminals).
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
_CONTROL_OR_NEWLINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\x{ord(char):02x}")


def safe(text: object, *, multiline: bool = False) -> str:
    """`text` fit for a terminal: control characters shown escaped (ESC as \\x1b), so text
    from the database (errors, results, ids, task names) cannot move the cursor, erase
    lines or open hyperlinks. Newlines stay only where `multiline` asks for them."""
    pattern = _CONTROL if multiline else _CONTROL_OR_NEWLINE
    return pattern.sub(_escape, str(text))


class _LazyConsole:
    """A rich Console made on first use: rich costs ~20 ms to import, which `--version`,
    `--help` and the JSON outputs never need."""

    def __init__(self, **options: Any):
        self._options = options
        self._console: Console | None = None

    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


err = _LazyConsole(stderr=True, highlight=False, soft_wrap=True)
# Piped output (scripts, `| less`) gets a wide fixed width instead of rich's 80 columns.
out = _LazyConsole(highlight=False, width=None if sys.stdout.isatty() else 200)


def say(text: object) -> None:
    """One line of data on stdout, escaped."""
    sys.stdout.write(safe(text) + "\n")


def width(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide characters take two."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(0 if unicodedata.combining(c) else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def print_table(columns: tuple[str, ...], rows: Sequence[tuple[object, ...]]) -> None:
    """A plain table on stdout: a header, one line per row, columns two spaces apart,
    every cell escaped, no trailing spaces; wide (CJK) characters keep columns aligned.
    Plain text on purpose: `grep`, `awk` and `cut` read it, and it needs no rich."""
    cells = [list(columns), *([safe(c) for c in row] for row in rows)]
    widths = [max(width(line[i]) for line in cells) for i in range(len(columns))]
    lines = ("  ".join(c + " " * (w - width(c)) for c, w in zip(line, widths, strict=True))
             for line in cells)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in lines))


def print_view(renderable: Any) -> None:
    """A rich table or view on stdout, without the trailing spaces rich pads lines with
    (they break `diff` and copy-paste)."""
    with out.capture() as captured:
        out.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def note(text: object) -> None:
    """One message line on stderr, escaped."""
    sys.stderr.write(safe(text) + "\n")


# -- usage errors ------------------------------------------------------------------------

# typer 0.29+ (not used now: see pyproject.toml) words validation errors the way pydantic
# does; say it as a person would.
_WORDING = (
    (re.compile(r"^Value error, "), ""),
    (re.compile(r"Input should be greater than or equal to "), "must be at least "),
    (re.compile(r"Input should be less than or equal to "), "must be at most "),
    (re.compile(r"Input should be greater than "), "must be more than "),
    (re.compile(r"Input should be less than "), "must be less than "),
    (re.compile(r"Input should be a valid integer.*"), "must be a whole number"),
    (re.compile(r"Input should be a valid number.*"), "must be a number"),
    (re.compile(r"Input should be "), "must be "),
    (re.compile(r"\.$"), ""),
)


def usage_error_line(exc: typer.TyperException) -> str:
    """A click/typer usage error as one line: what was wrong, and where help is."""
    message = exc.format_message()
    param = getattr(exc, "param", None)
    if param is not None and message.startswith("Invalid value for") and ": " in message:
        reason = message.partition(": ")[2]
        for pattern, replacement in _WORDING:
            reason = pattern.sub(replacement, reason)
        name = param.opts[0] if param.param_type_name == "option" else param.human_readable_name
        message = f"{name}: {reason}"
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    message = message.rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"error: {safe(message)}{where}"


# Every command and the module of pgsched/cli/ that defines it, in `pgsched --help` order.
# A module is imported when one of its commands runs or is listed, so `pgsched ls` neither
# imports nor builds the other twenty commands (~8 ms of its start-up). A test checks this
# table against what the modules register.
COMMAND_MODULES = {
    **dict.fromkeys(("migrate", "worker", "vacuum", "status", "workers", "init", "config",
                     "version"), "operate"),
    **dict.fromkeys(("add", "ls", "show", "retry", "cancel"), "jobs"),
    **dict.fromkeys(("schedules", "pause", "resume", "trigger", "remove", "cron"),
                    "schedules"),
    **dict.fromkeys(("queues", "queue"), "queues"),
    "top": "top",
    "web": "web",
}


class _Commands(MutableMapping[str, Any]):
    """The group's commands by name: every name of COMMAND_MODULES, each command built
    from its module's registration on first use (the dict click and typer read)."""

    def __init__(self, built: MutableMapping[str, Any]):
        self._built = dict(built)  # what typer built: commands registered before it ran

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            importlib.import_module(f"{__package__}.{COMMAND_MODULES[name]}")
            registered = {info.name or typer.main.get_command_name(info.callback.__name__): info
                          for info in app.registered_commands if info.callback is not None}
            groups = {info.name: info for info in app.registered_groups}  # `queue limit`
            if name in registered:
                self._built[name] = typer.main.get_command_from_info(
                    registered[name],
                    pretty_exceptions_short=app.pretty_exceptions_short,
                    rich_markup_mode=app.rich_markup_mode)
            elif name in groups:
                self._built[name] = typer.main.get_group_from_info(
                    groups[name], pretty_exceptions_short=app.pretty_exceptions_short,
                    suggest_commands=True, rich_markup_mode=app.rich_markup_mode)
            else:
                raise RuntimeError(f"pgsched/cli/{COMMAND_MODULES[name]}.py has no command {name}")
        return self._built[name]

    def _names(self) -> dict[str, None]:
        return {**dict.fromkeys(COMMAND_MODULES), **dict.fromkeys(self._built)}

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __setitem__(self, name: str, command: Any) -> None:
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._built[name]


class _Group(TyperGroup):
    """Commands built when used (see COMMAND_MODULES); usage errors as one line on stderr
    with exit 2, instead of click's usage block."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.commands = _Commands(self.commands)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False,
                                windows_expand_args=windows_expand_args, **extra)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `pgsched` alone: the help
                exc.show()  # type: ignore[attr-defined]
            else:
                sys.stderr.write(usage_error_line(exc) + "\n")
            code = getattr(exc, "exit_code", 2)
            if not standalone_mode:
                raise
        except typer.Abort:
            sys.stderr.write("aborted\n")
            code = 1
            if not standalone_mode:
                raise
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="pgsched: a PostgreSQL-backed job scheduler. Data on stdout, messages on stderr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


# -- settings and the global options -----------------------------------------------------


@dataclass
class _Context:
    config: str | None
    dsn: str | None
    schema: str | None
    debug: bool
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self, **overrides: object) -> Settings:
        from ..config import find_config_path, load_settings

        if self._settings is None or overrides:
            merged: dict[str, object] = {k: v for k, v in overrides.items() if v is not None}
            if self.dsn is not None:
                merged["database.dsn"] = self.dsn
            if self.schema is not None:
                merged["database.schema"] = self.schema
            settings = load_settings(find_config_path(self.config), overrides=merged)
            if overrides:  # the worker's: it logs the warnings as events
                return settings
            for warning in settings.warnings:  # every command that reads the file says so
                note(f"warning: {warning}")
            self._settings = settings
        return self._settings


def _ctx(ctx: typer.Context) -> _Context:
    return ctx.obj


def _fail(message: str, code: int) -> typer.Exit:
    sys.stderr.write(f"error: {safe(message)}\n")
    return typer.Exit(code)


CONFIG_HELP = "Path to pgsched.toml."
DSN_HELP = "PostgreSQL DSN (or PGSCHED_DSN)."
SCHEMA_HELP = "Schema holding pgsched's tables."

# The same options on every command, so `pgsched ls --config X` works like
# `pgsched --config X ls`; the command's own wins.
_GLOBAL_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                      annotation=Annotated[str | None, typer.Option(*flags, help=help_)])
    for name, flags, help_ in (
        ("_global_config", ("--config", "-c"), CONFIG_HELP),
        ("_global_dsn", ("--dsn",), DSN_HELP),
        ("_global_schema", ("--schema",), SCHEMA_HELP),
    )
]


def _database_error(exc: BaseException, schema: str) -> str | None:
    """One line for a database error a user can act on, or None for anything else."""
    if "psycopg" not in sys.modules:  # nothing connected: it cannot be a database error
        return None
    import psycopg
    import psycopg_pool

    from ..config import mask_dsn

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return (f"schema {schema} is not set up: run `pgsched migrate` with the same "
                "--config/--dsn/--schema first")
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return (f"{first}: the database role lacks a privilege pgsched needs; as the "
                "schema's owner run `pgsched migrate --grant ROLE`")
    # Both are OperationalErrors, but the database answered: it is busy, not unreachable.
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return (f"{first}: another session holds a lock on rows this command needs (a "
                "long transaction, a worker's write); try again once it ends")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return (f"{first}: the database did not finish this command within "
                "statement_timeout; try again when it is less busy")
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return f"database unreachable: {mask_dsn(first)}"
    return None


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make `fn` a pgsched command: it also takes the global options, and pgsched errors
    become one line on stderr with the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = kwargs.get("ctx") or next(a for a in args if isinstance(a, typer.Context))
        state = _ctx(ctx)
        for name in ("config", "dsn", "schema"):
            value = kwargs.pop(f"_global_{name}", None)
            if value is not None:
                setattr(state, name, value)
        if state.dsn:
            from ..config import command_line_dsn_warning

            if warning := command_line_dsn_warning(state.dsn):
                note(f"warning: {warning}")
        try:
            return fn(*args, **kwargs)
        except PgschedError as exc:
            if state.debug:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except Exception as exc:
            schema = (state._settings.database.schema if state._settings is not None
                      else state.schema or "pgsched")
            message = _database_error(exc, schema)
            if message is None or state.debug:
                raise
            raise _fail(message, 1) from None

    signature = inspect.signature(fn, eval_str=True)
    own = _flags(signature)  # `config --dsn` is the command's own flag: the global one yields
    signature = signature.replace(
        parameters=[*signature.parameters.values(),
                    *(p for p in _GLOBAL_PARAMETERS if not _flags(p) & own)])
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    # Evaluated once here: typer reads the annotations again when it builds the commands,
    # and would evaluate every string annotation anew at each start-up.
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return wrapper


def _flags(where: inspect.Signature | inspect.Parameter) -> set[str]:
    """The command-line flags of a parameter, or of every parameter of a signature."""
    if isinstance(where, inspect.Signature):
        return set().union(*map(_flags, where.parameters.values()))
    infos = [m for m in getattr(where.annotation, "__metadata__", ())
             if isinstance(m, typer.models.OptionInfo)]
    if not infos:
        return set()
    # In Annotated[...], typer.Option("--x", "-x") holds the first name in `default`.
    names = (infos[0].default, *(infos[0].param_decls or ()))
    declared = {d for d in names if isinstance(d, str) and d.startswith("-")}
    return declared or {"--" + where.name.replace("_", "-")}


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    import asyncio

    return asyncio.run(coro)


def resolve_dsn(settings: Settings, *, start_embedded: bool = False) -> str:
    """The DSN to use: the configured one; else the embedded server's, started only when
    `start_embedded` (worker, web); other commands join one that runs, or fail."""
    if settings.database.dsn:
        return settings.database.dsn
    from ..embedded import embedded_dsn, running_embedded_dsn

    data_dir = settings.database.data_dir
    if not start_embedded:
        dsn = running_embedded_dsn(data_dir)
        if dsn is None:
            raise DatabaseUnavailable(
                "no database configured: set [database] dsn in pgsched.toml, PGSCHED_DSN or "
                "--dsn; or start `pgsched worker` here for the embedded development server "
                f"in {data_dir}")
        return dsn
    dsn = embedded_dsn(data_dir)
    log.info("embedded_database", data_dir=str(data_dir),
             note="development database; set [database] dsn for production")
    return dsn


@asynccontextmanager
async def open_scheduler(settings: Settings, *, pool_size: int = 2):
    from ..scheduler import Scheduler

    misfire = settings.jobs.misfire_grace_seconds
    async with Scheduler(
        resolve_dsn(settings), schema=settings.database.schema, misfire_grace_time=misfire,
        pool_size=pool_size, prepare_threshold=settings.database.prepare_threshold,
    ) as sched:
        yield sched


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    """A Store on one plain connection, for a command that makes one query at a time: no
    Scheduler, no pool (psycopg_pool's import, a probe and a pool connection are most of
    what `pgsched ls` would pay beyond psycopg). It connects as open_scheduler does and
    fails the same way."""
    import psycopg

    from ..store import OneConnection, Store, cannot_connect, open_connection

    try:
        conn = await open_connection(resolve_dsn(settings),
                                     prepare_threshold=settings.database.prepare_threshold)
    except psycopg.OperationalError as exc:
        raise cannot_connect(exc) from exc
    async with conn:
        yield Store(OneConnection(conn), settings.database.schema)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"{__version__}\n")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[str | None, typer.Option(
        "--config", "-c", envvar="PGSCHED_CONFIG", help=CONFIG_HELP)] = None,
    dsn: Annotated[str | None, typer.Option(help=DSN_HELP)] = None,
    schema: Annotated[str | None, typer.Option(help=SCHEMA_HELP)] = None,
    debug: Annotated[bool, typer.Option(envvar="PGSCHED_DEBUG",
                                        help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print pgsched's version and exit.")] = False,
) -> None:
    """pgsched: a PostgreSQL-backed job scheduler. --config, --dsn and --schema may also
    follow the command name."""
    ctx.obj = _Context(config=config, dsn=dsn, schema=schema, debug=debug)


# -- helpers the command modules share --------------------------------------------------


def settings_of(ctx: typer.Context) -> Settings:
    """The command's settings, with logging configured from them."""
    settings = _ctx(ctx).settings()
    configure(settings.log.level, settings.log.format)
    return settings


def who() -> str:
    """user@host of whoever runs the command (recorded by pause and queue limit)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (containers)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


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


_JSON_UNSAFE = re.compile(r"[\x7f-\x9f]")  # json.dumps escapes C0 itself


def print_json(data: Any, *, indent: int | None = 2) -> None:
    """`data` as JSON on stdout; DEL and C1 controls as \\u escapes, like C0 ones."""
    text = json.dumps(data, indent=indent, ensure_ascii=False)
    sys.stdout.write(_JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def print_ids(ids: list[str]) -> None:
    # Plain writes: rich's print costs ~0.2 ms a line, which a 100k-line file notices.
    if ids:
        sys.stdout.write("\n".join(safe(i) for i in ids) + "\n")


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
    with Progress(*columns, console=err.real(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def main() -> None:
    try:
        app()
    finally:
        # Interpreter shutdown runs the cyclic garbage collector over every object still
        # alive: with psycopg loaded that is ~25 ms, a sixth of `pgsched ls`. Frozen objects
        # are skipped; modules are still torn down, and atexit handlers and finalizers of
        # objects that die by reference count still run.
        gc.freeze()

