"""What a running task can see and say: `current_job()`, `Retry`, `Fail` and `Backoff`.

Owns: the job a task runs for (a context variable the executor sets around each call, so
sync tasks in threads see it too: the thread runs in a copy of the job's context), the
exceptions a task raises to steer its job, and the validation of what they carry.

Invariants: nothing here decides an outcome on its own. `Retry`, `Fail` and
`RunningJob.complete` only describe or write what the worker's fenced statements would:
every write is fenced by (id, attempt, worker id, status 'running'), so a run that lost
its lease changes nothing. Values a task passes (a delay, a reason, a result) are checked
where they are given and again by the executor, which never trusts them.

Failure: `current_job()` outside a task raises NoCurrentJob; `Retry` with a delay that is
not a number of seconds from 0 to MAX_SNOOZE_SECONDS raises InvalidInput (the task then
fails as with any exception); `complete()` raises LeaseLost when the fence refused it.
"""

from __future__ import annotations

import contextvars
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

from .errors import InvalidInput, PgschedError

if TYPE_CHECKING:
    import psycopg

    from .store import Store

# The longest a job may snooze at once (a year): past it a Retry is a mistake (10**30).
MAX_SNOOZE_SECONDS = 366 * 86400.0
# How often a job may snooze before it fails (@task(max_snoozes=...) changes it per task).
DEFAULT_MAX_SNOOZES = 100


class NoCurrentJob(PgschedError, LookupError):
    """current_job() was called outside a task run by a pgsched worker."""


class LeaseLost(PgschedError):
    """A write of a running task was refused: its job is no longer this run's."""


def _finite(value: object) -> float | None:
    """`value` as a plain finite float; None unless it is a number (not a bool) that fits
    one (10**400 does not: float() raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def snooze_seconds(delay: object) -> float:
    """A Retry delay as seconds; InvalidInput unless it is 0 to MAX_SNOOZE_SECONDS."""
    if isinstance(delay, timedelta):
        delay = delay.total_seconds()
    seconds = _finite(delay)
    if seconds is None or not 0 <= seconds <= MAX_SNOOZE_SECONDS:
        shown = repr(delay)[:60]
        raise InvalidInput(
            f"invalid Retry delay {shown}: use a number of seconds (or a timedelta) from 0 "
            f"to {MAX_SNOOZE_SECONDS:.0f}")
    return seconds


class Retry(Exception):
    """Raise in a task to run its job again after `delay` (seconds or a timedelta)
    without counting a failure: a snooze. A job snoozes at most its task's max_snoozes
    times (DEFAULT_MAX_SNOOZES); the next Retry fails it."""

    def __init__(self, delay: float | timedelta = 0.0):
        self.delay = snooze_seconds(delay)
        super().__init__(f"retry in {self.delay:g}s")


class Fail(Exception):
    """Raise in a task to fail its job at once: no retries left, `reason` stored as its
    error."""

    def __init__(self, reason: str = "failed by the task"):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Backoff:
    """Exponential retry delays: `base * 2**(n-1)` seconds before the n-th retry, at most
    `cap`, spread by +-`jitter` (a fraction) so jobs that failed together do not return
    together."""

    base: float = 1.0
    cap: float = 300.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        for name in ("base", "cap", "jitter"):
            value = getattr(self, name)
            number = _finite(value)
            if number is None or number < 0:
                shown = repr(value)[:60]
                raise InvalidInput(f"invalid Backoff {name} {shown}: use a number >= 0")
        if self.jitter > 1:
            raise InvalidInput(f"invalid Backoff jitter {self.jitter!r}: use 0 to 1")
        if self.cap < self.base:
            raise InvalidInput(f"invalid Backoff: cap {self.cap!r} is below base {self.base!r}")

    def __call__(self, failures: int) -> float:
        delay = min(self.cap, self.base * 2.0 ** min(max(failures, 1) - 1, 62))
        return min(self.cap, delay * random.uniform(1 - self.jitter, 1 + self.jitter))


BackoffPolicy = Backoff | Callable[[int], float]


@dataclass
class RunningJob:
    """The job the current task runs for; `pgsched.current_job()` returns it.

    id, attempt (1 for the first run; it fences every write of this run), queue, task,
    scheduled_at (when it was due), and for a job a schedule made: schedule_id and
    fire_time (the window; None for `pgsched trigger` runs and one-off jobs). Together
    `(id, attempt)` or `(schedule_id, fire_time)` make good idempotency keys.
    """

    id: str
    attempt: int
    queue: str
    task: str
    scheduled_at: datetime
    schedule_id: str | None
    fire_time: datetime | None
    _store: Store = field(repr=False)
    _worker_id: str = field(repr=False)
    completed: bool = field(default=False, repr=False)  # complete() wrote (maybe uncommitted)
    # The worker is done with this attempt (see end()): complete() refuses from then on.
    ended: bool = field(default=False, repr=False)

    @overload
    def complete(self, conn: psycopg.AsyncConnection[Any],
                 result: Any = None) -> Awaitable[None]: ...

    @overload
    def complete(self, conn: psycopg.Connection[Any], result: Any = None) -> None: ...

    def complete(self, conn: Any, result: Any = None) -> Awaitable[None] | None:
        """Complete this job inside the transaction open on `conn` (a psycopg Connection,
        or an AsyncConnection: then await it), with `result` (JSON). The completion commits
        with the task's own writes or not at all; call it last, just before the commit,
        since it holds the job's row lock until then. Raises LeaseLost if the job is no
        longer this run's (lease lost, cancelled, completed already): roll back."""
        text = self._result_json(result)
        self._check_transaction(conn)
        if self.ended:
            self._settle(False)
        if _is_async(conn):
            return self._complete_async(conn, text)
        self._settle(self._store.complete_in_transaction_sync(
            conn, worker_id=self._worker_id, job_id=self.id, attempt=self.attempt,
            result_json=text))
        return None

    async def _complete_async(self, conn: Any, text: str) -> None:
        self._settle(await self._store.complete_in_transaction(
            conn, worker_id=self._worker_id, job_id=self.id, attempt=self.attempt,
            result_json=text))

    def end(self) -> None:
        """The worker recorded this attempt's end, or gave it up: a complete() from a
        thread the task left behind is refused here. The database's fence cannot see it
        once the job was deleted and added again with the same id: attempts start over,
        and this worker may claim the new job as the same attempt number."""
        self.ended = True

    def _settle(self, written: bool) -> None:
        if not written:
            raise LeaseLost(
                f"job {self.id!r} attempt {self.attempt} is no longer running for this "
                "worker (lease lost, cancelled, or completed already): roll back")
        self.completed = True

    @staticmethod
    def _result_json(result: Any) -> str:
        from .payload import encode_result  # the worker's own rules for results

        return encode_result(result)

    @staticmethod
    def _check_transaction(conn: Any) -> None:
        import psycopg

        if not isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
            raise InvalidInput(
                f"complete() needs a psycopg Connection or AsyncConnection, not "
                f"{type(conn).__name__}")
        if conn.closed:
            raise InvalidInput("complete() was given a closed connection")
        if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            raise InvalidInput(
                "complete() must run inside the transaction that holds the task's writes: "
                "the connection is in autocommit mode outside a transaction; use "
                "`with conn.transaction():`")


def _is_async(conn: Any) -> bool:
    import psycopg

    return isinstance(conn, psycopg.AsyncConnection)


_CURRENT: contextvars.ContextVar[RunningJob] = contextvars.ContextVar("pgsched_current_job")


def current_job() -> RunningJob:
    """The job the calling task runs for (see RunningJob); NoCurrentJob outside a task."""
    try:
        return _CURRENT.get()
    except LookupError:
        raise NoCurrentJob(
            "current_job() is only available inside a task run by a pgsched worker "
            "(async tasks, and sync tasks in the worker's threads)") from None


def set_current_job(job: RunningJob) -> contextvars.Token[RunningJob]:
    return _CURRENT.set(job)


def reset_current_job(token: contextvars.Token[RunningJob]) -> None:
    _CURRENT.reset(token)
