"""Job and schedule arguments: validation and their JSON encoding, below every layer.

Owns: turning `args`/`kwargs` into the JSON text stored with a job or a schedule. The
Python API (scheduler.py), schedules (recurring.py) and through them the CLI and the
planner use it, so it imports nothing of theirs (it sat in scheduler.py, and recurring.py
had to import it lazily to dodge the cycle scheduler -> worker -> planner -> recurring).

Invariants: arguments are JSON (never pickle): NaN, Infinity and non-JSON types are
refused, so are payloads nested deeper than the store can decode, payloads over
MAX_PAYLOAD_BYTES and NUL characters (which jsonb cannot hold). Nothing is written here.

Failure: InvalidInput naming what was wrong and how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import InvalidInput
from .store import check_json_depth, encode_json

MAX_PAYLOAD_BYTES = 1 << 20
# A NUL escaped by the JSON encoder: \u0000 after an even number of backslashes (an odd
# number means the backslash itself was escaped and this is plain text).
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_result(result: Any) -> str:
    """A task's result as the JSON text a job stores (the worker's, and complete()'s):
    InvalidInput for what JSON or PostgreSQL's jsonb cannot hold (a NUL in a string)."""
    what = "the task's return value"
    try:
        text = encode_json(result, what)
    except InvalidInput:
        raise
    except Exception as exc:  # a custom container whose items() or the like raises
        raise InvalidInput(  # (a str() that raises too is left to the caller)
            f"{what} could not be encoded: {type(exc).__name__}: {exc}"
        ) from exc
    _refuse_nul(text, what, "contains")
    return text


def _refuse_nul(text: str, what: str, verb: str) -> None:
    """jsonb cannot hold a NUL: refused here in one line, not by the server (whose error
    would abort a whole bulk call with a psycopg exception)."""
    if "\\u0000" in text and _JSON_NUL.search(text):  # the C-level scan first
        raise InvalidInput(
            f"{what} {verb} a NUL character (\\u0000), which PostgreSQL cannot store in "
            "jsonb: remove it or encode the data (for example as base64)")


def encode_arguments(args: Sequence[Any], kwargs: dict[str, Any] | None) -> tuple[str, str]:
    """Validate a job's (or schedule's) arguments; returns them as JSON text."""
    if not isinstance(args, list | tuple):
        raise InvalidInput(f"args must be a list or tuple, not {type(args).__name__}")
    if not args and not kwargs and (kwargs is None or isinstance(kwargs, dict)):
        return "[]", "{}"  # most jobs
    kwargs = kwargs or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidInput("kwargs must be a dict with string keys")
    args_json = encode_json(list(args), "args")
    kwargs_json = encode_json(kwargs, "kwargs")
    check_json_depth(args_json, "args")
    check_json_depth(kwargs_json, "kwargs")
    _refuse_nul(args_json, "args", "contain")
    _refuse_nul(kwargs_json, "kwargs", "contain")
    if len(args_json) + len(kwargs_json) > MAX_PAYLOAD_BYTES:
        raise InvalidInput(
            f"job payload is {len(args_json) + len(kwargs_json)} bytes; the limit is "
            f"{MAX_PAYLOAD_BYTES} (1 MiB): store large data elsewhere and pass a reference"
        )
    return args_json, kwargs_json
