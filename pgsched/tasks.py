"""The task registry: `@task`, and importing the user's task module.

Owns: the process-wide mapping from task name to function and its defaults. A job row
names a task; the worker runs it only if that name is registered here. Nothing is ever
imported or resolved from a name stored in the database: the registry is filled by
importing the module named in the configuration, once, at start-up.

Invariants: a name is registered once (registering a different function under a taken
name raises); decorated functions stay plain callables, so tests and other code can call
them directly.

Failure: a task module that cannot be found or raises on import becomes InvalidInput with
the module name and the original error, so the CLI reports it in one line.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from .control import DEFAULT_MAX_SNOOZES, Backoff, BackoffPolicy
from .errors import InvalidInput
from .queues import validate_queue_name

_TASK_NAME_RE = re.compile(r"^[A-Za-z_][\w.:-]{0,199}$")


class JobPriority(IntEnum):
    """Names for two of the priorities 0-9 (lower values are claimed first). NORMAL keeps
    pg-scheduler's stored value (5); any other number of PRIORITIES is a priority too."""

    CRITICAL = 1
    NORMAL = 5

    @classmethod
    def parse(cls, value: JobPriority | int | str) -> int:
        """A priority from a name (critical, normal) or a number 0-9, given as an int or
        as text; the named values come back as members, so they print by name."""
        number: object = value
        if isinstance(value, str):
            text = value.strip()
            if text.upper() in cls.__members__:
                return cls[text.upper()]
            number = int(text) if text.isascii() and text.isdigit() else None
        if isinstance(number, int) and not isinstance(number, bool) and number in PRIORITIES:
            return cls(number) if number in cls._value2member_map_ else number
        names = ", ".join(p.name.lower() for p in cls)
        raise InvalidInput(f"invalid priority {value!r}: use a number from "
                           f"{PRIORITIES[0]} (first) to {PRIORITIES[-1]} (last), or {names}")


# Every priority a job may have; the table's CHECK constraints (migration 0011) say the same.
PRIORITIES = range(10)


@dataclass(frozen=True)
class Task:
    name: str
    func: Callable[..., Any]
    max_retries: int = 0
    timeout: float | None = None
    priority: int = JobPriority.NORMAL
    queue: str = "default"
    # Exceptions worth a retry; any other fails the job at once. None: every exception.
    retry_on: tuple[type[BaseException], ...] | None = None
    backoff: BackoffPolicy | None = None  # None: the worker's retry_base/max_seconds
    max_snoozes: int = DEFAULT_MAX_SNOOZES

    @functools.cached_property
    def is_async(self) -> bool:  # asked for every job run; inspect costs ~1 us a time
        return inspect.iscoroutinefunction(self.func)

    def check_arguments(self, args: Any, kwargs: Any) -> None:
        """Refuse args/kwargs the function cannot be called with, before the job is written,
        instead of a TypeError when it runs. Callables without a signature pass."""
        try:
            signature = inspect.signature(self.func)
        except (TypeError, ValueError):
            return
        try:
            signature.bind(*args, **(kwargs or {}))  # kwargs None: none given
        except TypeError as exc:
            raise InvalidInput(
                f"arguments do not fit task {self.name}{signature}: {exc}") from None


_REGISTRY: dict[str, Task] = {}


def validate_task_name(name: str) -> str:
    if not isinstance(name, str) or not _TASK_NAME_RE.match(name):
        shown = name if len(str(name)) <= 60 else f"{str(name)[:60]}..."
        raise InvalidInput(
            f"invalid task name {shown!r}: use at most 200 letters, digits, '_', '.', ':' or '-',"
            " starting with a letter or underscore"
        )
    return name


MAX_RETRIES = 10_000  # far above any sane retry budget, far below the integer column's limit


def check_max_retries(max_retries: object) -> int:
    if (isinstance(max_retries, bool) or not isinstance(max_retries, int)
            or not 0 <= max_retries <= MAX_RETRIES):
        raise InvalidInput(
            f"invalid max_retries {max_retries!r}: use a whole number from 0 to {MAX_RETRIES}")
    return max_retries


def check_task_options(max_retries: int, timeout: float | None) -> None:
    check_max_retries(max_retries)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
        or timeout == float("inf")
    ):
        raise InvalidInput(f"invalid timeout {timeout!r}: use a number of seconds > 0, or None")


def check_retry_policy(
    retry_on: Any, backoff: Any, max_snoozes: Any,
) -> tuple[type[BaseException], ...] | None:
    """@task's retry_on (one exception class or a tuple of them), backoff (a Backoff or a
    callable of the failure number) and max_snoozes, checked; returns retry_on as a tuple."""
    if retry_on is not None:
        classes = retry_on if isinstance(retry_on, tuple | list) else (retry_on,)
        if not classes or not all(
                isinstance(c, type) and issubclass(c, BaseException) for c in classes):
            raise InvalidInput(
                f"invalid retry_on {retry_on!r}: use an exception class or a tuple of them, "
                "e.g. retry_on=(ConnectionError, TimeoutError)")
        retry_on = tuple(classes)
    if backoff is not None and not isinstance(backoff, Backoff) and not callable(backoff):
        raise InvalidInput(
            f"invalid backoff {backoff!r}: use pgsched.Backoff(base=, cap=, jitter=) or a "
            "function of the failure number returning seconds")
    if (isinstance(max_snoozes, bool) or not isinstance(max_snoozes, int)
            or not 0 <= max_snoozes <= MAX_RETRIES):
        raise InvalidInput(
            f"invalid max_snoozes {max_snoozes!r}: use a whole number from 0 to {MAX_RETRIES}")
    return retry_on


def _origin(func: Callable[..., Any]) -> tuple[str, str]:
    """Where a function was defined. Importing one file twice (by module name and by
    path) creates new function objects for the same task: not a clash."""
    code = getattr(func, "__code__", None)
    return (getattr(code, "co_filename", ""), getattr(func, "__qualname__", repr(func)))


def register(task_: Task) -> Task:
    existing = _REGISTRY.get(task_.name)
    if existing is not None and _origin(existing.func) != _origin(task_.func):
        raise InvalidInput(
            f"task name {task_.name!r} is registered twice ({_origin(existing.func)[1]} and "
            f"{_origin(task_.func)[1]}): give one of them another name="
        )
    _REGISTRY[task_.name] = task_
    task_.func.__pgsched_task__ = task_.name  # type: ignore[attr-defined]
    return task_


def task(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    max_retries: int = 0,
    timeout: float | None = None,
    priority: JobPriority | int | str = JobPriority.NORMAL,
    queue: str = "default",
    retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    backoff: BackoffPolicy | None = None,
    max_snoozes: int = DEFAULT_MAX_SNOOZES,
) -> Any:
    """Register a function as a task; usable as `@task` or `@task(name=..., ...)`.

    Plain `def` functions run in a thread pool so they never block the event loop;
    `async def` functions run on the worker's loop. retry_on: the exceptions that are
    retried (within max_retries); any other fails the job at once (default: all are).
    backoff: a Backoff, or a function of the failure number (1 for the first) returning
    the seconds to wait; default the worker's retry_base/max_seconds. max_snoozes: how
    often the job may `raise Retry(...)` before it fails.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        check_task_options(max_retries, timeout)
        retry_classes = check_retry_policy(retry_on, backoff, max_snoozes)
        register(
            Task(
                name=validate_task_name(name or fn.__name__),
                func=fn,
                max_retries=max_retries,
                timeout=timeout,
                priority=JobPriority.parse(priority),
                queue=validate_queue_name(queue),
                retry_on=retry_classes,
                backoff=backoff,
                max_snoozes=max_snoozes,
            )
        )
        return fn

    return decorate(func) if func is not None else decorate


def get_task(name: str) -> Task | None:
    return _REGISTRY.get(name)


def registered() -> dict[str, Task]:
    return dict(_REGISTRY)


def task_name_of(func_or_name: Callable[..., Any] | str) -> str:
    """The registered name for a function, or a validated name given as text."""
    if isinstance(func_or_name, str):
        return validate_task_name(func_or_name)
    name = getattr(func_or_name, "__pgsched_task__", None)
    if name is None:
        shown = getattr(func_or_name, "__qualname__", repr(func_or_name))
        raise InvalidInput(f"{shown} is not a registered task: decorate it with @task")
    return name


def load_tasks(spec: str, base_dir: Path | None = None) -> None:
    """Import the user's task module: a .py path (relative to base_dir), or a dotted name
    found on sys.path with base_dir (the config file's directory) and the working
    directory in front: the systemd unit keeps its config in /etc/pgsched and runs in the
    application's directory, and a console script does not put that directory on the path."""
    try:
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise InvalidInput(f"task module file {path} does not exist: check [worker] tasks")
            module_name = f"pgsched_tasks_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            assert module_spec and module_spec.loader
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        else:
            for directory in (os.getcwd(), base_dir):
                if directory is not None and str(directory) not in sys.path:
                    sys.path.insert(0, str(directory))
            importlib.import_module(spec)
    except InvalidInput:
        raise
    except ModuleNotFoundError as exc:
        raise InvalidInput(
            f"cannot import task module {spec!r}: {exc}; check [worker] tasks and that the "
            "module is on the Python path (the config file's directory and the working "
            "directory are added)"
        ) from exc
    except Exception as exc:
        raise InvalidInput(
            f"task module {spec!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
