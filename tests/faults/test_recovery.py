"""Fault 6: recovery is never blocked, by busy slots or by a reused host and pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import wait_until

from pgsched import JobSpec

from .kit import (
    at_least,
    audit,
    audit_env,
    check_each_completed_once,
    fault_config,
    jobs,
    lease_expiries,
    pid_of,
    query,
    release_file,
)


async def test_orphans_are_recovered_while_every_slot_is_busy(sched, pg_dsn, schema, workers,
                                                              tmp_path):
    env = audit_env(pg_dsn, schema)
    orphans_release, release_orphans = release_file(tmp_path, "orphans")
    blockers_release, release_blockers = release_file(tmp_path, "blockers")
    await sched.schedule_bulk([JobSpec("hold", args=(f"o{i}", orphans_release), job_id=f"o{i}")
                               for i in range(2)])
    doomed = workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2), env=env)
    await wait_until(lambda: _running(sched, ["o0", "o1"]), what="the doomed worker busy")
    await sched.schedule_bulk([JobSpec("hold", args=(f"b{i}", blockers_release),
                                       job_id=f"b{i}") for i in range(2)])
    busy_config = fault_config(tmp_path, pg_dsn, schema, concurrency=1)
    crew = [workers(busy_config, env=env) for _ in range(2)]
    blockers = await wait_until(lambda: _running(sched, ["b0", "b1"]),
                                what="every slot of the other workers busy")
    assert {pid_of(b["worker_id"]) for b in blockers} == {w.pid for w in crew}

    doomed.signal(signal.SIGKILL)
    await wait_until(lambda: _recovered(sched, ["o0", "o1"]), timeout=30,
                     what="orphans recovered while no worker has a free slot")
    assert await _running(sched, ["b0", "b1"]), "the blockers were still running"

    release_orphans()
    release_blockers()
    await wait_until(lambda: at_least(sched, "completed", 4), what="everything completed")
    check_each_completed_once(await jobs(sched), await audit(sched))
    for w in crew:
        w.signal(signal.SIGTERM)
        assert await w.wait() == 0


async def _running(sched, ids):
    rows = await query(sched, "SELECT * FROM {schema}.jobs WHERE id = ANY(%s) "
                              "AND status = 'running'", [ids])
    return rows if len(rows) == len(ids) else None


async def _recovered(sched, ids):
    rows = await query(sched, "SELECT * FROM {schema}.jobs WHERE id = ANY(%s)", [ids])
    return len(rows) == len(ids) and all(lease_expiries(row) == 1 for row in rows)


UNSHARE = ["unshare", "--pid", "--fork", "--kill-child"]


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --pid` (root or user "
                    "namespaces) to run two workers with the same pid")
async def test_a_worker_restarted_under_the_same_host_and_pid_inherits_nothing(
        sched, pg_dsn, schema, workers, tmp_path):
    """Each worker runs as pid 1 of its own pid namespace, like a container restarted on
    the same host: the previous life's leases are still in the table under a worker id
    with the same host and pid."""
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    config = fault_config(tmp_path, pg_dsn, schema, concurrency=2)
    await sched.schedule_bulk([JobSpec("hold", args=(f"h{i}", release), job_id=f"h{i}")
                               for i in range(2)])
    first = workers(config, env=env, prefix=UNSHARE)
    before = await wait_until(lambda: _running(sched, ["h0", "h1"]), what="first life busy")
    first.signal(signal.SIGKILL)  # unshare --kill-child takes the worker down with it
    await first.wait()

    second = workers(config, env=env, prefix=UNSHARE)
    old_id = before[0]["worker_id"]
    new_id = await wait_until(lambda: _other_worker(sched, old_id), what="second life up")
    assert pid_of(old_id) == pid_of(new_id) == 1
    assert old_id.rsplit(":", 1)[0] == new_id.rsplit(":", 1)[0]  # same host and pid

    # The new life does not renew the old leases: they expire and are recovered, and it
    # runs them one at a time (a shared crash: suspects).
    after = await wait_until(lambda: _running_attempt(sched, ["h0", "h1"], 2, any_of=True),
                             timeout=30, what="a job recovered and claimed by the second life")
    assert {r["worker_id"] for r in after} == {new_id}
    do_release()
    await wait_until(lambda: at_least(sched, "completed", 2), what="jobs completed")
    rows = await jobs(sched)
    assert all(lease_expiries(r) == 1 and r["worker_id"] == new_id for r in rows)
    assert sum(r["recoveries"] for r in rows) == 0  # one crash of two jobs: counted none
    assert all(old_id in str(r["errors"]) for r in rows)
    check_each_completed_once(rows, await audit(sched))
    # unshare does not forward signals: stop the worker inside, which takes unshare along.
    inner = Path(f"/proc/{second.pid}/task/{second.pid}/children").read_text().split()
    os.kill(int(inner[0]), signal.SIGTERM)
    assert await second.wait() == 0


async def _other_worker(sched, old_id):
    rows = await query(sched, "SELECT id FROM {schema}.workers WHERE id <> %s", [old_id])
    return rows[0]["id"] if rows else None


async def _running_attempt(sched, ids, attempt, any_of=False):
    rows = await query(sched, "SELECT * FROM {schema}.jobs WHERE id = ANY(%s) "
                              "AND status = 'running' AND attempts = %s", [ids, attempt])
    return rows if len(rows) == len(ids) or (any_of and rows) else None
