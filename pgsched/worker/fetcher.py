"""The fetcher: the worker's only claimer, and the starter of the jobs it claims.

Owns: the claim loop, the timer set to the next known due time, and running each claimed
job (executor.run_job) up to handing its outcome to the completer.

Invariants:
- It claims at most its free slots (fewer while more than one batch of outcomes waits
  for the completer; outcomes parked behind row locks other sessions hold count for
  nothing, up to PARKED_ROOM_FACTOR x concurrency of them), in one statement, then
  sleeps until the earliest of: a NOTIFY for a job due now, a timer set to the next
  known due time, a freed slot while a backlog remains, or the safety poll. With every
  slot busy it sleeps until a slot frees or a wake-up arrives (never on a due time it
  cannot act on).
- Wake-ups are cleared before the claim, so one that arrives during it is not lost, and
  a timer set during the claim (note_due) is kept if it is earlier than the claim's.
- Notifications are claimed for in turn among the workers that serve the same queues
  (turns.py): a claim settles the turns owed for what was heard before it was sent, and
  one that came back short (no per-queue cap of this worker cut it: it took fewer jobs of
  each capped queue than the cap left room for; not a suspect claim, and no suspect due
  that it left) tells the peers with a NOTIFY `took:`, so that they do not claim for it
  too.
- A timer moved by note_due (`retime`: a notification of a job due later, or of one due
  now past the notification budget) only shortens the sleep: no claim before its time.
  Every worker hears every enqueue's NOTIFY, so such a claim was an empty one on each.
- Queues: it claims from `options.queues` (None: every queue) except paused ones, and
  at most `queue_concurrency[q]` jobs of queue q at once.
- Claiming attempt n of a job proves every earlier attempt lost its lease: those runs
  (and a held run of attempt n itself: the job was deleted and added again) are
  cancelled and their outcome is void.
- Suspects (jobs of a crash shared by several jobs, recover_orphans) run alone: the
  ordinary claims leave them, and a claim that finds one due says so (suspect_due). A
  worker that is alone (it holds no job: none running, none waiting for the completer,
  whose rows still run in the database and would share a crash; and no thread of a
  timed-out sync job runs on) then claims one suspect, and claims nothing else until
  its outcome is recorded; a shutdown gives it back as a suspect. A busy worker that has
  seen one due for SUSPECT_DRAIN_SECONDS (a random share more) reserves one that no
  other worker has reserved and that its claim could take once alone (reserve_suspect:
  not one a global limit leaves no room), so that a steady stream, which keeps every
  worker busy, cannot starve a suspect, and claims nothing more until it is alone.
  The reserved row stays pending: a worker alone meanwhile claims it at once (the
  reserving one, waiting for its longest job, would keep it from running for as long),
  and other busy workers, finding every due suspect reserved, go on claiming (all of
  them stopping left a fleet of long jobs claiming nothing at all). The reserving worker
  renews its reservation every SUSPECT_DRAIN_SECONDS and goes back to claiming once it
  finds the suspect gone (taken, cancelled, paused); alone, it claims a due suspect,
  the one it reserved or an earlier one. A suspect claim or a reservation that finds
  nothing is not tried again for SUSPECT_DRAIN_SECONDS.

Failure: a claim that fails with a connection error is logged (`db_unavailable`) and
retried with backoff, which a stop ends (the drain must not wait for it); a suspect
claim that fails keeps the reservation, so the retry is a suspect claim too. It returns
once stop() is called, or in burst mode when nothing is left to run (a due suspect that
only abandoned threads hold back is left to run); the worker then drains. A job that was
cancelled (shutdown, lost lease, cancel request) records nothing here: shutdown releases
what is still held.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from ..logs import context_setters, get_logger
from ..queues import capped_free_slots, saturated
from ..store import CLAMPED_LATEST
from .context import DB_ERRORS, NOTIFY_WAKE_BURST, Completion, Held, WorkerContext, backoff_sleep
from .executor import CANCELLED, Outcome, make_running_job, run_job
from .turns import NOTHING, took_payload

log = get_logger("pgsched.worker")

# How much of a wait for a due time the fetcher waits in turns of its event loop, after
# the loop's own timer: that timer ends up to a millisecond late (epoll_wait counts whole
# milliseconds, and asyncio rounds up so as never to wake early): 0.83 ms p50 of an idle
# worker's 4.5 ms due-time latency in a traced benchmark run. So the loop's timer is set
# this much early, and the rest, under a millisecond, is waited out by yielding to the
# loop until the time has come (microseconds late): at most a millisecond of spinning per
# due time on an idle loop, and no delay to other work. Only for a turn's own time, not
# for a time the notification budget set (WorkerContext.due_deadline).
FINE_TIMER_SECONDS = 0.001
# The longest the fetcher waits for a completion write in flight before it claims what the
# backlog cap allows anyway (free_slots): a write takes milliseconds, and one whose server
# stopped answering (a frozen backend, a network black hole: statement_timeout cannot end
# it) must not stop the worker's claims until the cap itself does.
WRITE_WAIT_SECONDS = 0.25
# How many outcomes parked behind row locks (per slot) the backlog cap leaves aside.
PARKED_ROOM_FACTOR = 2
# How long a busy worker goes on claiming while a suspect is due, before it reserves the
# suspect and lets its other jobs finish to run it alone (times 1 to 2, drawn per
# worker): an idle worker takes a suspect at once, so a busy one reserves it only when
# none is idle, and the first busy worker to reserve it spares the others. Also how often
# the reserving worker renews its reservation, which lasts twice as long.
SUSPECT_DRAIN_SECONDS = 5.0


class Fetcher:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self._lowest_attempt = 1  # of every job claimed (see _lose_older_attempts)
        self._alone: Held | None = None  # the suspect this worker runs, alone
        self._suspect_drain_at: float | None = None  # loop time to reserve a due suspect, busy
        self._suspect_retry_at = float("-inf")  # after a suspect claim that found none
        self._reserved: str | None = None  # the suspect this worker reserved, busy
        self._renew_at = float("-inf")  # loop time to renew that reservation
        self._bind_job = context_setters("job_id", "task", "attempt")

    async def run(self) -> None:
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        failures = 0
        while not ctx.stop_requested.is_set():
            ctx.stats.wakeups += 1
            # Cleared before the claim: a wake-up that arrives while it runs (a NOTIFY, a
            # stop) must end the sleep that follows it.
            ctx.wake.clear()
            free = self.free_slots()
            claimed_full = False
            claimed_before = ctx.stats.claimed
            try:
                suspect = await self._suspect_turn()
                if suspect is not None:
                    free = 1 if suspect else 0
                if free > 0:
                    claimed_full = await self.claim(free, suspects=bool(suspect))
                failures = 0
            except DB_ERRORS as exc:
                ctx.db_error("claim", exc, failures)
                failures += 1
                await backoff_sleep(failures, stopping=ctx.stop_requested)
                continue
            if not ctx.ready.is_set():
                ctx.ready.set()
                served = ", ".join(ctx.options.queues or ["every queue"])
                ctx.systemd.ready(f"claiming from {served}")
                for callback in ctx.on_ready:
                    result = callback()
                    if result is not None:
                        await result
            if claimed_full:
                continue  # more may be due right now
            # A due suspect that only the threads of timed-out sync jobs keep from running
            # here is due now too: burst mode waits for them (it reserves it, in time).
            if (ctx.options.burst and free > 0 and ctx.executing == 0
                    and not (ctx.hung_threads and self._suspect_drain_at is not None)):
                log.info("burst_done")
                return
            # With every slot busy, a freed slot is the next reason to claim; with a
            # suspect running here, due or reserved, so is each job that ends or is recorded.
            ctx.slot_freed_wakes = (
                free <= 0 or ctx.options.burst or self._alone is not None
                or self._suspect_drain_at is not None or self._reserved is not None
                or saturated(ctx.queue_limits, ctx.running_by_queue(),
                             ctx.options.queues))
            poll_at = min(loop.time() + ctx.options.poll_seconds, self._suspect_deadline())
            write_wait_ends = self._write_wait_ends() if free <= 0 else None
            if ctx.stats.claimed != claimed_before:
                # The jobs just claimed start their bodies first, not after the sleep's
                # bookkeeping: a turn of the loop sooner.
                await asyncio.sleep(0)
            await self._sleep(free, poll_at if write_wait_ends is None
                              else min(poll_at, write_wait_ends))

    async def _sleep(self, free: int, poll_at: float) -> None:
        """Until a wake-up, the timer or the safety poll; a moved timer (`retime`) only
        recomputes how long, and a timer whose time has come ends the sleep at once."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        while True:
            ctx.retime.clear()
            until = poll_at
            # A busy worker cannot claim, so a due time is no reason to wake: only a freed
            # slot or a wake-up is (the due time may also be long past: not refreshed).
            deadline, precise = ctx.due_deadline() if free > 0 else (None, False)
            if deadline is not None:
                until = min(until, deadline)
            if until <= loop.time():
                # Its time has come: claim. Waiting again, however briefly, let the next
                # notification move the timer again, and a flood of them (any role may
                # NOTIFY) kept the fetcher here, its safety poll included.
                return
            # A turn's time is waited for in two steps: the loop's timer, which wakes up to
            # a millisecond late, ends a millisecond early, and a plain sleep waits out the
            # rest (FINE_TIMER_SECONDS). Not a time the notification budget set: a
            # notification arriving meanwhile takes the budget's next token for a claim of
            # its own (two claims where the bucket allows one).
            fine = precise and until == deadline
            waits = [asyncio.ensure_future(ctx.wake.wait()),
                     asyncio.ensure_future(ctx.retime.wait())]
            try:
                await asyncio.wait(
                    waits, timeout=max(0.0, until - loop.time()
                                       - (FINE_TIMER_SECONDS if fine else 0.0)),
                    return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            if ctx.wake.is_set() or not ctx.retime.is_set():
                # The rest in turns of the loop, not a blocking sleep: a loop with other
                # work ready would be held up by it for the whole rest (its timer is on
                # time then; 1.2 ms a sleep measured on a busy loop), an idle one spins
                # under a millisecond.
                while fine and not ctx.wake.is_set() and loop.time() < until:
                    await asyncio.sleep(0)
                return

    async def _suspect_turn(self) -> bool | None:
        """None: claim as usual; True: claim one suspect, alone; False: claim nothing (a
        suspect runs here, or this worker reserved one and waits to be alone)."""
        ctx = self.ctx
        if self._alone is not None:
            # Until its outcome is recorded, not only until it returns: its row runs on
            # in the database meanwhile, and a crash would be shared with what ran beside.
            if ctx.held.get(self._alone.key) is self._alone:
                return False
            self._alone = None
        now = asyncio.get_running_loop().time()
        alone = not ctx.held and not ctx.hung_threads
        if self._reserved is not None:
            if alone:
                # Kept until the claim returns (_note_suspects): a claim that fails (a
                # lock timeout, a lost connection) is tried again as a suspect claim,
                # not lost to an ordinary one that would make this worker busy again.
                return True
            if now < self._renew_at:
                return False
            self._renew_at = now + SUSPECT_DRAIN_SECONDS
            self._reserved = await self._reserve(self._reserved)
            return None if self._reserved is None else False
        if self._suspect_drain_at is None or now < self._suspect_retry_at:
            return None
        if alone:
            return True
        if now < self._suspect_drain_at:
            return None
        self._suspect_drain_at = None
        self._reserved = await self._reserve(None)
        if self._reserved is None:  # every due one is reserved, or none is left
            self._suspect_retry_at = now + SUSPECT_DRAIN_SECONDS
            return None
        self._renew_at = now + SUSPECT_DRAIN_SECONDS
        log.info("suspect_reserved", job_id=self._reserved)
        return False

    async def _reserve(self, job_id: str | None) -> str | None:
        return await self.ctx.store.reserve_suspect(
            worker_id=self.ctx.id, job_id=job_id, queues=self.ctx.options.queues,
            seconds=2 * SUSPECT_DRAIN_SECONDS)

    def _suspect_deadline(self) -> float:
        """The loop time the fetcher must look at suspects again without a wake-up: to
        renew its reservation (and see whether a timed-out job's thread has ended), or
        to reserve a suspect due for long enough while every slot stays busy."""
        if self._reserved is not None:
            return self._renew_at
        if self._suspect_drain_at is not None:
            return max(self._suspect_drain_at, self._suspect_retry_at)
        return float("inf")

    def _note_suspects(self, due: bool, claimed: Held | None, tried: bool) -> bool:
        """After a claim: remember whether a suspect is due (and since when) and which
        runs here; a suspect claim (`tried`) ends this worker's reservation. True when
        this worker should claim again at once: a suspect, as it holds nothing and one is
        due, or, after a suspect claim that found none, the ordinary jobs it left."""
        now = asyncio.get_running_loop().time()
        if tried:
            self._reserved = None
        if claimed is not None:
            self._alone, self._suspect_drain_at = claimed, None
            return False
        if tried:
            self._suspect_retry_at = now + SUSPECT_DRAIN_SECONDS
        if not due:
            self._suspect_drain_at = None
        elif self._suspect_drain_at is None:
            self._suspect_drain_at = now + SUSPECT_DRAIN_SECONDS * (1 + random.random())
        return tried or (due and not self.ctx.held and not self.ctx.hung_threads
                         and now >= self._suspect_retry_at)

    def free_slots(self) -> int:
        """Jobs to claim now: free execution slots, less whatever the completer's backlog
        holds beyond one full batch. When the database records outcomes slower than jobs
        finish, the fetcher waits for the completer instead of taking ever more leases
        (a backlog of thousands made every completion statement slower still).

        While that backlog holds slots back and a write is in flight, none: the slots the
        write frees are claimed with the others once it returns (the completer wakes the
        fetcher then). Claiming only what the backlog allowed split the slots into
        claims whose sizes followed the completer's batches and never merged again: a
        worker of 25 claimed 19 and 6 in turn, two claims per 25 jobs, and fell behind a
        stream it otherwise kept up with (the due-latency-load benchmark). It waits only
        while the completer is behind by more than a batch and writing: each write shrinks
        that backlog, and the fetcher adds nothing to it meanwhile. A write that has not
        returned in WRITE_WAIT_SECONDS (a row locked by another session, a lost
        connection being retried, a server that stopped answering) is not waited for."""
        concurrency = self.ctx.options.concurrency
        idle = concurrency - self.ctx.executing
        # Parked outcomes (behind rows other sessions hold locked, maybe for minutes) do
        # not count against the cap, up to a cap of their own: a few locked rows must not
        # stop the worker, and locks on everything it finishes must not grow held unbounded.
        room = (2 * concurrency - len(self.ctx.held)
                + min(self.ctx.parked, PARKED_ROOM_FACTOR * concurrency))
        if room < idle and self._write_wait_ends() is not None:
            return 0
        return min(idle, room)

    def _write_wait_ends(self) -> float | None:
        """The loop time the wait for the completer's write in flight ends, or None when
        there is nothing to wait for: no write, or one that has run WRITE_WAIT_SECONDS
        already."""
        if not self.ctx.recording:
            return None
        ends = self.ctx.recording_since + WRITE_WAIT_SECONDS
        return ends if asyncio.get_running_loop().time() < ends else None

    async def claim(self, free: int, suspects: bool = False) -> bool:
        """Claim up to `free` jobs and start them (one suspect, with `suspects`, started
        once it is alone here); True if the claim was full, or if this worker should
        claim again now (a suspect, or the ordinary jobs a suspect claim left)."""
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        # db_now is read when the statement starts, right after it is sent: timing from the
        # answer instead would set the timer late by the claim's own duration (1-3 ms).
        sent = loop.time()
        ctx.noted_deadline = None
        ctx.take_turn(sent)
        # The notifications heard before the claim is sent: its snapshot shows their jobs.
        heard, upto = ctx.turns.last, ctx.turns.heard
        ctx.stats.claims += 1
        capped = capped_free_slots(ctx.queue_limits, ctx.running_by_queue())
        jobs, next_due, db_now = await ctx.store.claim_jobs(
            worker_id=ctx.id, limit=free, lease_seconds=ctx.options.lease_seconds,
            queues=ctx.options.queues, capped=capped, suspects=suspects,
        )
        suspect_due = ctx.store.suspect_due
        ctx.turns.observe(loop.time() - sent)
        ctx.clock_offset = db_now.timestamp() - sent  # database clock minus loop clock
        # Turns owed for jobs this claim saw due are settled (not by a suspect claim,
        # which takes no other job); a job noted while it ran may be one it did not see
        # (its turn, and noted_deadline, stay). The next due job it saw is a turn too.
        covered, learned = 0, False
        if not suspects:
            covered = ctx.turns.cover(upto, db_now.timestamp())
            if next_due is not None and next_due < CLAMPED_LATEST:
                learned = ctx.owe_turn(next_due.timestamp())
        if jobs:  # a useful wake-up: give its notification token back
            ctx.wake_tokens = min(float(NOTIFY_WAKE_BURST), ctx.wake_tokens + 1.0)
        alone = None
        for job in jobs:
            if job["expired"]:
                ctx.stats.expired += 1
                ctx.metrics.job("expired", job["task"], job["queue"])
                log.warning("job_expired", job_id=job["id"], task=job["task"],
                            execution_time=job["execution_time"].isoformat())
                continue
            ctx.stats.claimed += 1
            ctx.metrics.job("started", job["task"], job["queue"])
            held = Held(job["id"], job["attempts"], task_name=job["task"], queue=job["queue"],
                        running=make_running_job(job, ctx.store, ctx.id))
            self._lose_older_attempts(held)
            ctx.held[held.key] = held
            ctx.executing += 1
            held.task = asyncio.create_task(self._execute(job, held), name=f"job:{job['id']}")
            if suspects:
                alone = held
                held.suspect = True
                log.info("suspect_claimed", job_id=held.id, task=held.task_name)
        again = self._note_suspects(suspect_due, alone, suspects)
        # Also when it covered nothing but learned of a job due later that no notification
        # announced (a retry, a job written with SQL): peers that do not know it would keep
        # its first turns, and this worker claim for it a few steps late. Not when a
        # suspect is due: this claim left it (it runs alone), and an idle peer would claim
        # it at once where this worker, busy, waits to reserve it.
        if ((covered or learned) and len(jobs) < free and not suspects
                and not suspect_due and not _cut_by_caps(capped, jobs)
                and len(ctx.turns.peers) > 1):
            await self._announce(db_now.timestamp(), next_due,
                                 NOTHING if heard is None else heard)
        return again or (free > 0 and len(jobs) >= free and alone is None)

    async def _announce(self, db_now: float, next_due: Any, heard: str) -> None:
        """Tell the peers that a claim begun after `heard` took every job it saw due
        (turns.py): it came back short, no per-queue cap of this worker cut it (it took
        fewer jobs of each capped queue than the cap left room for), and it
        left no due suspect (which an idle peer would claim at once). Its
        peers drop the turns it covered, and owe one for the next due job it saw. A
        failed NOTIFY only costs the peers their claims, in turn."""
        ctx = self.ctx
        # '9999-12-30' is the claim's "nothing pending" (the clamp): no turn to hand on.
        if next_due is not None and next_due >= CLAMPED_LATEST:
            next_due = None
        try:
            await ctx.store.notify(took_payload(
                ctx.turns.group, db_now,
                next_due.timestamp() if next_due is not None else None, heard, ctx.id))
        except DB_ERRORS as exc:
            ctx.db_error("announce", exc, 1)  # counted, not logged: nothing is lost

    def _lose_older_attempts(self, newer: Held) -> None:
        """Claiming attempt n of a job proves every earlier attempt lost its lease (this
        worker's own recovery took it back): stop those runs, their outcome is void. A
        held run of the same attempt is older too: its row was deleted and the job added
        again with the same id (attempts start over), so it goes the same way."""
        held = self.ctx.held
        self._lowest_attempt = min(self._lowest_attempt, newer.attempt)
        if newer.attempt - self._lowest_attempt < len(held):
            # Looking up the keys it could have beats a walk over every held job, per job
            # claimed. Every held key was claimed here, so none has an attempt below
            # _lowest_attempt (1, unless a row's count was set below 0 by hand).
            older = [h for a in range(self._lowest_attempt, newer.attempt + 1)
                     if (h := held.get((newer.id, a))) is not None]
        else:
            older = [h for h in held.values()
                     if h.id == newer.id and h.attempt <= newer.attempt]
        for h in older:
            self.ctx.lease_lost(h)

    async def _execute(self, job: dict[str, Any], held: Held) -> None:
        ctx = self.ctx
        # bind_contextvars(job_id=..., task=..., attempt=...), in this job's task only
        set_job_id, set_task, set_attempt = self._bind_job
        set_job_id(held.id)
        set_task(held.task_name)
        set_attempt(held.attempt)
        started = time.monotonic()
        try:
            lateness_ms = round(
                (ctx.db_time() - job["execution_time"].timestamp()) * 1000, 1)
            # debug, not info: with job_completed (which repeats lateness_ms) that would be
            # two lines per job, a third of the worker's CPU per no-op job, and journald's
            # rate limit would drop the warnings that matter.
            ctx.job_log.debug("job_started", lateness_ms=lateness_ms)
            outcome = await run_job(job, ctx.threads, running=held.running)
        except asyncio.CancelledError:
            ctx.executing -= 1
            held.finished = True
            if held.lease_lost:
                ctx.forget(held)
                log.warning("job_abandoned", reason="lease lost")
            elif held.cancel_requested:
                ctx.metrics.job_ran(held.task_name, held.queue, "cancelled",
                                    time.monotonic() - started)
                ctx.completions.put_nowait(Completion(held, CANCELLED, job["failures"]))
            else:
                log.info("job_interrupted", reason="shutdown")
            ctx.free_slot()
            return  # shutdown releases what is still held
        ctx.executing -= 1
        held.finished = True
        duration = round(time.monotonic() - started, 4)
        ran = _ran(outcome)
        ctx.metrics.job_ran(held.task_name, held.queue, ran, duration)
        if held.lease_lost:
            ctx.forget(held)
            log.warning("job_outcome_dropped", reason="lease lost", duration_s=duration)
        else:
            ctx.completions.put_nowait(
                Completion(held, outcome, job["failures"], duration, lateness_ms))
            if ran == "failed" and not outcome.unknown_task:  # task_unknown follows
                log.info("job_attempt_failed", error=outcome.error, duration_s=duration)
        ctx.free_slot()


def _cut_by_caps(capped: tuple[list[str], list[int]], jobs: list[dict[str, Any]]) -> bool:
    """Whether a per-queue cap may have cut a claim: it took (or expired) as many jobs of
    a capped queue as the cap left room for. Fewer, and the cap cut nothing: the claim
    took every job of that queue it saw due, as of an uncapped one."""
    taken = Counter(job["queue"] for job in jobs)
    return any(taken[q] >= room for q, room in zip(*capped, strict=True))


def _ran(outcome: Outcome) -> str:
    """How a run ended, for the duration histogram and the attempt log."""
    if outcome.snooze_seconds is not None:
        return "snoozed"  # job_snoozed follows, from the completer
    return "completed" if outcome.ok else "failed"
