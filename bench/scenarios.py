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
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


def _q(text: str, schema: str) -> sql.Composed:
    return sql.SQL(text).format(s=sql.Identifier(schema))


# -- raw ceiling ---------------------------------------------------------------------------

# A claim in one statement, like every Postgres queue: lock up to 100 due rows without
# waiting on anyone (SKIP LOCKED) and mark them running. The completion is a second
# statement, since a queue has to commit the claim before the job runs.
RAW_CLAIM = """
WITH c AS (
    SELECT id FROM {s}.jobs
    WHERE status = 'pending' AND execution_time <= now()
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
        rows = [_job_row(f"c-{i}", now) for i in range(sizes.enqueue_bulk)]
        started, cpu = time.perf_counter(), time.process_time()
        async with conn.cursor().copy(_q(f"COPY {{s}}.jobs ({COLUMNS}) FROM STDIN", schema)
                                      ) as copy:
            for row in rows:
                await copy.write_row(row)
        metrics["raw_copy_rows_per_s"] = len(rows) / (time.perf_counter() - started)
        metrics["raw_copy_client_cpu_us_per_row"] = (time.process_time() - cpu) / len(rows) * 1e6

        insert = _q(f"INSERT INTO {{s}}.jobs ({COLUMNS}) VALUES ({', '.join(['%s'] * 10)})",
                    schema)
        rows = [_job_row(f"i-{i}", now) for i in range(sizes.enqueue_loop)]
        started = time.perf_counter()
        for row in rows:
            await conn.execute(insert, row)
        metrics["raw_insert_loop_rows_per_s"] = len(rows) / (time.perf_counter() - started)

        await conn.execute(_q("TRUNCATE {s}.jobs", schema))
        await conn.execute(_q(
            f"INSERT INTO {{s}}.jobs ({COLUMNS}) SELECT 'r-' || g, 'noop', 'default', '[]',"
            " '{{}}', 5, now() - interval '1 second', 300, 0, NULL"
            " FROM generate_series(1, %(n)s) g", schema), {"n": sizes.raw_claim})
        await h.analyze(schema)
        claim, complete = _q(RAW_CLAIM, schema), _q(RAW_COMPLETE, schema)
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
        started = time.perf_counter()
        for _ in range(h.sizes.enqueue_loop):
            await sched.schedule("noop")
        elapsed = time.perf_counter() - started
    await h.drop_schema(schema)
    return {"enqueue_loop_jobs_per_s": h.sizes.enqueue_loop / elapsed}


async def enqueue_bulk(h: Harness) -> Metrics:
    schema = await h.fresh_schema("enqueue_bulk")
    specs = [JobSpec("noop") for _ in range(h.sizes.enqueue_bulk)]
    async with Scheduler(h.dsn, schema=schema) as sched:
        await sched.schedule("noop")
        started, cpu = time.perf_counter(), time.process_time()
        ids = await sched.schedule_bulk(specs)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if None in ids:
        raise BenchError("schedule_bulk skipped jobs")
    await h.drop_schema(schema)
    return {"enqueue_bulk_jobs_per_s": len(specs) / elapsed,
            "enqueue_bulk_client_cpu_us_per_job": cpu / len(specs) * 1e6}


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
    done, first, last = await h.one(_q(
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
        await conn.execute(_q(
            "INSERT INTO {s}.jobs (id, task, status, execution_time, attempts, worker_id,"
            " result, created_at, started_at, finished_at)"
            " SELECT 'done-' || g, 'noop', 'completed', now() - interval '1 day', 1, 'old',"
            " 'null', now() - interval '2 days' + g * interval '50 ms',"
            " now() - interval '2 days' + g * interval '50 ms' + interval '1 second',"
            " now() - interval '2 days' + g * interval '50 ms' + interval '2 seconds'"
            " FROM generate_series(1, %(n)s) g", schema), {"n": sizes.backlog_finished})
        await conn.execute(_q(
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


async def _idle_worker(h: Harness, schema: str, sched: Scheduler, dsn: str | None = None):
    """A worker that has claimed once (a warm-up job ran) and listens for notifications."""
    worker = h.start_worker(schema, dsn=dsn)
    await h.wait_listening(schema)
    await sched.schedule("noop", job_id="warm-up")
    await h.wait_finished(schema, "warm-up", 1)
    return worker


def _percentiles(values_ms: list[float], name: str) -> Metrics:
    ordered = sorted(values_ms)
    return {
        f"{name}_p50_ms": statistics.median(ordered),
        f"{name}_p95_ms": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        f"{name}_max_ms": ordered[-1],
    }


async def _stamps(h: Harness, schema: str, prefix: str) -> dict[str, tuple[datetime, float]]:
    async with await h.connect() as conn:
        cur = await conn.execute(_q(
            "SELECT id, execution_time, result FROM {s}.jobs WHERE id LIKE %s", schema),
            [prefix + "%"])
        return {row[0]: (row[1], float(row[2])) for row in await cur.fetchall()}


async def due_latency(h: Harness) -> Metrics:
    """Jobs due at distinct future instants: how late does each one start?"""
    n = h.sizes.due_latency
    schema = await h.fresh_schema("due_latency")
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched)
        # 25 ms apart plus jitter, starting after a second: all are known to the worker
        # before the first falls due, so it must sleep on a timer, not on a notification.
        base = datetime.now(UTC) + timedelta(seconds=1)
        await sched.schedule_bulk([
            JobSpec("stamp", job_id=f"due-{i:05d}", execution_time=base + timedelta(
                seconds=i * 0.025 + random.uniform(0, 0.01)))
            for i in range(n)])
        await h.wait_finished(schema, "due-", n, timeout=30 + n * 0.1)
        await worker.stop()
    stamps = await _stamps(h, schema, "due-")
    await h.drop_schema(schema)
    return _percentiles([(started - due.timestamp()) * 1000 for due, started in stamps.values()],
                        "due_latency")


async def enqueue_latency(h: Harness) -> Metrics:
    """Jobs added one at a time for now: from schedule() returning to the job starting."""
    n = h.sizes.enqueue_latency
    schema = await h.fresh_schema("enqueue_latency")
    committed: dict[str, float] = {}
    async with Scheduler(h.dsn, schema=schema) as sched:
        worker = await _idle_worker(h, schema, sched)
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
    return _percentiles([(started - committed[job_id]) * 1000
                         for job_id, (_, started) in stamps.items()], "enqueue_latency")


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


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Harness], Awaitable[Metrics]]
    repeated: bool  # throughput: run in every round, alternating with the raw ceiling
    default: bool = True  # False: only when named with --only (or in a --quick run)


def scenarios() -> list[Scenario]:
    return [
        Scenario("raw", raw_ceiling, True),
        Scenario("enqueue-loop", enqueue_loop, True),
        Scenario("enqueue-bulk", enqueue_bulk, True),
        Scenario("drain-1", _drain_scenario("drain-1", 1), True),
        Scenario("drain-2", _drain_scenario("drain-2", 2), True),
        Scenario("drain-1-default", _drain_scenario("drain-1-default", 1,
                                                    default_concurrency=True), True),
        Scenario("drain-1-quiet", _drain_scenario("drain-1-quiet", 1, log_level="warning"),
                 True),
        Scenario("backlog", Backlog(), True),
        Scenario("due-latency", due_latency, False),
        Scenario("enqueue-latency", enqueue_latency, False),
        Scenario("idle", idle_cost, False),
        Scenario("web", web_service, False, default=False),
    ]


NAMES = [s.name for s in scenarios()]
