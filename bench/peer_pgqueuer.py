"""PgQueuer's side of the benchmark: run by the peer's own virtual environment, never by pgsched's.

`python peer_pgqueuer.py COMMAND DSN [N]`, with PGQUEUER_SCHEMA naming the schema (the
benchmark sets it to a bench_* schema and drops it afterwards). Commands:

- install: create PgQueuer's tables in that schema (Queries.install());
- enqueue N: one Queries.enqueue() of N no-op jobs (the lists built beforehand), timed;
- drain: a PgQueuer worker in drain mode (it exits when the queue is empty), at its
  defaults; the benchmark times it from PgQueuer's own log table (first pick to last
  success), as it times pgsched from started_at and finished_at;
- due N: an idle PgQueuer worker (warmed up by one job) and N jobs due at distinct
  instants 25 ms apart; each job's start delay (body start minus execute_after).

PgQueuer is driven only through its public API with its defaults (asyncpg connection,
batch size, unlimited concurrency). The last line of stdout is a JSON object; anything
that goes wrong is a traceback and a non-zero exit, which the benchmark reports.
This file imports nothing from pgsched or the benchmark: it runs with the peer's python.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from datetime import timedelta

import asyncpg
from pgqueuer import AsyncpgDriver, Job, PgQueuer, Queries
from pgqueuer.types import QueueExecutionMode

SPACING_S = 0.025  # as pgsched's due-latency scenario


async def install(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    await Queries(AsyncpgDriver(conn)).install()
    await conn.close()
    return {}


async def enqueue(dsn: str, n: int) -> dict:
    conn = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(conn))
    names, payloads, priorities = ["noop"] * n, [None] * n, [0] * n
    started = time.perf_counter()
    await queries.enqueue(names, payloads, priorities)
    elapsed = time.perf_counter() - started
    await conn.close()
    return {"jobs": n, "seconds": elapsed}


async def drain(dsn: str) -> dict:
    conn = await asyncpg.connect(dsn)
    pgq = PgQueuer.from_asyncpg_connection(conn)
    ran = 0

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        nonlocal ran
        ran += 1

    await pgq.run(mode=QueueExecutionMode.drain)
    await conn.close()
    return {"ran": ran}


async def due(dsn: str, n: int) -> dict:
    conn = await asyncpg.connect(dsn)
    pgq = PgQueuer.from_asyncpg_connection(conn)
    delays: list[float] = []
    warm = asyncio.Event()
    done = asyncio.Event()

    @pgq.entrypoint("warm_up")
    async def warm_up(job: Job) -> None:
        warm.set()

    @pgq.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        delays.append((time.time() - job.execute_after.timestamp()) * 1000)
        if len(delays) == n:
            done.set()

    worker = asyncio.create_task(pgq.run())
    enqueuer = await asyncpg.connect(dsn)
    queries = Queries(AsyncpgDriver(enqueuer))
    await queries.enqueue("warm_up", None)
    await asyncio.wait_for(warm.wait(), 30)
    # Starting after a second, so every job is known before the first falls due.
    after = [timedelta(seconds=1 + i * SPACING_S + random.uniform(0, 0.01)) for i in range(n)]
    await queries.enqueue(["stamp"] * n, [None] * n, [0] * n, after)
    await asyncio.wait_for(done.wait(), 30 + n * 0.1)
    pgq.shutdown.set()
    await worker
    await enqueuer.close()
    await conn.close()
    return {"delays_ms": delays}


def main(argv: list[str]) -> None:
    command, dsn, *rest = argv
    runs = {
        "install": lambda: install(dsn),
        "enqueue": lambda: enqueue(dsn, int(rest[0])),
        "drain": lambda: drain(dsn),
        "due": lambda: due(dsn, int(rest[0])),
    }
    print(json.dumps(asyncio.run(runs[command]())))


if __name__ == "__main__":
    main(sys.argv[1:])
