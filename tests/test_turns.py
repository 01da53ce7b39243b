"""Workers take turns to claim for a notification (worker/turns.py): issue 14's thundering
herd. The turn logic is pure and tested on its own; the fleet tests run real in-process
workers against the real database, with the safety poll far away (60 s), so a job left
behind shows as a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import fast_options, wait_until

from pgsched.worker.daemon import Worker
from pgsched.worker.turns import (
    HISTORY,
    TURN_STEP_MAX_SECONDS,
    TURN_STEP_SECONDS,
    Turns,
    group_key,
    parse_took,
    took_payload,
)

POLL_SECONDS = 60


# The turn logic.

def test_the_peers_of_a_notification_take_every_turn_once():
    ids = [f"w{i}" for i in range(7)]
    for payload in ("1764500000.1", "1764500000.25", "x"):
        ranks = []
        for me in ids:
            turns = Turns(me, None)
            turns.set_peers(list(reversed(ids)))
            ranks.append(turns.rank(payload))
        assert sorted(ranks) == list(range(7)), (payload, ranks)
    # The first turn moves with the notification: not always the same worker.
    first = {min(ids, key=lambda me: _rank(me, ids, str(p))) for p in range(50)}
    assert len(first) > 3


def _rank(me: str, ids: list[str], payload: str) -> int:
    turns = Turns(me, None)
    turns.set_peers(ids)
    return turns.rank(payload)


def test_a_worker_missing_from_its_peer_list_counts_itself_in():
    turns = Turns("w9", None)
    turns.set_peers(["w1", "w2"])
    assert turns.peers == ["w1", "w2", "w9"]
    turns.set_peers(None)
    assert turns.peers == ["w9"] and turns.rank("1.5") == 0


def test_a_took_covers_what_was_heard_up_to_its_payload_and_due_by_its_time():
    turns = Turns("me", None)
    turns.hear("10.0", 10.0, 100.0)
    turns.hear("11.0", 11.0, 101.0)
    turns.hear("50.0", 50.0, 140.0)  # a job due later
    turns.hear("12.0", 12.0, 102.0)  # heard after the payload the took names
    assert turns.covered_by("11.0", db_now=20.0) == 2
    assert [e[1] for e in turns.entries] == [50.0, 12.0]
    assert turns.next_turn() == 102.0


def test_a_payload_heard_twice_covers_only_up_to_its_first_hearing():
    """Two notifications may carry the same due time: the peer cannot tell which one the
    claimer heard, and must not drop the later one's turn (its job may be newer than the
    claim's snapshot)."""
    turns = Turns("me", None)
    turns.hear("10.0", 10.0, 100.0)
    turns.hear("11.0", 11.0, 101.0)
    turns.hear("10.0", 10.0, 102.0)
    assert turns.covered_by("10.0", db_now=20.0) == 1
    assert [e[0] for e in turns.entries] == [2, 3]


def test_a_payload_never_heard_covers_nothing():
    turns = Turns("me", None)
    turns.hear("10.0", 10.0, 100.0)
    assert turns.covered_by("9.0", db_now=20.0) == 0
    assert len(turns.entries) == 1


def test_a_turn_owed_for_a_job_a_claim_saw_is_settled_by_any_claim_once_it_is_due():
    """A job due later that a claim saw pending (handed on in a took:, or this worker's
    own claim's next due time) is settled by any claim at or after its due time: that
    claim began after the job was seen, whatever it heard. Owed once per due time."""
    turns = Turns("me", None)
    turns.owe(30.0, 120.0)
    turns.owe(30.0, 121.0)
    turns.hear("10.0", 10.0, 100.0)
    assert turns.covered_by("10.0", db_now=29.0) == 1
    assert turns.entries == [(0, 30.0, 120.0)]
    turns.hear("11.0", 11.0, 101.0)
    assert turns.covered_by("10.0", db_now=30.0) == 1  # heard "11.0" is not covered
    assert [e[1] for e in turns.entries] == [11.0]


def test_turns_come_in_doubling_batches():
    """Position r waits ceil(log2(1 + r)) steps: one free worker last of 1,000 peers whose
    others are all busy waits 10 steps, not 999."""
    ids = [f"w{i:04d}" for i in range(1000)]
    lags = {}
    for me in ids:
        turns = Turns(me, None)
        turns.set_peers(ids)
        lags[turns.rank("p")] = turns.lag("p") / turns.step
    assert [lags[r] for r in (0, 1, 2, 3, 4, 7, 8, 999)] == [0, 1, 2, 2, 3, 3, 4, 10]


def test_groups_are_the_sets_of_queues_served():
    assert group_key(None) == "*" != group_key(())  # no queue is not every queue
    assert group_key(["b", "a", "a"]) == group_key(("a", "b"))
    assert group_key(["a"]) != group_key(["a", "b"]) != "*"
    assert group_key(["a b"]) != group_key(["a", "b"])


def test_took_payloads_round_trip_and_garbage_is_refused():
    payload = took_payload("*", 1764500000.25, None, "1764500000.123456", "host:1: a b")
    kind, _, body = payload.partition(":")
    assert kind == "took"
    assert parse_took(body) == ("*", 1764500000.25, None, "1764500000.123456", "host:1: a b")
    assert parse_took("* 1.0 2.5 3.0 w")[2] == 2.5
    for bad in ("", "* 1.0 -", "* x - 3.0 w", "* nan - 3.0 w", "* 1.0 inf 3.0 w",
                "* 1.0 1e999 3.0 w"):
        assert parse_took(bad) is None, bad


# A fleet of real workers.

async def _fleet(sched, pg_dsn, n: int, **options) -> tuple[list[Worker], list[asyncio.Task]]:
    workers = [Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS, **options))
               for _ in range(n)]
    runners = [asyncio.create_task(w.run()) for w in workers]
    await wait_until(lambda: all(w.ready.is_set() and w.listening for w in workers),
                     what="every worker ready and listening")
    await wait_until(lambda: all(len(w.ctx.turns.peers) == n for w in workers),
                     what="every worker knowing its peers")
    return workers, runners


async def _stop(workers, runners) -> None:
    for w in workers:
        w.stop()
    await asyncio.wait_for(asyncio.gather(*runners), 30)


async def _run_one_at_a_time(sched, jobs: int, **schedule) -> None:
    for _ in range(jobs):
        job = await sched.schedule("noop", **schedule)
        await wait_until(lambda j=job: _status(sched, j, "completed"), timeout=10,
                         what="the job run (the safety poll is 60 s away)")


def _claims(workers) -> int:
    """The claims the workers made so far, between them."""
    return sum(w.stats.claims for w in workers)


async def _claims_since(workers, before: int) -> int:
    """The claims made since `before` (a _claims reading), once any late turn would have
    claimed."""
    await asyncio.sleep(0.3)
    return _claims(workers) - before


async def _status(sched, job_id: str, status: str) -> bool:
    return str((await sched.get_job(job_id))["status"]) == status


async def test_one_notification_makes_one_claim_not_one_per_worker(sched, pg_dsn):
    """Five idle workers, jobs added one at a time: each notification is claimed for by
    the worker whose turn is first, which takes the job and tells the others. Before
    turns every worker claimed on every notification (5 claims a job, 4 of them empty)."""
    workers, runners = await _fleet(sched, pg_dsn, 5, concurrency=2)
    try:
        await asyncio.sleep(0.3)  # the start-up claims are over
        before = _claims(workers)
        jobs = 20
        await _run_one_at_a_time(sched, jobs)
        claims = await _claims_since(workers, before)
        # A `took:` that comes after the next worker's turn costs one more claim: a loaded
        # machine sees a few. Every worker claiming on every notification is 5 a job.
        assert claims <= 3 * jobs, f"{claims} claims for {jobs} jobs by 5 workers"
        ran = [w.stats.claimed for w in workers]
        assert sum(ran) >= jobs and sum(1 for r in ran if r) > 1, ran  # turns rotate
    finally:
        await _stop(workers, runners)


async def test_when_the_first_in_turn_is_busy_the_next_claims_without_the_poll(
        sched, pg_dsn):
    """Two of three workers (one slot each) run long jobs; every notification must still
    be served by whichever worker is free, in its turn, never left to the safety poll."""
    workers, runners = await _fleet(sched, pg_dsn, 3, concurrency=1,
                                    shutdown_grace_seconds=0.1)
    try:
        for _ in range(2):
            busy = await sched.schedule("sleep", args=(60.0,))
            await wait_until(lambda b=busy: _status(sched, b, "running"), timeout=10,
                             what="a worker made busy")
        await _run_one_at_a_time(sched, 12)
    finally:
        await _stop(workers, runners)


async def test_a_took_of_other_queues_or_of_the_worker_itself_drops_no_turn(sched, pg_dsn):
    """Peers serving other queues saw other jobs: their short claim says nothing of this
    worker's. Neither does its own `took:`, heard back. (A job due in 1,000 s: the
    worker's own claims meanwhile do not cover it either.)"""
    workers, runners = await _fleet(sched, pg_dsn, 1, queues=("a",))
    try:
        ctx, listener = workers[0].ctx, workers[0].listener
        ctx.turns.set_peers([ctx.id, "~later"])  # so that its turn is not the first
        payload = f"{time.time() + 1000:.6f}"
        listener.on_notify(payload)
        assert len(ctx.turns.entries) == 1
        listener.on_notify(took_payload(group_key(["b"]), 2e9, None, payload, "other"))
        listener.on_notify(took_payload(ctx.turns.group, 2e9, None, payload, ctx.id))
        assert len(ctx.turns.entries) == 1
        listener.on_notify(took_payload(ctx.turns.group, 2e9, None, payload, "other"))
        assert ctx.turns.entries == []
    finally:
        await _stop(workers, runners)


def test_turns_past_the_history_are_dropped_and_make_the_worker_claim_at_once():
    """A worker that hears a flood and never claims (its peers silent) keeps at most
    HISTORY turns: past that it claims at once, and that claim settles everything."""
    turns = Turns("me", None)
    for i in range(HISTORY + 5):
        turns.hear(f"{i}.5", float(i), 1000.0 + i)
    assert len(turns.entries) == HISTORY
    assert turns.next_turn() == float("-inf")
    assert turns.cover(turns.heard, db_now=1e9) == HISTORY
    assert turns.next_turn() is None


def test_the_step_between_turns_follows_the_claims_round_trips_within_bounds():
    turns = Turns("me", None)
    assert turns.step == TURN_STEP_SECONDS
    for _ in range(30):
        turns.observe(0.010)
    assert turns.step == pytest.approx(3 * 0.010, rel=0.01)
    for _ in range(30):
        turns.observe(1.0)
    assert turns.step == TURN_STEP_MAX_SECONDS
    for _ in range(60):
        turns.observe(0.0001)
    assert turns.step == TURN_STEP_SECONDS
    turns.observe(float("nan"))
    turns.observe(-1.0)
    assert turns.step == TURN_STEP_SECONDS


async def _settled(workers) -> None:
    """Until no worker owes a turn that has come (every claim for them ran)."""
    loop = asyncio.get_running_loop()
    await wait_until(lambda: all((t := w.ctx.turns.next_turn()) is None or t > loop.time()
                                 for w in workers), timeout=10, what="the turns claimed")


async def test_a_fleet_owes_no_turn_for_each_took_it_heard(sched, pg_dsn):
    """A `took:` hands its claim's next due time on, once: a peer owes one turn for a
    due time, not one per `took:` that repeats it, nor one for the claim's "nothing is
    due" (next_due '9999-12-30', the clamp). Owed for ever, those filled the history
    within HISTORY jobs, and past it every notification made every worker claim at once
    (the herd back). Jobs one at a time, first with nothing else pending, then with a
    job due in an hour: either way no worker owes more than that job's one turn."""
    workers, runners = await _fleet(sched, pg_dsn, 3, concurrency=2)
    try:
        await _run_one_at_a_time(sched, 10)
        await _settled(workers)
        assert [w.ctx.turns.entries for w in workers] == [[], [], []]
        later = await sched.schedule("noop", execution_time=datetime.now(UTC) + timedelta(hours=1))
        await _run_one_at_a_time(sched, 10)
        await _settled(workers)
        owed = [len(w.ctx.turns.entries) for w in workers]
        assert max(owed) <= 1, owed
        await sched.cancel_job(later)
    finally:
        await _stop(workers, runners)


async def _busy_peers(sched, ids: list[str]) -> None:
    """Registry rows of workers of every queue that stay alive and never claim, as peers
    whose every slot is busy would (heartbeats dated an hour ahead, so none is left out)."""
    async with sched.store.pool.connection() as conn:
        await conn.execute(
            f'INSERT INTO "{sched.schema}".workers (id, host, pid, version, concurrency,'
            " heartbeat_at) SELECT unnest(%s::text[]), 'h', 1, 'v', 1,"
            " now() + interval '1 hour'", (ids,))


def _payload_first_for(worker, peers: int) -> str:
    """A due-time payload (now) whose first turn is `worker`'s among `peers` workers."""
    now = time.time()
    for i in range(10_000):
        payload = f"{now:.6f}"[:-4] + f"{i:04d}"
        if worker.ctx.turns.rank(payload) == 0:
            return payload
    raise AssertionError("no payload found")


@contextlib.asynccontextmanager
async def _busy_first_idle_last(sched, pg_dsn, **options):
    """Worker 'w-a' (2 slots) runs a long job; 'w-z' (1 slot) is idle; ten busy peers
    between them in the turn order. Yields (w-a, w-z, a payload of a due time, now, for
    which w-a is first in turn and w-z last, 55 ms later)."""
    await _busy_peers(sched, [f"w-f{i:02d}" for i in range(10)])
    busy = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS, concurrency=2,
                                                    shutdown_grace_seconds=0.1, **options),
                  worker_id="w-a")
    runners = [asyncio.create_task(busy.run())]
    idle = None
    try:
        await wait_until(lambda: busy.ready.is_set() and busy.listening, what="w-a ready")
        long = await sched.schedule("sleep", args=(60.0,))
        await wait_until(lambda: _status(sched, long, "running"), what="w-a busy")
        idle = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS,
                                                        concurrency=1, **options),
                      worker_id="w-z")
        runners.append(asyncio.create_task(idle.run()))
        await wait_until(lambda: idle.ready.is_set() and idle.listening, what="w-z ready")
        await wait_until(lambda: all(len(w.ctx.turns.peers) == 12 for w in (busy, idle)),
                         what="both knowing their peers")
        await asyncio.sleep(0.3)  # the start-up claims are over
        payload = _payload_first_for(busy, 12)
        assert idle.ctx.turns.rank(payload) == 11
        yield busy, idle, payload
    finally:
        for w in (busy, idle):
            if w is not None:
                w.stop()
        await asyncio.wait_for(asyncio.gather(*runners), 30)


async def _due_now_unnotified(sched, job_id: str, task: str = "noop", *,
                              suspect: bool = False) -> str:
    """A job due now whose notification the test sends itself (with its own payload)."""
    job = await sched.schedule(task, job_id=job_id,
                               execution_time=datetime.now(UTC) + timedelta(hours=1))
    async with sched.store.pool.connection() as conn:
        await conn.execute(f'UPDATE "{sched.schema}".jobs SET suspect = %s, '
                           "execution_time = now() WHERE id = %s", (suspect, job_id))
    return job


async def test_a_claim_that_saw_a_suspect_due_and_left_it_covers_no_peer(sched, pg_dsn):
    """A busy worker's claim skips a due suspect (it runs alone) and waits some seconds
    (SUSPECT_DRAIN_SECONDS) before it reserves it: its short claim did not take every
    job it saw due, so it must not tell its idle peers, which would claim the suspect at
    once, that they need not claim. The busy worker is first in turn, the idle one last."""
    async with _busy_first_idle_last(sched, pg_dsn) as (_, _, payload):
        s = await _due_now_unnotified(sched, "s", suspect=True)
        await sched.store.notify(payload)
        # Well before the busy worker reserves it (5 s at least), and the poll (60 s).
        await wait_until(lambda: _status(sched, s, "completed"), timeout=3,
                         what="the idle worker to run the suspect")


async def test_a_claim_cut_by_a_per_queue_cap_covers_no_peer(sched, pg_dsn):
    """The busy worker, first in turn, is at its cap for the queue ([queues.default]
    concurrency = 1): its claim takes nothing and must not tell the idle worker, last in
    turn, that it need not claim."""
    async with _busy_first_idle_last(sched, pg_dsn,
                                     queue_concurrency=(("default", 1),)) as (_, _, payload):
        job = await _due_now_unnotified(sched, "j")
        await sched.store.notify(payload)
        await wait_until(lambda: _status(sched, job, "completed"), timeout=3,
                         what="the idle worker to run the job (the poll is 60 s away)")


async def test_a_turn_that_comes_before_its_job_is_due_is_timed_again_by_the_claim(
        sched, pg_dsn):
    """A turn is timed by the worker's estimate of the database clock (wall clock plus the
    offset its last claim measured). Ahead of it (the wall clock stepped forward since,
    or the last claim reached the server late, which makes the offset too large), the
    turn comes before its job is due: the claim then finds the job not due yet, and its
    answer says when it is. The turn must follow that answer: kept as it was, it stayed
    due, and the worker claimed again at every notification token (a burst of 20, then
    50 a second) until the job fell due. Here the estimate is 0.5 s ahead."""
    workers, runners = await _fleet(sched, pg_dsn, 1)
    try:
        w = workers[0]
        await asyncio.sleep(0.3)  # the start-up claims are over
        w.ctx.clock_offset += 0.5
        before = w.stats.claims
        job = await sched.schedule("noop", execution_time=datetime.now(UTC)
                                   + timedelta(seconds=1.0))
        await wait_until(lambda: _status(sched, job, "completed"), timeout=10,
                         what="the job run")
        # One claim early (the estimate's), one when the job is due, maybe one more for
        # a claim that reached the server a hair before it.
        assert w.stats.claims - before <= 4, w.stats.claims - before
    finally:
        await _stop(workers, runners)


async def test_a_flood_of_notifications_never_holds_the_claims_back_past_the_poll(
        sched, pg_dsn):
    """Any role may NOTIFY. A flood of due times, each of a job due later and not this
    worker's first turn, moves its timer (`retime`) at each one: the fetcher's sleep
    recomputed its end and slept again, and while the flood lasted (seconds, for a few
    hundred thousand notifications in one transaction) it never claimed, its safety poll
    included. The job added after the flood (its notification waits behind it) must be
    claimed by the poll (0.2 s) while the flood is still being read."""
    await _busy_peers(sched, ["~peer"])
    w = Worker(sched.store, pg_dsn, fast_options(poll_seconds=0.2, concurrency=2))
    workers, runners = [w], [asyncio.create_task(w.run())]
    try:
        await wait_until(lambda: w.ready.is_set() and w.listening, what="ready")
        await wait_until(lambda: len(w.ctx.turns.peers) == 2, what="the peer known")
        flood = 200_000
        async with sched.store.pool.connection() as conn:
            # Due times an hour ahead and more, each later than the one before (before
            # turns only an earlier one moved the timer).
            await conn.execute("SELECT pg_notify(%s, (extract(epoch FROM now())::bigint"
                               " + 3600 + i)::text) FROM generate_series(1, %s) i",
                               (sched.store.channel, flood))
        job = await sched.schedule("noop")
        await wait_until(lambda: _status(sched, job, "completed"), timeout=60,
                         interval=0.01, what="the job run")
        assert w.ctx.turns.heard < flood, "claimed only once the flood was over"
    finally:
        await _stop(workers, runners)


async def test_a_free_worker_behind_many_busy_peers_claims_within_milliseconds(
        sched, pg_dsn):
    """999 peers registered and alive whose every slot is busy (they never claim) and one
    free worker, last in turn for the notification of a job due now: the job must start
    well before the poll (60 s here, 5 s by default), within a second."""
    await _busy_peers(sched, [f"w-f{i:04d}" for i in range(999)])
    w = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS),
               worker_id="w-z")
    runner = asyncio.create_task(w.run())
    try:
        await wait_until(lambda: w.ready.is_set() and w.listening, what="ready")
        await wait_until(lambda: len(w.ctx.turns.peers) == 1000, what="its peers known")
        await asyncio.sleep(0.3)  # the start-up claims are over
        job = await sched.schedule("noop", job_id="j",
                                   execution_time=datetime.now(UTC) + timedelta(hours=1))
        async with sched.store.pool.connection() as conn:
            await conn.execute(f'UPDATE "{sched.schema}".jobs SET execution_time = now()'
                               " WHERE id = 'j'")
        now = time.time()
        payload = next(p for i in range(100_000)
                       if w.ctx.turns.rank(p := f"{now:.6f}"[:-5] + f"{i:05d}") >= 990)
        await sched.store.notify(payload)
        await wait_until(lambda: _status(sched, job, "completed"), timeout=1.0,
                         interval=0.01, what="the job run")
    finally:
        w.stop()
        await asyncio.wait_for(runner, 30)


async def test_workers_with_per_queue_caps_take_turns_too(sched, pg_dsn):
    """A per-queue cap ([queues.NAME] concurrency) may cut a claim short, and a claim cut
    so must not tell the peers it took everything. One that took fewer jobs of each
    capped queue than the cap left room for was cut by nothing: it says so (`took:`).
    Before, any cap at all kept a worker silent, so a fleet of capped workers claimed
    once per worker per notification, only spread over the turns."""
    workers, runners = await _fleet(sched, pg_dsn, 3, concurrency=2,
                                    queue_concurrency=(("default", 4),))
    tooks: list[str] = []
    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        await conn.execute(f'LISTEN "{sched.store.channel}"')

        async def hear() -> None:
            async for notify in conn.notifies():
                if notify.payload.startswith("took:"):
                    tooks.append(notify.payload)

        hearing = asyncio.create_task(hear())
        await asyncio.sleep(0.3)  # the start-up claims are over
        jobs = 10
        await _run_one_at_a_time(sched, jobs)
        await wait_until(lambda: len(tooks) >= jobs / 2, timeout=5,
                         what="the claims that took a job each to say so")
        hearing.cancel()
    finally:
        await conn.close()
        await _stop(workers, runners)


async def test_a_job_due_later_is_claimed_for_once_not_by_every_worker_that_claimed(
        sched, pg_dsn):
    """Five workers; a job due in 2.5 s; meanwhile ten jobs due at once, claimed in turn
    by several of the workers, each of which learns the later job's due time. When it
    falls due, one claim (two at most) should serve it."""
    workers, runners = await _fleet(sched, pg_dsn, 5, concurrency=2)
    try:
        await asyncio.sleep(0.3)  # the start-up claims are over
        later = await sched.schedule("noop", execution_time=datetime.now(UTC)
                                     + timedelta(seconds=2.5))
        await _run_one_at_a_time(sched, 10)
        await _settled(workers)
        if not await _status(sched, later, "pending"):
            pytest.skip("the later job fell due meanwhile (a machine too slow)")
        before = _claims(workers)
        await wait_until(lambda: _status(sched, later, "completed"), timeout=10,
                         what="the later job run")
        claims = await _claims_since(workers, before)
        assert claims <= 2, f"{claims} claims for one job due later, by 5 workers"
    finally:
        await _stop(workers, runners)


async def _future_jobs(sched, count: int, start_seconds: float = 3600.0) -> None:
    """`count` jobs due an hour ahead and later, each with its own notification, as
    `count` schedule() calls for later (reminders) send: the same insert, in one
    statement (its RETURNING notifies per row, at commit). The latest first: each
    notification then moves the worker's timer earlier (`retime`), as reminders
    scheduled in that order would."""
    async with sched.store.pool.connection() as conn:
        await conn.execute(
            f'INSERT INTO "{sched.schema}".jobs (id, task, queue, args, kwargs, priority,'
            " execution_time) SELECT 'later-' || i, 'noop', 'default', '[]', '{}', 5,"
            " now() + make_interval(secs => %s - i)"
            " FROM generate_series(1, %s) i"
            " RETURNING pg_notify(%s, extract(epoch FROM execution_time)::text)",
            (start_seconds + count, count, sched.store.channel))


async def test_jobs_scheduled_ahead_past_the_history_cost_no_claim_per_enqueue(
        sched, pg_dsn):
    """More than HISTORY jobs scheduled for later (a day of reminders) fill every
    worker's turns with turns not due yet, which no claim settles before their time. Each
    further enqueue for later then dropped the oldest of them and made every worker claim
    at once (`behind`), an empty claim per worker per enqueue: the herd back, for jobs
    that are not even due (before turns, a job due later cost no claim at all)."""
    workers, runners = await _fleet(sched, pg_dsn, 2, concurrency=2)
    try:
        await asyncio.sleep(0.3)  # the start-up claims are over
        await _future_jobs(sched, HISTORY + 10)
        await wait_until(lambda: all(w.ctx.turns.heard >= HISTORY + 10 for w in workers),
                         what="the notifications heard")
        await asyncio.sleep(0.3)
        before = _claims(workers)
        for i in range(10):
            await sched.schedule("noop", execution_time=datetime.now(UTC)
                                 + timedelta(hours=2, seconds=i))
        await wait_until(lambda: all(w.ctx.turns.heard >= HISTORY + 20 for w in workers),
                         what="the notifications heard")
        claims = await _claims_since(workers, before)
        assert claims <= 2, f"{claims} claims for 10 jobs due in 2 hours, by 2 workers"
    finally:
        await _stop(workers, runners)


async def test_a_job_due_soon_is_not_lost_when_the_history_fills_with_later_ones(
        sched, pg_dsn):
    """A single worker knows the job due soon only as its claim's next due job (a turn
    owed, order 0: added by SQL, say, with no notification). Then exactly HISTORY jobs are
    scheduled for later: each pushes an older turn out, the last one the job due soon's.
    A dropped notification's turn makes the worker claim at once (`behind`), a dropped
    owed one did nothing, and the job waited for the safety poll (60 s)."""
    workers, runners = await _fleet(sched, pg_dsn, 1, concurrency=2)
    w = workers[0]
    try:
        soon = "soon"
        async with sched.store.pool.connection() as conn:  # no notification
            await conn.execute(
                f'INSERT INTO "{sched.schema}".jobs (id, task, queue, args, kwargs,'
                " priority, execution_time) VALUES ('soon', 'noop', 'default', '[]', '{}',"
                " 5, now() + interval '3 seconds')")
        await _run_one_at_a_time(sched, 1)  # a claim: its next due job is `soon`
        await _settled(workers)
        assert [e[0] for e in w.ctx.turns.entries] == [0], w.ctx.turns.entries
        heard = w.ctx.turns.heard
        await _future_jobs(sched, HISTORY)
        await wait_until(lambda: w.ctx.turns.heard >= heard + HISTORY,
                         what="the notifications heard")
        await wait_until(lambda: _status(sched, soon, "completed"), timeout=10,
                         what="the job due soon run (the safety poll is 60 s away)")
    finally:
        await _stop(workers, runners)


async def test_a_wall_clock_stepped_back_does_not_delay_a_job_due_later(
        sched, pg_dsn, monkeypatch):
    """A single worker knows a job due in 2 s as its claim's next due job (added by SQL,
    no notification): a turn owed, kept on the database clock. Then the machine's wall
    clock steps back 30 s (NTP, a VM resumed), which moves no loop timer. The turn was
    converted with time.time() plus the offset of the last claim, so it came 30 s late,
    here the safety poll (60 s); the claim's timer it replaced was a loop time, which no
    wall clock step moves."""
    import pgsched.worker.context as context_module

    workers, runners = await _fleet(sched, pg_dsn, 1, concurrency=2)
    try:
        async with sched.store.pool.connection() as conn:  # no notification
            await conn.execute(
                f'INSERT INTO "{sched.schema}".jobs (id, task, queue, args, kwargs,'
                " priority, execution_time) VALUES ('later', 'noop', 'default', '[]', '{}',"
                " 5, now() + interval '2 seconds')")
        await _run_one_at_a_time(sched, 1)  # a claim: its next due job is 'later'
        await _settled(workers)
        assert [e[0] for e in workers[0].ctx.turns.entries] == [0]
        real = time.time
        monkeypatch.setattr(context_module, "time", type("Stepped", (), {
            "time": staticmethod(lambda: real() - 30.0)}))
        workers[0].ctx.retime.set()  # the fetcher recomputes its sleep, as any notice would
        await wait_until(lambda: _status(sched, "later", "completed"), timeout=10,
                         what="the job due later run (the safety poll is 60 s away)")
    finally:
        await _stop(workers, runners)


async def test_a_worker_of_no_queue_takes_no_turn_of_the_workers_of_every_queue(
        sched, pg_dsn):
    """WorkerOptions(queues=()) claims from no queue (an empty list, not None), yet it
    registered as a worker of every queue (NULL) and took turns with them in group '*':
    first in turn, its claim took nothing, came back short, and its `took:` told the
    worker of every queue that it need not claim: the job waited for the safety poll."""
    everything = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS),
                        worker_id="w-a")
    nothing = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS, queues=()),
                     worker_id="w-b")
    workers = [everything, nothing]
    runners = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_until(lambda: all(w.ready.is_set() and w.listening for w in workers),
                         what="both ready")
        await asyncio.sleep(1.2)  # a few heartbeats: each knows whichever peers it will
        await asyncio.sleep(0.3)
        jobs = []
        now = time.time()
        # Payloads for which the worker of no queue is first in turn, if it is a peer.
        last = len(everything.ctx.turns.peers) - 1
        for i in range(200):
            payload = f"{now:.6f}"[:-4] + f"{i:04d}"
            if everything.ctx.turns.rank(payload) == last:
                job = await _due_now_unnotified(sched, f"j{i}")
                await sched.store.notify(payload)
                jobs.append(job)
                if len(jobs) == 3:
                    break
        assert len(jobs) == 3, everything.ctx.turns.peers
        for job in jobs:
            await wait_until(lambda j=job: _status(sched, j, "completed"), timeout=5,
                             what="the job run (the safety poll is 60 s away)")
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*runners), 30)


async def test_a_job_due_later_known_only_from_claims_is_claimed_for_once(sched, pg_dsn):
    """A job added with no notification (SQL; or while the workers were down) is known to
    each worker from its own claim's next due job: a turn owed, which any claim at or
    after its due time settles, whatever that claim heard. The first in turn takes it,
    but a worker that had heard no notification yet sent no `took:` (it had no payload to
    name), and a `took:` naming a payload a peer never heard settled nothing there: every
    worker claimed for it in turn. (Steps of 50 ms, so that a turn a clock offset makes
    come a little early does not blur the count.)"""
    workers, runners = await _fleet(sched, pg_dsn, 3, concurrency=2)
    try:
        await asyncio.sleep(0.3)  # the start-up claims are over
        for w in workers:
            for _ in range(30):
                w.ctx.turns.observe(1.0)
            assert w.ctx.turns.step == TURN_STEP_MAX_SECONDS
        async with sched.store.pool.connection() as conn:  # no notification of it
            await conn.execute(
                f'INSERT INTO "{sched.schema}".jobs (id, task, queue, args, kwargs,'
                " priority, execution_time) VALUES ('later', 'noop', 'default', '[]',"
                " '{}', 5, now() + interval '1.5 seconds')")
        await sched.store.notify("let_go:default")  # a claim each: they learn its due time
        await wait_until(lambda: all(len(w.ctx.turns.entries) == 1 for w in workers),
                         what="every worker owing a turn for it")
        assert all(w.ctx.turns.last is None for w in workers)
        before = _claims(workers)
        await wait_until(lambda: _status(sched, "later", "completed"), timeout=10,
                         what="the job run")
        claims = await _claims_since(workers, before)
        assert claims <= 2, f"{claims} claims for one job due later, by 3 workers"
    finally:
        await _stop(workers, runners)


async def test_a_job_due_later_that_only_one_worker_knows_is_claimed_at_its_due_time(
        sched, pg_dsn):
    """Worker w-a's retry timer (or a job added by SQL) is the next due job of a claim it
    made for no notification (a freed slot). Unless it tells w-b of it (`took:`, for a job
    it newly learned of), its turn comes a step late behind w-b, which would never claim
    for it. Before: w-a's turn came 5 ms after the job fell due."""
    a = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS), worker_id="w-a")
    b = Worker(sched.store, pg_dsn, fast_options(poll_seconds=POLL_SECONDS), worker_id="w-b")
    workers = [a, b]
    runners = [asyncio.create_task(w.run()) for w in workers]
    try:
        await wait_until(lambda: all(w.ready.is_set() and len(w.ctx.turns.peers) == 2
                                     for w in workers), what="both ready, knowing each other")
        await asyncio.sleep(0.3)  # the start-up claims are over
        due = datetime.now(UTC) + timedelta(seconds=30)
        while a.ctx.turns.rank(repr(due.timestamp())) != 1:
            due += timedelta(microseconds=1)
        async with sched.store.pool.connection() as conn:  # no notification
            await conn.execute(
                f'INSERT INTO "{sched.schema}".jobs (id, task, queue, args, kwargs,'
                " priority, execution_time) VALUES ('later', 'noop', 'default', '[]',"
                " '{}', 5, %s)", (due,))
        claims = a.stats.claims
        a.ctx.wake.set()  # a claim of its own, as a freed slot makes
        # w-a hands it on (took:), so w-b, first in turn for it, owes a turn too
        await wait_until(lambda: a.ctx.turns.entries and b.ctx.turns.entries,
                         what="both workers owing a turn for it")
        assert a.stats.claims == claims + 1
        turns = [w.ctx.turns.entries for w in workers]
        assert all(e[1] == due.timestamp() for [e] in turns), turns
        first = min(e[2] for [e] in turns)
        late = first - due.timestamp()
        assert late == 0, f"its first turn comes {late:.3f} s late"
        await sched.cancel_job("later")
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*runners), 30)
