"""The completer: writes the outcomes of finished jobs, one statement per batch.

Owns: the queue of outcomes (context.completions) from the moment a job finishes until
its row says so, and the held attempt's removal once it is written.

Invariants:
- A batch forms naturally while the previous write is in flight: it takes everything
  waiting, and every write is fenced by (worker id, id, attempt), so an outcome whose
  lease was lost is rejected (`job_completion_rejected`) instead of overwriting newer work.
  An outcome whose run was superseded here (context.held) is not written at all.
- Each outcome is written once: after a connection error part-way through a batch, the
  retry writes only what the failed write left.
- A batch the database refuses because of a value in it is written job by job, and the
  job whose outcome cannot be stored fails (`job_result_not_storable`).
- One write that cannot finish never holds up the outcomes behind it. A write that met a
  row lock past lock_timeout looks at its outcomes without waiting on a lock
  (Store.outcome_states): the free ones are written at once, the locked ones are parked
  (_park: looked at again the same way after a backoff, still counted unfinished in
  ctx.completions, so shutdown waits for them; written after the fresh outcomes, the
  smaller results first, one at a time while others come in: each parked write holds
  up what is behind it once at most). Every write is abandoned with its
  connection after `_write_bound` (Store.bounded, NoAnswer), a little over the pool's
  statement_timeout; a batch cut either way is written job by job, and an outcome cut
  alone is parked, or failed only on the evidence at TOO_SLOW_CUTS, which must span
  TOO_SLOW_SPAN_LEASES.
- An unwritten outcome whose row shows this worker's attempt ended by a write of its own
  (an abandoned write that committed after all) is counted and logged as written
  (earlier_write), not as a lost lease: a success, a failure, a retry, a snooze, a
  deferral or a cancellation alike (Store.outcome_states). One whose fenced write left
  this attempt's own unlocked row as it was (a cancel request withdrawn by SQL) is given
  up as a lost lease: written again it would be fenced out for ever.
- A job whose task is unknown here is put back for a worker that knows it (defer_job):
  due again after UNKNOWN_TASK_DELAY_SECONDS, doubling up to an hour, and failed once it
  has been deferred for UNKNOWN_TASK_GIVE_UP_SECONDS.
- A written batch frees slots the fetcher may be waiting for (its backlog cap);
  `recording` counts the outcomes of the write in flight (begun at `recording_since`),
  which the fetcher waits for, briefly (fetcher.WRITE_WAIT_SECONDS).
- A task that completed its own job (current_job().complete()) gets nothing written
  when its transaction committed, and is not counted as a lost lease; when it rolled
  back, its outcome is written as any other (a normal return becomes a failure, since
  its work did not commit). A snooze (Retry) and a failure without retries (Fail,
  retry_on) have statements of their own, fenced the same way.

Failure: a job whose outcome cannot be written keeps its slot here until it can, with
backoff (or its lease expires and it is recovered: at-least-once): a database outage
holds up the batch (every write would fail alike), a locked row or a write cut on
statement_timeout holds up only its own outcome (parked), a server that stopped
answering holds one write for `_write_bound`. A slow database never fails an ordinary
result, nor a large one through a spell of slowness shorter than TOO_SLOW_SPAN_LEASES:
only a result of TOO_SLOW_RESULT_BYTES or more that is cut again and again over that span
is failed for being slow to write.
A stop ends the back-off and later ones are short, so shutdown's deadline is not spent
sleeping. After kill(), it gives up after a few attempts (`completion_not_recorded`) so
that shutdown stays bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime

import psycopg

from ..logs import get_logger, info_events
from ..store import OutcomeState, statement_timeout_for
from .context import (
    DB_ERRORS,
    SHUTDOWN_BACKOFF_SECONDS,
    Completion,
    WorkerContext,
    backoff_delay,
    backoff_sleep,
)
from .executor import failed, task_retry_delay_off_loop

log = get_logger("pgsched.worker")

# Writes a batch cannot survive because of what is in it (a value PostgreSQL refuses):
# the batch is written job by job, and the job that cannot be written fails. A value over
# one of PostgreSQL's size limits is an OperationalError: caught before DB_ERRORS, or it
# would be retried for ever like an outage, holding up every later outcome.
DATA_ERRORS = (psycopg.DataError, UnicodeEncodeError, psycopg.errors.ProgramLimitExceeded,
               psycopg.errors.StatementTooComplex)
# The fields of a job_completed line after the event: Held.log_fields(), then the run's.
_COMPLETED_KEYS = ("job_id", "task", "attempt", "duration_s", "lateness_ms")
# A job whose task this worker does not know (rolling deploy): due again after 60 s,
# doubling up to an hour, and failed once it has been deferred for a day.
UNKNOWN_TASK_DELAY_SECONDS = 60.0
# A task's own completion whose row its still-open transaction locks is looked at again
# after this, instead of holding up the completer.
OWN_COMPLETION_RECHECK_SECONDS = 1.0
UNKNOWN_TASK_MAX_DELAY_SECONDS = 3600.0
UNKNOWN_TASK_GIVE_UP_SECONDS = 86400.0
# An outcome write still unanswered this long after the statement_timeout of the worker's
# pool (half a lease), or half that timeout if longer, is abandoned with its connection
# (Store.bounded). A live server cuts the statement first; the margin covers sending a
# large result, which comes before the server's clock starts.
WRITE_MARGIN_SECONDS = 1.0
# A result whose write was cut on statement_timeout (QueryCanceled) or by the write bound
# (NoAnswer: a batch of two 100 MB results, in tests) fails its job
# (job_result_not_storable) only on this evidence: the result is at least
# TOO_SLOW_RESULT_BYTES of JSON; its write alone was cut TOO_SLOW_CUTS times, each
# counted only when the database answered another write of this worker (a heartbeat
# renewing the leases, or an outcome) since the cut before: the database answers, this
# value does not fit in the time; and the cuts span TOO_SLOW_SPAN_LEASES leases (ten
# statement_timeouts), from the first cut of its write alone to the one that decides. A
# write tried after a spell of slowness ends is not cut, so a spell shorter than that span
# never fails a job, however many cuts it packs in; nor do two such spells with a spell
# between in which the write was not tried (its row locked): a park for anything but a
# cut starts the count again (_park). Between tries the outcome is parked
# (backoff up to a quarter lease), so one that never fits fails after about that span,
# each try holding the outcomes behind it for at most one write bound. A smaller result
# is never failed for being slow to write, however slow the database: it waits and is
# written again.
TOO_SLOW_RESULT_BYTES = 1 << 20
TOO_SLOW_CUTS = 3
TOO_SLOW_SPAN_LEASES = 5.0
# What a write the server cut or that met a row lock left unwritten: tried again on its
# own (QueryCanceled, DATA_ERRORS), or looked at without waiting on its row (the lock).
SPLIT_ERRORS = (*DATA_ERRORS, psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)


class Completer:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        timeout = statement_timeout_for(ctx.options.lease_seconds)
        self._write_bound = timeout + max(WRITE_MARGIN_SECONDS, timeout / 2)
        # Outcomes put back to be written later (_park), by held key: how many times. They
        # still count as unfinished in ctx.completions, so shutdown waits for them.
        self._waiting: dict[tuple[str, int], int] = {}
        self._parked: set[int] = set()  # id() of the outcomes parked from the batch in hand
        # statement_timeout cuts of an outcome written alone: counted cuts, and when the
        # first and the last one were (TOO_SLOW_CUTS, TOO_SLOW_SPAN_LEASES).
        self._cuts: dict[tuple[str, int], tuple[int, float, float]] = {}
        self._written_at = float("-inf")  # when an outcome write last succeeded

    async def run(self) -> None:
        while True:
            batch = [await self.ctx.completions.get()]
            while not self.ctx.completions.empty():
                batch.append(self.ctx.completions.get_nowait())
            self.ctx.recording = len(batch)
            self.ctx.recording_since = asyncio.get_running_loop().time()
            try:
                with self.ctx.store.bounded(self._write_bound):
                    await self._record(batch)
            finally:
                self.ctx.recording = 0
                if self._parked or self._waiting or self._cuts:
                    for c in batch:
                        if id(c) not in self._parked:
                            self._waiting.pop(c.held.key, None)
                            self._cuts.pop(c.held.key, None)
                            self.ctx.completions.task_done()
                    self._parked.clear()
                else:  # the usual batch: nothing parked, waiting or cut
                    for _ in batch:
                        self.ctx.completions.task_done()
            self.ctx.free_slot()  # the fetcher may be waiting for this backlog to shrink

    async def _record(self, batch: list[Completion]) -> None:
        # A run superseded while its outcome waited here (fetcher._lose_older_attempts)
        # writes nothing: the fence cannot tell it from a newer claim of the same key.
        pending = [c for c in batch if not c.held.lease_lost]
        if not self._waiting:  # the usual batch: nothing parked before
            await self._record_pending(pending)
            return
        parked = [c for c in pending if c.held.key in self._waiting]
        await self._record_pending([c for c in pending if c.held.key not in self._waiting])
        if parked:
            # Written apart from the batch: a parked outcome whose own row is free may
            # still meet a lock (a waiting dependent's), which must not fail the batch.
            # After the fresh outcomes, and one at a time while others come in: a parked
            # one may be a large result cut again (a whole statement_timeout).
            await self._record_pending(
                await self._record_apart(await self._sort_out(parked), requeue=True))

    async def _record_pending(self, pending: list[Completion]) -> None:
        attempt = 0
        while pending:
            try:
                await self._record_once(pending)
            except psycopg.errors.LockNotAvailable as exc:
                # Another transaction held a row past lock_timeout (a short hold, such as
                # a heartbeat's, ends well within it): the rest goes on without it. The
                # row may be a job's own (parked here) or a waiting dependent's that the
                # write settles (jobs_dependents_settle), whose job looks free: the free
                # ones are written apart, and one that meets the lock alone is parked.
                self.ctx.db_error("complete", exc, 0)
                pending = await self._record_apart(await self._sort_out(pending))
            except SPLIT_ERRORS as exc:
                if isinstance(exc, psycopg.errors.QueryCanceled):
                    # Cut, or abandoned (NoAnswer: a server that stopped answering): said
                    # here, since the writes on their own that follow may all succeed.
                    self.ctx.db_error("complete", exc, 0)
                pending = await self._record_apart(pending)
            except DB_ERRORS as exc:
                self.ctx.db_error("complete", exc, attempt)
                attempt += 1
                if self.ctx.killed.is_set() and attempt > 5:
                    log.error("completion_not_recorded", jobs=len(pending),
                              hint="their leases expire and another worker runs them again")
                    for c in pending:
                        self.ctx.forget(c.held)
                    return
                await backoff_sleep(attempt, stopping=self.ctx.stop_requested)

    async def _sort_out(self, cs: list[Completion]) -> list[Completion]:
        """Outcomes whose rows may be locked (a write failed on lock_timeout, or they were
        parked): where each stands, without waiting on a lock (Store.outcome_states).
        Returns those free to write now; parks those still locked, settles the ended."""
        try:
            states = await self.ctx.store.outcome_states(
                worker_id=self.ctx.id, held=[c.held.key for c in cs])
        except DB_ERRORS as exc:
            # Logged once per outcome's first look: parked ones come back here in an outage.
            self.ctx.db_error("complete", exc, min(self._waiting.get(c.held.key, 0) for c in cs))
            for c in cs:
                self._park(c)
            return []
        free = [c for c in cs if states[c.held.key].state == "free"]
        for c in cs:
            if states[c.held.key].state != "free":
                self._unwritten(c, states[c.held.key])
        return free

    def _park(self, c: Completion, cut: bool = False) -> None:
        """Write c again after a backoff, without holding up the outcomes behind it. Its
        slot stays taken and its lease renewed meanwhile; after kill(), it is given up
        after a few tries (`completion_not_recorded`) so that shutdown stays bounded.
        Parked for anything but a cut of its write (a row lock, a failed look), its cuts
        are forgotten: the verdict (TOO_SLOW_SPAN_LEASES) spans tries in a row, each cut,
        not two spells of slowness with a spell it was not tried in between."""
        if not cut:
            self._cuts.pop(c.held.key, None)
        tries = self._waiting[c.held.key] = self._waiting.get(c.held.key, 0) + 1
        if self.ctx.killed.is_set() and tries > 5:
            log.error("completion_not_recorded", **c.held.log_fields(),
                      hint="its lease expires and another worker runs it again")
            self.ctx.forget(c.held)
            return
        self._parked.add(id(c))
        self.ctx.parked += 1
        cap = (SHUTDOWN_BACKOFF_SECONDS if self.ctx.stop_requested.is_set()
               else self.ctx.options.lease_seconds / 4)
        asyncio.get_running_loop().call_later(backoff_delay(tries, cap), self._unpark, c)

    def _requeue(self, c: Completion) -> None:
        """A parked outcome back in the queue at once, untried: still parked (its tries,
        its cuts), but behind what came in meanwhile."""
        self._parked.add(id(c))
        self.ctx.completions.put_nowait(c)
        self.ctx.completions.task_done()  # the put stands for the outcome's own

    def _unpark(self, c: Completion) -> None:
        self.ctx.parked -= 1
        self.ctx.completions.put_nowait(c)
        self.ctx.completions.task_done()  # the put stands for the parked outcome's own

    async def _look_at_unwritten(self, cs: list[Completion]) -> None:
        """Outcomes a fenced write left unwritten (rare: a lost lease, or a write again
        after an abandoned one): each settled by where its row stands (_unwritten)."""
        states = await self.ctx.store.outcome_states(worker_id=self.ctx.id,
                                                     held=[c.held.key for c in cs])
        for c in cs:
            if states[c.held.key].state == "free":
                # This attempt's own row, unlocked, yet the write left it as it was: a
                # cancellation whose request was withdrawn (finish_cancelled_jobs is
                # fenced on it). Written again it would be fenced out for ever, its slot
                # and lease held: given up as a lost lease, as before the look existed.
                self.ctx.forget(c.held)
                self._lost(c)
            else:
                self._unwritten(c, states[c.held.key])

    def _unwritten(self, c: Completion, state: OutcomeState) -> None:
        """An outcome a write left unwritten, by where its row stands (outcome_states):
        still this worker's running attempt (parked), ended by an earlier write of this
        very outcome (abandoned when its server stopped answering or took too long, it
        committed after all: counted and logged as written, with earlier_write), or lost."""
        if state.state in ("free", "running"):
            self._park(c)
            return
        self.ctx.forget(c.held)
        if state.state is None or c.outcome.ok != (state.state == "completed"):
            self._lost(c)
        elif c.outcome.ok:
            self.ctx.stats.completed += 1
            self.ctx.metrics.job("completed", c.held.task_name, c.held.queue)
            self.ctx.job_log.info("job_completed", **c.held.log_fields(), earlier_write=True,
                                  duration_s=c.duration_s, lateness_ms=c.lateness_ms)
        else:
            self._ended(c, state.state, state.due, earlier_write=True)

    def _lost(self, c: Completion) -> None:
        self.ctx.count_lease_lost()
        if c.outcome.ok:
            log.warning("job_completion_rejected", **c.held.log_fields(), reason="lease lost")
        elif c.outcome.cancelled:
            log.warning("job_cancel_rejected", **c.held.log_fields(), reason="lease lost")
        else:
            log.warning("job_failure_rejected", **c.held.log_fields(), reason="lease lost")

    def _cut_too_often(self, c: Completion) -> bool:
        """Whether c's write, cut on statement_timeout once more, shows its result cannot
        be written in time (the evidence at TOO_SLOW_CUTS)."""
        now = asyncio.get_running_loop().time()
        cuts, first, last = self._cuts.get(c.held.key, (0, now, float("-inf")))
        if max(self.ctx.last_db_ok or float("-inf"), self._written_at) > last:
            cuts += 1
        self._cuts[c.held.key] = (cuts, first, now)
        return (c.outcome.ok and cuts >= TOO_SLOW_CUTS
                and now - first >= TOO_SLOW_SPAN_LEASES * self.ctx.options.lease_seconds
                and len(c.outcome.result_json) >= TOO_SLOW_RESULT_BYTES)

    async def _record_apart(self, batch: list[Completion],
                            requeue: bool = False) -> list[Completion]:
        """A batch PostgreSQL refused because of a value in it, or cut on
        statement_timeout: write each job on its own, the smaller results first (a large
        one's write may be cut, after a whole statement_timeout). A result that cannot be
        stored, or that the evidence says cannot be written in time, fails its job; an
        outcome cut or locked otherwise is parked. With `requeue` (parked outcomes), once
        one is tried the rest go back to the queue behind the outcomes that came in
        meanwhile, so each holds those up for one write at most. Returns what is left to
        write after a connection error."""
        batch = sorted(batch, key=_result_size)
        for i, c in enumerate(batch):
            if requeue and i and not self.ctx.completions.empty():
                for rest in batch[i:]:
                    self._requeue(rest)
                return []
            try:
                try:
                    await self._record_once([c])
                except psycopg.errors.LockNotAvailable:
                    self._park(c)
                except psycopg.errors.QueryCanceled as exc:
                    self.ctx.db_error("complete", exc, self._waiting.get(c.held.key, 0))
                    if not self._cut_too_often(c):
                        self._park(c, cut=True)
                        continue
                    c = batch[i] = _unstorable(c, "recorded within statement_timeout", exc)
                    await self._record_once([c])
                except DATA_ERRORS as exc:
                    if not c.outcome.ok:
                        raise
                    c = batch[i] = _unstorable(c, "stored", exc)
                    await self._record_once([c])
            except DATA_ERRORS as exc:
                log.error("completion_not_recorded", **c.held.log_fields(), error=str(exc),
                          hint="its lease expires and another worker runs it again")
                self.ctx.forget(c.held)
            except DB_ERRORS:
                self._cuts.pop(c.held.key, None)  # an outage is no cut: tries in a row
                return batch[i:]
        return []

    async def _record_once(self, pending: list[Completion]) -> None:
        """Write a batch (failures one by one). Each outcome leaves `pending` as soon as it
        is written: after a connection error part-way, a retry writes only the rest (the
        successes already committed would be fenced out and reported as lost leases)."""
        # The live flag too: a complete() made after the task returned (from a thread it
        # left behind) must not be taken for a lost lease either. Written last, each on its
        # own: its row may still be locked by the task's open transaction, and waiting for
        # it must not hold up the other outcomes.
        own: list[Completion] = []
        successes: list[Completion] = []
        cancelled: list[Completion] = []
        failures: list[Completion] = []
        for c in pending:
            if c.outcome.completed_in_task or c.held.completed_in_task:
                own.append(c)
            elif c.outcome.ok:
                successes.append(c)
            elif c.outcome.cancelled:
                cancelled.append(c)
            else:
                failures.append(c)
        if successes:
            written = await self.ctx.store.complete_jobs(
                worker_id=self.ctx.id,
                done=[(c.held.id, c.held.attempt, c.outcome.result_json) for c in successes],
            )
            self._written_at = asyncio.get_running_loop().time()
            unwritten = [c for c in successes if c.held.key not in written]
            if unwritten:
                await self._look_at_unwritten(unwritten)
            _remove(pending, successes)
            stats, metrics = self.ctx.stats, self.ctx.metrics
            lines = []
            for c in successes:
                held = c.held
                if held.key in written:
                    self.ctx.forget(held)
                    stats.completed += 1
                    metrics.job("completed", held.task_name, held.queue)
                    lines.append((held.id, held.task_name, held.attempt, c.duration_s,
                                  c.lateness_ms))
            # One job_completed line per job (held.log_fields(), duration_s, lateness_ms),
            # the batch's lines rendered together and written at once (logs.info_events).
            info_events(self.ctx.job_log, "job_completed", _COMPLETED_KEYS, lines)
        if cancelled:
            await self._record_cancelled(cancelled)
            _remove(pending, cancelled)
        for c in failures:
            await self._record_failure(c)
            _remove(pending, [c])
        for c in own:
            try:
                await self._record_task_completion(c)
            except psycopg.errors.LockNotAvailable:
                # The task's transaction is still open: judge it again in a moment.
                asyncio.get_running_loop().call_later(
                    OWN_COMPLETION_RECHECK_SECONDS, self.ctx.completions.put_nowait, c)
            _remove(pending, [c])

    async def _record_task_completion(self, c: Completion) -> None:
        """A task that called current_job().complete(): its own transaction completed the
        job, unless that transaction rolled back. Committed: nothing to write (and no lost
        lease). Not: the job is still this run's, and its outcome is recorded as any other;
        a run that returned normally did not commit its work, which is a failure."""
        committed = await self.ctx.store.completed_by(
            worker_id=self.ctx.id, job_id=c.held.id, attempt=c.held.attempt)
        if committed:
            self.ctx.forget(c.held)
            self.ctx.stats.completed += 1
            self.ctx.metrics.job("completed", c.held.task_name, c.held.queue)
            self.ctx.job_log.info("job_completed", **c.held.log_fields(), in_task=True,
                                  duration_s=c.duration_s, lateness_ms=c.lateness_ms)
            return
        outcome = dataclasses.replace(c.outcome, completed_in_task=False)
        if outcome.ok:
            outcome = failed("the task called current_job().complete() but its transaction "
                             "did not commit: commit it before the task returns")
        # Settled: the outcome below is written as any other, and a thread the task left
        # behind cannot complete the job any more.
        running, c.held.running = c.held.running, None
        if running is not None:
            running.end()
        try:
            await self._record_once([dataclasses.replace(c, outcome=outcome)])
        except psycopg.errors.LockNotAvailable:
            c.held.running = running  # still its task's transaction's: judged again later
            raise

    async def _record_failure(self, c: Completion) -> None:
        """A failed attempt (retried while the budget lasts, failed at once when final),
        a snooze (Retry), or a job whose task this worker does not know (put back for one
        that does, without counting a failure)."""
        if c.outcome.snooze_seconds is not None:
            row = await self.ctx.store.snooze_job(
                worker_id=self.ctx.id, job_id=c.held.id, attempt=c.held.attempt,
                delay_seconds=c.outcome.snooze_seconds, max_snoozes=c.outcome.max_snoozes)
        elif c.outcome.final:
            row = await self.ctx.store.fail_job_now(
                worker_id=self.ctx.id, job_id=c.held.id, attempt=c.held.attempt,
                error=c.outcome.error, traceback=c.outcome.traceback)
        elif c.outcome.unknown_task:
            row = await self.ctx.store.defer_job(
                worker_id=self.ctx.id, job_id=c.held.id, attempt=c.held.attempt,
                error=c.outcome.error, base_delay_seconds=UNKNOWN_TASK_DELAY_SECONDS,
                max_delay_seconds=UNKNOWN_TASK_MAX_DELAY_SECONDS,
                give_up_seconds=UNKNOWN_TASK_GIVE_UP_SECONDS)
        else:
            row = await self.ctx.store.fail_job(
                worker_id=self.ctx.id, job_id=c.held.id, attempt=c.held.attempt,
                error=c.outcome.error, traceback=c.outcome.traceback,
                retry_delay_seconds=await task_retry_delay_off_loop(
                    c.held.task_name, c.failures + 1, self.ctx.options.retry_base_seconds,
                    self.ctx.options.retry_max_seconds))
        self._written_at = asyncio.get_running_loop().time()
        if row is None:
            await self._look_at_unwritten([c])
        else:
            self.ctx.forget(c.held)
            self._ended(c, row["status"], row["execution_time"])

    def _ended(self, c: Completion, status: str, due: datetime | None,
               earlier_write: bool = False) -> None:
        """Count and log an outcome other than a success, written: the job's status now,
        and when it is due again if it was put back (None: claimed again since, after an
        earlier write of it)."""
        held, fields = c.held, c.held.log_fields()
        if earlier_write:
            fields["earlier_write"] = True
        retry_at = None if due is None else due.isoformat()
        if status == "pending" and due is not None and not c.outcome.unknown_task:
            self.ctx.note_due(due.timestamp())
        if status == "pending" and c.outcome.unknown_task:
            self.ctx.stats.deferred += 1
            log.warning("task_unknown", **fields, retry_at=retry_at,
                        hint="deploy the code that defines it to this worker, or let a "
                             "worker that has it run the job")
        elif status == "pending" and c.outcome.snooze_seconds is not None:
            self.ctx.stats.snoozed += 1
            log.info("job_snoozed", **fields, retry_at=retry_at)
        elif status == "pending":
            self.ctx.stats.retried += 1
            self.ctx.metrics.job("retried", held.task_name, held.queue)
            log.info("job_retry_scheduled", **fields, error=c.outcome.error, retry_at=retry_at)
        elif status == "cancelled":  # a cancel was requested while it failed, or on request
            self.ctx.stats.cancelled += 1
            self.ctx.metrics.job("cancelled", held.task_name, held.queue)
            log.info("job_cancelled", **fields, error=c.outcome.error)
        else:
            self.ctx.stats.failed += 1
            self.ctx.metrics.job("failed", held.task_name, held.queue)
            log.error("job_failed", **fields, error=c.outcome.error)

    async def _record_cancelled(self, cancelled: list[Completion]) -> None:
        if not cancelled:
            return
        written = await self.ctx.store.finish_cancelled_jobs(
            worker_id=self.ctx.id, held=[(c.held.id, c.held.attempt) for c in cancelled])
        self._written_at = asyncio.get_running_loop().time()
        unwritten = [c for c in cancelled if c.held.id not in written]
        if unwritten:
            await self._look_at_unwritten(unwritten)
        for c in cancelled:
            if c.held.id in written:
                self.ctx.forget(c.held)
                self.ctx.stats.cancelled += 1
                self.ctx.metrics.job("cancelled", c.held.task_name, c.held.queue)
                log.info("job_cancelled", **c.held.log_fields())


def _unstorable(c: Completion, could_not_be: str, exc: Exception) -> Completion:
    """c with its result replaced by the failure that says why it could not be written."""
    log.error("job_result_not_storable", **c.held.log_fields(), error=str(exc))
    return Completion(c.held, failed(f"the task's return value could not be {could_not_be}: "
                                     f"{exc}"), c.failures, c.duration_s, c.lateness_ms)


def _result_size(c: Completion) -> int:
    return len(c.outcome.result_json) if c.outcome.ok else 0


def _remove(pending: list[Completion], written: list[Completion]) -> None:
    """Take `written` out of `pending`, by identity: two outcomes may compare equal (a
    dataclass compares its fields)."""
    gone = {id(c) for c in written}
    pending[:] = [c for c in pending if id(c) not in gone]
