"""An adversary's review of issue 11's CPU cuts (complete_jobs' array literals, the
batched job_completed lines, context variables set directly, per-job metrics kept as
plain numbers), against a real PostgreSQL and the real in-process Worker."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import structlog
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import wait_until
from test_worker_core import ended, sql, start, stop

from pgsched import Retry, logs, task

W = "w-review"

# What SQL can write as an id (the API refuses some): array literal syntax, quoting,
# escapes, whitespace array_in would trim unquoted, NULL-looking text, non-ASCII, long.
HOSTILE_IDS = ["", " ", "  lead", "trail  ", "\t", "a\nb", '"', "\\", '\\"', '"\\',
               "{", "}", "{}", "{{}}", ",", "a,b", "NULL", "null", 'NULL"', "{NULL}",
               "∅ ✓ 🙂", "\u2028", "x" * 20_000 + '"\\{,}']
HOSTILE_RESULTS = ['"\\\\"', '"\\""', '"{,}"', "{}", "[]", '{"NULL": null}', "null",
                   '"\\u2028"', '"' + "y" * 50_000 + '"', '" "', '"\\t"', "-7"]


@pytest.mark.parametrize("prepared", [False, True], ids=["planned", "prepared"])
async def test_completions_of_ids_sql_wrote_write_each_job_its_result(sched, prepared):
    """complete_jobs' hand-escaped literals: every id SQL can write completes its own row
    with its own result, whether the statement is planned each time or prepared."""
    ids = HOSTILE_IDS
    await sql(sched, "INSERT INTO {schema}.jobs (id, task, status, execution_time, "
                     "worker_id, attempts, lease_until) "
                     "SELECT i, 'noop', 'running', now(), %s, 3, now() + interval '1 hour' "
                     "FROM unnest(%s::text[]) AS i", [W, ids])
    sched.store._complete_prepared = prepared
    results = [HOSTILE_RESULTS[i % len(HOSTILE_RESULTS)] for i in range(len(ids))]
    for _ in range(2):  # a prepared statement is run again as prepared
        assert await sched.store.complete_jobs(
            worker_id=W, done=[(i, 99, r) for i, r in zip(ids, results, strict=True)]
        ) == set()  # another attempt's outcome: fenced out
    done = [(i, 3, r) for i, r in zip(ids, results, strict=True)]
    assert await sched.store.complete_jobs(worker_id=W, done=done) == {(i, 3) for i in ids}
    rows = await sql(sched, "SELECT id, status::text, result FROM {schema}.jobs")
    assert {row[0]: (row[1], row[2]) for row in rows} == {
        i: ("completed", json.loads(r)) for i, r in zip(ids, results, strict=True)}


# -- a worker's job lines and counters over a batch of mixed outcomes ---------------------

_SNOOZED: set[str] = set()


async def _child(marker: str) -> None:
    await asyncio.sleep(0.01)
    structlog.get_logger("cr").info("cr_child", marker=marker)


@task
async def cr_async(marker: str, nap: float, outcome: str) -> str:
    await asyncio.sleep(nap)
    structlog.get_logger("cr").info("cr_inner", marker=marker)
    await asyncio.create_task(_child(marker))  # a nested task the job spawns
    if outcome == "snooze" and marker not in _SNOOZED:
        _SNOOZED.add(marker)
        raise Retry(0.05)
    if outcome == "fail":
        raise RuntimeError(f"boom {marker}")
    if outcome == "hang":
        await asyncio.sleep(60)  # its timeout or a cancel ends it
    return marker  # the result holds the id: quotes, backslashes, braces


@task
def cr_sync(marker: str) -> dict:
    structlog.get_logger("cr").info("cr_inner", marker=marker)  # in the task's thread
    return {marker: [marker, "{", "}", "\\", '"']}


@pytest.fixture
def json_stderr(capsys):
    """pgsched's JSON logs (as `pgsched worker` sets them up) captured; the lines read."""
    logs.configure("info", "json")
    logs._structlog()
    capsys.readouterr()

    def lines() -> list[dict]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines()
                if line.startswith("{")]

    yield lines
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def _samples(registry, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for family in registry.collect()
            for s in family.samples if s.name == name}


async def test_a_batch_of_mixed_outcomes_logs_and_counts_each_job_as_itself(sched,
                                                                            json_stderr):
    """Jobs whose ids hold what the literals escape, ending every way at once (completed,
    sync in a thread, failed, retried, snoozed, timed out, cancelled while running): each
    completed job gets exactly one job_completed line with its own job_id, task, attempt
    and worker_id; every line a job logs (in its task, a nested task, its thread) names
    that job; the counters and the histogram agree with the rows."""
    kinds = {f'a"{i}\\{{}},' if i % 3 else f"ñ{i} ✓": ("ok", i % 5 * 0.01) for i in range(16)}
    kinds.update({f"sync{{{i}}}": ("sync", 0) for i in range(4)})
    kinds.update({'fail"1': ("fail", 0), "retry\\2": ("retry", 0), "snooze,3": ("snooze", 0),
                  "timeout{4}": ("timeout", 0), "cancel 5": ("hang", 0)})
    worker, runner = await start(sched, concurrency=8, heartbeat_seconds=0.2)
    try:
        for job_id, (kind, nap) in kinds.items():
            if kind == "sync":
                await sched.schedule(cr_sync, args=(job_id,), job_id=job_id)
                continue
            outcome = {"retry": "fail", "timeout": "hang"}.get(kind, kind)
            await sched.schedule(cr_async, args=(job_id, nap, outcome), job_id=job_id,
                                 max_retries=1 if kind == "retry" else 0,
                                 timeout=0.3 if kind == "timeout" else None)
        await wait_until(lambda: worker.running_jobs and _running(sched, "cancel 5"),
                         what="the job to cancel running")
        assert await sched.store.request_cancel(ids=["cancel 5"]) == {"cancel 5": "running"}
        rows = {}
        for job_id in kinds:
            rows[job_id] = await wait_until(lambda j=job_id: ended(sched, j), what=job_id)
    finally:
        await stop(worker, runner)
    lines = json_stderr()
    completed = {j for j, row in rows.items() if str(row["status"]) == "completed"}
    assert completed == {j for j, (k, _) in kinds.items() if k in ("ok", "sync", "snooze")}
    assert {j: str(rows[j]["status"]) for j in kinds if j not in completed} == {
        'fail"1': "failed", "retry\\2": "failed", "timeout{4}": "failed",
        "cancel 5": "cancelled"}
    for j in completed:
        assert rows[j]["result"] in (j, {j: [j, "{", "}", "\\", '"']}), j
    done_lines = [e for e in lines if e["event"] == "job_completed"]
    assert sorted(e["job_id"] for e in done_lines) == sorted(completed)
    for e in done_lines:
        row = rows[e["job_id"]]
        assert (e["task"], e["attempt"], e["worker_id"], e["level"]) == (
            row["task"], row["attempts"], worker.id, "info"), e
        assert isinstance(e["duration_s"], float) and isinstance(e["lateness_ms"], float)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["timestamp"]), e
    inner = [e for e in lines if e["event"] in ("cr_inner", "cr_child")]
    assert len(inner) >= 2 * 16 + 4
    assert [e for e in inner if (e.get("job_id"), e.get("task")) != (
        e["marker"], "cr_sync" if e["marker"].startswith("sync") else "cr_async")] == []
    job_lines = [e for e in lines if "job_id" in e]
    assert all(e["job_id"] in kinds for e in job_lines)

    metrics = worker.metrics.registry
    counted = _samples(metrics, "pgsched_jobs_completed_total")
    assert sum(counted.values()) == len(completed)
    assert counted[(("queue", "default"), ("task", "cr_sync"))] == 4
    started = sum(_samples(metrics, "pgsched_jobs_started_total").values())
    runs = _samples(metrics, "pgsched_job_duration_seconds_count")
    assert started == sum(runs.values()) == sum(row["attempts"] for row in rows.values())
    by_outcome = {}
    for labels, count in runs.items():
        outcome = dict(labels)["outcome"]
        by_outcome[outcome] = by_outcome.get(outcome, 0) + count
    assert by_outcome == {"completed": len(completed), "snoozed": 1, "failed": 4,
                          "cancelled": 1}
    assert sum(_samples(metrics, "pgsched_jobs_failed_total").values()) == 3
    assert sum(_samples(metrics, "pgsched_jobs_retried_total").values()) == 1
    assert sum(_samples(metrics, "pgsched_jobs_cancelled_total").values()) == 1


async def _running(sched, job_id: str) -> bool:
    row = await sched.get_job(job_id)
    return row is not None and str(row["status"]) == "running"
