"""Ops queries at size: the CLI, `top` and web list statements timed on a big jobs table.

Usage: python -m bench.ops_at_size --dsn DSN [--rows 5000000] [--schema ops_size]
       [--runs 20] [--keep]

Fills a migrated schema with `--rows` jobs by SQL (96% finished over a week, 4% pending
over 10 queues and 50 tasks, a few hundred running), then runs every read statement of
the operator commands, and the selecting part of the bulk writes inside a transaction
that is rolled back, `--runs` times each, and prints p50/p95 in ms with the top of the
plan and whether it reads jobs with a sequential scan. Measures only; nothing asserts.
Reuses the schema if it already holds the rows (--keep leaves it for the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from pgsched import Scheduler
from pgsched.tasks import PRIORITIES

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


def statements(cutoff: datetime) -> list[tuple[str, str, dict]]:
    prios = list(PRIORITIES)
    since = datetime.now(UTC) - timedelta(hours=1)
    cancel = {"ids": None, "channel": "x", "limit": 5000}
    retry = {"ids": None, "statuses": ["failed"], "cutoff": cutoff, "limit": 1000,
             "channel": "x", "errors_first": 5, "errors_last": 5}
    return [
        ("ls", "list_jobs", LIST),
        ("ls --task", "list_jobs", {**LIST, "task": "task_7"}),
        ("ls --status failed", "list_jobs", {**LIST, "statuses": ["failed"]}),
        ("ls --status running", "list_jobs", {**LIST, "statuses": ["running"]}),
        ("ls --status pending", "list_jobs", {**LIST, "statuses": ["pending"]}),
        ("ls --status expired", "list_jobs", {**LIST, "statuses": ["expired"]}),
        ("ls --since 1h", "list_jobs", {**LIST, "since": since}),
        ("ls, a page 3 days back", "list_jobs", {**LIST, "before_id": "",
                                                 "before_created": cutoff - timedelta(days=3)}),
        ("cancel --task (batch)", "request_cancel", {**cancel, "task": "task_3",
                                                     "queue": None}),
        ("cancel --queue (batch)", "request_cancel", {**cancel, "task": None, "queue": "q3"}),
        ("retry --task (batch)", "ops_retry_jobs", {**retry, "task": "task_7",
                                                    "queue": None}),
        ("top: active counts", "ops_active_counts", {}),
        ("top: throughput", "ops_throughput", {}),
        ("top: workers", "ops_workers", {}),
        ("top: running", "ops_running_jobs", {"limit": 20}),
        ("top: next jobs", "ops_next_jobs", {"limit": 20, "priorities": prios}),
        ("top: failures", "ops_recent_failures", {"limit": 10}),
        ("queues", "queue_stats", {}),
        ("status (full count)", "ops_job_counts", {}),
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
        print(f"filled {rows} rows in {time.perf_counter() - started:.0f} s", flush=True)


async def measure(dsn: str, schema: str, runs: int) -> list[dict]:
    out = []
    async with Scheduler(dsn, schema=schema) as sched:
        store = sched.store
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cutoff = (await (await conn.execute("SELECT now()")).fetchone())[0]
            for label, name, params in statements(cutoff):
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
                row = {"query": label, "p50_ms": round(statistics.median(times), 2),
                       "p95_ms": round(p95, 2), "seq_scans_of_jobs": seq_scans(plan)}
                out.append(row)
                print(json.dumps(row), flush=True)
    return out


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
