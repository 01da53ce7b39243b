"""Review of the reserve change: a busy worker reserves a due suspect (it stays pending)
and claims it once every other job it holds is recorded. Real worker processes.

- A kill while the suspect waits beside a running job counts against that job alone, the
  only one running: the reserved suspect was never claimed. A fresh worker runs each once.
- A SIGTERM while it waits leaves it a suspect, unrun; a fresh worker finishes all.
- Once the suspect is recorded the worker claims again at once, not at its poll.
- It also waits for the thread of a timed-out sync job that runs on (recorded, yet still
  running in the worker).
- Another worker that becomes idle meanwhile runs it, not the reserving one.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from datetime import timedelta

from conftest import wait_until

from .kit import audit, audit_env, db_now, fault_config, query


async def _status(sched) -> dict[str, tuple[str, bool, int]]:
    rows = await query(sched, "SELECT id, status::text, suspect, recoveries "
                              "FROM {schema}.jobs")
    return {r["id"]: (r["status"], r["suspect"], r["recoveries"]) for r in rows}


async def _ran(sched) -> list[str]:
    return sorted(a["key"] for a in await audit(sched))


async def _suspect_due_once_long_runs(sched) -> None:
    """Once job `long` runs, make `s` a due suspect (marked by hand, as a recovery would)."""

    async def long_running() -> bool:
        return (await _status(sched)).get("long", ("",))[0] == "running"

    await wait_until(long_running, timeout=30, what="the long job")
    await sched.schedule("sleep_then_record", args=("s", 0.0), job_id="s",
                         execution_time=await db_now(sched) + timedelta(hours=1))
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                       "WHERE id = 's' RETURNING id")


async def _suspect_waiting_beside_long(sched, pg_dsn, schema, workers, tmp_path,
                                       poisoned_reservation: bool = False, **cfg):
    """One worker runs `long` (until `release` exists) and has reserved suspect `s`, which
    waits for it: `long` running, `s` pending and not run. Returns (worker, release)."""
    env = audit_env(pg_dsn, schema)
    release = tmp_path / "release"
    worker = workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2, **cfg), env=env)
    await sched.schedule("hold", args=("long", str(release)), job_id="long")
    await _suspect_due_once_long_runs(sched)
    if poisoned_reservation:
        await query(sched, "UPDATE {schema}.jobs SET reserved_until = now() + interval "
                           "'1 year' WHERE id = 's' RETURNING id")

    pokes = iter(range(1000))

    async def s_reserved() -> bool:
        # A NOTIFY wakes the worker to claim (its poll may be long): it sees s due.
        await sched.schedule("noop", job_id=f"n{next(pokes)}")
        await asyncio.sleep(0.5)
        return await _reserved(sched)

    await wait_until(s_reserved, timeout=40, what="the busy worker to reserve the suspect")
    await asyncio.sleep(4.0)  # past the 3 s lease
    assert await _ran(sched) == []  # s waits for long
    status = await _status(sched)
    assert (status["s"][0], status["long"][0]) == ("pending", "running")
    return worker, release, env


async def _reserved(sched) -> bool:
    rows = await query(sched, "SELECT reserved_until BETWEEN now() AND now() + interval "
                              "'1 minute' AS reserved "
                              "FROM {schema}.jobs WHERE id = 's'")
    return bool(rows[0]["reserved"])


async def _a_fresh_worker_runs_each_once(sched, pg_dsn, schema, workers, tmp_path, env):
    (tmp_path / "fresh").mkdir()
    workers(fault_config(tmp_path / "fresh", pg_dsn, schema, concurrency=2), env=env)

    async def done() -> bool:
        return {v[0] for v in (await _status(sched)).values()} == {"completed"}

    await wait_until(done, timeout=60, what="a fresh worker to finish every job")
    assert await _ran(sched) == ["long", "s"]


async def test_a_kill_while_a_suspect_waits_beside_a_job_counts_against_that_job_only(
        sched, pg_dsn, schema, workers, tmp_path):
    worker, release, env = await _suspect_waiting_beside_long(
        sched, pg_dsn, schema, workers, tmp_path)
    worker.kill()
    # Recovered once its 3 s lease is past (and the dead worker's registry beat older
    # than one): tried until then, not once after a fixed 4 s, which a heartbeat that
    # committed late on a loaded machine could outlast.
    await wait_until(lambda: sched.store.recover_orphans(max_recoveries=3), timeout=30,
                     what="the dead worker's job recovered")
    status = {k: v for k, v in (await _status(sched)).items() if k in ("long", "s")}
    # long ran alone: the crash is its own; s, reserved, never ran
    assert status == {"long": ("pending", True, 1), "s": ("pending", True, 0)}
    release.touch()
    await _a_fresh_worker_runs_each_once(sched, pg_dsn, schema, workers, tmp_path, env)


async def test_a_sigterm_while_a_suspect_waits_gives_it_back_unrun_as_a_suspect(
        sched, pg_dsn, schema, workers, tmp_path):
    worker, release, env = await _suspect_waiting_beside_long(
        sched, pg_dsn, schema, workers, tmp_path, shutdown_grace_seconds=2)
    worker.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    release.touch()  # long ends within the grace period: s must not start after it
    assert await worker.wait() == 0
    status = await _status(sched)
    assert status["s"] == ("pending", True, 0)
    assert status["long"][0] == "completed"
    assert await _ran(sched) == ["long"]
    await _a_fresh_worker_runs_each_once(sched, pg_dsn, schema, workers, tmp_path, env)


async def test_after_a_waiting_suspect_is_recorded_the_worker_claims_at_once(
        sched, pg_dsn, schema, workers, tmp_path):
    """poll_seconds 60: only a wake-up can make the worker claim the ordinary job queued
    while the suspect waited."""
    _, release, _ = await _suspect_waiting_beside_long(
        sched, pg_dsn, schema, workers, tmp_path, poll_seconds=60)
    await sched.schedule("sleep_then_record", args=("o", 0.0), job_id="o")
    await asyncio.sleep(1.5)
    assert (await _status(sched))["o"][0] == "pending"  # nothing beside the suspect
    release.touch()
    await wait_until(lambda: _ran_all(sched), timeout=10,
                     what="o to be claimed right after the suspect is recorded")


async def _ran_all(sched) -> bool:
    return await _ran(sched) == ["long", "o", "s"]



async def _two_busy_workers_one_reserving(sched, pg_dsn, schema, workers, tmp_path):
    """Workers `a` and `b` (queues a and b, both default), each busy with a long job of
    its queue (until `release-<queue>` exists), and suspect `s` due in default: poked
    until one reserves it. Returns the workers by queue and the reserving one's queue."""
    env = audit_env(pg_dsn, schema)
    procs = {}
    for queue in ("a", "b"):
        (tmp_path / queue).mkdir()
        procs[queue] = workers(fault_config(tmp_path / queue, pg_dsn, schema, concurrency=2,
                                            queues=[queue, "default"]), env=env)
        await sched.schedule("hold", args=(queue, str(tmp_path / f"release-{queue}")),
                             job_id=queue, queue=queue)

    async def both_running() -> bool:
        status = await _status(sched)
        return all(status.get(q, ("",))[0] == "running" for q in ("a", "b"))

    await wait_until(both_running, timeout=30, what="a long job on each worker")
    await sched.schedule("sleep_then_record", args=("s", 0.0), job_id="s",
                         execution_time=await db_now(sched) + timedelta(hours=1))
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                       "WHERE id = 's' RETURNING id")
    pokes = itertools.count()

    async def reserver() -> str | None:
        await sched.schedule("noop", job_id=f"n{next(pokes)}")
        await asyncio.sleep(0.5)
        return next((q for q, p in procs.items() if "suspect_reserved" in p.log()), None)

    return procs, await wait_until(reserver, timeout=40, what="a busy worker to reserve s")


async def test_a_suspect_waiting_on_a_busy_worker_runs_once_another_worker_is_idle(
        sched, pg_dsn, schema, workers, tmp_path):
    """A strict xfail while a busy worker claimed the suspect and waited with it, running,
    until its own long job ended: the worker that became idle could not take it."""
    _, held_by = await _two_busy_workers_one_reserving(
        sched, pg_dsn, schema, workers, tmp_path)
    other = "b" if held_by == "a" else "a"
    (tmp_path / f"release-{other}").touch()  # the other worker is idle from now on
    try:
        await wait_until(lambda: _has_run(sched, "s"), timeout=30,
                         what="the suspect to run while its claimer's long job goes on")
    finally:
        (tmp_path / f"release-{held_by}").touch()


async def _has_run(sched, key: str) -> bool:
    return key in await _ran(sched)


async def test_a_suspect_waits_for_the_abandoned_thread_of_a_timed_out_job(
        sched, pg_dsn, schema, workers, tmp_path):
    """A sync job that timed out is recorded (failed) while its thread runs on in the
    worker: a crash from that thread would be counted against the suspect started then."""
    env = audit_env(pg_dsn, schema)
    release = tmp_path / "release"
    workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2), env=env)
    await sched.schedule("sync_hold", args=("long", str(release)), job_id="long",
                         timeout=3.0, max_retries=0)
    await _suspect_due_once_long_runs(sched)

    async def long_failed() -> bool:
        return (await _status(sched))["long"][0] == "failed"

    await wait_until(long_failed, timeout=30, what="the long job to time out")
    await asyncio.sleep(12.0)  # past the 5-10 s before a busy worker claims s
    release.touch()
    await wait_until(lambda: _has_run(sched, "long"), timeout=20, what="the thread to end")
    await wait_until(lambda: _has_run(sched, "s"), timeout=30, what="the suspect")
    order = [a["key"] for a in await audit(sched)]
    assert order == ["long", "s"]


async def test_a_reservation_written_far_ahead_by_hand_does_not_keep_busy_workers_away(
        sched, pg_dsn, schema, workers, tmp_path):
    """Nothing read from the database is trusted: a suspect `reserved_until` a year ahead
    (no worker writes that) would otherwise never be reserved by a busy worker, and with
    every worker busy it would never run."""
    _, release, _ = await _suspect_waiting_beside_long(
        sched, pg_dsn, schema, workers, tmp_path, poisoned_reservation=True)
    release.touch()
    await wait_until(lambda: _ran_all_of(sched, ["long", "s"]), timeout=20,
                     what="the suspect to run once the long job ended")


async def _ran_all_of(sched, keys: list[str]) -> bool:
    return await _ran(sched) == keys


async def test_show_tells_a_reserved_suspect_and_until_when(sched):
    """`pgsched show` (text and --json) of a suspect a busy worker reserved: pending,
    a suspect, and the reservation's end, which is all an operator sees of the wait."""
    from rich.console import Console

    from pgsched.cli.views import job_view
    from pgsched.ops import job_json

    await sched.schedule("noop", job_id="s")
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, reserved_until = now() "
                       "+ interval '10 s' WHERE id = 's' RETURNING id")
    data = job_json(await sched.store.get_job("s"), await db_now(sched))
    assert (data["status"], data["suspect"]) == ("pending", True)
    assert data["reserved_until"] is not None
    console = Console(width=200, record=True)
    console.print(job_view(data))
    assert f"reserved until  {data['reserved_until']}" in console.export_text()

