"""Running one claimed job's function and turning what happened into an Outcome.

Owns: calling the task (async on the loop, sync in the worker's thread pool), the
per-job timeout, encoding the result as JSON, and the retry delay. It writes nothing:
the daemon records the Outcome with fenced statements.

Invariants: every exception a task raises becomes an Outcome (never escapes); only
asyncio cancellation propagates, because it means the daemon itself cancelled the job
(shutdown, lost lease) and must decide what to record; an exception a task raises while
it is being cancelled that way (a failing cleanup) counts as that cancellation. A sync
task that times out or is cancelled cannot be interrupted: its thread runs on, its result
is ignored.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
import threading
import traceback
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidInput
from ..store import encode_json
from ..tasks import get_task


@dataclass(frozen=True)
class Outcome:
    ok: bool
    result_json: str = "null"
    error: str = ""
    traceback: str | None = None
    cancelled: bool = False  # stopped because a cancel was requested


CANCELLED = Outcome(ok=False, error="cancelled on request", cancelled=True)


class SyncCalls:
    """Counts sync task calls still running in threads, so shutdown can tell the
    process it must not wait for them (a thread cannot be interrupted)."""

    def __init__(self) -> None:
        self.running = 0
        self._lock = threading.Lock()

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.running += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1


async def run_job(job: dict[str, Any], threads: Executor, sync_calls: SyncCalls) -> Outcome:
    task = get_task(job["task"])
    if task is None:
        return Outcome(
            ok=False,
            error=f"unknown task {job['task']!r}: it is not registered in this worker's task "
            "module (check [worker] tasks and deploy the code that defines it)",
        )
    timeout = job["timeout_seconds"]
    args, kwargs = job["args"], job["kwargs"]
    try:
        async with asyncio.timeout(timeout) as deadline:
            if task.is_async:
                result = await task.func(*args, **kwargs)
            else:
                # copy_context: structlog's bound job context reaches the thread's logs.
                call = functools.partial(
                    contextvars.copy_context().run, sync_calls.call, task.func, *args, **kwargs)
                result = await asyncio.get_running_loop().run_in_executor(threads, call)
    except TimeoutError as exc:
        if deadline.expired():
            return Outcome(ok=False, error=f"timed out after {timeout:g}s")
        return _failed(exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if _cancelling():
            # The task raised while handling the daemon's cancellation (shutdown, lost
            # lease): an interruption, not a failed attempt that would burn a retry.
            raise asyncio.CancelledError from exc
        return _failed(exc)
    try:
        return Outcome(ok=True, result_json=encode_json(result, "the task's return value"))
    except InvalidInput as exc:
        return Outcome(ok=False, error=str(exc))


def _cancelling() -> bool:
    # asyncio.timeout() withdraws its own cancellation before the error gets here, so
    # only a cancellation from outside (the daemon) is still counted.
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _failed(exc: BaseException) -> Outcome:
    return Outcome(
        ok=False,
        error=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_exception(exc)),
    )


def retry_delay(failures: int, base_seconds: float, max_seconds: float) -> float:
    """Exponential backoff for the n-th failure (1-based) with +-20% jitter, capped.

    The jitter spreads retries of jobs that failed together (a dependency went down)
    so they do not return as one burst.
    """
    exponent = min(failures - 1, 62)
    delay = min(max_seconds, base_seconds * 2.0**exponent)
    return min(max_seconds, delay * random.uniform(0.8, 1.2))
