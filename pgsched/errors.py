"""The exceptions pgsched raises on purpose.

Every error a user can cause derives from `PgschedError` and carries the CLI exit code
that fits it: 2 for bad input (the caller must change what they asked), 1 for an
operation that failed (a missing job, a conflict, an unreachable database). The CLI
prints `str(error)` as one line and exits with `exit_code`; anything else that escapes is
a bug and keeps its traceback.
"""

from __future__ import annotations


class PgschedError(Exception):
    """Base class: a failure the user can act on, described in one line."""

    exit_code = 1


class InvalidInput(PgschedError, ValueError):
    """The caller passed something pgsched cannot accept (bad time, JSON, name...)."""

    exit_code = 2


class ConfigError(InvalidInput):
    """The configuration file or an override is missing, unparsable or invalid."""


class JobConflict(PgschedError, ValueError):
    """A job with this id already exists and the conflict mode does not allow a change."""


class JobNotFound(PgschedError, LookupError):
    """No job has the given id."""


class DatabaseUnavailable(PgschedError):
    """The database could not be reached (or the embedded one could not be started)."""


class ScheduleConflict(PgschedError, ValueError):
    """A schedule with this id already exists and may not be changed this way."""


class ScheduleNotFound(PgschedError, LookupError):
    """No schedule has the given id."""


class WaitTimedOut(PgschedError, TimeoutError):
    """A job waited for (Scheduler.wait, `pgsched add --wait`) did not end in time; it may
    still run. Exit code 124, as timeout(1)."""

    exit_code = 124
