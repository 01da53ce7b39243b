"""Fault: a worker holding several jobs is SIGKILLed, then the worker that runs them
after it. A crash of several jobs counts against none of them; they then run alone
(suspects), and a crash of one job counts against it: the innocent neighbours of whatever
killed the first worker are never failed as poison pills for it."""

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

    def held_by(pid: int, n: int):
        """pid runs n jobs, and no other worker runs any."""
        async def check() -> bool:
            running = [r for r in await jobs(sched) if str(r["status"]) == "running"]
            return len(running) == n and all(pid_of(r["worker_id"]) == pid for r in running)
        return check

    # The first worker takes all three at once; after its crash each runs alone.
    for crash, held in enumerate((len(JOBS), 1), start=1):
        worker = workers(config, env=env)
        await wait_until(held_by(worker.pid, held), timeout=30,
                         what=f"claims before crash {crash}")
        worker.kill()  # SIGKILL: every job it held is orphaned at once

    survivor = workers(config, env=env)
    await wait_until(held_by(survivor.pid, 1), timeout=30,
                     what="the survivor to recover the orphans")
    do_release()
    await wait_until(lambda: settled(sched), timeout=30, what="every job finished")
    rows = await jobs(sched)
    # Two crashes: the shared one counted against none, the second against the one job
    # its worker ran.
    assert sorted(r["recoveries"] for r in rows) == [0, 0, 1], rows
    assert [str(r["status"]) for r in rows] == ["completed"] * len(JOBS)


async def settled(sched) -> bool:
    active = await counts(sched)
    return active["pending"] == 0 and active["running"] == 0
