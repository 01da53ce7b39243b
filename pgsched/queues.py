"""Queue names and per-queue concurrency: the pure logic behind queues.

Owns: what a queue name may be (`validate_queue_name`), reading a `--queues a,b` list
(`parse_queue_list`), and how many more jobs a worker may claim from each queue that has
a concurrency limit (`capped_free_slots`). No database, no clock.

Invariants: a valid queue name never contains a comma or whitespace, so a list of names
round-trips through "a,b"; per-queue limits apply within one worker process (each
worker enforces its own copy of `[queues.NAME] concurrency`), never across workers.

Failure: a bad name or list raises InvalidInput with one line naming the value and the
rule it broke.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

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
