"""Helpers for the fault-injection tests: worker configs, the audit of real executions,
and the check that every job completed exactly once.

The delivery check is the heart of the suite. pgsched promises at-least-once execution
and an exactly-once completion record, so for every job:
- it ended `completed`;
- exactly one audited execution is the attempt recorded as completed (same attempt number
  and worker), so the recorded result came from a real, finished run;
- no attempt ran twice (an attempt number belongs to one claim);
- every other execution belongs to an attempt whose lease was recovered (the job's
  `errors` holds a "lease expired" entry for it): a second run only ever follows a lost
  lease, never happens silently.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from conftest import WorkerProcess, cli_env, fast_options, write_config
from psycopg.rows import dict_row
from worker_tasks import create_audit_table

from pgsched import Scheduler, WorkerOptions

# Generous next to the heartbeat: on a loaded 2-core machine a lease must not expire
# just because a process waited for the CPU, or the reruns checked below would blur.
FAULT_WORKER = dict(lease_seconds=3, heartbeat_seconds=0.5, poll_seconds=1,
                    shutdown_grace_seconds=5, concurrency=4)


def fault_options(**overrides: Any) -> WorkerOptions:
    return fast_options(**{**FAULT_WORKER, **overrides})


def fault_config(directory: Path, dsn: str, schema: str, **worker: Any) -> Path:
    return write_config(directory, dsn, schema, **{**FAULT_WORKER, **worker})


def audit_env(dsn: str, schema: str, **extra: str) -> dict[str, str]:
    """Environment for worker processes whose audited tasks write to `schema`.audit."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        create_audit_table(conn, schema)
    return cli_env(PGSCHED_TEST_AUDIT_DSN=dsn, PGSCHED_TEST_AUDIT_SCHEMA=schema, **extra)


async def query(sched: Scheduler, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """Ad-hoc reads for assertions; `{schema}` is the test schema (quoted)."""
    async with sched.store.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql.replace("{schema}", f'"{sched.schema}"'), params)
        return await cur.fetchall()


async def jobs(sched: Scheduler) -> list[dict[str, Any]]:
    return await query(sched, "SELECT * FROM {schema}.jobs ORDER BY id")


async def audit(sched: Scheduler) -> list[dict[str, Any]]:
    return await query(sched, "SELECT * FROM {schema}.audit ORDER BY at")


async def counts(sched: Scheduler) -> Counter[str]:
    rows = await query(sched, "SELECT status::text, count(*) AS n FROM {schema}.jobs "
                              "GROUP BY 1")
    return Counter({r["status"]: r["n"] for r in rows})


def lease_expiries(job: dict[str, Any]) -> int:
    """How many of the job's attempts were recovered after their lease expired (each is
    in `errors`; `recoveries` counts only those a crash was blamed on)."""
    return sum(1 for e in job["errors"] if e.get("outcome") == "lease_expired")


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


@dataclass
class Deliveries:
    jobs: int
    executions: int
    reruns: list[dict[str, Any]]  # executions of attempts that were recovered

    @property
    def rerun_worker_pids(self) -> set[int]:
        return {r["pid"] for r in self.reruns}


def check_each_completed_once(job_rows: list[dict[str, Any]],
                              executions: list[dict[str, Any]]) -> Deliveries:
    """Assert the delivery guarantees (module docstring) and return what was rerun."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for row in executions:
        by_job.setdefault(row["job_id"], []).append(row)
    statuses = Counter(str(j["status"]) for j in job_rows)
    assert statuses == Counter({"completed": len(job_rows)}), f"not all completed: {statuses}"
    reruns = []
    for job in job_rows:
        runs = by_job.pop(job["id"], [])
        attempts = Counter(r["attempt"] for r in runs)
        twice = [a for a, n in attempts.items() if n > 1]
        assert not twice, f"job {job['id']}: attempts {twice} ran twice: {runs}"
        recorded = [r for r in runs if r["attempt"] == job["attempts"]]
        assert len(recorded) == 1, (f"job {job['id']}: no execution matches the completed "
                                    f"attempt {job['attempts']}: {runs}")
        assert recorded[0]["worker_id"] == job["worker_id"], (job, recorded)
        recovered = {e["attempt"] for e in job["errors"] if "lease expired" in e["error"]}
        for run in runs:
            if run["attempt"] != job["attempts"]:
                assert run["attempt"] in recovered, (
                    f"job {job['id']}: attempt {run['attempt']} ran but its lease was never "
                    f"recovered (a silent double run): {runs} {job['errors']}")
                reruns.append(run)
    assert not by_job, f"executions of unknown jobs: {list(by_job)[:5]}"
    return Deliveries(len(job_rows), len(executions), reruns)


def log_events(worker: WorkerProcess, event: str) -> list[str]:
    return [line for line in worker.log().splitlines() if f'"event": "{event}"' in line]


def alive(processes: list[WorkerProcess]) -> bool:
    return all(w.proc.poll() is None for w in processes)


def release_file(directory: Path, name: str = "release") -> tuple[str, Callable[[], None]]:
    """A path a `hold` task waits for, and the function that creates it."""
    path = directory / name
    return str(path), path.touch


def with_params(dsn: str, **params: str) -> str:
    """`dsn` (URI or key=value) with connection parameters added."""
    if "://" in dsn:
        extra = "&".join(f"{k}={v}" for k, v in params.items())
        return dsn + ("&" if "?" in dsn else "?") + extra
    return " ".join([dsn, *(f"{k}={v}" for k, v in params.items())])


async def backends(sched: Scheduler, application_name: str) -> list[dict[str, Any]]:
    return await query(sched, "SELECT pid, query, state FROM pg_stat_activity "
                              "WHERE application_name = %s", [application_name])


async def stop_all(processes: list[WorkerProcess]) -> list[int]:
    """SIGTERM each worker once it is up (a process still importing has no handler yet and
    would die of the signal), and return the exit codes."""
    for w in processes:
        await w.wait_for_log('"worker_starting"')
        w.signal(signal.SIGTERM)
    return [await w.wait() for w in processes]


def assert_json_lines(worker: WorkerProcess) -> None:
    """A worker logging JSON writes nothing else, even during outages."""
    for line in worker.log().splitlines():
        assert line.startswith("{") and json.loads(line), line


async def job_if(sched: Scheduler, job_id: str, status: str,
                 attempts: int | None = None) -> dict[str, Any] | None:
    """The job when it has this status (and attempt count); None otherwise, also while
    the test's own connections are reconnecting after a database restart."""
    try:
        job = await sched.store.get_job(job_id)
    except psycopg.OperationalError:
        return None
    if job is None or job["status"] != status:
        return None
    return job if attempts is None or job["attempts"] == attempts else None


async def at_least(sched: Scheduler, status: str, n: int) -> bool:
    """Whether at least n jobs have this status."""
    return (await counts(sched))[status] >= n


async def db_now(sched: Scheduler) -> datetime:
    return (await query(sched, "SELECT now() AS now"))[0]["now"]
