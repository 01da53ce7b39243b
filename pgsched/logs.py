"""structlog set-up: a console renderer on a TTY, JSON lines otherwise.

Owns: the process-wide logging configuration. Logs go to stderr, so stdout stays clean
for data (`JOB=$(pgsched add ...)`). Under systemd stderr is not a TTY, so the daemon
writes one JSON object per line, which journald stores and `jq` reads. Per-job context
(job_id, task, attempt) is bound with contextvars by the worker, once per job.

Event names are stable (they are documented in the README for alerting): change them
only with a note in the changelog.

structlog is imported on first use (a logger's first call, or configure() once it is
loaded): the CLI's quick commands never log, and never pay for importing it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class _CurrentStderr:
    """Whatever sys.stderr is at write time (test runners and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_requested: tuple[str, str] | None = None  # what configure() asked for
_applied = False  # whether structlog has it yet


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Route logs to stderr at `level` ("auto" format: console on a TTY, else JSON). Takes
    effect at once if structlog is loaded, otherwise when a logger is first used.

    Built for the worker's one line per job: three processors (the context variables;
    level, time and traceback in one call, the time's text built once a second; the
    renderer), the JSON encoder built once (structlog's JSONRenderer builds a new one per
    event through json.dumps's keyword arguments), and a line is one write() and flush()
    rather than print()'s several. Loggers are not
    cached on first use: the worker binds its per-job logger once per run, which is the
    same saving, and module-level loggers keep following a later configure().
    """
    global _requested, _applied
    _requested, _applied = (level, fmt), False
    # psycopg_pool logs each broken connection it discards; the worker already reports
    # the outage once as `db_unavailable`, in its own format.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    _route_library_logs()
    if "structlog" in sys.modules:
        _structlog()


def _structlog() -> Any:
    global _applied
    import structlog

    if _requested is not None and not _applied:
        _applied = True
        _apply(structlog, *_requested)
    return structlog


def _apply(structlog: Any, level: str, fmt: str) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        _render_json if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, _add_level_and_time, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def configure_unless_configured() -> bool:
    """configure() with the defaults (level info, JSON unless stderr is a terminal) if the
    application has not configured structlog itself; returns whether it did. For a worker
    started inside an application: structlog's own defaults print two console lines per
    job to stdout, which halves a drain."""
    import structlog

    if structlog.is_configured():
        return False
    configure()
    return True


_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level
_second_text: list[Any] = [None, ""]  # [whole second since the epoch, its ISO text]


def _timestamp() -> str:
    """Now as an ISO UTC timestamp with microseconds (the second's text built once)."""
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    if second != _second_text[0]:
        _second_text[:] = second, datetime.fromtimestamp(second, UTC).strftime(
            "%Y-%m-%dT%H:%M:%S.")
    return f"{_second_text[1]}{ns // 1000:06d}Z"


def _add_level_and_time(logger: Any, method: str, event_dict: Any) -> Any:
    """structlog's add_log_level, TimeStamper(fmt="iso", utc=True) and format_exc_info in
    one call: level, an ISO UTC timestamp with microseconds, and a traceback's text."""
    event_dict["level"] = _LEVEL_OF_METHOD.get(method, method)
    event_dict["timestamp"] = _timestamp()
    if "exc_info" in event_dict:
        import structlog

        return structlog.processors.format_exc_info(logger, method, event_dict)
    return event_dict


def _json_default(value: object) -> str:
    return repr(value)  # what structlog's JSONRenderer writes for a non-JSON value


_JSON_LINE = json.JSONEncoder(default=_json_default)


def _render_json(_logger: object, _method: str, event_dict: Any) -> str:
    return _JSON_LINE.encode(event_dict)


# Keys the chain sets itself (or that change what it does): rows, or a bound context,
# holding one go the ordinary way.
_CHAIN_KEYS = frozenset({"event", "level", "timestamp", "exc_info"})
_json_str = json.encoder.encode_basestring_ascii  # what _JSON_LINE writes for a str


def info_events(logger: Any, event: str, keys: tuple[str, ...],
                rows: list[tuple[Any, ...]]) -> None:
    """`logger.info(event, **dict(zip(keys, row)))` for each row, written at once.

    For the completer's `job_completed` lines, one per job of a batch: with the chain
    configure() sets up (JSON lines to stderr, and `logger` bound from it) the lines are
    the same, key for key, as those calls write, but the parts every line shares (the
    bound and context variables, the event, the level, and the time: the lines are
    written together) are encoded once per batch, a row's values are encoded by type,
    and the batch is one write(). Any other set-up (an
    application's own structlog configuration, the console renderer, a test's
    capture_logs), or a row the shortcut does not encode as the JSON encoder would (any
    value but a str, an int or a finite float), goes through `logger.info` row by row.
    """
    if not rows:
        return
    chain = getattr(logger, "_processors", None)  # a bound logger's, as configured then
    out: Any = getattr(logger, "_logger", None)
    structlog = sys.modules.get("structlog")
    # Only a logger that writes each call's text as a line (configure()'s WriteLogger):
    # another (a capturing, journald or syslog one) makes a record of each call.
    if (structlog is None or chain is None
            or type(out) not in (structlog.WriteLogger, structlog.PrintLogger)
            or not hasattr(logger, "is_enabled_for") or tuple(chain) != (
                structlog.contextvars.merge_contextvars, _add_level_and_time, _render_json)):
        _one_by_one(logger, event, keys, rows)
        return
    if not logger.is_enabled_for(logging.INFO):
        return
    context = logger._context
    if (_CHAIN_KEYS.intersection(keys) or not context.keys().isdisjoint(keys)
            or not context.keys().isdisjoint(_CHAIN_KEYS)):
        _one_by_one(logger, event, keys, rows)
        return
    # What follows a row's own keys, as _process_event and the chain add it: the event,
    # the context variables not already set (setdefault), the level; then the timestamp.
    tail: dict[str, Any] = {"event": event}
    for key, value in structlog.contextvars.merge_contextvars(None, "info", {}).items():
        if key in ("timestamp", "exc_info"):  # the chain would set or use it in place
            _one_by_one(logger, event, keys, rows)
            return
        if key not in context and key not in keys:
            tail.setdefault(key, value)
    tail["level"] = "info"
    head = _JSON_LINE.encode(dict(context))[1:-1]
    head = "{" + (head + ", " if head else "")
    tail_text = ", " + _JSON_LINE.encode(tail)[1:-1] + ', "timestamp": "'
    names = [_json_str(key) + ": " for key in keys]
    # One time for the batch: its lines are written together, now (a time per line cost
    # 1 us of the 2.8 a line took).
    tail_text += _timestamp() + '"}'
    lines = []
    for row in rows:
        values = []
        for name, value in zip(names, row, strict=True):
            kind = type(value)
            if kind is str:
                values.append(name + _json_str(value))
            elif kind is int or (kind is float and value - value == 0.0):  # finite
                values.append(name + repr(value))
            else:  # None, a bool, NaN: whatever the encoder does with it
                break
        else:
            lines.append(head + ", ".join(values) + tail_text)
            continue
        break
    if lines:
        out.msg("\n".join(lines))
    if len(lines) < len(rows):
        _one_by_one(logger, event, keys, rows[len(lines):])


def context_setters(*keys: str) -> tuple[Callable[[Any], Any], ...]:
    """What `structlog.contextvars.bind_contextvars(key=value)` calls for each of `keys`:
    the `set` of structlog's context variable of that name (created by one bind in a
    throw-away context). For the worker's per-job binding (job_id, task, attempt): three
    calls instead of bind_contextvars's name building and lookups, about 1 us a job."""
    import structlog

    scratch = contextvars.copy_context()
    scratch.run(structlog.contextvars.bind_contextvars, **dict.fromkeys(keys))
    prefix = structlog.contextvars.STRUCTLOG_KEY_PREFIX
    found = {var.name: var for var in scratch}
    return tuple(found[prefix + key].set for key in keys)


def _one_by_one(logger: Any, event: str, keys: tuple[str, ...],
                rows: list[tuple[Any, ...]]) -> None:
    for row in rows:
        logger.info(event, **dict(zip(keys, row, strict=True)))


class _LibraryLogs(logging.Handler):
    """psycopg's own warnings (the pool reconnecting during an outage) as structlog events,
    so a JSON log stays one JSON object per line; a DSN in them is masked."""

    def emit(self, record: logging.LogRecord) -> None:
        from .config import mask_dsn

        _structlog().get_logger(record.name).log(
            record.levelno, "library_warning", message=mask_dsn(record.getMessage()))


def _route_library_logs() -> None:
    library = logging.getLogger("psycopg")
    if not any(isinstance(h, _LibraryLogs) for h in library.handlers):
        library.addHandler(_LibraryLogs(logging.WARNING))
        library.propagate = False


class _Logger:
    """structlog's logger called `name`, looked up on each call (so a later configure()
    applies, as structlog's own lazy proxy does)."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, method: str) -> Any:
        return getattr(_structlog().get_logger(self._name), method)


def get_logger(name: str = "pgsched") -> structlog.typing.FilteringBoundLogger:
    return _Logger(name)
