"""Lost wake-ups behind brief row locks, against a real PostgreSQL and a real `pgsched
worker` process that polls only every 60 s, so a job it misses shows as a timeout of a
wait well under that.

The claim locks what it takes FOR UPDATE SKIP LOCKED: a due job that another session has
locked at that moment is skipped, and the claim's next due time leaves it out too (it is
due already). A statement of pgsched's own that locks a pending job for a moment must
therefore wake the workers when it commits, or the job waits for the safety poll. Each
test here holds such a lock while the job falls due (the worker's timer claims and skips
it), then lets it go, and waits for the job to run:
- scheduling a job that depends on it (insert_waiting_job locks its dependencies), and
  refusing to (a dependency that does not exist: the locks were held all the same), and
  `retry` of such a job (lock_dependencies; the retry's own NOTIFY covers it), each also
  failing on a lock_timeout or cancelled by its caller (rolled back with its NOTIFY: the
  store wakes the workers after the rollback);
- waiting for it (mark_awaited marks the row);
and one checks that a job released by the completion of its dependency is announced. A
fenced-out snooze (the worker lost its lease) must not lock the job it no longer holds.
A REPLACE through the caller's connection that rolls back wakes nobody: the job runs at the
safety poll, as documented.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import psycopg
import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import claim_params, fast_options, wait_until, write_config
from psycopg.rows import dict_row

from pgsched import InvalidInput, Scheduler, ops
from pgsched.store import ERRORS_KEPT_FIRST, ERRORS_KEPT_LAST, channel_name
from pgsched.web.feed import ChangeFeed
from pgsched.worker.context import is_due_time
from pgsched.worker.daemon import Worker

POLL_SECONDS = 60  # the safety poll: no test here may pass by waiting for it
DEADLINE = 20.0  # well under POLL_SECONDS
LEAD_SECONDS = 2.0  # from scheduling a job to its due time: the lock is taken meanwhile


async def start_idle_worker(sched, pg_dsn, schema, tmp_path, workers, **config):
    """A worker process listening for notifications, idle, polling every 60 s."""
    workers(write_config(tmp_path, pg_dsn, schema, **{"poll_seconds": POLL_SECONDS, **config}))
    listen = f'LISTEN "{channel_name(schema)}"'
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        await wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s", [listen]
        ).fetchone()[0], timeout=60, what="the worker's LISTEN")
    warm = await sched.schedule("noop", queue=(config.get("queues") or ["default"])[0])
    await wait_until(lambda: completed(sched, warm), timeout=DEADLINE, what="a first job")


async def status_is(sched, job_id: str, status: str) -> bool:
    return str((await sched.get_job(job_id))["status"]) == status


async def completed(sched, job_id: str) -> bool:
    return await status_is(sched, job_id, "completed")


async def db_now(sched) -> datetime:
    async with sched.store.pool.connection() as conn:
        return (await (await conn.execute("SELECT now()")).fetchone())[0]


def claimable(pg_dsn: str, schema: str, job_id: str) -> bool:
    """Whether a claim would take the row now rather than skip it as locked."""
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE SKIP LOCKED',
            [job_id]).fetchone() is not None


async def until_past(sched, due: datetime) -> None:
    """Until the job has been due for a second: the worker's timer claim has run."""
    await wait_until(lambda: _past(sched, due + timedelta(seconds=1)), timeout=DEADLINE,
                     what="the due time")


async def _past(sched, at: datetime) -> bool:
    return await db_now(sched) >= at


@pytest.mark.parametrize(("how", "end"), [
    ("scheduled", "commits"), ("refused", "commits"), ("retried", "commits"),
    ("scheduled", "gives up"), ("retried", "gives up"),
    ("scheduled", "is cancelled"), ("retried", "is cancelled")])
async def test_a_job_locked_by_a_dependent_being_scheduled_runs_when_that_ends(
        sched, pg_dsn, schema, tmp_path, workers, how, end):
    await start_idle_worker(sched, pg_dsn, schema, tmp_path, workers)
    # The client and the holder's connection are opened first: opened after the due
    # time was set, they took from the LEAD_SECONDS the race is set up in, which a
    # loaded machine could use up ("the lock came after the due time").
    async with Scheduler(pg_dsn, schema=schema) as client, \
            await psycopg.AsyncConnection.connect(pg_dsn) as holder:
        due = await db_now(sched) + timedelta(seconds=LEAD_SECONDS)
        parent = await sched.schedule("noop", job_id="a-parent", execution_time=due)
        other = await sched.schedule("noop", job_id="b-other",
                                     execution_time=due + timedelta(days=1))
        if how == "retried":  # `pgsched retry` of a dependent locks its dependencies too
            await sched.schedule("noop", job_id="c-child", depends_on=[parent, other])
            assert await sched.cancel_job("c-child")
        # The dependent's statement locks its dependencies in id order: it holds a-parent while
        # it waits for b-other, which another session holds meanwhile (until after the due
        # time; or longer than the client's lock_timeout, as a task between its complete() and
        # its commit would: the statement gives up; or the client cancels it, its own deadline
        # past). A statement that fails rolls back the NOTIFY it sent.
        await holder.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE', [other])
        # (a client's lock_timeout, LOCK_TIMEOUT_SECONDS, not a worker's short one: longer
        # than LEAD_SECONDS; a refused dependent, one of whose dependencies does not exist,
        # held the same locks)
        locking = asyncio.create_task(
            ops.retry_jobs(client.store, ["c-child"]) if how == "retried"
            else client.schedule("noop", job_id="c-child", depends_on=[
                parent, other, *(["z-ghost"] if how == "refused" else [])]))
        await wait_until(lambda: not claimable(pg_dsn, schema, parent), timeout=DEADLINE,
                         what="the dependent's statement to lock its dependency")
        assert await db_now(sched) < due, "the lock came after the due time: no race made"
        await until_past(sched, due)
        assert not locking.done(), "the statement ended before the due time: no race made"
        if end == "commits":
            await holder.commit()
        elif end == "is cancelled":
            locking.cancel()
        error = {"gives up": psycopg.errors.LockNotAvailable,
                 "is cancelled": asyncio.CancelledError}.get(
            end, InvalidInput if how == "refused" else None)
        if error is None:
            await locking
        else:
            with pytest.raises(error):
                await locking
    if end != "commits":  # rolled back: nothing written
        child = await sched.get_job("c-child")
        assert child is None if how == "scheduled" else str(child["status"]) == "cancelled"
    await wait_until(lambda: completed(sched, parent), timeout=DEADLINE,
                     what=f"the dependency, locked as it fell due by a statement that {end}, "
                     "to run")


async def test_a_job_locked_by_a_wait_as_it_falls_due_runs_when_that_commits(
        sched, pg_dsn, schema, tmp_path, workers):
    await start_idle_worker(sched, pg_dsn, schema, tmp_path, workers)
    due = await db_now(sched) + timedelta(seconds=LEAD_SECONDS)
    job = await sched.schedule("noop", execution_time=due)
    # Scheduler.wait's statement, held open past the due time as a slow one would be.
    with psycopg.connect(pg_dsn) as waiter:
        waiter.execute(sched.store._q["mark_awaited"],
                       {"id": job, "channel": channel_name(schema)})
        assert await db_now(sched) < due, "the lock came after the due time: no race made"
        await until_past(sched, due)
        assert not claimable(pg_dsn, schema, job)
        waiter.commit()
    await wait_until(lambda: completed(sched, job), timeout=DEADLINE,
                     what="the awaited job, locked as it fell due, to run")


async def test_a_job_scheduled_right_before_a_dependent_runs_at_once(
        sched, pg_dsn, schema, tmp_path, workers):
    # The race as users meet it: the worker claims on the first job's notification while
    # the second job's insert holds the first locked.
    await start_idle_worker(sched, pg_dsn, schema, tmp_path, workers)
    for _ in range(3):
        parent = await sched.schedule("noop")
        child = await sched.schedule("noop", depends_on=[parent])
        await wait_until(lambda job=child: completed(sched, job), timeout=DEADLINE,
                         what="a dependency scheduled just before its dependent to run")


async def test_a_dependent_released_by_a_completion_wakes_an_idle_worker(
        sched, pg_dsn, schema, tmp_path, workers):
    await start_idle_worker(sched, pg_dsn, schema, tmp_path, workers)
    parent = await sched.schedule("sleep", args=(1.0,))
    await wait_until(lambda: status_is(sched, parent, "running"), timeout=DEADLINE,
                     what="the dependency to start")
    child = await sched.schedule("noop", depends_on=[parent])
    await wait_until(lambda: completed(sched, child), timeout=DEADLINE,
                     what="the released dependent to run")


async def test_a_snooze_of_a_lost_attempt_leaves_the_job_unlocked(sched, pg_dsn, schema):
    # A worker that lost its lease snoozes its attempt while the job, pending again, is due:
    # the fenced write changes nothing, and must not hold the row a claim would take.
    job = await sched.schedule("noop")
    claimed, _, _ = await sched.store.claim_jobs(worker_id="lost", limit=1, lease_seconds=30)
    assert [j["id"] for j in claimed] == [job]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # recovered by another worker
        conn.execute(f'UPDATE "{schema}".jobs SET status = \'pending\', worker_id = NULL '
                     "WHERE id = %s", [job])
    with psycopg.connect(pg_dsn) as snoozing:
        params = {"worker_id": "lost", "id": job, "attempt": claimed[0]["attempts"],
                  "delay_seconds": 1.0, "max_snoozes": 5,
                  "errors_first": ERRORS_KEPT_FIRST, "errors_last": ERRORS_KEPT_LAST}
        assert snoozing.execute(sched.store._q["snooze_job"], params).fetchall() == []
        assert claimable(pg_dsn, schema, job), "the fenced-out snooze holds the job locked"


@pytest.mark.parametrize("served", [["q1", "q2"], ["q2"], None])
async def test_a_job_another_claim_locked_and_let_go_runs_at_once(
        sched, pg_dsn, schema, tmp_path, workers, served):
    """A claim from several queues locks up to its limit in each and lets the surplus go
    at its commit: it must wake the workers then (let_go), or a worker that skipped a
    let-go row meanwhile sleeps with it due. A worker of both queues, of the one let go
    (q2) and of every queue (the flat walk skips it all the same)."""
    await start_idle_worker(sched, pg_dsn, schema, tmp_path, workers, concurrency=1,
                            **({} if served is None else {"queues": served}))
    # Busy until the other claim is open (the file busy-1): a fixed sleep (3 s) could end
    # first on a loaded machine, the worker idle before the race is set up.
    busy = await sched.schedule("hold_attempt", args=(str(tmp_path / "busy-"),), queue="q2")
    await wait_until(lambda: status_is(sched, busy, "running"), timeout=DEADLINE,
                     what="the worker to be busy")
    first = await sched.schedule("noop", queue="q1", job_id="j1")
    second = await sched.schedule("noop", queue="q2", job_id="j2")
    # Another worker's claim of one job from both queues, held open: it takes j1 and holds
    # j2 as well until it commits.
    async with await psycopg.AsyncConnection.connect(pg_dsn) as other:
        cur = other.cursor(row_factory=dict_row)
        await cur.execute(sched.store._q["claim_jobs_unlimited"], claim_params(
            worker_id="other", limit=1, lease_seconds=30, queues=["q1", "q2"],
            limit_recheck_seconds=1.0, channel=sched.store.channel))
        assert [r["id"] for r in await cur.fetchall()] == [first]
        assert not claimable(pg_dsn, schema, first) and not claimable(pg_dsn, schema, second)
        assert await status_is(sched, busy, "running"), "the worker was idle: no race made"
        # The busy job ends; the worker claims with its slot free and skips j2.
        (tmp_path / "busy-1").touch()
        await wait_until(lambda: completed(sched, busy), timeout=DEADLINE,
                         what="the busy job to end")
        await asyncio.sleep(1.0)
        await other.commit()
    await wait_until(lambda: status_is(sched, second, "completed"), timeout=DEADLINE,
                     what="the job another claim let go to run")


@pytest.mark.parametrize("statement", ["claim_jobs_unlimited", "claim_jobs"])
async def test_only_a_claim_that_lets_rows_go_wakes_the_workers(sched, pg_dsn, statement):
    """The wake-up of a claim that locked more than it took (let_go) must not come from
    every claim, or each claim of an idle fleet wakes every worker again (the herd): a
    claim of one job from two queues notifies only when both have one due. The same with
    a global limit on q2 (claim_jobs: claim_room gives q2 room for its one job)."""
    if statement == "claim_jobs":
        await sched.store.set_queue_limits("q2", global_concurrency=5, set_concurrency=True)

    async def notifications(queues: list[str]) -> list[str]:
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as ear:
            await ear.execute(f'LISTEN "{sched.store.channel}"')
            async with await psycopg.AsyncConnection.connect(pg_dsn) as claimer:
                await claimer.execute(sched.store._q[statement], claim_params(
                    limit=1, lease_seconds=30, queues=queues, limit_recheck_seconds=1.0,
                    channel=sched.store.channel))
                await claimer.commit()
            heard = []
            async for notify in ear.notifies(timeout=0.5):
                heard.append(notify.payload)
            return heard

    await sched.schedule("noop", queue="q1")
    await sched.schedule("noop", queue="q1")
    assert await notifications(["q1", "q2"]) == []  # one queue: its walk stops at one
    await sched.schedule("noop", queue="q2")
    # two locked, one taken: q1's, scheduled first; the wake-up names the queue let go
    assert await notifications(["q1", "q2"]) == ["let_go:q2"]


def due_in_q1_and_q2(pg_dsn: str, schema: str) -> None:
    """Ten due jobs in each of q1 and q2, added by SQL (no NOTIFY of their own)."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, queue, execution_time) '
            "SELECT q || g, 'noop', q, now() - interval '1 minute' "
            "FROM generate_series(1, 10) g, unnest(ARRAY['q1', 'q2']) q")


async def let_go(sched, pg_dsn: str, claims: int) -> None:
    """Claims of one job from q1 and q2, each committed, each locking one of each and
    letting one go (due_in_q1_and_q2)."""
    async with await psycopg.AsyncConnection.connect(pg_dsn) as claimer:
        for _ in range(claims):
            cur = claimer.cursor(row_factory=dict_row)
            await cur.execute(sched.store._q["claim_jobs_unlimited"], claim_params(
                limit=1, lease_seconds=30, queues=["q1", "q2"], limit_recheck_seconds=1.0,
                channel=sched.store.channel))
            assert (await cur.fetchone())["let_go"] is not None
            await claimer.commit()


async def test_a_let_go_does_not_wake_a_worker_held_at_the_queue_s_cap(sched, pg_dsn, schema):
    """A worker of the queue let go that runs as many of its jobs as its per-queue cap
    allows ([queues.q2] concurrency) would claim nothing of it either: woken, it claimed
    empty at every let-go of a backlog others drain. The job that ends frees the claim
    (a freed slot wakes a worker held at a cap)."""
    worker = Worker(sched.store, pg_dsn, fast_options(
        queues=("q2",), queue_concurrency={"q2": 1}, poll_seconds=60,
        shutdown_grace_seconds=0.1))
    runner = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.ready.is_set() and worker.listening,
                         what="the worker ready")
        busy = await sched.schedule("sleep", args=(30.0,), queue="q2")
        await wait_until(lambda: status_is(sched, busy, "running"), timeout=DEADLINE,
                         what="the worker's q2 slot busy")
        due_in_q1_and_q2(pg_dsn, schema)
        await asyncio.sleep(0.5)
        before = worker.stats.claims
        await let_go(sched, pg_dsn, 8)
        await asyncio.sleep(1.0)  # the notifications arrive
        assert worker.stats.claims - before == 0
    finally:
        worker.stop()
        await asyncio.wait_for(runner, 30)


class CountedFeed(ChangeFeed):
    """The dashboard's change feed, counting its looks at the database."""
    looks = 0

    async def look(self, conn) -> None:
        self.looks += 1
        await super().look(conn)


async def test_a_let_go_does_not_make_the_dashboard_look(sched, pg_dsn, schema):
    """The dashboard's change feed (web/feed.py) looks at the database at every
    notification on the channel (enqueues, resumes, cancels), else every `interval`: a
    let-go, sent by nearly every claim of a backlog of several queues, made it look at
    every claim (2 queries, and a second of changes read again each time) where it looked
    every interval. The jobs a claim started are seen at the next interval, as any start."""
    due_in_q1_and_q2(pg_dsn, schema)
    feed = CountedFeed(store=sched.store, dsn=pg_dsn, interval=60)
    feed.start()
    try:
        await wait_until(lambda: feed.looks >= 1, what="the feed's first look")
        await asyncio.sleep(0.3)
        before = feed.looks
        await let_go(sched, pg_dsn, 8)
        await asyncio.sleep(1.0)  # the notifications arrive
        assert feed.looks - before == 0
    finally:
        await feed.stop()


async def test_a_let_go_of_more_queues_than_a_payload_holds_wakes_every_worker(
        sched, pg_dsn, schema):
    """The queues a claim let go are named in the NOTIFY payload, which holds 8,000 bytes:
    a claim that let the rows of 89 queues of long names go (9,000 bytes of names) must not
    fail ('payload string too long' would fail every claim of that worker), and wakes every
    worker with a due time instead."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, queue, execution_time) '
            "SELECT 'j' || g, 'noop', lpad(g::text, 100, 'q'), now() - interval '1 minute' "
            "FROM generate_series(1, 90) g")
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as ear:
        await ear.execute(f'LISTEN "{sched.store.channel}"')
        claimed, _, _ = await sched.store.claim_jobs(
            worker_id="w", limit=1, lease_seconds=30, queues=None, capped=(["q"], [1]))
        assert len(claimed) == 1
        heard = [n.payload async for n in ear.notifies(timeout=0.5)]
    assert len(heard) == 1 and is_due_time(heard[0]), heard


async def test_a_let_go_wakes_only_the_workers_of_the_queues_it_let_go(sched, pg_dsn, schema):
    """A backlog of two queues drained by a worker of both, one job a claim (a slot freed
    at a time), lets a row go at every claim: the wake-up must reach only the workers that
    could claim it. Sent to all, a worker of another queue claimed on each, finding
    nothing (measured with real worker processes: each idle worker of q3 ran about 630
    empty claims while one of q1 and q2 with two slots drained 3,000 jobs; 3 before the
    let-go wake-up). A worker of every queue, or of the queue let go, is still woken."""
    due_in_q1_and_q2(pg_dsn, schema)
    claims = 8
    others = [Worker(sched.store, pg_dsn, fast_options(queues=queues, poll_seconds=60))
              for queues in (("q3",), ("q3", "q4"))]
    runners = [asyncio.create_task(w.run()) for w in others]
    try:
        await wait_until(lambda: all(w.ready.is_set() and w.listening for w in others),
                         what="the workers of q3 ready")
        # The claim a (re)connected listener asks for may come just after `listening`.
        await asyncio.sleep(0.5)
        before = [w.stats.claims for w in others]
        await let_go(sched, pg_dsn, claims)
        await asyncio.sleep(1.0)  # the notifications arrive
        woken = [w.stats.claims - b for w, b in zip(others, before, strict=True)]
        assert woken == [0, 0], f"workers of q3 claimed {woken} times on {claims} let-gos"
    finally:
        for w in others:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*runners), 30)


async def test_a_job_a_rolled_back_transactional_replace_held_runs_at_the_next_poll(
        sched, pg_dsn, schema, tmp_path, workers):
    """A REPLACE through the caller's connection holds the pending job it overwrites until
    the caller's transaction ends, and a rollback drops its NOTIFY: pgsched runs nothing
    at the caller's rollback. The documented bound (docs/delivery.md, "Wake-ups behind row
    locks", as for the application's own locks): the job runs at the worker's next
    wake-up, at the latest its safety poll. A claim that looked again soon after skipping
    a locked due row would also look again after every claim race of an idle fleet,
    doubling its empty claims."""
    poll = 3.0
    await start_idle_worker(sched, pg_dsn, schema, tmp_path, workers, poll_seconds=poll)
    due = await db_now(sched) + timedelta(seconds=LEAD_SECONDS)
    job = await sched.schedule("noop", job_id="replaced", execution_time=due)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as caller:
        assert await sched.schedule("noop", job_id=job, execution_time=due,
                                    conflict_resolution="replace", connection=caller) == job
        assert await db_now(sched) < due, "the lock came after the due time: no race made"
        await until_past(sched, due)
        assert not claimable(pg_dsn, schema, job)
        await caller.rollback()
    await wait_until(lambda: completed(sched, job), timeout=poll + 2.0,
                     what="the job a rolled-back REPLACE held as it fell due to run")
