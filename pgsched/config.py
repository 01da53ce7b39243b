"""Finding, reading, validating and rendering pgsched's configuration.

Owns: the settings dataclasses that every other module codes against; where the config
file is looked for (`find_config_path`); how the file, PGSCHED_DSN and command-line
overrides combine (`load_settings`); and the text `pgsched config` prints
(`settings_to_toml`, `mask_dsn`).

Invariants:
- A Settings returned by `load_settings` is fully validated: every value has its declared
  type (a bool is never a number; an int is accepted where a float is expected and stored
  as float), every number is finite and in range, heartbeat_seconds < lease_seconds and
  retry_max_seconds >= retry_base_seconds.
- Precedence, lowest first: dataclass defaults < file < PGSCHED_DSN (dsn only) < overrides.
- database.data_dir is always absolute. Relative paths (data_dir, a tasks .py file) from
  the file resolve against the file's directory; from overrides, against the cwd.
- Passwords never appear in error messages, warnings or `settings_to_toml` output.

Failure: anything the user can fix raises ConfigError (exit code 2) with one line naming
the source (the file path, "override" or an environment variable), the key and the value,
and what would be accepted. Unknown tables and keys are errors, with the closest known
name suggested. Problems that do not stop pgsched (a config file with a password that
other users can read) are returned in Settings.warnings for the caller to log.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
import tomli_w
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsched.errors import ConfigError, InvalidInput
from pgsched.queues import check_global_concurrency, parse_rate, validate_queue_name

CONFIG_FILENAME = "pgsched.toml"
_DSN_KEYS = ("dsn", "listen_dsn")  # [database] keys that may carry a password
CONFIG_ENV = "PGSCHED_CONFIG"
DSN_ENV = "PGSCHED_DSN"


@dataclass(frozen=True)
class DatabaseSettings:
    dsn: str | None = None  # None -> embedded PostgreSQL
    schema: str = "pgsched"
    data_dir: Path = Path(".pgsched")  # load_settings always makes this absolute
    pool_size: int = 4
    # psycopg prepares a statement after this many executions on one connection; None
    # never prepares (PgBouncer in transaction mode before 1.21 cannot route prepared
    # statements, see docs/pgbouncer.md).
    prepare_threshold: int | None = 5
    # A direct connection (not through a transaction pooler) for the worker's LISTEN;
    # None: the LISTEN goes to dsn.
    listen_dsn: str | None = None


@dataclass(frozen=True)
class WorkerSettings:
    tasks: str | None = None  # dotted module, or an absolute path to a .py file
    concurrency: int = 25
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    shutdown_grace_seconds: float = 30.0
    poll_seconds: float = 5.0
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    max_recoveries: int = 3  # a job orphaned this many times is failed as a poison pill
    queues: tuple[str, ...] = ()  # the queues this worker claims from; empty: every queue


@dataclass(frozen=True)
class JobSettings:
    timezone: str = "UTC"  # for naive --at times and as the default cron time zone
    misfire_grace_seconds: float | None = 300.0  # None: a late job never expires


@dataclass(frozen=True)
class VacuumSettings:
    enabled: bool = True
    interval_seconds: float = 3600.0
    retention_days: float = 7.0  # completed, cancelled and expired jobs
    failed_retention_days: float = 30.0  # failed jobs are the dead-letter record
    batch_size: int = 1000


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None  # "host:port" for /metrics and /healthz; None: off


@dataclass(frozen=True)
class WebSettings:
    """`pgsched web`: where it listens, its tokens (None: a random one per start for
    `token`, no read-only access for `read_token`), and the path prefix a reverse proxy
    serves it under."""

    listen: str = "127.0.0.1:8787"
    token: str | None = None
    read_token: str | None = None
    root_path: str = ""


@dataclass(frozen=True)
class QueueSettings:
    """One `[queues.NAME]` table. `concurrency` holds within each worker process;
    `global_concurrency` and `rate` hold across every worker (they are written to the
    database when a worker starts, see docs/job-control.md)."""

    concurrency: int | None = None
    global_concurrency: int | None = None
    rate: str | None = None  # "JOBS/PERIOD", checked by queues.parse_rate


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings
    worker: WorkerSettings
    jobs: JobSettings
    vacuum: VacuumSettings
    log: LogSettings
    path: Path | None  # the file read, as it was named
    base_dir: Path  # the file's directory (cwd if none), absolute
    warnings: tuple[str, ...]
    metrics: MetricsSettings = MetricsSettings()
    web: WebSettings = WebSettings()
    queues: Mapping[str, QueueSettings] = dataclasses.field(default_factory=dict)


_SECTIONS: dict[str, type] = {
    "database": DatabaseSettings,
    "worker": WorkerSettings,
    "jobs": JobSettings,
    "vacuum": VacuumSettings,
    "log": LogSettings,
    "metrics": MetricsSettings,
    "web": WebSettings,
}
# [queues.NAME] tables are named by the user, so they are read apart from the sections.
QUEUES_TABLE = "queues"
_FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}

# Every integer may end up as a query parameter, so it has to fit a PostgreSQL integer.
_INT_MAX = 2**31 - 1
# Far beyond any sensible duration, yet safe for timedelta and PostgreSQL intervals.
_MAX_SECONDS = 3_155_760_000
_MAX_DAYS = 36_525


# ---------------------------------------------------------------- finding the file


def find_config_path(
    explicit: str | Path | None, env: Mapping[str, str] = os.environ
) -> Path | None:
    """The config file to read: --config, else PGSCHED_CONFIG, else ./pgsched.toml, else None."""
    if explicit is not None:
        return _must_exist(Path(explicit), "")
    # An empty variable is how shells and service managers spell "unset".
    if env.get(CONFIG_ENV):
        return _must_exist(Path(env[CONFIG_ENV]), f" (named by {CONFIG_ENV})")
    local = Path(CONFIG_FILENAME)
    return local if local.exists() else None


def _must_exist(path: Path, named_by: str) -> Path:
    if not path.exists():
        raise ConfigError(_missing_message(path, named_by))
    return path


def _missing_message(path: Path, named_by: str = "") -> str:
    return (
        f"config file {path}{named_by} does not exist; "
        "create it with `pgsched init` or pass --config"
    )


# ---------------------------------------------------------------- loading


class _Bad(Exception):
    """A value was rejected; the message says what would have been accepted."""


@dataclass(frozen=True)
class _Origin:
    """Where a value came from: decides how errors name it and where relative paths go."""

    kind: str  # "file", "env" or "override"
    label: str  # the file as named, or the environment variable
    base_dir: Path

    def describe(self, section: str, key: str, value: object) -> str:
        if self.kind == "file":
            return f"{self.label}: [{section}] {_show_key(key)} = {_show(value)}"
        if self.kind == "env":
            return f"{self.label} = {_show(value)}"
        return f"override {section}.{_show_key(key)} = {_show(value)}"


def load_settings(
    path: Path | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Read and validate `path` (None: defaults only), then apply PGSCHED_DSN and overrides.

    `overrides` maps dotted keys ("worker.concurrency") to values checked exactly like the
    file's; a None value means "not given", so CLI flags can be passed through as they are.
    """
    cwd = Path.cwd()
    base_dir = cwd if path is None else Path(os.path.abspath(path)).parent
    chosen: dict[tuple[str, str], tuple[_Origin, object]] = {}
    warnings: list[str] = []

    queues: dict[str, QueueSettings] = {}
    if path is not None:
        origin = _Origin("file", str(path), base_dir)
        document = _read_toml(path)
        queues = _queue_tables(path, document.pop(QUEUES_TABLE, {}))
        for section, key, value in _file_entries(path, document):
            chosen[section, key] = (origin, value)
        file_dsns = [chosen.get(("database", key), (None, None))[1]
                     for key in _DSN_KEYS]
        warning = next(filter(None, (_permission_warning(path, d) for d in file_dsns)), None)
        if warning:
            warnings.append(warning)

    if env.get(DSN_ENV):
        chosen["database", "dsn"] = (_Origin("env", DSN_ENV, cwd), env[DSN_ENV])

    override_origin = _Origin("override", "override", cwd)
    for section, key, value in _override_entries(overrides or {}):
        chosen[section, key] = (override_origin, value)

    values: dict[str, dict[str, object]] = {name: {} for name in _SECTIONS}
    for (section, key), (origin, raw) in chosen.items():
        try:
            values[section][key] = _CHECKS[section][key](raw, origin.base_dir)
        except _Bad as bad:
            raise ConfigError(f"{origin.describe(section, key, raw)}: {bad}") from None
    values["database"].setdefault("data_dir", _absolute(DatabaseSettings.data_dir, base_dir))

    sections = {name: cls(**values[name]) for name, cls in _SECTIONS.items()}
    _check_relations(sections, chosen)
    return Settings(
        **sections,
        path=None if path is None else Path(path),
        base_dir=base_dir,
        warnings=tuple(warnings),
        queues=queues,
    )


def _read_toml(path: Path) -> dict:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(_missing_message(path)) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass the .toml file") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        # Tolerate the byte-order mark some Windows editors put in front of UTF-8.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"{path}: line {line} is not valid UTF-8; save the file as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except ValueError as error:
        # TOMLDecodeError, or the int() digit limit for absurdly long integer literals.
        raise ConfigError(f"{path}: invalid TOML: {_printable(str(error))}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None


def _queue_tables(path: Path, tables: object) -> dict[str, QueueSettings]:
    """The [queues.NAME] tables: {name: QueueSettings}, every name and value checked."""
    if not isinstance(tables, dict):
        raise ConfigError(
            f"{path}: {QUEUES_TABLE} = {_show(tables)}: must be a table of queues; write "
            "[queues.NAME] on its own line with concurrency = N below it"
        )
    queues = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: [queues] {_show_key(name)} = {_show(table)}: each queue is a table "
                f"of its own; write [queues.{_show_key(name)}] with concurrency = N below it"
            )
        where = f"{path}: [queues.{_show_key(name)}]"
        try:
            validate_queue_name(name)
        except InvalidInput as exc:
            raise ConfigError(f"{where}: {exc}") from None
        fields = [f.name for f in dataclasses.fields(QueueSettings)]
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{where} {_show_key(key)} = {_show(value)}: unknown key; "
                                  f"[queues.NAME] accepts {', '.join(fields)}")
        if not table:
            raise ConfigError(f"{where}: no limit given; add concurrency = N (per worker), "
                              "global_concurrency = N or rate = \"100/1m\" (every worker)")
        queues[name] = QueueSettings(**{
            key: _queue_value(where, key, value, path) for key, value in table.items()})
    return queues


def _queue_value(where: str, key: str, value: object, path: Path) -> Any:
    try:
        if key == "concurrency":
            return _integer(1, 10_000)(value, path)
        if key == "global_concurrency":
            return check_global_concurrency(value)
        parse_rate(value)
        return value
    except _Bad as bad:
        raise ConfigError(f"{where} {key} = {_show(value)}: {bad}") from None
    except InvalidInput as exc:
        raise ConfigError(f"{where} {key} = {_show(value)}: {exc}") from None


def _file_entries(path: Path, document: dict) -> Iterator[tuple[str, str, object]]:
    """Yield (section, key, value) for every setting, rejecting anything unknown."""
    for name, table in document.items():
        if name not in _SECTIONS:
            if isinstance(table, dict):
                hint = _hint(name, list(_SECTIONS), _section_list(), wrap="[{}]")
                raise ConfigError(f"{path}: unknown table [{_show_key(name)}]; {hint}")
            owners = [s for s, keys in _FIELDS.items() if name in keys]
            hint = (
                f"move it under [{owners[0]}]"
                if owners
                else _hint(name, list(_SECTIONS), _section_list(), wrap="[{}]")
            )
            raise ConfigError(
                f"{path}: {_show_key(name)} = {_show(table)}: unknown top-level key; {hint}"
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: {name} = {_show(table)}: must be a table; "
                f"write [{name}] on its own line with its keys below it"
            )
        for key, value in table.items():
            if key not in _FIELDS[name]:
                raise ConfigError(
                    f"{path}: [{name}] {_show_key(key)} = {_show(value)}: unknown key; "
                    + _key_hint(name, key)
                )
            yield name, key, value


def _override_entries(overrides: Mapping[str, object]) -> Iterator[tuple[str, str, object]]:
    known = [f"{s}.{k}" for s, keys in _FIELDS.items() for k in keys]
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = str(dotted).partition(".")
        if section not in _FIELDS or key not in _FIELDS[section]:
            hint = _hint(str(dotted), known, "see `pgsched config` for the known settings")
            shown = ".".join(_show_key(part) for part in str(dotted).split("."))
            raise ConfigError(f"override {shown}: unknown setting; {hint}")
        yield section, key, value


def _key_hint(section: str, key: str) -> str:
    owners = [s for s, keys in _FIELDS.items() if key in keys and s != section]
    if owners:
        return f"it belongs in [{owners[0]}]"
    return _hint(key, _FIELDS[section], f"[{section}] accepts {', '.join(_FIELDS[section])}")


def _hint(name: str, candidates: list[str], otherwise: str, wrap: str = "{}") -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"did you mean {wrap.format(close[0])}?" if close else otherwise


def _section_list() -> str:
    return "the tables are " + ", ".join(f"[{name}]" for name in _SECTIONS) + \
        ", [queues.NAME]"


# Cross-field rules: (section, key, op, other key, why). The message blames `key` when it
# was set explicitly, otherwise `other`, because that is the value the user chose.
_RELATIONS = (
    (
        "worker",
        "heartbeat_seconds",
        "<",
        "lease_seconds",
        "a worker must renew its lease before the lease expires",
    ),
    (
        "worker",
        "retry_max_seconds",
        ">=",
        "retry_base_seconds",
        "the retry backoff cannot be capped below its first delay",
    ),
)
_OPERATORS = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}
_FLIPPED = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}
_WORDS = {"<": "less than", ">": "greater than", "<=": "at most", ">=": "at least"}


def _check_relations(
    sections: dict[str, object], chosen: dict[tuple[str, str], tuple[_Origin, object]]
) -> None:
    for section, key, op, other, why in _RELATIONS:
        value = getattr(sections[section], key)
        other_value = getattr(sections[section], other)
        if _OPERATORS[op](value, other_value):
            continue
        if (section, other) in chosen and (section, key) not in chosen:
            key, other, op, value, other_value = other, key, _FLIPPED[op], other_value, value
        origin, raw = chosen.get((section, key), (None, value))
        where = origin.describe(section, key, raw) if origin else f"[{section}] {key}"
        raise ConfigError(f"{where}: must be {_WORDS[op]} {other} ({other_value:g}); {why}")


def _permission_warning(path: Path, dsn: object) -> str | None:
    if os.name == "nt" or not isinstance(dsn, str) or not dsn_has_password(dsn):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"{path} is readable by other users and contains a database password; "
        f"run: chmod 600 {shlex.quote(str(path))}"
    )


def command_line_dsn_warning(dsn: str) -> str | None:
    """The warning for a --dsn that carries a password (other users see it in `ps`)."""
    if not dsn_has_password(dsn):
        return None
    return ("--dsn carries a password, which other users of this machine can read in the "
            "process list; put it in a PGPASSFILE or in pgsched.toml with mode 600 instead")


# ---------------------------------------------------------------- value checks

_Check = Callable[[object, Path], object]


def _integer(low: int, high: int = _INT_MAX) -> Callable[[object, Path], int]:
    def check(value: object, _base: Path) -> int:
        if type(value) is not int or value < low:
            raise _Bad(f"must be an integer >= {low}")
        if value > high:
            raise _Bad(f"must be at most {high}")
        return value

    return check


def _number(*, positive: bool, days: bool = False, none_ok: bool = False) -> _Check:
    expected = "a number > 0" if positive else "a number >= 0"
    if none_ok:
        expected += ' or "none" (never expire)'
    limit = _MAX_DAYS if days else _MAX_SECONDS

    def check(value: object, _base: Path) -> float | None:
        if none_ok and isinstance(value, str) and value.strip().lower() == "none":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(f"must be {expected}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _Bad(f"must be a finite {expected.removeprefix('a ')}")
        if value < 0 or (positive and value == 0):
            raise _Bad(f"must be {expected}")
        if value > limit:  # compared before float() so huge integers cannot overflow
            raise _Bad(f"must be at most {limit} (100 years)")
        return float(value)

    return check


def _prepare_threshold(value: object, _base: Path) -> int | None:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if type(value) is not int or not 0 <= value <= _INT_MAX:
        raise _Bad('must be an integer >= 0 (executions before psycopg prepares a '
                   'statement) or "none" (never prepare, for PgBouncer in transaction mode)')
    return value


def _text(what: str) -> _Check:
    def check(value: object, _base: Path) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"must be {what}")
        return value

    return check


def _boolean(value: object, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _choice(*options: str) -> _Check:
    def check(value: object, _base: Path) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        close = (
            difflib.get_close_matches(value.lower(), options, n=1) if isinstance(value, str) else []
        )
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise _Bad(f"must be one of {', '.join(options)}{hint}")

    return check


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def _schema(value: object, _base: Path) -> str:
    # The name is spliced into SQL as an identifier, so only plain identifiers pass.
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise _Bad("must be a letter or _ followed by up to 62 letters, digits or _")
    if value.lower().startswith("pg_"):
        raise _Bad('must not start with "pg_", which PostgreSQL reserves for system schemas')
    return value


def _data_dir(value: object, base: Path) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _Bad("must be a directory path")
    return _absolute(Path(value), base)


def _tasks(value: object, base: Path) -> str:
    if isinstance(value, str) and (value.endswith(".py") or "/" in value or os.sep in value):
        if not value.endswith(".py") or "\0" in value:
            raise _Bad("must be a path to a .py file or a dotted module name")
        # Absolute, so loading the file does not depend on the daemon's cwd.
        return str(_absolute(Path(value), base))
    if not isinstance(value, str) or not all(p.isidentifier() for p in value.split(".")):
        raise _Bad('must be a dotted module name like "myapp.tasks" or a path to a .py file')
    return value


def _timezone(value: object, _base: Path) -> str:
    try:
        if not isinstance(value, str) or not value:
            raise ValueError(value)
        ZoneInfo(value)
    # zoneinfo raises a different error for each way a name can be wrong.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _Bad('must be an IANA time zone name such as "UTC" or "Europe/Berlin"') from None
    return value


def _queue_names(value: object, _base: Path) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _Bad('must be a list of queue names like ["default", "emails"]; [] serves all')
    try:
        return tuple(dict.fromkeys(validate_queue_name(v) for v in value))
    except InvalidInput as exc:
        raise _Bad(str(exc)) from None


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:9464" or "[::1]:9464" -> (host, port); ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535 or \
            any(c.isspace() for c in host) or ("[" in host or "]" in host):
        raise ValueError('must be "host:port" like "127.0.0.1:9464" or "[::1]:9464"')
    return host, int(port)


def _listen(value: object, _base: Path) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError('must be "host:port" like "127.0.0.1:9464"')
        parse_listen(value)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    return value


def _token(value: object, _base: Path) -> str:
    # Tokens travel in headers and URLs: printable ASCII without spaces, and long enough
    # that guessing is hopeless.
    if not isinstance(value, str) or len(value) < 16 or \
            not all(33 <= ord(c) < 127 for c in value):
        raise _Bad("must be at least 16 printable ASCII characters without spaces, "
                   "e.g. the output of `openssl rand -hex 24`")
    return value


def _root_path(value: object, _base: Path) -> str:
    if not isinstance(value, str) or (value and not re.fullmatch(r"(/[\w.~-]+)+", value)):
        raise _Bad('must be "" or a URL path like "/scheduler" (no trailing slash)')
    return value


def _absolute(path: Path, base: Path) -> Path:
    return Path(os.path.abspath(base / path.expanduser()))


_CHECKS: dict[str, dict[str, _Check]] = {
    "database": {
        "dsn": _text("a PostgreSQL connection string; remove the key to use the embedded one"),
        "schema": _schema,
        "data_dir": _data_dir,
        "pool_size": _integer(2),
        "prepare_threshold": _prepare_threshold,
        "listen_dsn": _text("a PostgreSQL connection string that reaches the server directly "
                            "(not through a transaction pooler)"),
    },
    "worker": {
        "tasks": _tasks,
        "concurrency": _integer(1, 10_000),
        "lease_seconds": _number(positive=True),
        "heartbeat_seconds": _number(positive=True),
        "shutdown_grace_seconds": _number(positive=False),
        "poll_seconds": _number(positive=True),
        "retry_base_seconds": _number(positive=True),
        "retry_max_seconds": _number(positive=True),
        "max_recoveries": _integer(1),
        "queues": _queue_names,
    },
    "jobs": {
        "timezone": _timezone,
        "misfire_grace_seconds": _number(positive=True, none_ok=True),
    },
    "vacuum": {
        "enabled": _boolean,
        "interval_seconds": _number(positive=True),
        "retention_days": _number(positive=False, days=True),
        "failed_retention_days": _number(positive=False, days=True),
        "batch_size": _integer(1),
    },
    "log": {
        "level": _choice("debug", "info", "warning", "error"),
        "format": _choice("auto", "console", "json"),
    },
    "metrics": {
        "listen": _listen,
    },
    "web": {
        "listen": _listen,
        "token": _token,
        "read_token": _token,
        "root_path": _root_path,
    },
}


# ---------------------------------------------------------------- rendering

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _show(value: object, depth: int = 0) -> str:
    """A value as TOML-ish text on one short line, with any password masked."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = _quote(mask_dsn(value))
    elif isinstance(value, int):
        try:
            text = str(value)
        except ValueError:  # beyond Python's int-to-str digit limit
            text = "<an integer with thousands of digits>"
    elif isinstance(value, list | tuple):
        items = [_show(item, depth + 1) for item in value[:4]] if depth < 2 else ["..."]
        text = "[" + ", ".join(items) + (", ..." if len(value) > len(items) else "") + "]"
    elif isinstance(value, dict):
        pairs = list(value.items())
        items = (
            [f"{_show_key(str(k))} = {_show(v, depth + 1)}" for k, v in pairs[:4]]
            if depth < 2
            else ["..."]
        )
        text = "{" + ", ".join(items) + (", ..." if len(pairs) > len(items) else "") + "}"
    elif hasattr(value, "isoformat"):
        text = value.isoformat()
    else:
        text = repr(value)
    text = _printable(text)
    return text if len(text) <= 80 else text[:77] + "..."


def _show_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _quote(key)


def _quote(text: str) -> str:
    return '"' + _printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _printable(text: str) -> str:
    # Errors are promised to be one line; escape newlines and other invisible characters.
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&#]+", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']\S*)", re.IGNORECASE
)


# The libpq keywords whose values are secrets.
_SECRET_KEYS = ("password", "sslpassword")


def mask_dsn(dsn: str) -> str:
    """`dsn` with any password replaced by ***, in URL or key=value form.

    libpq decides what a password is (a `?` inside it, `pass%77ord=`, a repeated key), so
    the text is parsed as libpq parses it. The mask keeps the DSN's own spelling when libpq
    reads the masked text back with every password as ***; otherwise the DSN is rebuilt
    from libpq's reading, in key=value form. Text that is not a DSN (an error message)
    gets the same masking by pattern.
    """
    masked = _mask_by_pattern(dsn)
    secrets = _secrets(dsn)
    if not secrets:
        return masked
    back = _secrets(masked)
    if back is not None and all(back.get(key) == "***" for key in secrets):
        return masked
    params = conninfo_to_dict(dsn)
    params.update(dict.fromkeys(secrets, "***"))
    return make_conninfo("", **params)


def dsn_has_password(dsn: str) -> bool:
    """True if libpq would read a password from `dsn` (unparsable text: if it looks so)."""
    secrets = _secrets(dsn)
    return bool(secrets) if secrets is not None else _mask_by_pattern(dsn) != dsn


def _secrets(dsn: str) -> dict[str, str] | None:
    """The non-empty secrets libpq reads from `dsn`; None if libpq cannot parse it."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return None
    return {key: str(params[key]) for key in _SECRET_KEYS if params.get(key)}


def _mask_by_pattern(dsn: str) -> str:
    start = _URL_SCHEME.match(dsn)
    if not start:
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)
    authority_start = start.end()
    query = dsn.find("?", authority_start)
    # The last @ before the query: an unescaped @ or / in a password must not leak it.
    at = dsn.rfind("@", authority_start, len(dsn) if query < 0 else query)
    colon = dsn.find(":", authority_start, at) if at >= 0 else -1
    if colon >= 0 and colon + 1 < at:
        dsn = dsn[: colon + 1] + "***" + dsn[at:]
    return _QUERY_PASSWORD.sub(r"\1***", dsn)


# Keys whose None is a setting of its own ("none"), not "use the default".
_NONE_SPELLED_OUT = {("jobs", "misfire_grace_seconds"), ("database", "prepare_threshold")}


def settings_to_toml(settings: Settings) -> str:
    """The effective configuration as TOML that load_settings accepts, password masked."""
    document: dict[str, dict[str, object]] = {}
    for name in _SECTIONS:
        section = getattr(settings, name)
        table: dict[str, object] = {}
        for key in _FIELDS[name]:
            value = getattr(section, key)
            if value is None:
                if (name, key) not in _NONE_SPELLED_OUT:
                    continue  # TOML has no null; leaving the key out means the same
                value = "none"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif name == "database" and key in _DSN_KEYS:
                value = mask_dsn(value)
            elif name == "web" and key in ("token", "read_token"):
                value = "***"
            table[key] = value
        document[name] = table
    if settings.queues:
        document[QUEUES_TABLE] = {
            name: {k: v for k, v in dataclasses.asdict(queue).items() if v is not None}
            for name, queue in settings.queues.items()
        }
    source = f"from {settings.path}" if settings.path else "no config file; defaults"
    return f"# effective pgsched configuration ({_printable(source)})\n\n" + tomli_w.dumps(document)
