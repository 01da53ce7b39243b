"""structlog set-up: a console renderer on a TTY, JSON lines otherwise.

Owns: the process-wide logging configuration. Logs go to stderr, so stdout stays clean
for data (`JOB=$(pgsched add ...)`). Under systemd stderr is not a TTY, so the daemon
writes one JSON object per line, which journald stores and `jq` reads. Per-job context
(job_id, task, attempt) is bound with contextvars by the worker, once per job.

Event names are stable (they are documented in the README for alerting): change them
only with a note in the changelog.
"""

from __future__ import annotations

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
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    # psycopg_pool logs each broken connection it discards; the worker already reports
    # the outage once as `db_unavailable`, in its own format.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "pgsched") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
