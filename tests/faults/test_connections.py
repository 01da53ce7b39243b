"""Faults 4 and 5: the database restarts, or kills a worker's connections.

Workers must log, reconnect, LISTEN again and carry on, without exiting. That LISTEN
really came back is proved by a NOTIFY waking an idle worker whose safety poll is ten
minutes: nothing else would pick the probe job up within the test's deadline.
"""

from __future__ import annotations

import asyncio
import signal

from conftest import audit_env, wait_until

from .kit import (
    alive,
    assert_json_lines,
    at_least,
    audit,
    backends,
    check_each_completed_once,
    fault_config,
    job_if,
    jobs,
    log_events,
    query,
    release_file,
)

NEVER_POLL = 600  # seconds: longer than any deadline below, so only NOTIFY wakes a worker


async def probe_notify(sched, name: str) -> None:
    """Two jobs added one after the other to idle workers. The first may be picked up by
    a wake-up left over from the reconnect; the second only by its NOTIFY."""
    for n in (1, 2):
        job_id = await sched.schedule("record", args=(f"{name}-{n}",), job_id=f"{name}-{n}")
        await wait_until(lambda j=job_id: job_if(sched, j, "completed"), timeout=20,
                         what=f"{job_id} picked up by NOTIFY (poll is {NEVER_POLL}s)")


async def test_postgres_restarts_under_busy_and_idle_workers(cluster, cluster_sched, schema,
                                                             workers, tmp_path):
    sched = cluster_sched
    dsn = cluster.app_dsn()
    config = fault_config(tmp_path, dsn, schema, concurrency=1, poll_seconds=NEVER_POLL)
    env = audit_env(dsn, schema)
    release, do_release = release_file(tmp_path)
    crew = [workers(config, env=env) for _ in range(3)]
    await wait_until(lambda: _registered(sched, 3), what="three workers registered")
    # One job whose body needs the database (it waits for it to come back), one whose
    # body does not (it finishes during the outage and its outcome must wait).
    await sched.schedule("hold", args=("hold", release), job_id="hold")
    await sched.schedule("sleep", args=(1,), job_id="sleep")
    await wait_until(lambda: at_least(sched, "running", 2), what="two workers busy, one idle")

    # 1. A clean stop (every connection dropped) with jobs in flight, for longer than a
    #    lease.
    cluster.stop("fast")
    await wait_until(lambda: all(log_events(w, "db_unavailable") for w in crew),
                     what="every worker to notice the outage")
    do_release()
    await asyncio.sleep(4)  # the outage itself: longer than the 3 s lease
    cluster.start()
    await sched.store.pool.check()
    await wait_until(lambda: all(log_events(w, "listener_reconnected") for w in crew),
                     what="every listener to reconnect")
    for job_id in ("hold", "sleep"):
        await wait_until(lambda j=job_id: job_if(sched, j, "completed"), timeout=30,
                         what=f"{job_id} completed, or recovered and rerun")
    await probe_notify(sched, "after-stop")

    # 2. A crash (immediate stop: no shutdown, crash recovery at start) while all idle.
    before = [len(log_events(w, "listener_reconnected")) for w in crew]
    cluster.stop("immediate")
    cluster.start()
    await sched.store.pool.check()
    await wait_until(lambda: all(len(log_events(w, "listener_reconnected")) > n
                                 for w, n in zip(crew, before, strict=True)),
                     what="every listener to reconnect after the crash")
    await probe_notify(sched, "after-crash")

    assert alive(crew), [w.log()[-2000:] for w in crew if w.proc.poll() is not None]
    audited = [j for j in await jobs(sched) if j["task"] != "sleep"]
    result = check_each_completed_once(audited, await audit(sched))
    print(f"restart: {len(result.reruns)} of the in-flight jobs were recovered and rerun")
    for w in crew:
        w.signal(signal.SIGTERM)
    assert [await w.wait() for w in crew] == [0, 0, 0]
    for w in crew:
        assert cluster.app_password not in w.log()
        assert_json_lines(w)


async def _registered(sched, n):
    return len(await query(sched, "SELECT id FROM {schema}.workers")) >= n


async def test_terminated_connections_are_replaced(sched, pg_dsn, schema, workers, tmp_path):
    app = "pgsched-worker"  # the application_name of every worker connection
    config = fault_config(tmp_path, pg_dsn, schema, poll_seconds=NEVER_POLL)
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    worker = workers(config, env=env)
    listener = await wait_until(lambda: _listener(sched, app), what="the LISTEN connection")
    await sched.schedule("hold", args=("first", release), job_id="first")
    await wait_until(lambda: at_least(sched, "running", 1), what="a job in flight")

    # 1. Only the LISTEN connection.
    await query(sched, "SELECT pg_terminate_backend(%s)", [listener])
    await worker.wait_for_log('"listener_reconnected"')
    assert await wait_until(lambda: _listener(sched, app), what="LISTEN again") != listener
    await probe_notify(sched, "after-listener-killed")

    # 2. Every connection of the worker, with a job in flight.
    outages = len(log_events(worker, "db_unavailable"))
    killed = await query(sched, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = %s", [app])
    assert len(killed) >= 2  # the pool's connections and the listener
    do_release()
    await wait_until(lambda: job_if(sched, "first", "completed"),
                     what="the in-flight job completed")
    await wait_until(lambda: len(log_events(worker, "db_unavailable")) > outages,
                     what="the worker to log the lost connections")
    await wait_until(lambda: _listener(sched, app), what="LISTEN again")
    await probe_notify(sched, "after-all-killed")

    assert alive([worker])
    check_each_completed_once(await jobs(sched), await audit(sched))
    first = await sched.store.get_job("first")
    assert first["attempts"] == 1  # the outcome was recorded through a new connection
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


async def _listener(sched, app):
    rows = [b for b in await backends(sched, app) if b["query"].startswith("LISTEN")]
    return rows[0]["pid"] if rows else None
