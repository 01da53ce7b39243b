"""Ops queries at size: the CLI, `top` and web list statements timed on a big jobs table.

Two ways in, one measurement:
- `python -m bench --only ops` (opt-in, like scale): a PostgreSQL cluster of its own
  (bench/scale.py), `Sizes.ops_rows` jobs (5M), every statement's p50/p95 beside the
  target of issue 14 (20 ms) in the report;
- `python -m bench.ops_at_size --dsn DSN [--rows 5000000] [--schema ops_size] [--runs 20]
  [--fill-only]` on a server of your choice: prints one JSON line per statement and
  reuses the schema when it already holds the rows (it is left in place).

Fills a migrated schema with the jobs by SQL (96% finished over a week, 4% pending over
10 queues and 50 tasks, 500 running), then runs every read statement of the operator
commands, and the bulk writes (one batch, inside a transaction that is rolled back),
`runs` times each: p50/p95 in ms, and whether the plan reads jobs with a sequential scan.
Measures only; nothing asserts (tests/test_ops_plans.py checks the plans).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from pgsched import Scheduler
from pgsched.store import BULK_BATCH, COUNT_LIMIT, LOCK_TIMEOUT_SECONDS, _session_options
from pgsched.tasks import PRIORITIES

from .harness import Harness

TARGET_MS = 20.0

FILL = """
INSERT INTO {schema}.jobs (id, task, queue, status, priority, execution_time, created_at,
                           started_at, finished_at, attempts, worker_id, lease_until,
                           heartbeat_at, last_error)
SELECT md5(g::text), 'task_' || (g %% 50), 'q' || (g %% 10), s.status,
       CASE WHEN g %% 7 = 0 THEN 1 ELSE 5 END,
       t.created + CASE WHEN s.status = 'pending' AND g %% 2 = 0
                        THEN interval '2 hours' ELSE interval '0' END,
       t.created,
       CASE WHEN s.status <> 'pending' THEN t.created END,
       CASE WHEN s.status NOT IN ('pending', 'running') THEN t.created + interval '1 s' END,
       CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END,
       CASE WHEN s.status <> 'pending' THEN 'w' || (g %% 50) END,
       CASE WHEN s.status = 'running' THEN now() + interval '1 min' END,
       CASE WHEN s.status = 'running' THEN now() END,
       CASE WHEN s.status = 'failed' THEN 'boom' END
FROM generate_series(1, %(rows)s) g
CROSS JOIN LATERAL (SELECT now() - (%(rows)s - g) * interval '7 days' / %(rows)s AS created) t
CROSS JOIN LATERAL (SELECT (CASE
    WHEN g %% 100 < 4 THEN 'pending'
    WHEN g %% 10000 < 5 THEN 'running'
    WHEN g %% 100 = 4 THEN 'failed'
    WHEN g %% 100 = 5 THEN 'cancelled'
    ELSE 'completed' END)::{schema}.job_status AS status) s
"""


LIST = {"statuses": None, "task": None, "since": None, "limit": 50, "before_created": None,
        "before_id": None, "queue": None}


def statements(cutoff: datetime) -> list[tuple[str, str, str, dict]]:
    """(metric key, what the operator runs, named query, parameters) for each statement."""
    prios = list(PRIORITIES)
    counts = {"count_limit": COUNT_LIMIT}
    since = datetime.now(UTC) - timedelta(hours=1)
    cancel = {"ids": None, "channel": "x", "limit": BULK_BATCH}
    retry = {"ids": None, "statuses": ["failed"], "cutoff": cutoff, "limit": BULK_BATCH,
             "channel": "x", "errors_first": 5, "errors_last": 5}
    page = {**LIST, "before_id": "", "before_created": cutoff - timedelta(days=3)}
    return [
        ("ls", "ls", "list_jobs", LIST),
        ("ls_task", "ls --task", "list_jobs", {**LIST, "task": "task_7"}),
        ("ls_failed", "ls --status failed", "list_jobs", {**LIST, "statuses": ["failed"]}),
        ("ls_running", "ls --status running", "list_jobs", {**LIST, "statuses": ["running"]}),
        ("ls_pending", "ls --status pending", "list_jobs", {**LIST, "statuses": ["pending"]}),
        ("ls_expired", "ls --status expired (none)", "list_jobs",
         {**LIST, "statuses": ["expired"]}),
        ("ls_since", "ls --since 1h", "list_jobs", {**LIST, "since": since}),
        ("ls_page", "ls, a page 3 days back", "list_jobs", page),
        ("cancel_task", f"cancel --task (batch of {BULK_BATCH})", "request_cancel",
         {**cancel, "task": "task_3", "queue": None}),
        ("cancel_queue", f"cancel --queue (batch of {BULK_BATCH})", "request_cancel",
         {**cancel, "task": None, "queue": "q3"}),
        ("retry_task", f"retry --task (batch of {BULK_BATCH})", "ops_retry_jobs",
         {**retry, "task": "task_4", "queue": None}),
        ("retry_task_none", "retry --task (a task without failures)", "ops_retry_jobs",
         {**retry, "task": "task_7", "queue": None}),
        ("retry_queue", f"retry --queue (batch of {BULK_BATCH})", "ops_retry_jobs",
         {**retry, "task": None, "queue": "q4"}),
        ("top_counts", "top: active counts", "ops_active_counts", counts),
        ("top_throughput", "top: throughput", "ops_throughput", {}),
        ("top_workers", "top: workers", "ops_workers", {}),
        ("top_running", "top: running", "ops_running_jobs", {"limit": 20}),
        ("top_next", "top: next jobs", "ops_next_jobs", {"limit": 20, "priorities": prios}),
        ("top_failures", "top: failures", "ops_recent_failures", {"limit": 10}),
        ("queues", "queues (and GET /api/queues)", "queue_stats", counts),
        ("status_estimates", "status: finished jobs estimated", "ops_finished_estimates", {}),
        ("status_exact", "status --exact (every row, no target)", "ops_job_counts", {}),
    ]


def seq_scans(plan: dict, table: str = "jobs") -> int:
    found = plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") == table
    return int(found) + sum(seq_scans(p, table) for p in plan.get("Plans", ()))


async def fill(dsn: str, schema: str, rows: int) -> None:
    async with Scheduler(dsn, schema=schema) as sched:
        await sched.migrate()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        ident = sql.Identifier(schema)
        have = (await (await conn.execute(sql.SQL("SELECT count(*) FROM {}.jobs").format(
            ident))).fetchone())[0]
        if have == rows:
            return
        await conn.execute(sql.SQL("TRUNCATE {}.jobs").format(ident))
        started = time.perf_counter()
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(sql.SQL(FILL).format(schema=ident), {"rows": rows})
        await conn.execute(sql.SQL("VACUUM (ANALYZE) {}.jobs").format(ident))
        print(f"filled {rows} rows in {time.perf_counter() - started:.0f} s", flush=True,
              file=sys.stderr)


async def measure(dsn: str, schema: str, runs: int, *, echo: bool = True) -> list[dict]:
    out = []
    async with Scheduler(dsn, schema=schema) as sched:
        store = sched.store
        # Set up as pgsched's own connections are (JIT off, timeouts: store.py).
        options = _session_options(dsn, LOCK_TIMEOUT_SECONDS)
        async with await psycopg.AsyncConnection.connect(dsn, **options) as conn:
            cutoff = (await (await conn.execute("SELECT now()")).fetchone())[0]
            for key, label, name, params in statements(cutoff):
                text = store._q[name]
                cur = await conn.execute("EXPLAIN (FORMAT JSON) " + text, params)
                plan = (await cur.fetchone())[0][0]["Plan"]
                await conn.rollback()
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    await conn.execute(text, params)
                    times.append((time.perf_counter() - started) * 1000)
                    await conn.rollback()
                times.sort()
                p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
                row = {"key": key, "query": label, "p50_ms": round(statistics.median(times), 2),
                       "p95_ms": round(p95, 2), "seq_scans_of_jobs": seq_scans(plan)}
                out.append(row)
                if echo:
                    print(json.dumps(row), flush=True)
    return out


async def ops(h: Harness) -> dict:
    """The `ops` scenario: its own cluster, Sizes.ops_rows jobs, every statement timed."""
    from .scale import own_server

    rows = h.sizes.ops_rows
    async with own_server(h) as (server, inner):
        started = time.perf_counter()
        await fill(inner.dsn, "bench_ops", rows)
        m: dict = {"ops_rows": rows, "ops_fill_seconds": round(time.perf_counter() - started, 1),
                   "own_server": server.description}
        for row in await measure(inner.dsn, "bench_ops", runs=5 if rows < 100_000 else 20,
                                 echo=False):
            m[f"ops_{row['key']}_p50_ms"] = row["p50_ms"]
            m[f"ops_{row['key']}_p95_ms"] = row["p95_ms"]
            m[f"ops_{row['key']}_seq_scans"] = row["seq_scans_of_jobs"]
        return m


def table(m: dict) -> str:
    """The ops table of the report: each statement's p50/p95 against the 20 ms target."""
    if "ops_rows" not in m:
        return ""
    out = [f"| ops statement at {m['ops_rows']:,} jobs | p50 ms | p95 ms | target p95 "
           f"<= {TARGET_MS:.0f} ms |", "|---|---|---|---|"]
    for key, label, _, _ in statements(datetime.now(UTC)):
        p95 = m[f"ops_{key}_p95_ms"]
        verdict = ("-" if key == "status_exact"
                   else "met" if p95 <= TARGET_MS else "missed")
        out.append(f"| {label} | {m[f'ops_{key}_p50_ms']:.2f} | {p95:.2f} | {verdict} |")
    return "\n".join([*out, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--schema", default="ops_size")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--fill-only", action="store_true")
    args = parser.parse_args()
    asyncio.run(fill(args.dsn, args.schema, args.rows))
    if not args.fill_only:
        asyncio.run(measure(args.dsn, args.schema, args.runs))


if __name__ == "__main__":
    main()
