"""The worker core as a real `pgsched worker` process (issue 9): a busy worker sleeps,
and SIGTERM stops a worker whose database is down."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from conftest import wait_until

from .kit import at_least, fault_config, query


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_fully_busy_worker_sleeps_instead_of_spinning(sched, pg_dsn, schema, workers,
                                                            tmp_path):
    worker = workers(fault_config(tmp_path, pg_dsn, schema, concurrency=1))
    await worker.wait_for_log("worker_starting")
    await sched.schedule("sleep", args=(60,))
    await wait_until(lambda: at_least(sched, "running", 1), what="the only slot busy")
    # Due while the slot is busy: the timer the claim set for it passes unclaimable.
    await sched.schedule("noop", execution_time=datetime.now(UTC) + timedelta(seconds=1))
    await asyncio.sleep(1.5)
    before = cpu_seconds(worker.pid)
    await asyncio.sleep(3)
    used = cpu_seconds(worker.pid) - before
    print(f"busy worker: {used:.2f} s of CPU in 3 s")
    # A spinning fetcher takes a whole core (3 s here); a sleeping worker a few ms.
    assert used < 1.0, f"the busy worker used {used:.2f} s of CPU in 3 s"


async def test_sigterm_while_postgres_is_down_stops_within_the_grace(cluster, cluster_sched,
                                                                     schema, workers, tmp_path):
    grace = 2
    worker = workers(fault_config(tmp_path, cluster.app_dsn(), schema,
                                  shutdown_grace_seconds=grace, lease_seconds=3))
    job_id = await cluster_sched.schedule("sleep", args=(600,))
    await wait_until(lambda: at_least(cluster_sched, "running", 1), what="job running")
    cluster.stop("fast")
    try:
        await worker.wait_for_log('"db_unavailable"')
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        # grace + KILL_CLEANUP_SECONDS + SHUTDOWN_DB_SECONDS, plus start-up slack.
        await worker.wait(timeout=grace + 1 + 5 + 7)
        print(f"stopped {time.monotonic() - signalled:.1f} s after SIGTERM")
    finally:
        cluster.start()
    # Nothing could be released: the job's lease expires and recovery puts it back.
    recovered = await wait_until(lambda: recover(cluster_sched), what="lease expiry")
    assert [r["id"] for r in recovered] == [job_id]
    [row] = await query(cluster_sched, "SELECT status::text FROM {schema}.jobs")
    assert row["status"] == "pending"


async def recover(sched) -> list:
    """Orphan recovery, through a pool whose connections the restart broke."""
    with contextlib.suppress(psycopg.OperationalError):
        return await sched.store.recover_orphans(max_recoveries=3)
    return []
