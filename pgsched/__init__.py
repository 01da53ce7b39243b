"""pgsched: a job scheduler for Python whose only moving part is PostgreSQL.

The public API, nothing else: see README.md for usage.
"""

from .errors import (
    ConfigError,
    DatabaseUnavailable,
    InvalidInput,
    JobConflict,
    JobNotFound,
    PgschedError,
    ScheduleConflict,
    ScheduleNotFound,
)
from .recurring import periodic
from .scheduler import ConflictResolution, JobSpec, Scheduler
from .tasks import JobPriority, task
from .version import __version__
from .worker import Worker, WorkerOptions

__all__ = [
    "ConfigError",
    "ConflictResolution",
    "DatabaseUnavailable",
    "InvalidInput",
    "JobConflict",
    "JobNotFound",
    "JobPriority",
    "JobSpec",
    "PgschedError",
    "ScheduleConflict",
    "ScheduleNotFound",
    "Scheduler",
    "Worker",
    "WorkerOptions",
    "__version__",
    "periodic",
    "task",
]
