"""Tasks the benchmark's worker processes run (the generated config loads this file by path).

`noop` is the job of the drain scenarios: it measures pgsched's own cost per job.
`stamp` returns the wall-clock time its body started; the latency scenarios compare it
with the due time (or the enqueue time). Worker, benchmark and server share one machine,
so they share one clock.
"""

import time

from pgsched import task


@task
async def noop() -> None:
    return None


@task
async def stamp() -> float:
    return time.time()
