"""Schedules for the worker processes of test_recurring.py (loaded by path from the
generated config, so only those processes define them)."""

from pgsched import periodic


@periodic(every=1, id="tick", catch_up="all")
async def tick() -> str:
    return "tick"
