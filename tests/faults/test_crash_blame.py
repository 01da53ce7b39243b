"""Fault: a worker holding several jobs is SIGKILLed again and again. Each crash counts
one recovery, against the job that was running longest, so the innocent neighbours of
whatever killed it are never failed as poison pills."""

from __future__ import annotations

from conftest import wait_until

from .kit import audit_env, counts, fault_config, jobs, pid_of, release_file

MAX_RECOVERIES = 2
JOBS = ("a", "b", "c")


async def test_a_crash_fails_no_innocent_neighbour_as_poison(sched, pg_dsn, schema, workers,
                                                             tmp_path):
    config = fault_config(tmp_path, pg_dsn, schema, max_recoveries=MAX_RECOVERIES)
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    for job_id in JOBS:
        await sched.schedule("hold", args=(job_id, release), job_id=job_id)

    def held_by(pid: int):
        async def check() -> bool:
            rows = await jobs(sched)
            return all(str(r["status"]) == "failed" or (
                str(r["status"]) == "running" and pid_of(r["worker_id"]) == pid) for r in rows)
        return check

    for crash in range(1, MAX_RECOVERIES + 1):
        worker = workers(config, env=env)
        await wait_until(held_by(worker.pid), timeout=30, what=f"claims before crash {crash}")
        worker.kill()  # SIGKILL: every job it held is orphaned at once

    survivor = workers(config, env=env)
    await wait_until(held_by(survivor.pid), timeout=30,
                     what="the survivor to recover the orphans")
    do_release()
    await wait_until(lambda: settled(sched), timeout=30, what="every job finished")
    rows = await jobs(sched)
    assert sum(r["recoveries"] for r in rows) == MAX_RECOVERIES, rows
    failed = [r["id"] for r in rows if str(r["status"]) == "failed"]
    assert len(failed) <= 1, f"innocent neighbours failed as poison: {failed}"
    assert sum(1 for r in rows if str(r["status"]) == "completed") >= len(JOBS) - 1


async def settled(sched) -> bool:
    active = await counts(sched)
    return active["pending"] == 0 and active["running"] == 0
