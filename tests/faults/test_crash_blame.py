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


async def test_two_pills_claimed_together_are_both_failed_and_their_neighbours_are_not(
        sched, pg_dsn, schema, workers, tmp_path):
    """Two poison pills always in one batch with innocent jobs: no crash of the batch
    is counted, and each pill must still be told apart (alone, it kills its worker
    again) and failed, while every neighbour completes with no crash counted."""
    config = fault_config(tmp_path, pg_dsn, schema, max_recoveries=MAX_RECOVERIES)
    env = audit_env(pg_dsn, schema)
    for job_id in ("p1", "p2"):
        await sched.schedule("kill_own_worker", args=(0.5,), job_id=job_id)
    for job_id in ("i1", "i2"):
        await sched.schedule("sleep_then_record", args=(job_id, 2.0), job_id=job_id)
    worker = workers(config, env=env)
    crashes = 0

    async def settled_restarting() -> bool:
        nonlocal worker, crashes
        if worker.proc.poll() is not None:  # a supervisor starts it again
            crashes += 1
            worker = workers(config, env=env)
        return await settled(sched)

    await wait_until(settled_restarting, timeout=120, interval=0.2,
                     what="every job finished")
    rows = {r["id"]: r for r in await jobs(sched)}
    assert {k: (str(r["status"]), r["recoveries"]) for k, r in rows.items()} == {
        "p1": ("failed", MAX_RECOVERIES), "p2": ("failed", MAX_RECOVERIES),
        "i1": ("completed", 0), "i2": ("completed", 0)}
    assert crashes == 1 + 2 * MAX_RECOVERIES
