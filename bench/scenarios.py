"""The benchmark scenarios: each runs in its own schema and returns its metrics.

Every scenario prepares its data untimed, times only the part it names, and checks that
the work was really done (every job completed) before it reports a figure. Throughput
of a drain is taken from the jobs table (first started_at to last finished_at), so
process start-up and the final shutdown are not part of it. Latencies use the `stamp`
task's own clock reading, taken when the job body starts.

The raw ceiling is plain SQL on the same server, against a table identical to pgsched's
(a migrated schema), from the same Python driver: it is what PostgreSQL allows, and every
pgsched figure is printed as a fraction of it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg import sql

from pgsched import JobSpec, Scheduler

from .harness import BenchError, Harness

Metrics = dict[str, Any]
COLUMNS = ("id, task, queue, args, kwargs, priority, execution_time, misfire_grace_seconds, "
           "max_retries, timeout_seconds")


def _job_row(job_id: str, when: datetime) -> tuple:
    # The values schedule_bulk() writes for JobSpec("noop"): same widths, same indexes hit.
    return (job_id, "noop", "default", "[]", "{}", 5, when, 300.0, 0, None)


def q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(s=sql.Identifier(schema))


# -- raw ceiling ---------------------------------------------------------------------------

# A claim in one statement, like every Postgres queue: lock up to 100 due rows without
# waiting on anyone (SKIP LOCKED) and mark them running. The completion is a second
# statement, since a queue has to commit the claim before the job runs. The claim walks
# the pending index in its order, (queue, priority, execution_time, id) since migration
# 0005: without the queue, every claim would sort all pending rows (a ceiling of 4,300
# instead of ~27,000 jobs/s on the machine of docs/performance.md). `NOT suspect`: the
# index holds no suspects since 0020, and a claim that does not say so cannot use it.
RAW_CLAIM = """
WITH c AS (
    SELECT id FROM {s}.jobs
    WHERE status = 'pending' AND NOT suspect AND queue = 'default'
      AND execution_time <= now()
    ORDER BY priority, execution_time, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {s}.jobs AS j SET status = 'running', attempts = j.attempts + 1, worker_id = 'raw',
    started_at = now(), lease_until = now() + interval '60 seconds'
FROM c WHERE j.id = c.id
RETURNING j.id, j.task, j.args, j.kwargs, j.attempts
"""
RAW_COMPLETE = """
UPDATE {s}.jobs SET status = 'completed', finished_at = now(), lease_until = NULL
WHERE id = ANY(%(ids)s)
"""


async def raw_ceiling(h: Harness) -> Metrics:
    sizes = h.sizes
    schema = await h.fresh_schema("raw")
    now = datetime.now(UTC)
    metrics: Metrics = {}
    async with await h.connect() as conn:
        for prefix, n in (("c-", sizes.enqueue_bulk), ("c10k-", sizes.enqueue_bulk_small)):
            # The fastest plain COPY of the rows schedule_bulk() writes: ids as wide as a
            # UUID and ascending, as pgsched's version 7 ids are (random ids cost the
            # server index page writes: 20-40k against 81-112k rows/s), and COPY text
            # made with one f-string a row, 1,000 rows a write (psycopg's write_row dumps
            # each value: slower than pgsched's own COPY text, so no ceiling).
            width = 36 - len(prefix)
            when = now.isoformat()
            started, cpu = time.perf_counter(), time.process_time()
            async with conn.cursor().copy(q(f"COPY {{s}}.jobs ({COLUMNS}) FROM STDIN", schema)
                                          ) as copy:
                for block in range(0, n, 1000):
                    await copy.write("".join(
                        f"{prefix}{i:0{width}d}\tnoop\tdefault\t[]\t{{}}\t5\t{when}\t300\t0\t\\N\n"
                        for i in range(block, min(n, block + 1000))))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            if prefix == "c-":
                metrics["raw_copy_rows_per_s"] = n / elapsed
                metrics["raw_copy_client_cpu_us_per_row"] = cpu / n * 1e6
            else:
                metrics["raw_copy_10k_rows_per_s"] = n / elapsed

        insert = q(f"INSERT INTO {{s}}.jobs ({COLUMNS}) VALUES ({', '.join(['%s'] * 10)})",
                    schema)
        rows = [_job_row(f"i-{i}", now) for i in range(sizes.enqueue_loop)]
        started = time.perf_counter()
        for row in rows:
            await conn.execute(insert, row)
        metrics["raw_insert_loop_rows_per_s"] = len(rows) / (time.perf_counter() - started)
        # The same loop with the wake-up every enqueue sends (pgsched's insert_job): what
        # a NOTIFY a commit costs the server is part of any enqueue that wakes workers.
        notify = q(f"INSERT INTO {{s}}.jobs ({COLUMNS}) VALUES ({', '.join(['%s'] * 10)})"
                   " RETURNING pg_notify(%s, extract(epoch FROM execution_time)::text)", schema)
        rows = [[*_job_row(f"n-{i}", now), f"pgsched_{schema}"] for i in range(sizes.enqueue_loop)]
        started = time.perf_counter()
        for row in rows:
            await conn.execute(notify, row)
        metrics["raw_notify_loop_rows_per_s"] = len(rows) / (time.perf_counter() - started)

        await conn.execute(q("TRUNCATE {s}.jobs", schema))
        await conn.execute(q(
            f"INSERT INTO {{s}}.jobs ({COLUMNS}) SELECT 'r-' || g, 'noop', 'default', '[]',"
            " '{{}}', 5, now() - interval '1 second', 300, 0, NULL"
            " FROM generate_series(1, %(n)s) g", schema), {"n": sizes.raw_claim})
        await h.analyze(schema)
        claim, complete = q(RAW_CLAIM, schema), q(RAW_COMPLETE, schema)
        done = 0
        meter = h.cpu_meter()
        started, cpu = time.time(), time.process_time()
        while True:
            cur = await conn.execute(claim, {"limit": sizes.raw_batch})
            ids = [row[0] for row in await cur.fetchall()]
            if not ids:
                break
            await conn.execute(complete, {"ids": ids})
            done += len(ids)
        ended, cpu = time.time(), time.process_time() - cpu
        server = meter.server_used()
        if done != sizes.raw_claim:
            raise BenchError(f"raw claim loop completed {done}/{sizes.raw_claim} rows")
        metrics["raw_claim_jobs_per_s"] = done / (ended - started)
        metrics["raw_claim_client_cpu_us_per_job"] = cpu / done * 1e6
        if server is not None:
            metrics["raw_claim_server_cpu_us_per_job"] = server / done * 1e6
    await h.drop_schema(schema)
    return metrics


# -- enqueue -------------------------------------------------------------------------------


async def enqueue_loop(h: Harness) -> Metrics:
    schema = await h.fresh_schema("enqueue_loop")
    async with Scheduler(h.dsn, schema=schema) as sched:
        await sched.schedule("noop")  # the pool's first connection, like the raw loop's
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(h.sizes.enqueue_loop):
            await sched.schedule("noop")
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        interleaved = await _interleaved_loops(h, sched, schema)
    await h.drop_schema(schema)
    return {"enqueue_loop_jobs_per_s": h.sizes.enqueue_loop / elapsed,
            "enqueue_loop_client_cpu_us_per_job": cpu / h.sizes.enqueue_loop * 1e6,
            **interleaved}


async def _interleaved_loops(h: Harness, sched: Scheduler, schema: str) -> Metrics:
    """schedule() against the raw insert loops, in alternating batches of
    INTERLEAVED_BATCH calls on the same table: the raw ceiling runs minutes away from the
    enqueue-loop, long enough for another process's load to come or go (rounds of a shared
    2-core machine ranged from 69% to 585% of raw insert), whereas batches a tenth of a
    second apart see the same machine. Rates over all batches of each, and the client's
    CPU per call. The raw statements are made into text once, as pgsched's are."""
    batch, n = INTERLEAVED_BATCH, h.sizes.enqueue_loop // 2
    now = datetime.now(UTC)
    plain = q(f"INSERT INTO {{s}}.jobs ({COLUMNS}) VALUES ({', '.join(['%s'] * 10)})", schema)
    notify = q(f"INSERT INTO {{s}}.jobs ({COLUMNS}) VALUES ({', '.join(['%s'] * 10)})"
               " RETURNING pg_notify(%s, extract(epoch FROM execution_time)::text)", schema)
    spent = {name: [0.0, 0.0] for name in ("insert", "notify", "schedule")}
    async with await h.connect() as conn:
        plain_text, notify_text = plain.as_string(conn), notify.as_string(conn)
        channel = sched.store.channel
        for start in range(0, n, batch):
            count = min(batch, n - start)
            for name in spent:
                if name == "schedule":
                    calls: Any = None
                elif name == "insert":
                    calls = [_job_row(f"ii-{start + i}", now) for i in range(count)]
                else:
                    calls = [(*_job_row(f"in-{start + i}", now), channel) for i in range(count)]
                started, cpu = time.perf_counter(), time.process_time()
                if calls is None:
                    for _ in range(count):
                        await sched.schedule("noop")
                else:
                    query = plain_text if name == "insert" else notify_text
                    for row in calls:
                        await conn.execute(query, row)
                spent[name][0] += time.perf_counter() - started
                spent[name][1] += time.process_time() - cpu
    return {
        "enqueue_loop_interleaved_jobs_per_s": n / spent["schedule"][0],
        "enqueue_loop_interleaved_client_cpu_us_per_job": spent["schedule"][1] / n * 1e6,
        "raw_interleaved_insert_rows_per_s": n / spent["insert"][0],
        "raw_interleaved_notify_rows_per_s": n / spent["notify"][0],
        "raw_interleaved_notify_client_cpu_us_per_row": spent["notify"][1] / n * 1e6,
    }


# _interleaved_loops: calls in each batch of schedule() and of each raw loop.
INTERLEAVED_BATCH = 250


def _enqueue_bulk(size: str, name: str) -> Callable[[Harness], Awaitable[Metrics]]:
    """One schedule_bulk() of `getattr(h.sizes, size)` JobSpecs, built beforehand."""

    async def enqueue_bulk(h: Harness) -> Metrics:
        schema = await h.fresh_schema(name)
        specs = [JobSpec("noop") for _ in range(getattr(h.sizes, size))]
        async with Scheduler(h.dsn, schema=schema) as sched:
            await sched.schedule("noop")
            started, cpu = time.perf_counter(), time.process_time()
            ids = await sched.schedule_bulk(specs)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        if None in ids:
            raise BenchError("schedule_bulk skipped jobs")
        await h.drop_schema(schema)
        return {f"{name}_jobs_per_s": len(specs) / elapsed,
                f"{name}_client_cpu_us_per_job": cpu / len(specs) * 1e6}

    return enqueue_bulk


# -- drains --------------------------------------------------------------------------------


async def _add_due(h: Harness, schema: str, n: int, prefix: str) -> None:
    due = datetime.now(UTC) - timedelta(seconds=1)
    async with Scheduler(h.dsn, schema=schema) as sched:
        await sched.schedule_bulk(
            [JobSpec("noop", execution_time=due, job_id=f"{prefix}{i:07d}") for i in range(n)])


async def _drain(h: Harness, schema: str, name: str, *, processes: int = 1,
                 concurrency: int | None = None, log_level: str = "info",
                 prefix: str = "d-") -> Metrics:
    """Add the due jobs, start `processes` burst workers, and time them from the table."""
    n = h.sizes.drain
    await _add_due(h, schema, n, prefix)
    await h.analyze(schema)
    meter = h.cpu_meter()
    procs = [h.start_worker(schema, "--burst", concurrency=concurrency, log_level=log_level)
             for _ in range(processes)]
    for proc in procs:
        meter.add_worker(proc.ps)
    await asyncio.gather(*(p.wait(timeout=60 + n / 100, meter=meter) for p in procs))
    done, first, last = await h.one(q(
        "SELECT count(*) FILTER (WHERE status = 'completed'), min(started_at),"
        " max(finished_at) FROM {s}.jobs WHERE id LIKE %s", schema), [prefix + "%"])
    if done != n:
        raise BenchError(f"{schema}: {done}/{n} jobs completed")
    server = meter.server_used()  # includes the workers' start-up and shutdown statements
    metrics = {
        f"{name}_jobs_per_s": n / (last - first).total_seconds(),
        f"{name}_worker_peak_rss_mb": max(p.peak_rss for p in procs) / 2**20,
        f"{name}_worker_cpu_us_per_job":
            meter.worker_between(first.timestamp(), last.timestamp()) / n * 1e6,
    }
    if server is not None:
        metrics[f"{name}_server_cpu_us_per_job"] = server / n * 1e6
    return metrics


def _drain_scenario(name: str, processes: int, *, default_concurrency: bool = False,
                    log_level: str = "info") -> Callable[[Harness], Awaitable[Metrics]]:
    async def drain(h: Harness) -> Metrics:
        schema = await h.fresh_schema(name.replace("-", "_"))
        concurrency = None if default_concurrency else h.sizes.drain_concurrency
        metrics = await _drain(h, schema, name.replace("-", "_"), processes=processes,
                               concurrency=concurrency, log_level=log_level)
        await h.drop_schema(schema)
        return metrics

    return drain


async def build_backlog(h: Harness, name: str) -> str:
    """A schema with a million finished jobs (created, run and finished over the 14 hours
    two days ago) and 200,000 due next week, as a long-lived installation has."""
    sizes = h.sizes
    schema = await h.fresh_schema(name)
    async with await h.connect() as conn:
        await conn.execute(q(
            "INSERT INTO {s}.jobs (id, task, status, execution_time, attempts, worker_id,"
            " result, created_at, started_at, finished_at)"
            " SELECT 'done-' || g, 'noop', 'completed', now() - interval '1 day', 1, 'old',"
            " 'null', now() - interval '2 days' + g * interval '50 ms',"
            " now() - interval '2 days' + g * interval '50 ms' + interval '1 second',"
            " now() - interval '2 days' + g * interval '50 ms' + interval '2 seconds'"
            " FROM generate_series(1, %(n)s) g", schema), {"n": sizes.backlog_finished})
        await conn.execute(q(
            f"INSERT INTO {{s}}.jobs ({COLUMNS}, created_at) SELECT 'future-' || g, 'noop',"
            " 'default', '[]', '{{}}', 5,"
            " now() + interval '7 days' + (g %% 86400) * interval '1 second', 300, 0, NULL,"
            " now() - interval '1 day' + g * interval '100 ms'"
            " FROM generate_series(1, %(n)s) g", schema), {"n": sizes.backlog_future})
    return schema


class Backlog:
    """drain-1 with a million finished jobs and 200,000 due next week in the same table.

    The big table is built once (the first round) and kept until cleanup(); each round
    drains a fresh set of due jobs beside it."""

    def __init__(self) -> None:
        self.schema: str | None = None
        self.rounds = 0

    async def __call__(self, h: Harness) -> Metrics:
        if self.schema is None:
            self.schema = await self._build(h)
        self.rounds += 1
        return await _drain(h, self.schema, "backlog", concurrency=h.sizes.drain_concurrency,
                            prefix=f"d{self.rounds}-")

    async def _build(self, h: Harness) -> str:
        return await build_backlog(h, "backlog")

    async def cleanup(self, h: Harness) -> None:
        if self.schema is not None:
            await h.drop_schema(self.schema)


# -- latency -------------------------------------------------------------------------------


async def _idle_worker(h: Harness, schema: str, sched: Scheduler, dsn: str | None = None,
                       raw: bool = False):
    """A worker (with `raw`, the latency floor's plain loop instead) that has claimed once
    (a warm-up job ran) and listens for notifications."""
    worker = h.start_raw_latency(schema) if raw else h.start_worker(schema, dsn=dsn)
    await h.wait_listening(schema)
    await sched.schedule("noop", job_id="warm-up")
    await h.wait_finished(schema, "warm-up", 1)
    return worker


def percentiles(values_ms: list[float], name: str) -> Metrics:
    ordered = sorted(values_ms)
    return {
        f"{name}_p50_ms": statistics.median(ordered),
        f"{name}_p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        f"{name}_max_ms": ordered[-1],
    }


async def _stamps(h: Harness, schema: str, prefix: str) -> dict[str, tuple[datetime, float]]:
    async with await h.connect() as conn:
        cur = await conn.execute(q(
            "SELECT id, execution_time, result FROM {s}.jobs WHERE id LIKE %s", schema),
            [prefix + "%"])
        return {row[0]: (row[1], float(row[2])) for row in await cur.fetchall()}


def _due_stamps(n: int, lead: float = 1.0) -> list[JobSpec]:
    # 25 ms apart plus jitter, starting after `lead` seconds: all are known to the worker
    # before the first falls due, so it must sleep on a timer, not on a notification.
    base = datetime.now(UTC) + timedelta(seconds=lead)
    return [JobSpec("stamp", job_id=f"due-{i:05d}", execution_time=base + timedelta(
        seconds=i * 0.025 + random.uniform(0, 0.01))) for i in range(n)]


async def due_latency(h: Harness, raw: bool = False) -> Metrics:
    """Jobs due at distinct future instants: how late does each one start?"""
    n = h.sizes.due_latency
    name = "raw_due_latency" if raw else "due_latency"
    schema = await h.fresh_schema(name)
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched, raw=raw)
        await sched.schedule_bulk(_due_stamps(n))
        await h.wait_finished(schema, "due-", n, timeout=30 + n * 0.1)
        await worker.stop()
    stamps = await _stamps(h, schema, "due-")
    await h.drop_schema(schema)
    return percentiles([(started - due.timestamp()) * 1000 for due, started in stamps.values()],
                       name)


async def due_latency_load(h: Harness) -> Metrics:
    """due-latency while the same worker (default configuration) drains a steady stream of
    no-op jobs enqueued for now at half its peak: the drain-1-default rate of this run's
    first round (measured here first when --only left that scenario out)."""
    schema = await h.fresh_schema("due_load")
    peak = await _drain_peak(h, schema)
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched)
        metrics = await _due_under_stream(h, schema, sched, peak / 2, "due_latency_load")
        await worker.stop()
    await h.drop_schema(schema)
    return metrics


async def due_latency_fed(h: Harness) -> Metrics:
    """due-latency-load at half the rate the worker reaches while it is fed, not while it
    drains a prepared backlog: drain-1-default's rate is reached without a feeder on the
    machine (its schedule_bulk() calls, their COPY on the server) and on a table analysed
    beforehand. First the feeder offers that rate for FED_PEAK_SECONDS to the worker, which
    takes what it can: its completions per second over the last FED_PEAK_WINDOW seconds
    of that are its fed peak; once it has caught up, the timed jobs run while the stream
    comes at half the fed peak (the same worker, in the same schema)."""
    schema = await h.fresh_schema("due_fed")
    offered = await _drain_peak(h, schema)
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched)
        fed, elapsed = await _feed(sched, offered, FED_PEAK_SECONDS, prefix="peak-")
        ended = datetime.now(UTC)  # worker, benchmark and server share one clock
        (done,) = await h.one(q("SELECT count(*) FROM {s}.jobs WHERE id LIKE 'peak-%%'"
                                " AND finished_at BETWEEN %s AND %s", schema),
                              [ended - timedelta(seconds=FED_PEAK_WINDOW), ended])
        peak = done / FED_PEAK_WINDOW
        await h.wait_finished(schema, "peak-", fed, timeout=30 + fed / 100)
        metrics = await _due_under_stream(h, schema, sched, peak / 2, "due_latency_fed")
        await worker.stop()
    await h.drop_schema(schema)
    metrics["due_latency_fed_peak_jobs_per_s"] = peak
    metrics["due_latency_fed_offered_jobs_per_s"] = fed / elapsed
    return metrics


# The fed peak of due_latency_fed: how long the feeder offers drain-1-default's rate, and
# the last part of that in which the worker's completions are counted (the first second
# is its start from idle).
FED_PEAK_SECONDS = 3.0
FED_PEAK_WINDOW = 2.0


async def _drain_peak(h: Harness, schema: str) -> float:
    """drain-1-default's rate in this run's first round; measured in `schema` first when
    --only left that scenario out."""
    peak = h.measured.get("drain_1_default_jobs_per_s")
    if peak is None:
        peak = (await _drain(h, schema, "peak", prefix="drained-"))["peak_jobs_per_s"]
    return peak


async def _due_under_stream(h: Harness, schema: str, sched: Scheduler, rate: float,
                            name: str) -> Metrics:
    """The timed jobs of due-latency, due while a stream of `rate` no-op jobs a second
    comes for the listening worker; their latencies and the stream's rate."""
    n = h.sizes.due_latency
    stamps = _due_stamps(n, lead=1.5)  # the stream is steady before the first falls due
    await sched.schedule_bulk(stamps)
    seconds = (stamps[-1].execution_time - datetime.now(UTC)).total_seconds() + 0.2
    fed, elapsed = await _feed(sched, rate, seconds)
    await h.wait_finished(schema, "due-", n, timeout=30 + n * 0.1)
    await h.wait_finished(schema, "load-", fed, timeout=30 + fed / 100)
    timed = await _stamps(h, schema, "due-")
    metrics = percentiles([(started - due.timestamp()) * 1000 for due, started in timed.values()],
                          name)
    metrics[f"{name}_stream_jobs_per_s"] = fed / elapsed
    return metrics


async def _feed(sched: Scheduler, rate: float, seconds: float, prefix: str = "load-",
                until: Callable[[], bool] | None = None) -> tuple[int, float]:
    """Enqueue no-op jobs for now at `rate` a second for `seconds` (or until `until()` is
    true), in one schedule_bulk() every 10 ms (a stream, not a burst); returns how many
    and over how long."""
    started, sent = time.monotonic(), 0
    while (elapsed := time.monotonic() - started) < seconds and not (until and until()):
        behind = int(rate * elapsed) - sent
        if behind > 0:
            await sched.schedule_bulk([JobSpec("noop", job_id=f"{prefix}{sent + i:07d}")
                                       for i in range(behind)])
            sent += behind
        await asyncio.sleep(0.01)
    return sent, time.monotonic() - started


async def enqueue_latency(h: Harness, raw: bool = False) -> Metrics:
    """Jobs added one at a time for now: from schedule() returning to the job starting."""
    n = h.sizes.enqueue_latency
    name = "raw_enqueue_latency" if raw else "enqueue_latency"
    schema = await h.fresh_schema(name)
    committed: dict[str, float] = {}
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched, raw=raw)
        for i in range(n):
            job_id = await sched.schedule("stamp", job_id=f"enq-{i:05d}")
            committed[job_id] = time.time()
            # Enough for the job to have run, so the worker is idle again; jittered so
            # the enqueues never fall into step with the worker's own timers.
            await asyncio.sleep(random.uniform(0.03, 0.07))
        await h.wait_finished(schema, "enq-", n)
        await worker.stop()
    stamps = await _stamps(h, schema, "enq-")
    await h.drop_schema(schema)
    return percentiles([(started - committed[job_id]) * 1000
                         for job_id, (_, started) in stamps.items()], name)


async def raw_latency(h: Harness) -> Metrics:
    """The latency floor: due-latency and enqueue-latency with a plain psycopg loop in
    place of the worker (bench/raw_latency.py), on the same server in the same run."""
    return {**await due_latency(h, raw=True), **await enqueue_latency(h, raw=True)}


# -- recurring at scale --------------------------------------------------------------------


async def recurring_at_scale(h: Harness) -> Metrics:
    """Many interval schedules firing together across several worker processes.

    The workers start first and listen; then one statement adds every schedule (as the
    CLI would: origin 'cli', catch-up 'latest'), all due at the same instant a few
    seconds on and every `recurring_every` after, and wakes the planners. The run ends
    when every job of `recurring_windows` windows has completed. Reported: window to
    start (the time the task itself read when it ran minus its fire time: not
    started_at, which is the claim's time, and a claimed job may wait in its worker for
    a slot) and every (schedule, window) pair without exactly one job: lost (none) or
    doubled (more).
    """
    sizes = h.sizes
    n, every, windows = sizes.recurring_schedules, sizes.recurring_every, sizes.recurring_windows
    schema = await h.fresh_schema("recurring")
    procs = [h.start_worker(schema) for _ in range(sizes.recurring_workers)]
    await h.wait_listening(schema, count=len(procs))
    async with await h.connect() as conn:
        (first,) = await (await conn.execute(
            "SELECT date_trunc('second', now()) + interval '3 seconds'")).fetchone()
        async with conn.transaction():
            await conn.execute(q(
                "INSERT INTO {s}.schedules (id, task, every, anchor, next_fire_at, origin)"
                " SELECT 'rec-' || lpad(g::text, 6, '0'), 'stamp', %(every)s, %(first)s,"
                " %(first)s, 'cli' FROM generate_series(1, %(n)s) g", schema),
                {"every": timedelta(seconds=every), "first": first, "n": n})
            await conn.execute("SELECT pg_notify(%s, 'schedules')", [f"pgsched_{schema}"])
    total = n * windows
    await h.wait_finished(schema, "rec-", total,
                          timeout=10 + (windows - 1) * every + 60 + total / 100)
    for proc in procs:
        await proc.stop()
    expected = [first + timedelta(seconds=k * every) for k in range(windows)]
    async with await h.connect() as conn:
        cur = await conn.execute(q(
            "SELECT fire_time, (result::float8 - extract(epoch FROM fire_time)) * 1000"
            " FROM {s}.jobs"
            " WHERE schedule_id IS NOT NULL AND fire_time <= %s", schema), [expected[-1]])
        rows = await cur.fetchall()
        (pairs,) = await (await conn.execute(q(
            "SELECT count(DISTINCT (schedule_id, fire_time)) FROM {s}.jobs"
            " WHERE fire_time = ANY(%s)", schema), [expected])).fetchone()
    await h.drop_schema(schema)
    metrics = percentiles([float(ms) for fire, ms in rows if fire in expected],
                          "recurring_window_to_start")
    metrics["recurring_windows_expected"] = total
    metrics["recurring_windows_lost"] = total - pairs
    metrics["recurring_windows_doubled"] = len(rows) - pairs  # incl. any at a wrong instant
    return metrics


# -- idle cost -----------------------------------------------------------------------------

_STATEMENT_RE = re.compile(r"LOG:  (?:statement|execute [^:]*): (.*)")


async def idle_cost(h: Harness) -> Metrics:
    """An idle worker with default settings: its CPU time and the statements it sends.

    Statements are counted in the server log: the worker's sessions (and only they) run
    with log_statement=all, set through the connection's startup options. With --dsn the
    log is not ours to read, so the count falls back to the database's committed and
    rolled-back transactions (every worker statement is its own transaction), which also
    counts anything else running on that database during the window.
    """
    seconds = h.sizes.idle_seconds
    schema = await h.fresh_schema("idle")
    logging_dsn = h.statement_logging_dsn()
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched, dsn=logging_dsn)
        await asyncio.sleep(1)  # the warm-up job's completion and wake-ups settle
        cpu = worker.ps.cpu_times()
        log_offset = h.server_log.stat().st_size if logging_dsn else 0
        xacts = None if logging_dsn else await _transactions(h)
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        cpu_after = worker.ps.cpu_times()
        if logging_dsn:
            with h.server_log.open("rb") as f:
                f.seek(log_offset)
                kinds = Counter(m.group(1).strip()[:70] for m in _STATEMENT_RE.finditer(
                    f.read().decode("utf-8", "replace")))
            statements, method = sum(kinds.values()), "server log (log_statement=all)"
        else:
            # minus the one transaction of the first reading itself
            statements = await _transactions(h) - xacts - 1
            kinds, method = Counter(), "pg_stat_database xact_commit+xact_rollback"
        await worker.stop()
    await h.drop_schema(schema)
    used = (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system)
    return {
        "idle_cpu_percent": used / elapsed * 100,
        "idle_statements_per_min": statements / elapsed * 60,
        "idle_seconds": elapsed,
        "idle_statement_method": method,
        "idle_statement_kinds": dict(kinds.most_common()),
    }


async def _transactions(h: Harness) -> int:
    (n,) = await h.one("SELECT xact_commit + xact_rollback FROM pg_stat_database"
                       " WHERE datname = current_database()")
    return n


# -- CLI start-up ----------------------------------------------------------------------------

CLI_COMMANDS = {"version": ["--version"], "help": ["--help"], "ls": ["ls"],
                "add": ["add", "noop"]}


def _pgsched() -> list[str]:
    """The console script next to this Python (what users run), else `python -m pgsched`."""
    script = Path(sys.executable).parent / "pgsched"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgsched"]


def _time_command(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user + system) milliseconds of each run. CPU time barely moves with
    the machine's load, so it tells a slow start from a busy machine.

    Runs with bytecode caching on, as an installed pgsched has it: with
    PYTHONDONTWRITEBYTECODE set (some environments set it) every run would compile
    pgsched's modules again, about 40 ms that no user pays."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(argv, capture_output=True, check=True, env=env)  # warm caches, .pyc
    wall, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        wall.append((time.perf_counter() - start) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-500:]}")
    return wall, cpu


async def cli_startup(h: Harness) -> Metrics:
    """Wall time of whole `pgsched` processes on a small database (50 jobs): what a script
    calling the CLI in a loop pays per call, Python's own start-up included."""
    schema = await h.fresh_schema("cli_startup")
    async with Scheduler(h.dsn, schema=schema) as sched:
        await sched.schedule_bulk([JobSpec("noop") for _ in range(50)])
    config = h.write_config(schema)
    metrics: Metrics = {}
    for name, args in CLI_COMMANDS.items():
        argv = [*_pgsched(), "--config", str(config), *args]
        wall, cpu = await asyncio.to_thread(_time_command, argv, h.sizes.cli_runs)
        metrics.update(percentiles(wall, f"cli_{name}"))
        metrics[f"cli_{name}_cpu_p50_ms"] = statistics.median(cpu)
    async with await h.connect() as conn:
        cur = await conn.execute(q("SELECT count(*) FROM {s}.jobs", schema))
        added = (await cur.fetchone())[0] - 50
    await h.drop_schema(schema)
    if added != h.sizes.cli_runs + 1:
        raise BenchError(f"cli-startup: `add` made {added} jobs, not {h.sizes.cli_runs + 1}")
    return metrics


# -- the web service -------------------------------------------------------------------------


async def web_service(h: Harness) -> Metrics:
    """`pgsched web` beside the backlog: API latency, completion-to-event latency, and 200
    event-stream clients on one process (bench/web.py)."""
    from . import web  # needs the web extra (FastAPI, uvicorn, httpx): only when chosen

    schema = await build_backlog(h, "web")
    await h.analyze(schema)
    quick = h.sizes.drain < 1000
    try:
        return await web.measure(h, schema, requests=20 if quick else 200,
                                 sse_jobs=10 if quick else 100, clients=20 if quick else 200,
                                 load_seconds=2 if quick else 20)
    finally:
        await h.drop_schema(schema)


def _opt_in(module: str, name: str) -> Callable[[Harness], Awaitable[Metrics]]:
    """An opt-in scenario of another bench module (scale.py, ops_at_size.py,
    claim_queues.py), imported when it runs: it imports this module."""

    async def run(h: Harness) -> Metrics:
        return await getattr(importlib.import_module(f".{module}", __package__), name)(h)

    return run


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Harness], Awaitable[Metrics]]
    repeated: bool  # throughput: run in every round, alternating with the raw ceiling
    default: bool = True  # False: only when named with --only (or in a --quick run)


def scenarios() -> list[Scenario]:
    """pgsched's scenarios in the order they run: throughput (every round), then the rest."""
    return [
        Scenario("raw", raw_ceiling, True),
        Scenario("enqueue-loop", enqueue_loop, True),
        Scenario("enqueue-bulk", _enqueue_bulk("enqueue_bulk", "enqueue_bulk"), True),
        Scenario("enqueue-bulk-10k", _enqueue_bulk("enqueue_bulk_small", "enqueue_bulk_10k"),
                 True),
        Scenario("drain-1", _drain_scenario("drain-1", 1), True),
        Scenario("drain-2", _drain_scenario("drain-2", 2, default_concurrency=True), True),
        Scenario("drain-1-default", _drain_scenario("drain-1-default", 1,
                                                    default_concurrency=True), True),
        Scenario("drain-1-quiet", _drain_scenario("drain-1-quiet", 1, log_level="warning"),
                 True),
        Scenario("backlog", Backlog(), True),
        Scenario("due-latency", due_latency, False),
        Scenario("due-latency-load", due_latency_load, False),
        Scenario("due-latency-fed", due_latency_fed, False),
        Scenario("enqueue-latency", enqueue_latency, False),
        Scenario("raw-latency", raw_latency, False),
        Scenario("recurring", recurring_at_scale, False),
        Scenario("idle", idle_cost, False),
        Scenario("cli-startup", cli_startup, False),
        Scenario("web", web_service, False, default=False),
        *(Scenario(name, _opt_in("scale", name), False, default=False)
          for name in ("scale", "churn", "retention")),
        Scenario("ops", _opt_in("ops_at_size", "ops"), False, default=False),
        Scenario("queues", _opt_in("claim_queues", "claim_queues"), False, default=False),
    ]


NAMES = [s.name for s in scenarios()]
