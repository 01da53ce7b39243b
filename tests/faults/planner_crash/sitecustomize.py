"""A planner that dies mid-pass: Python imports this at start-up when this folder is on
PYTHONPATH (only the test's own worker processes get it), and it wraps Planner._plan so
that, with probability PGSCHED_TEST_PLANNER_CRASH_RATE, the process exits (code
EXIT_CODE) right after a schedule's windows were computed, inside the planner's
transaction and before they are written. It first prints one JSON line,
`planner_crash_injected`, naming the windows that were in flight.
"""

import json as _json
import os as _os
import random as _random
import sys as _sys

EXIT_CODE = 86
_rate = float(_os.environ.get("PGSCHED_TEST_PLANNER_CRASH_RATE") or 0)

if _rate:
    from pgsched.recurring import format_instant as _format_instant
    from pgsched.worker import planner as _planner

    _plan = _planner.Planner._plan

    def _plan_then_maybe_crash(self, row):
        advance = _plan(self, row)
        if _random.random() < _rate:
            _sys.stdout.write(_json.dumps({
                "event": "planner_crash_injected", "schedule_id": row["id"],
                "windows": [_format_instant(fire) for _, fire in advance.windows]}) + "\n")
            _sys.stdout.flush()
            _os._exit(EXIT_CODE)
        return advance

    _planner.Planner._plan = _plan_then_maybe_crash
