"""Running one claimed job's function and turning what happened into an Outcome.

Owns: calling the task (async on the loop, sync in the worker's threads) with
current_job() set, the per-job timeout, encoding the result as JSON, making error text
storable, what a task's Retry/Fail/retry_on mean (a snooze, a failure without retries),
and the retry delay (the task's backoff, or the worker's). It writes nothing: the
completer records the Outcome with fenced statements (a task's own complete() included).

Invariants: every exception a task raises (BaseException included: a task's
SystemExit or GeneratorExit, an exception whose __str__ raises), and every value it
returns (one whose encoding raises included), becomes an Outcome (never escapes); only
the daemon's asyncio cancellation propagates (shutdown, lost lease: the daemon decides
what to record); a CancelledError the task raises itself is its failure; an exception a task raises
while it is being cancelled that way (a failing cleanup) counts as that cancellation.
Error text is at most ERROR_MAX_CHARS, and it and tracebacks (which the store cuts)
have NUL and unencodable characters escaped, so PostgreSQL can store them. A result
PostgreSQL cannot store (a NUL in a string) fails the job. What a task puts in a Retry
or a Fail is distrusted the same way: a delay that is not 0 to a year of seconds (NaN,
-1, 10**30, text, a property that raises) makes the attempt a plain failure; a reason is
escaped and cut like any error; a backoff function that raises or returns nonsense gives
the worker's default delay (`backoff_invalid`). A row's NaN timeout reaches it as none
(the claim's doing: a NaN timer would break the loop's timer heap).

Threads: a sync task that times out or is cancelled cannot be interrupted: its thread
runs on (abandoned) and its result is ignored. TaskThreads then gives the next jobs a
fresh pool, so an abandoned thread never takes a slot, up to MAX_ABANDONED_THREADS
(the worker's concurrency); beyond that the pool is kept and the worker reports itself
unhealthy, because a process full of hung threads needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import random
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..control import (
    DEFAULT_MAX_SNOOZES,
    Fail,
    Retry,
    RunningJob,
    reset_current_job,
    set_current_job,
    snooze_seconds,
)
from ..errors import InvalidInput
from ..logs import get_logger
from ..payload import encode_result
from ..store import Store
from ..tasks import Task, get_task

log = get_logger("pgsched.worker")

ERROR_MAX_CHARS = 2000  # tracebacks are cut by the store (store.TRACEBACK_MAX_CHARS)
# A task's backoff function is arithmetic: one still running after this is broken.
BACKOFF_LIMIT_SECONDS = 1.0


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result_json: str = "null"
    error: str = ""
    traceback: str | None = None
    cancelled: bool = False  # stopped because a cancel was requested
    unknown_task: bool = False  # this worker does not know the task: defer, not a failure
    snooze_seconds: float | None = None  # Retry(delay): run again then, not a failure
    max_snoozes: int = DEFAULT_MAX_SNOOZES
    final: bool = False  # Fail, or an exception outside retry_on: no retries left
    completed_in_task: bool = False  # current_job().complete() wrote (commit unknown)


CANCELLED = Outcome(ok=False, error="cancelled on request", cancelled=True)


def escaped(text: str) -> str:
    """`text` as PostgreSQL text can hold it: NULs and lone surrogates escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def storable(text: str, limit: int) -> str:
    """escaped(text), cut to `limit` characters with a marker saying how much was cut."""
    text = escaped(text)
    if len(text) <= limit:
        return text
    marker = f"... [{len(text) - limit} more characters cut]"
    return text[: max(0, limit - len(marker))] + marker


def failed(error: str, tb: str | None = None) -> Outcome:
    return Outcome(ok=False, error=storable(error, ERROR_MAX_CHARS),
                   traceback=None if tb is None else escaped(tb))


class TaskThreads:
    """The threads sync tasks run in, and the count of those still running.

    A call abandoned while its thread runs (timeout, cancel, lost lease, shutdown) moves
    the next calls to a fresh pool, so `concurrency` threads stay free for new jobs; the
    old pool's threads end when their calls return.
    """

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.max_abandoned = concurrency
        self.running = 0  # calls in any thread, abandoned or not
        self.abandoned = 0  # calls whose job has moved on while the thread runs on
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="pgsched-task")

    @property
    def over_cap(self) -> bool:
        return self.abandoned > self.max_abandoned

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # copy_context: structlog's bound job context reaches the thread's logs.
        call = functools.partial(contextvars.copy_context().run, self._run, fn, *args, **kwargs)
        future = self._pool.submit(call)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel() and not future.done():  # a thread cannot be stopped
                self._abandon(future)
            raise

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.running += 1
        try:
            return fn(*args, **kwargs)
        except GeneratorExit as exc:
            # Re-raised by the awaiting coroutine, it would pass by every `except` on its
            # way out (CPython treats it as that coroutine closing) and end the job's task.
            raise RuntimeError(f"the task raised GeneratorExit: {exc}") from exc
        finally:
            with self._lock:
                self.running -= 1

    def _abandon(self, future: Future[Any]) -> None:
        with self._lock:
            self.abandoned += 1
        future.add_done_callback(self._abandoned_call_ended)
        if self.over_cap:
            log.error("threads_abandoned_over_cap", abandoned=self.abandoned,
                      cap=self.max_abandoned, hint="sync tasks hang after their timeout; "
                      "they now take slots from new jobs: fix the task and restart the worker")
            return
        old, self._pool = self._pool, self._new_pool()
        old.shutdown(wait=False)  # its idle threads exit; running calls finish there
        log.warning("thread_abandoned", abandoned=self.abandoned,
                    hint="a sync task ran on after its timeout or cancellation")

    def _abandoned_call_ended(self, _: Future[Any]) -> None:
        with self._lock:
            self.abandoned -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


async def run_job(job: dict[str, Any], threads: TaskThreads, *,
                  running: RunningJob | None = None) -> Outcome:
    """Run a claimed job's task; `running` is what current_job() returns inside it."""
    if job.get("undecodable"):
        return failed(job["undecodable"])
    task = get_task(job["task"])
    if task is None:
        return Outcome(
            ok=False, unknown_task=True,
            error=f"unknown task {job['task']!r}: it is not registered in this worker's task "
            "module (check [worker] tasks and deploy the code that defines it)",
        )
    token = set_current_job(running) if running is not None else None
    try:
        outcome = await _run(job, task, threads)
    finally:
        if token is not None:
            reset_current_job(token)
    if running is not None and running.completed:
        outcome = dataclasses.replace(outcome, completed_in_task=True)
    return outcome


async def _run(job: dict[str, Any], task: Task, threads: TaskThreads) -> Outcome:
    timeout = job["timeout_seconds"]  # never NaN: the claim returns none for it
    args, kwargs = job["args"], job["kwargs"]
    try:
        if timeout is None:  # no timeout scope: a measurable share of a no-op job
            # _call spelt out: one coroutine less per job
            if task.is_async:
                result = await task.func(*args, **kwargs)
            else:
                result = await threads.call(task.func, *args, **kwargs)
        else:
            async with asyncio.timeout(timeout) as deadline:
                result = await _call(task, args, kwargs, threads)
    except TimeoutError as exc:
        if timeout is not None and deadline.expired():
            return Outcome(ok=False, error=f"timed out after {timeout:g}s",
                           final=not _retried(task, TimeoutError()))
        return _failed(exc, task)
    except asyncio.CancelledError as exc:
        if _cancelling():
            raise
        # Nobody cancelled the job's task: the task raised it itself. Passed on, it would
        # read as a shutdown, and the job would stay held (and running) for good.
        return _failed(exc, task)
    except BaseException as exc:  # SystemExit, GeneratorExit...: the task's failure too
        if _cancelling():
            # The task raised while handling the daemon's cancellation (shutdown, lost
            # lease): an interruption, not a failed attempt that would burn a retry.
            raise asyncio.CancelledError from exc
        return _failed(exc, task)
    if result is None:
        return _NONE
    return result_outcome(result)


def make_running_job(job: dict[str, Any], store: Store, worker_id: str) -> RunningJob:
    """What current_job() returns for a claimed job (claim_jobs' row)."""
    return RunningJob(
        id=job["id"], attempt=job["attempts"], queue=job["queue"], task=job["task"],
        scheduled_at=job["execution_time"], schedule_id=job.get("schedule_id"),
        fire_time=job.get("fire_time"), _store=store, _worker_id=worker_id)


def result_outcome(result: Any) -> Outcome:
    try:
        return Outcome(ok=True, result_json=encode_result(result))
    except InvalidInput as exc:
        return failed(str(exc))
    except BaseException as exc:  # a custom container's items() raising, SystemExit too
        return failed("the task's return value could not be encoded: "
                      f"{type(exc).__name__} raised while reading it")


_NONE = Outcome(ok=True)  # most tasks return nothing: skip encoding null every time


async def _call(task: Any, args: list, kwargs: dict, threads: TaskThreads) -> Any:
    if task.is_async:
        return await task.func(*args, **kwargs)
    return await threads.call(task.func, *args, **kwargs)


def _cancelling() -> bool:
    # asyncio.timeout() withdraws its own cancellation before the error gets here, so
    # only a cancellation from outside (the daemon) is still counted.
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _failed(exc: BaseException, task: Task | None = None) -> Outcome:
    """The outcome of an exception: a snooze (Retry), a failure without retries (Fail, or
    an exception outside the task's retry_on) or a failure. Nothing a task put in a Retry
    or Fail may escape: a delay or reason whose methods raise, even SystemExit or
    KeyboardInterrupt (escaping the job's asyncio task, those would stop the worker's
    loop), makes the attempt a plain failure."""
    try:
        return _judged(exc, task)
    except BaseException as bad:
        return failed(f"{type(exc).__name__} raised by the task could not be read: reading "
                      f"it raised {type(bad).__name__}")


def _judged(exc: BaseException, task: Task | None) -> Outcome:
    if isinstance(exc, Retry):
        try:
            delay = snooze_seconds(getattr(exc, "delay", None))
        except InvalidInput as bad:
            return failed(str(bad))
        except Exception as bad:  # a subclass whose `delay` property raises
            return failed(f"invalid Retry delay: reading it raised {_describe(bad)}")
        return Outcome(ok=False, snooze_seconds=delay, error=f"snoozed for {delay:g}s",
                       max_snoozes=task.max_snoozes if task else DEFAULT_MAX_SNOOZES)
    tb = "".join(traceback.format_exception(exc))
    if isinstance(exc, Fail):
        return dataclasses.replace(failed(_reason(exc), tb), final=True)
    outcome = failed(_describe(exc), tb)
    if task is not None and not _retried(task, exc):
        return dataclasses.replace(outcome, final=True)
    return outcome


def _retried(task: Task, exc: BaseException) -> bool:
    try:
        return task.retry_on is None or isinstance(exc, task.retry_on)
    except BaseException:  # a retry_on class whose __instancecheck__ raises: as if unset
        return True


def _reason(exc: Fail) -> str:
    try:
        reason = getattr(exc, "reason", None)
        # A str subclass may override what escaping calls (encode, replace): a plain copy.
        return str.__str__(reason) if isinstance(reason, str) and reason else _describe(exc)
    except Exception:
        return "Fail: <reason str() failed>"


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:  # its __str__ raises; the traceback module says the same
        return f"{type(exc).__name__}: <exception str() failed>"


def task_retry_delay(task_name: str, failures: int, base_seconds: float,
                     max_seconds: float) -> float:
    """The delay before retry number `failures` (1-based): the task's backoff when it has
    one, else retry_delay(). A backoff function that raises or returns anything but a
    number of seconds from 0 to MAX_SNOOZE_SECONDS logs `backoff_invalid` and the default
    is used: a task's policy never stops the worker."""
    task = get_task(task_name)
    if task is None or task.backoff is None:
        return retry_delay(failures, base_seconds, max_seconds)
    try:
        delay = task.backoff(failures)
        if asyncio.iscoroutine(delay):
            delay.close()  # an async backoff: refused below, without a never-awaited warning
        return snooze_seconds(delay)
    except BaseException as exc:
        log.warning("backoff_invalid", task=task_name, failures=failures, error=_describe(exc),
                    hint="the task's backoff must return seconds (0 to a year); the "
                         "worker's retry_base/max_seconds were used")
        return retry_delay(failures, base_seconds, max_seconds)


async def task_retry_delay_off_loop(task_name: str, failures: int, base_seconds: float,
                                    max_seconds: float) -> float:
    """task_retry_delay() with the task's backoff function run in a thread of its own for
    at most BACKOFF_LIMIT_SECONDS: on the loop, one that sleeps or hangs would stop every
    heartbeat of the worker (its other jobs would be recovered as orphans, run twice and
    blamed). Not in the tasks' threads, which busy sync tasks may all hold; a daemon
    thread, so one that never returns holds up no exit. Past the limit: the default."""
    task = get_task(task_name)
    if task is None or task.backoff is None:
        return retry_delay(failures, base_seconds, max_seconds)
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[float] = loop.create_future()

    def answered(delay: float) -> None:
        if not answer.done():  # not given up on (timed out) meanwhile
            answer.set_result(delay)

    def compute() -> None:
        delay = task_retry_delay(task_name, failures, base_seconds, max_seconds)
        with contextlib.suppress(RuntimeError):  # the loop closed while the backoff ran
            loop.call_soon_threadsafe(answered, delay)

    threading.Thread(target=compute, name="pgsched-backoff", daemon=True).start()
    try:
        async with asyncio.timeout(BACKOFF_LIMIT_SECONDS):
            return await answer
    except TimeoutError:
        log.warning("backoff_invalid", task=task_name, failures=failures,
                    error=f"the backoff took longer than {BACKOFF_LIMIT_SECONDS:g}s",
                    hint="the task's backoff must return seconds at once; the worker's "
                         "retry_base/max_seconds were used")
        return retry_delay(failures, base_seconds, max_seconds)


def retry_delay(failures: int, base_seconds: float, max_seconds: float) -> float:
    """Exponential backoff for the n-th failure (1-based) with +-20% jitter, capped.

    The jitter spreads retries of jobs that failed together (a dependency went down)
    so they do not return as one burst.
    """
    exponent = min(failures - 1, 62)
    delay = min(max_seconds, base_seconds * 2.0**exponent)
    return min(max_seconds, delay * random.uniform(0.8, 1.2))
