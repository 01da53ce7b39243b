"""The loop watch: reports an event loop blocked by a task.

Owns: nothing but a sleep. It wakes every heartbeat interval and logs
`event_loop_blocked` when it wakes more than an interval late (a task doing CPU work in
`async def`).

Invariants: it is its own task, doing nothing but sleep, so that any lateness is the
loop's: the heartbeat's lateness would also include its database round trips, and a
freeze during one of them would go unseen.

Failure: none of its own; it returns once the worker is closing.
"""

from __future__ import annotations

import asyncio

from ..logs import get_logger
from .context import WorkerContext

log = get_logger("pgsched.worker")


class LoopWatch:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    async def run(self) -> None:
        interval = self.ctx.options.heartbeat_seconds
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + interval
            if await self.ctx.sleep_or_close(interval):
                return
            blocked = loop.time() - planned
            if blocked > interval:
                log.warning("event_loop_blocked", seconds=round(blocked, 2),
                            hint="a task runs CPU work in `async def`; make it a plain def "
                                 "so it runs in a thread")
