"""Fault: statements that take longer than a lease (a slow trigger standing in for a
planner or metrics query at size, a completion stuck on a busy server).

- Every pooled connection of a worker busy for longer than a lease: heartbeats have a
  connection of their own, so the worker keeps renewing its running job's lease and no
  other worker recovers it.
- The heartbeat connection killed (pg_terminate_backend) again and again, or the
  worker's registry row locked: the heartbeater reconnects, renews, and keeps its job.
- The registry row and the job's row both locked for longer than a lease, then let go
  at once: an idle worker could recover the job at the unlock, before the live worker's
  next beat (issue seen in review); the worker keeps it.
- A claim slower than the worker pool's statement_timeout (half a lease) is cancelled
  by the server; the worker logs it, backs off, claims again and carries on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import WorkerProcess, wait_until

from pgsched.store import connect

from .kit import (
    audit,
    audit_env,
    check_each_completed_once,
    fault_config,
    job_if,
    jobs,
    query,
    release_file,
)

LEASE_SECONDS = 3
BLOCK_SECONDS = 3 * LEASE_SECONDS  # how long a slow statement would take


async def make_status_changes_slow(sched) -> None:
    """Until the test deletes the row of `slow_while`, job `slow-<status>` takes
    BLOCK_SECONDS to move to that status: the claim of `slow-running` holds the fetcher's
    connection, the completion of `slow-completed` the completer's."""
    schema = f'"{sched.schema}"'
    async with sched.store.pool.connection() as conn:
        await conn.execute(f"""
            CREATE TABLE {schema}.slow_while (x int);
            INSERT INTO {schema}.slow_while VALUES (1);
            CREATE FUNCTION {schema}.slow_for_test() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.id = 'slow-' || NEW.status AND OLD.status IS DISTINCT FROM NEW.status
                   AND EXISTS (SELECT 1 FROM {schema}.slow_while) THEN
                    PERFORM pg_sleep({BLOCK_SECONDS});
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER slow_for_test BEFORE UPDATE ON {schema}.jobs
                FOR EACH ROW EXECUTE FUNCTION {schema}.slow_for_test();""")


async def stop_slowing(sched) -> None:
    async with sched.store.pool.connection() as conn:
        await conn.execute(f'DELETE FROM "{sched.schema}".slow_while')


async def _sleeping_backends(sched, at_least: int = 1) -> bool:
    """Whether at least this many worker statements are stuck in the slow trigger."""
    rows = await query(sched, "SELECT count(*) AS n FROM pg_stat_activity "
                              "WHERE wait_event = 'PgSleep' AND application_name = "
                              "'pgsched-worker'")
    return rows[0]["n"] >= at_least


def _small_pool_config(tmp_path, pg_dsn, schema):
    config = fault_config(tmp_path, pg_dsn, schema, lease_seconds=LEASE_SECONDS)
    config.write_text(config.read_text().replace(
        f'schema = "{schema}"', f'schema = "{schema}"\npool_size = 2'))
    return config


@dataclass
class HeldJob:
    """Job `held`, running in the worker `busy` (pool_size = 2) until release()."""

    config: Path
    env: dict[str, str]
    busy: WorkerProcess
    claimed: dict[str, Any]
    release: Callable[[], None]

    async def completes_once(self, sched, *others: WorkerProcess) -> None:
        """Released, it completes on its first attempt, never recovered, and no worker
        died meanwhile."""
        self.release()
        done = await wait_until(lambda: job_if(sched, "held", "completed"), timeout=60,
                                what="the held job completed")
        assert (done["attempts"], done["recoveries"], done["worker_id"]) == \
            (1, 0, self.claimed["worker_id"]), done["errors"]
        assert all(w.proc.poll() is None for w in (self.busy, *others))


async def hold_a_job(sched, pg_dsn, schema, workers, tmp_path) -> HeldJob:
    config = _small_pool_config(tmp_path, pg_dsn, schema)
    env = audit_env(pg_dsn, schema)
    release, do_release = release_file(tmp_path)
    await sched.schedule("hold", args=("held", release), job_id="held")
    busy = workers(config, env=env)
    claimed = await wait_until(lambda: job_if(sched, "held", "running", 1), what="claim")
    return HeldJob(config, env, busy, claimed, do_release)


async def test_lease_is_renewed_while_every_pool_connection_is_busy(
        sched, pg_dsn, schema, workers, tmp_path):
    held = await hold_a_job(sched, pg_dsn, schema, workers, tmp_path)
    await make_status_changes_slow(sched)

    # pool_size = 2: a stuck completion and a stuck claim hold the whole pool.
    await sched.schedule("record", args=("slow-completed",), job_id="slow-completed")
    await wait_until(lambda: _sleeping_backends(sched), what="the completion stuck")
    await sched.schedule("record", args=("slow-running",), job_id="slow-running")
    await wait_until(lambda: _sleeping_backends(sched, 2), what="the claim stuck too")
    blocked = (await query(sched, "SELECT clock_timestamp() AS at"))[0]["at"]
    # Free to recover the held job the moment its lease lapses.
    idle = workers(held.config, env=held.env)

    await wait_until(lambda: query(
        sched, "SELECT 1 FROM {schema}.jobs WHERE id = 'held' AND status = 'running' "
               "AND attempts = 1 AND heartbeat_at > %s + make_interval(secs => %s)",
        [blocked, LEASE_SECONDS + 1]),
        timeout=BLOCK_SECONDS, what="the lease renewed while the pool was busy")
    # The slow statements are retried after each statement timeout: still there.
    await wait_until(lambda: _sleeping_backends(sched), what="the pool still busy")

    await stop_slowing(sched)
    await held.completes_once(sched, idle)
    assert check_each_completed_once(
        [j for j in await jobs(sched) if j["id"] == "held"],
        [a for a in await audit(sched) if a["key"] == "held"]).executions == 1


async def test_slow_claim_is_cut_by_the_statement_timeout_and_the_worker_carries_on(
        sched, pg_dsn, schema, workers, tmp_path):
    config = _small_pool_config(tmp_path, pg_dsn, schema)
    env = audit_env(pg_dsn, schema)
    await make_status_changes_slow(sched)
    worker = workers(config, env=env)
    await sched.schedule("record", args=("slow-running",), job_id="slow-running")

    await worker.wait_for_log("canceling statement due to statement timeout")
    assert '"where": "claim"' in worker.log()
    await stop_slowing(sched)
    done = await wait_until(lambda: job_if(sched, "slow-running", "completed"), timeout=30,
                            what="the job claimed once the claim is fast again")
    assert done["attempts"] == 1, done["errors"]
    # Still serving: a new job is claimed and run.
    await sched.schedule("record", args=("after",), job_id="after")
    await wait_until(lambda: job_if(sched, "after", "completed"), what="a later job run")
    assert worker.proc.poll() is None


async def test_leases_are_renewed_while_the_registry_row_is_locked(
        sched, pg_dsn, schema, workers, tmp_path):
    """Someone holds the worker's registry row locked for longer than a lease: the
    registry beat fails after lock_timeout each time, and the job leases are renewed
    anyway, so the job is not recovered."""
    held = await hold_a_job(sched, pg_dsn, schema, workers, tmp_path)
    idle = workers(held.config, env=held.env)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{schema}".workers WHERE id = %s FOR UPDATE',
                             [held.claimed["worker_id"]])
        locked = (await query(sched, "SELECT clock_timestamp() AS at"))[0]["at"]
        await wait_until(lambda: query(
            sched, "SELECT 1 FROM {schema}.jobs WHERE id = 'held' AND attempts = 1 "
                   "AND heartbeat_at > %s + make_interval(secs => %s)",
            [locked, LEASE_SECONDS + 1]),
            timeout=BLOCK_SECONDS, what="the lease renewed while the registry row is locked")
        await locker.rollback()
    await held.completes_once(sched, idle)


async def _registry_beat_waits(sched, waits: bool = True) -> bool:
    """Whether a worker's registry beat is waiting for a row lock (or, waits=False,
    none is)."""
    return waits == bool(await query(
        sched, "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgsched-worker' "
               "AND query LIKE '-- Mark this worker alive%%' AND wait_event_type = 'Lock'"))


@pytest.mark.parametrize("unlock", ["after_a_beat_gave_up", "while_a_beat_waits"])
async def test_job_and_registry_rows_locked_longer_than_a_lease(
        sched, pg_dsn, schema, workers, tmp_path, unlock):
    """Someone holds the worker's registry row and its job's row locked for longer than
    a lease, so neither its registry heartbeat nor the job's lease can be written, then
    lets go of both at once. The worker is alive all along: it keeps its job, however the
    unlock falls against its beats (just after a beat gave up on lock_timeout, leaving
    the worker asleep until the next; or while a beat waits for the lock), and the idle
    worker beside it never recovers it."""
    held = await hold_a_job(sched, pg_dsn, schema, workers, tmp_path)
    idle = workers(held.config, env=held.env)
    await wait_until(lambda: query(sched, "SELECT 1 FROM {schema}.workers "
                                          "WHERE id <> %s", [held.claimed["worker_id"]]),
                     what="the idle worker registered")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{schema}".workers WHERE id = %s FOR UPDATE',
                             [held.claimed["worker_id"]])
        await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                             ["held"])
        # Both the lease and the registry heartbeat are over a lease old.
        await wait_until(lambda: query(
            sched, "SELECT 1 FROM {schema}.jobs j JOIN {schema}.workers w "
                   "ON w.id = j.worker_id WHERE j.id = 'held' "
                   "AND j.lease_until < clock_timestamp() AND w.heartbeat_at < "
                   "clock_timestamp() - make_interval(secs => %s)", [LEASE_SECONDS + 0.5]),
            timeout=BLOCK_SECONDS, what="lease and registry heartbeat stale")
        await wait_until(lambda: _registry_beat_waits(sched), what="a registry beat waiting")
        if unlock == "after_a_beat_gave_up":
            await wait_until(lambda: _registry_beat_waits(sched, waits=False),
                             interval=0.01, what="the registry beat gave up")
        await locker.rollback()
    # Long enough for the idle worker's recovery to come round several times.
    await asyncio.sleep(LEASE_SECONDS)
    await held.completes_once(sched, idle)
    assert check_each_completed_once(
        [j for j in await jobs(sched) if j["id"] == "held"],
        [a for a in await audit(sched) if a["key"] == "held"]).executions == 1


async def _heartbeat_backend(sched, killed: set[int]) -> int | None:
    """The pid of the worker's heartbeat connection (the only one that writes the
    registry heartbeat or renews leases), once it is not one of those killed."""
    rows = await query(sched, "SELECT pid FROM pg_stat_activity WHERE application_name = "
                              "'pgsched-worker' AND (query LIKE '-- Mark this worker alive%%' "
                              "OR query LIKE '%%Renew the leases%%') AND pid <> ALL(%s)",
                       [list(killed)])
    return rows[0]["pid"] if len(rows) == 1 else None


async def test_heartbeat_connection_killed_again_and_again_comes_back(
        sched, pg_dsn, schema, workers, tmp_path):
    held = await hold_a_job(sched, pg_dsn, schema, workers, tmp_path)
    killed: set[int] = set()
    for _ in range(3):
        pid = await wait_until(lambda: _heartbeat_backend(sched, killed),
                               what="a new heartbeat connection")
        await query(sched, "SELECT pg_terminate_backend(%s)", [pid])
        killed.add(pid)
    idle = workers(held.config, env=held.env)  # recovers the job if its lease lapses from now on
    after = (await query(sched, "SELECT clock_timestamp() AS at"))[0]["at"]
    await wait_until(lambda: query(
        sched, "SELECT 1 FROM {schema}.jobs WHERE id = 'held' AND attempts = 1 "
               "AND heartbeat_at > %s", [after]), what="the lease renewed after the kills")
    await held.completes_once(sched, idle)


async def test_listen_connection_has_tcp_keepalives_unless_the_dsn_sets_them(pg_dsn):
    """A LISTEN connection only reads: keepalives make a silent peer fail the read."""
    given = psycopg.conninfo.make_conninfo(pg_dsn, keepalives_idle="7")
    for dsn, idle in ((pg_dsn, "30"), (given, "7")):
        conn = await connect(dsn)
        try:
            params = psycopg.conninfo.conninfo_to_dict(conn.info.dsn)
        finally:
            await conn.close()
        assert (params.get("keepalives"), params.get("keepalives_idle")) == ("1", idle), params
