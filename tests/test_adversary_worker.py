"""A second adversary's attacks on the worker core (issue 9's review): a connection lost
between the writes of one completion batch, and a claim of an (id, attempt) this worker
still runs a stale copy of. Against a real PostgreSQL and the real in-process Worker;
timing is controlled by holding back the real store's answers, never by a fake database.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import wait_until
from test_worker_core import ended, sql, start, stop

from pgsched import Scheduler, Worker, task
from pgsched.store import Store, open_pool


@task
async def adv_hold_then_return(value: str, release: str) -> str:
    while not Path(release).exists():
        await asyncio.sleep(0.02)
    return value


class CutBetweenWrites(Store):
    """The real store on a pool of its own (so its backends can be told apart). The first
    complete_jobs answer is held until two more outcomes wait (the next batch then holds
    a success and a failure); the first fail_job finds its connection terminated by the
    server, after that batch's successes were committed."""

    def __init__(self, pool: Any, schema: str, app: str):
        super().__init__(pool, schema)
        self.app = app
        self.worker: Worker | None = None
        self.complete_calls = 0
        self.cut = False

    async def complete_jobs(self, **kwargs: Any) -> Any:
        self.complete_calls += 1
        written = await super().complete_jobs(**kwargs)
        if self.complete_calls == 1:
            assert self.worker is not None
            ctx = self.worker.ctx
            await wait_until(lambda: ctx.completions.qsize() == 2, what="two outcomes waiting")
        return written

    async def fail_job(self, **kwargs: Any) -> Any:
        if not self.cut:
            self.cut = True
            async with self.pool.connection() as conn:
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE application_name = %s AND pid <> pg_backend_pid()",
                                   [self.app])
            await asyncio.sleep(0.2)  # the server closes them
        return await super().fail_job(**kwargs)


async def test_successes_written_before_a_lost_connection_are_not_written_again(
        sched: Scheduler, pg_dsn: str):
    app = f"adv-{uuid.uuid4().hex[:8]}"
    pool = await open_pool(pg_dsn, application_name=app)
    store = CutBetweenWrites(pool, sched.schema, app)
    worker, runner = await start(sched, store, concurrency=4)
    store.worker = worker
    try:
        first = await sched.schedule("add", args=(1, 1))
        await wait_until(lambda: store.complete_calls == 1, what="the first write held")
        good = await sched.schedule("add", args=(2, 2))
        bad = await sched.schedule("fail", args=("boom",))
        for job_id in (first, good, bad):
            await wait_until(lambda j=job_id: ended(sched, j), what=f"{job_id} recorded")
        assert store.cut and store.complete_calls >= 2
        assert (await sched.get_job(good))["result"] == 4
        assert str((await sched.get_job(bad))["status"]) == "failed"
        await wait_until(lambda: worker.stats.failed == 1, what="the failure counted")
        # The success committed before the cut is not written again, so it is neither
        # rejected nor counted as a lost lease.
        assert (worker.stats.completed, worker.stats.lease_lost) == (2, 0), worker.stats
    finally:
        await stop(worker, runner)
        await pool.close()


async def test_stale_run_of_a_readded_job_neither_writes_its_outcome_nor_drops_the_new_run(
        sched: Scheduler, tmp_path: Path):
    """A job deleted while a stale run of it went on here (recovered, finished elsewhere
    and vacuumed, or deleted by hand) and added again with the same id: its new claim
    here has the same (id, attempt). The stale run must not record its result as the new
    job's, nor remove the new run's entry (which would stop its heartbeats)."""
    worker, runner = await start(sched, lease_seconds=20.0, heartbeat_seconds=5.0)
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    try:
        job_id = await sched.schedule("adv_hold_then_return", args=("stale", str(stale)),
                                      job_id="readded")
        await wait_until(lambda: worker.running_jobs == 1, what="the first run")
        # Between two heartbeats (5 s apart), so that no beat notices the deletion.
        await sql(sched, "DELETE FROM {schema}.jobs WHERE id = %s", [job_id])
        await sched.schedule("adv_hold_then_return", args=("fresh", str(fresh)),
                             job_id="readded")
        await wait_until(lambda: sql(sched, "SELECT 1 FROM {schema}.jobs WHERE id = %s "
                                            "AND status = 'running'", [job_id]),
                         what="the same (id, attempt) claimed again here")
        stale.touch()  # the stale run ends (or was already stopped)
        await asyncio.sleep(0.5)
        [(status, result)] = await sql(sched, "SELECT status::text, result FROM {schema}.jobs "
                                              "WHERE id = %s", [job_id])
        assert (status, result) == ("running", None), "the stale run's outcome was recorded"
        assert [h.key for h in worker.ctx.held.values()] == [(job_id, 1)]
        fresh.touch()
        row = await wait_until(lambda: ended(sched, job_id), what="the new run recorded")
        assert (str(row["status"]), row["result"]) == ("completed", "fresh")
        assert not worker.ctx.held
    finally:
        stale.touch()
        fresh.touch()
        await stop(worker, runner)
