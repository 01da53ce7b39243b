"""Every operator query (CLI, `top`, queues) has an index path: none reads jobs whole.

Plans are taken on a small table with `enable_seqscan = off`, which leaves a sequential
scan only where no index can serve the statement, so a missing or unusable index (a
predicate the query no longer implies, a cast that hides a column) shows up as
`Seq Scan on jobs`. An index can still be the wrong one (walking the whole history in
order for a few rows): the statements changed for issue 14 are also checked for the
index they must use, or for how many pending entries they may read. The figures at 5M
rows come from `python -m bench --only ops` (bench/ops_at_size.py); `pgsched status
--exact` (ops_job_counts) is a deliberate pass over the table and is left out.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from pgsched import store as store_module
from pgsched.tasks import PRIORITIES as PRIORITY_VALUES

PRIORITIES = list(PRIORITY_VALUES)
NOW = datetime.now(UTC)
BATCH = {"ids": None, "channel": "c", "limit": 5000}
COUNTS = {"count_limit": 10}
LIST = {"statuses": None, "task": None, "since": None, "limit": 50, "before_created": None,
        "before_id": None, "queue": None}

# (what the operator runs, named query, its parameters)
STATEMENTS = [
    ("ls", "list_jobs", LIST),
    ("ls --task", "list_jobs", {**LIST, "task": "task_3"}),
    ("ls --queue", "list_jobs", {**LIST, "queue": "q3"}),
    ("ls --since", "list_jobs", {**LIST, "since": NOW - timedelta(hours=1)}),
    ("ls, next page", "list_jobs", {**LIST, "before_created": NOW, "before_id": "j5"}),
    ("cancel --task", "request_cancel", {**BATCH, "task": "task_3", "queue": None}),
    ("cancel --queue", "request_cancel", {**BATCH, "task": None, "queue": "q3"}),
    ("cancel ID", "request_cancel", {**BATCH, "ids": ["a", "b"], "task": None, "queue": None}),
    ("retry --task", "ops_retry_jobs", {**BATCH, "statuses": ["failed"], "cutoff": NOW,
                                        "task": "task_3", "queue": None, "errors_first": 1,
                                        "errors_last": 10}),
    ("ls --status running", "list_jobs", {**LIST, "statuses": ["running"]}),
    ("ls --status pending", "list_jobs", {**LIST, "statuses": ["pending"]}),
    ("ls --status expired", "list_jobs", {**LIST, "statuses": ["expired"]}),
    ("retry --queue", "ops_retry_jobs", {**BATCH, "statuses": ["failed"], "cutoff": NOW,
                                         "task": None, "queue": "q3", "errors_first": 1,
                                         "errors_last": 10}),
    ("top: counts", "ops_active_counts", COUNTS),
    ("top: throughput", "ops_throughput", {}),
    ("top: workers", "ops_workers", {}),
    ("top: running", "ops_running_jobs", {"limit": 20}),
    ("top: next jobs", "ops_next_jobs", {"limit": 20, "priorities": PRIORITIES}),
    ("top: failures", "ops_recent_failures", {"limit": 10}),
    ("queues", "queue_stats", COUNTS),
    ("metrics: queue depth", "queue_stats", {**COUNTS, "count_limit": None}),
    ("status: finished estimates", "ops_finished_estimates", {}),
    ("recovery", "recover_orphans", {"limit": 100, "max_recoveries": 3, "channel": "c",
                                     "errors_first": 5, "errors_last": 5,
                                     "seen_twice": True, "sighted_workers": [],
                                     "sighted_beats": []}),
]

FILL = """
INSERT INTO {schema}.jobs (id, task, queue, status, execution_time, started_at,
                           finished_at, worker_id, lease_until, heartbeat_at)
SELECT 'j' || g, 'task_' || (g % 20), 'q' || (g % 5), s.status, now(),
       CASE WHEN s.status <> 'pending' THEN now() END,
       CASE WHEN s.status NOT IN ('pending', 'running') THEN now() END,
       CASE WHEN s.status <> 'pending' THEN 'w' END,
       CASE WHEN s.status = 'running' THEN now() + interval '1 min' END,
       CASE WHEN s.status = 'running' THEN now() END
FROM generate_series(1, 3000) g
CROSS JOIN LATERAL (SELECT (CASE WHEN g % 10 = 0 THEN 'pending'
                                 WHEN g % 100 = 1 THEN 'running'
                                 WHEN g % 10 = 2 THEN 'failed'
                                 ELSE 'completed' END)::{schema}.job_status AS status) s
"""


def seq_scans(plan: dict) -> list[str]:
    here = [plan["Relation Name"]] if plan.get("Node Type") == "Seq Scan" else []
    return here + [name for child in plan.get("Plans", ()) for name in seq_scans(child)]


@pytest.fixture
async def planner(sched, pg_dsn):
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        schema = psycopg.sql.Identifier(sched.schema)
        await conn.execute(psycopg.sql.SQL(FILL).format(schema=schema))
        await conn.execute(psycopg.sql.SQL("ANALYZE {}.jobs").format(schema))
        await conn.execute("SET enable_seqscan = off")
        yield conn


@pytest.mark.parametrize(("command", "name", "params"), STATEMENTS,
                         ids=[s[0] for s in STATEMENTS])
async def test_operator_query_reads_jobs_through_an_index(sched, planner, command, name,
                                                          params):
    text = sched.store._q[name]
    cur = await planner.execute("EXPLAIN (FORMAT JSON) " + text, params)
    plan = (await cur.fetchone())[0][0]["Plan"]
    assert "jobs" not in seq_scans(plan), f"{command}: {json.dumps(plan)[:2000]}"


def index_names(plan: dict) -> set[str]:
    here = {plan["Index Name"]} if "Index Name" in plan else set()
    return here.union(*(index_names(child) for child in plan.get("Plans", ())))


def most_pending_rows(plan: dict) -> int:
    """The most rows a scan of a pending index returned in one loop (EXPLAIN ANALYZE)."""
    here = plan["Actual Rows"] if plan.get("Index Name", "").startswith("jobs_pending") else 0
    return max([here, *(most_pending_rows(child) for child in plan.get("Plans", ()))])


RETRY = {**BATCH, "statuses": ["failed"], "cutoff": NOW, "errors_first": 1, "errors_last": 10}

# (what the operator runs, named query, parameters, the index its plan must use): each
# read jobs through an index before too, but one that made it walk the history (half a
# million rows at 5M for 50 running jobs; every failed job for a task without failures).
TARGETED = [
    ("ls --status running", "list_jobs", {**LIST, "statuses": ["running"]}, "jobs_running_idx"),
    ("ls --status expired", "list_jobs", {**LIST, "statuses": ["expired"]}, "jobs_finished_idx"),
    ("retry --task", "ops_retry_jobs", {**RETRY, "task": "task_3", "queue": None},
     "jobs_retry_task_idx"),
    ("retry --queue", "ops_retry_jobs", {**RETRY, "task": None, "queue": "q3"},
     "jobs_retry_queue_idx"),
]


@pytest.mark.parametrize(("command", "name", "params", "index"), TARGETED,
                         ids=[t[0] for t in TARGETED])
async def test_operator_query_reads_what_it_shows(sched, planner, command, name, params, index):
    cur = await planner.execute("EXPLAIN (FORMAT JSON) " + sched.store._q[name], params)
    plan = (await cur.fetchone())[0][0]["Plan"]
    assert index in index_names(plan), f"{command}: {json.dumps(plan)[:2000]}"


@pytest.mark.parametrize("name", ["ops_active_counts", "queue_stats"])
async def test_pending_counts_read_at_most_the_limit_per_queue(sched, planner, name):
    """300 pending jobs in q0: counted up to 10 (+1 to know there are more), not all."""
    cur = await planner.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sched.store._q[name],
                                COUNTS)
    plan = (await cur.fetchone())[0][0]["Plan"]
    assert most_pending_rows(plan) <= 11, json.dumps(plan)[:2000]


async def test_capped_counts_are_lower_bounds_and_the_lag_stays_exact(sched, planner,
                                                                     monkeypatch):
    monkeypatch.setattr(store_module, "COUNT_LIMIT", 10)
    exact = {r["queue"]: r for r in await sched.store.queue_stats(exact=True)}
    capped = {r["queue"]: r for r in await sched.store.queue_stats()}
    assert exact["q0"]["due"] == 300 and not exact["q0"]["capped"]
    assert capped["q0"]["due"] == 10 and capped["q0"]["capped"]
    assert capped["q0"]["lag_seconds"] == pytest.approx(exact["q0"]["lag_seconds"], abs=1)
    assert capped["q1"]["running"] == exact["q1"]["running"] == 30


async def test_status_estimates_finished_jobs_on_a_big_table(sched, planner, monkeypatch):
    from pgsched import ops

    monkeypatch.setattr(ops, "EXACT_COUNT_ROWS", 1000)  # the 3,000-row table is "big"
    snapshot = await ops.gather(sched.store, stale_after=30)
    assert snapshot.estimated["completed"] == pytest.approx(2370, rel=0.05)
    assert snapshot.estimated["failed"] == pytest.approx(300, rel=0.05)
    assert snapshot.queues["q0"]["pending"] == 300
    assert snapshot.to_json()["queues"]["q0"]["completed"] is None
    exact = await ops.gather(sched.store, stale_after=30, exact=True)
    assert exact.estimated is None and exact.queues["q2"]["failed"] == 300


async def test_the_full_count_is_the_one_sequential_scan(sched, planner):
    """The check above can fail: a statement that must read every row shows its scan."""
    cur = await planner.execute("EXPLAIN (FORMAT JSON) " + sched.store._q["ops_job_counts"])
    assert "jobs" in seq_scans((await cur.fetchone())[0][0]["Plan"])


async def test_keyset_pages_list_every_job_once_newest_first(sched, planner):
    pages, before = [], None
    while page := await sched.store.list_jobs(limit=700, before=before):
        pages.append([job["id"] for job in page])
        before = (page[-1]["created_at"], page[-1]["id"])
    seen = [job_id for page in pages for job_id in page]
    assert len(pages) == 5 and len(seen) == len(set(seen)) == 3000
    everything = await sched.store.list_jobs(limit=5000)
    assert seen == [job["id"] for job in everything]
