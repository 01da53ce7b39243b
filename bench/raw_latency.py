"""The latency floor: how soon a plain psycopg loop on the same server starts a job.

Run by the raw-latency scenario (scenarios.raw_latency) as its own process, in place of a
pgsched worker and fed the same jobs as due-latency and enqueue-latency: it LISTENs on the
schema's channel, claims due rows with the raw ceiling's claim (10 at a time), takes the
job's start time right after the claim returns and writes it as the job's result, as the
`stamp` task does. It does nothing else: no leases renewed, no tasks run, no logs. It
waits for a job due later on the loop's timer until 2 ms before the due time and then
spins on the wall clock (one core busy for at most 2 ms a job), which is the earliest a
process can be awake. Its latencies are what PostgreSQL and Python allow on this machine:
the round trip of the claim, and for an enqueue the delivery of the NOTIFY.

    python bench/raw_latency.py DSN SCHEMA

Stops on SIGTERM (exit 0). Prints nothing; a failure is a traceback and a non-zero exit,
which the scenario reports.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import psycopg
from psycopg import sql

from pgsched.store import channel_name

SPIN_SECONDS = 0.002

CLAIM = """
WITH c AS (
    SELECT id FROM {s}.jobs
    WHERE status = 'pending' AND NOT suspect AND queue = 'default'
      AND execution_time <= now()
    ORDER BY priority, execution_time, id
    LIMIT 10
    FOR UPDATE SKIP LOCKED
), u AS (
    UPDATE {s}.jobs AS j SET status = 'running', attempts = j.attempts + 1,
        worker_id = 'raw-latency', started_at = now(),
        lease_until = now() + interval '60 seconds'
    FROM c WHERE j.id = c.id
    RETURNING j.id
)
SELECT (SELECT array_agg(id) FROM u),
       (SELECT extract(epoch FROM min(execution_time))::float8 FROM {s}.jobs
        WHERE status = 'pending' AND NOT suspect AND queue = 'default'
          AND execution_time > now())
"""
COMPLETE = """
UPDATE {s}.jobs AS j SET status = 'completed', finished_at = now(), lease_until = NULL,
    result = to_jsonb(t.stamp)
FROM unnest(%s::text[], %s::float8[]) AS t(id, stamp)
WHERE j.id = t.id
"""


async def run(dsn: str, schema: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    s = sql.Identifier(schema)
    claim, complete = (sql.SQL(text).format(s=s) for text in (CLAIM, COMPLETE))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listen, \
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as work:
        await listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(schema))))
        notified = asyncio.Event()

        async def hear() -> None:
            async for _ in listen.notifies():
                notified.set()

        hearing = asyncio.create_task(hear())
        next_due: float | None = None
        while not stop.is_set():
            notified.clear()
            ids, next_due = await (await work.execute(claim)).fetchone()
            if ids:
                started = time.time()
                await work.execute(complete, [ids, [started] * len(ids)])
                continue  # more may be due
            wait = None if next_due is None else next_due - time.time() - SPIN_SECONDS
            waits = [asyncio.ensure_future(notified.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if next_due is not None and not notified.is_set() and not stop.is_set():
                while time.time() < next_due:
                    pass  # the last 2 ms on the clock itself: no timer is that exact
        hearing.cancel()


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1], sys.argv[2]))
