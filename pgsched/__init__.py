"""pgsched: a job scheduler for Python whose only moving part is PostgreSQL.

The public API, nothing else: see README.md for usage. The errors are imported at once;
everything else on first use (PEP 562), so `import pgsched` (and the `pgsched` command,
which starts with it) does not pay for psycopg, croniter or the worker before it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    DatabaseUnavailable,
    InvalidInput,
    JobConflict,
    JobNotFound,
    PgschedError,
    ScheduleConflict,
    ScheduleNotFound,
    WaitTimedOut,
)
from .version import __version__

if TYPE_CHECKING:
    from .control import Backoff, Fail, LeaseLost, NoCurrentJob, Retry, RunningJob, current_job
    from .recurring import periodic
    from .scheduler import ConflictResolution, JobSpec, Scheduler
    from .tasks import JobPriority, task
    from .worker import Worker, WorkerOptions

_LAZY = {
    "Backoff": ".control",
    "Fail": ".control",
    "LeaseLost": ".control",
    "NoCurrentJob": ".control",
    "Retry": ".control",
    "RunningJob": ".control",
    "current_job": ".control",
    "periodic": ".recurring",
    "ConflictResolution": ".scheduler",
    "JobSpec": ".scheduler",
    "Scheduler": ".scheduler",
    "JobPriority": ".tasks",
    "task": ".tasks",
    "Worker": ".worker",
    "WorkerOptions": ".worker",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pgsched' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "Backoff",
    "ConfigError",
    "ConflictResolution",
    "DatabaseUnavailable",
    "Fail",
    "InvalidInput",
    "JobConflict",
    "JobNotFound",
    "JobPriority",
    "JobSpec",
    "LeaseLost",
    "NoCurrentJob",
    "PgschedError",
    "Retry",
    "RunningJob",
    "ScheduleConflict",
    "ScheduleNotFound",
    "Scheduler",
    "WaitTimedOut",
    "Worker",
    "WorkerOptions",
    "__version__",
    "current_job",
    "periodic",
    "task",
]
