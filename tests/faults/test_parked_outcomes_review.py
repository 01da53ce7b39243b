"""Review of parked outcomes (completer._park) against real `pgsched worker` processes:
an outcome whose job row another session holds locked past lock_timeout is put aside and
looked at again with backoff. Shutdown while it is parked behind a lock that is never let
go must stay bounded, strand nothing (a fresh worker completes every job once the lock
goes) and exit 0; a second signal gives the parked outcome up (`completion_not_recorded`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from conftest import wait_until

from pgsched import Scheduler

from .kit import (
    audit,
    audit_env,
    check_each_completed_once,
    fault_config,
    jobs,
    query,
    release_file,
)


async def _status(sched: Scheduler, job_id: str) -> str:
    rows = await query(sched, "SELECT status::text FROM {schema}.jobs WHERE id = %s", [job_id])
    return rows[0]["status"]


async def _is(sched: Scheduler, job_id: str, wanted: str) -> bool:
    return await _status(sched, job_id) == wanted


@asynccontextmanager
async def _parked_behind_a_lock(sched, pg_dsn, worker,
                               tmp_path) -> AsyncIterator[psycopg.AsyncConnection]:
    """Job `locked` runs and finishes while another session holds its row locked: its
    completion fails on lock_timeout and is parked. Job `after`, finishing later, is
    recorded meanwhile. Yields the locking session (its transaction still open).
    `locked` runs until the row is locked (hold): a fixed sleep could end first on a
    loaded machine, its outcome written before the lock (no "lock timeout" then)."""
    release, do_release = release_file(tmp_path)
    await sched.schedule("hold", args=("locked", release), job_id="locked")
    await wait_until(lambda: _is(sched, "locked", "running"), what="locked running")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{sched.schema}".jobs WHERE id = %s '
                             "FOR UPDATE", ["locked"])
        do_release()
        await worker.wait_for_log("lock timeout")
        await sched.schedule("sleep_then_record", args=("after", 0.0), job_id="after")
        await wait_until(lambda: _is(sched, "after", "completed"), timeout=10,
                         what="a later outcome recorded while the lock is held")
        yield locker


async def _completed_once_by_a_fresh_worker(sched, workers, config, env) -> None:
    """The job left running by the stopped worker is completed by a fresh one (once its
    lease expired), and every job was completed once."""
    fresh = workers(config, env=env)
    await wait_until(lambda: _is(sched, "locked", "completed"), timeout=30,
                     what="the stranded job completed by a fresh worker")
    fresh.signal(signal.SIGTERM)
    assert await fresh.wait() == 0
    check_each_completed_once(await jobs(sched), await audit(sched))


async def test_sigterm_with_an_outcome_parked_behind_a_lock_never_let_go(
        sched, pg_dsn, schema, workers, tmp_path):
    env = audit_env(pg_dsn, schema)
    config = fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=1)
    worker = workers(config, env=env)
    async with _parked_behind_a_lock(sched, pg_dsn, worker, tmp_path):
        worker.signal(signal.SIGTERM)
        # grace 1 s + KILL_CLEANUP_SECONDS + SHUTDOWN_DB_SECONDS, with room for the load
        assert await worker.wait(timeout=30) == 0
        assert await _status(sched, "locked") == "running"
    await _completed_once_by_a_fresh_worker(sched, workers, config, env)


async def test_a_second_signal_gives_a_parked_outcome_up(
        sched, pg_dsn, schema, workers, tmp_path):
    env = audit_env(pg_dsn, schema)
    config = fault_config(tmp_path, pg_dsn, schema, shutdown_grace_seconds=600)
    worker = workers(config, env=env)
    async with _parked_behind_a_lock(sched, pg_dsn, worker, tmp_path):
        worker.signal(signal.SIGTERM)
        await worker.wait_for_log("signal_received")
        worker.signal(signal.SIGINT)
        assert await worker.wait(timeout=30) == 0
        assert '"completion_not_recorded"' in worker.log(), worker.log()[-3000:]
    await _completed_once_by_a_fresh_worker(sched, workers, config, env)


async def test_a_frozen_completion_behind_pgbouncer_is_abandoned_and_completed_once(
        cluster, cluster_sched, schema, pgbouncer, workers, tmp_path):
    """Through PgBouncer in transaction mode: the server process of a completion waiting
    for a row lock is frozen (SIGSTOP), then the lock goes. The worker abandons the write
    (its socket to PgBouncer shut down at the bound: NoAnswer, logged as
    db_unavailable), records later outcomes
    meanwhile, and writes the outcome again; the job is completed once, by the one run,
    and the frozen process, resumed, changes nothing (no lost lease is reported)."""
    sched = cluster_sched
    env = audit_env(cluster.app_dsn(), schema)
    config = fault_config(tmp_path, pgbouncer.dsn(), schema)
    config.write_text(config.read_text().replace(
        "[database]\n", '[database]\nprepare_threshold = "none"\n', 1))
    worker = workers(config, "--no-migrate", env=env)
    release, do_release = release_file(tmp_path)  # `locked` runs until its row is locked
    await sched.schedule("hold", args=("locked", release), job_id="locked")
    await wait_until(lambda: _is(sched, "locked", "running"), timeout=30, what="locked running")
    frozen = None
    try:
        async with (await psycopg.AsyncConnection.connect(cluster.app_dsn()) as locker,
                    await psycopg.AsyncConnection.connect(cluster.app_dsn(),
                                                          autocommit=True) as watcher):
            await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                                 ["locked"])
            do_release()
            frozen = await wait_until(lambda: _completion_backend(watcher),
                                      what="the completion waiting for the row lock")
            os.kill(frozen, signal.SIGSTOP)
            await locker.rollback()
            await sched.schedule("sleep_then_record", args=("after", 0.0), job_id="after")
            await wait_until(lambda: _is(sched, "after", "completed"), timeout=20,
                             what="a later outcome recorded behind the frozen write")
        # The rewrite takes the row once the lock went (the frozen write holds no lock of
        # its own yet): the frozen write, resumed, finds the job no longer running.
        await wait_until(lambda: _is(sched, "locked", "completed"), timeout=30,
                         what="the abandoned write's outcome written again")
        assert "no answer from the server" in worker.log(), "the abandoned write is logged"
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
    assert "job_completion_rejected" not in worker.log()
    check_each_completed_once(await jobs(sched), await audit(sched))


async def _completion_backend(conn: psycopg.AsyncConnection) -> int | None:
    cur = await conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE '%%Record successful attempts%%'")
    row = await cur.fetchone()
    return row[0] if row else None
