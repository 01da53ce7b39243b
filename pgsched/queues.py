"""Queue names and per-queue concurrency: the pure logic behind queues.

Owns: what a queue name may be (`validate_queue_name`), reading a `--queues a,b` list
(`parse_queue_list`), how many more jobs a worker may claim from each queue that has
a concurrency limit (`capped_free_slots`), and the values of a queue's global limits
(`parse_rate`, `check_global_concurrency`). No database, no clock.

Invariants: a valid queue name never contains a comma or whitespace, so a list of names
round-trips through "a,b"; per-queue limits apply within one worker process (each
worker enforces its own copy of `[queues.NAME] concurrency`), never across workers.
Global limits (`global_concurrency`, `rate`) hold across every worker: they live in the
database and the claim enforces them (sql/queries.sql claim_jobs); here they are only
read and checked.

Failure: a bad name or list raises InvalidInput with one line naming the value and the
rule it broke.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import NamedTuple

from .errors import InvalidInput

DEFAULT_QUEUE = "default"
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_][\w.:-]{0,99}$")


def validate_queue_name(name: object) -> str:
    if not isinstance(name, str) or not _QUEUE_RE.match(name):
        shown = name if len(str(name)) <= 60 else f"{str(name)[:60]}..."
        raise InvalidInput(
            f"invalid queue name {shown!r}: use at most 100 letters, digits, '_', '.', ':' or "
            "'-', starting with a letter, digit or underscore"
        )
    return name


def parse_queue_list(text: str, option: str = "--queues") -> tuple[str, ...]:
    """"a, b,a" -> ("a", "b"): names validated, duplicates dropped, order kept."""
    names = [part.strip() for part in text.split(",")]
    if not any(names):
        raise InvalidInput(f"{option} is empty: give queue names separated by commas, like a,b")
    try:
        return tuple(dict.fromkeys(validate_queue_name(n) for n in names if n))
    except InvalidInput as exc:
        raise InvalidInput(f"{option}: {exc}") from None


def capped_free_slots(
    limits: Mapping[str, int], running: Mapping[str, int]
) -> tuple[list[str], list[int]]:
    """For each queue with a concurrency limit: how many more of its jobs may start now.

    Returned as parallel lists, the shape the claim query takes; queues without a limit
    are absent and share the worker's free slots.
    """
    queues = sorted(limits)
    return queues, [max(0, limits[q] - running.get(q, 0)) for q in queues]


def saturated(limits: Mapping[str, int], running: Mapping[str, int],
              served: Iterable[str] | None) -> bool:
    """True if some served queue is at its limit: a finished job of it frees a claim."""
    wanted = None if served is None else set(served)
    return any(running.get(q, 0) >= n for q, n in limits.items()
               if wanted is None or q in wanted)


# Bounds of a global limit: the counts fit a PostgreSQL integer, and a rate's window lies
# between a second and a week (the claim keeps its window as 64 buckets per period).
MAX_LIMIT = 2**31 - 1
MIN_RATE_PERIOD_SECONDS = 1.0
MAX_RATE_PERIOD_SECONDS = 7 * 86400.0
_RATE_HINT = "write JOBS/PERIOD, like 100/1m, 10/1s or 5000/1h (a period of 1s to 7d)"


class Rate(NamedTuple):
    """At most `jobs` started in any `period_seconds` (a sliding window)."""

    jobs: int
    period_seconds: float

    def __str__(self) -> str:
        from .timing import format_duration  # not at import: `pgsched ls` loads this module

        return f"{self.jobs}/{format_duration(timedelta(seconds=self.period_seconds))}"


def parse_rate(text: object) -> Rate:
    """"100/1m" -> Rate(100, 60.0); "10/s" means 10/1s."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise InvalidInput(f"invalid rate {_shown(text)}: {_RATE_HINT}")
    jobs_text, period_text = (part.strip() for part in text.split("/"))
    if not jobs_text.isdigit() or len(jobs_text) > 10:
        raise InvalidInput(f"invalid rate {_shown(text)}: the number of jobs must be a whole "
                           f"number from 1 to {MAX_LIMIT}; {_RATE_HINT}")
    if period_text.isalpha():  # "10/s", "100/m": one of the unit
        period_text = f"1{period_text}"
    try:
        from .timing import parse_duration

        period = parse_duration(period_text).total_seconds()
    except InvalidInput as exc:
        raise InvalidInput(f"invalid rate {_shown(text)}: {exc}") from None
    jobs = int(jobs_text)
    if not 1 <= jobs <= MAX_LIMIT:
        raise InvalidInput(f"invalid rate {_shown(text)}: the number of jobs must be from 1 "
                           f"to {MAX_LIMIT} (to stop a queue, pause it)")
    if not MIN_RATE_PERIOD_SECONDS <= period <= MAX_RATE_PERIOD_SECONDS:
        raise InvalidInput(f"invalid rate {_shown(text)}: the period must be from 1s to 7d")
    return Rate(jobs, period)


def check_global_concurrency(value: object) -> int:
    """A global_concurrency: a whole number from 1 (0 would stop the queue: pause it)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise InvalidInput(
            f"invalid global concurrency {_shown(value)}: use a whole number from 1 to "
            f"{MAX_LIMIT} (to stop a queue, pause it: pgsched pause --queue NAME)")
    return value


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:60]}..."


def describe_limits(limits: Mapping[str, object] | None) -> str:
    """A queue's global limits as one phrase: "at most 3 running, 100/1m", or "none"."""
    if not limits:
        return "none"
    parts = []
    if limits.get("global_concurrency") is not None:
        parts.append(f"at most {limits['global_concurrency']} running")
    if limits.get("rate_jobs") is not None:
        parts.append(str(Rate(int(limits["rate_jobs"]),  # type: ignore[call-overload]
                              float(limits["rate_period_seconds"]))))  # type: ignore[arg-type]
    return ", ".join(parts) or "none"
