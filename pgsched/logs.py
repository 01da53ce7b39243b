"""structlog set-up: a console renderer on a TTY, JSON lines otherwise.

Owns: the process-wide logging configuration. Logs go to stderr, so stdout stays clean
for data (`JOB=$(pgsched add ...)`). Under systemd stderr is not a TTY, so the daemon
writes one JSON object per line, which journald stores and `jq` reads. Per-job context
(job_id, task, attempt) is bound with contextvars by the worker, once per job.

Event names are stable (they are documented in the README for alerting): change them
only with a note in the changelog.
"""

from __future__ import annotations

import json
import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class _CurrentStderr:
    """Whatever sys.stderr is at write time (test runners and daemons swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and route psycopg's warnings through it) for this process.

    Built for the worker's one line per job: every processor is one that structlog
    specialises at configuration time, the JSON encoder is built once (structlog's
    JSONRenderer builds a new one per event through json.dumps's keyword arguments), and
    a line is one write() and flush() rather than print()'s several. Loggers are not
    cached on first use: the worker binds its per-job logger once per run, which is the
    same saving, and module-level loggers keep following a later configure().
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    # psycopg_pool logs each broken connection it discards; the worker already reports
    # the outage once as `db_unavailable`, in its own format.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    renderer: structlog.types.Processor = (
        _render_json if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    _route_library_logs()


def configure_unless_configured() -> bool:
    """configure() with the defaults (level info, JSON unless stderr is a terminal) if the
    application has not configured structlog itself; returns whether it did. For a worker
    started inside an application: structlog's own defaults print two console lines per
    job to stdout, which halves a drain."""
    if structlog.is_configured():
        return False
    configure()
    return True


def _json_default(value: object) -> str:
    return repr(value)  # what structlog's JSONRenderer writes for a non-JSON value


_JSON_LINE = json.JSONEncoder(default=_json_default)


def _render_json(_logger: object, _method: str, event_dict: structlog.types.EventDict) -> str:
    return _JSON_LINE.encode(event_dict)


class _LibraryLogs(logging.Handler):
    """psycopg's own warnings (the pool reconnecting during an outage) as structlog events,
    so a JSON log stays one JSON object per line; a DSN in them is masked."""

    def emit(self, record: logging.LogRecord) -> None:
        from .config import mask_dsn

        structlog.get_logger(record.name).log(
            record.levelno, "library_warning", message=mask_dsn(record.getMessage()))


def _route_library_logs() -> None:
    library = logging.getLogger("psycopg")
    if not any(isinstance(h, _LibraryLogs) for h in library.handlers):
        library.addHandler(_LibraryLogs(logging.WARNING))
        library.propagate = False


def get_logger(name: str = "pgsched") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
