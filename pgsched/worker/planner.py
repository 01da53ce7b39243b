"""The planner: turns due windows of recurring schedules into jobs, on every worker.

No leader. Each pass is one transaction (Store.fire_due_schedules):
1. lock the due, active schedules with FOR UPDATE SKIP LOCKED, reading the database
   clock; replicas waking together split the due rows instead of queueing on them (due:
   see "Planning ahead" below);
2. decide each schedule's windows with pgsched.timing.due_windows (pure; the catch-up
   mode picks which missed windows run; a window planned ahead is decided as at its
   fire time, so it is on time and runs in every mode);
3. in one statement, move each next_fire_at on (compare-and-set on the value read) and
   insert one job per window with execution_time = the window's fire time; for a
   schedule with overlap = false that statement writes a window as skipped (a cancelled
   job) while a run of the schedule is pending or running (sql/recurring.sql).
A planner that dies anywhere before its commit moves nothing and inserts nothing; its
locks go with its session, and the next planner to look does the work. A planner frozen
mid-transaction is cut off by the server after IDLE_TIMEOUT_SECONDS. The unique index on
jobs (schedule_id, fire_time) makes a second job for a window impossible regardless.

Planning ahead: a window is planned up to LOOKAHEAD_SECONDS before its fire time, as a
pending job with execution_time = the fire time, so at the fire time the jobs exist and
the workers' due-time timers start them: 10,000 windows falling due together no longer
wait for planner passes that take seconds (issue 11). Bounds, so that planning ahead
changes nothing a user can rely on:
- at most one window per schedule is planned ahead, and only once the schedule's
  previous window has come (last_fire_at <= now);
- overlap = false: only while no run of the schedule is pending or running (whether such
  a run ends before the fire time is unknown until then; if one is active, the window is
  decided at its fire time, as before; a triggered run made after the window was planned
  sends it back to its fire time). Runs of later windows never count as overlapping;
- a schedule changed, paused, disabled or removed before the window comes must not run
  the old plan: a trigger on schedules (migration 0016) withdraws the unclaimed job,
  whichever path made the change, and a window withdrawn under an unchanged timing is
  planned again with the new definition (one another job waits for is rewritten in place
  instead, migration 0021, and one withdrawn as cancelled that comes again is taken over
  by advance_schedules: its id is the window's).
LOOKAHEAD_SECONDS is small: a few times the pass time of 10,000 schedules on a loaded
2-core machine (1.4 s across 3 workers), and short enough that a window planned ahead
shows in `pgsched ls` as an ordinary scheduled job for a few seconds at most. Schedules
beyond what a planner can plan within it are planned late, as before, never lost.

Timing: after a pass the planner sleeps until the earliest moment a schedule becomes
due (database clock; LOOKAHEAD_SECONDS before its next_fire_at, or at it), at most
MAX_SLEEP_SECONDS; a NOTIFY 'schedules' (a schedule added, resumed or changed elsewhere)
or a listener reconnect wakes it early. It does not poll.

At start it upserts the process's @periodic schedules and disables the code schedules it
no longer defines (recurring.sync_code_schedules). Burst workers do neither.

Catch-up (per schedule): latest runs the most recent missed window once; skip runs only
windows at most SKIP_TOLERANCE late (and their jobs expire if not started within it);
all runs every missed window, at most CATCH_UP_LIMIT of them, the most recent.

Failure: connection errors are logged and retried with backoff. (An outdated schema is
caught by the worker before any service starts.) A stored schedule that no longer parses
(a time zone removed from tzdata, a cron expression over the length limit, arguments
written with SQL that no worker could decode) is logged, makes no job, and is looked at
again every BROKEN_RETRY; it never stops the worker or the other schedules. Anything
else is a bug and stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..errors import InvalidInput
from ..logs import get_logger
from ..recurring import format_instant, sync_code_schedules, timing_of, window_job_id
from ..store import MAX_JSON_DEPTH, ScheduleAdvance
from ..timing import due_windows
from .context import DB_ERRORS, WorkerContext, backoff_sleep

log = get_logger("pgsched.planner")

CATCH_UP_LIMIT = 100
SKIP_TOLERANCE = timedelta(seconds=60)
BATCH_SIZE = 100
# Windows are planned up to this long before their fire time (see "Planning ahead" above).
LOOKAHEAD_SECONDS = 5.0
MAX_SLEEP_SECONDS = 60.0
# Passes come at most this often: a flood of NOTIFY 'schedules' (any role may send it)
# costs a bounded number of planner transactions. A wake-up during the gap is kept.
MIN_GAP_SECONDS = 0.1
BUSY_RETRY_SECONDS = 0.5  # a due schedule is locked by another planner that is finishing
BROKEN_RETRY = timedelta(minutes=5)
IDLE_TIMEOUT_SECONDS = 10.0


@dataclass
class PlanResult:
    """What one pass did: the jobs it inserted, and when to look again."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    wake_at: datetime | None = None  # the earliest moment a schedule becomes due
    db_now: datetime | None = None

    def delay_seconds(self) -> float:
        if self.wake_at is None or self.db_now is None:
            return MAX_SLEEP_SECONDS
        delay = (self.wake_at - self.db_now).total_seconds()
        if delay <= 0:
            # Due but not ours: another planner holds it (and is about to commit).
            return BUSY_RETRY_SECONDS * random.uniform(0.8, 1.2)
        # A few milliseconds late, so the database clock has passed the fire time.
        return min(MAX_SLEEP_SECONDS, delay + random.uniform(0.005, 0.02))


class Planner:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.store = ctx.store

    def wake(self) -> None:
        """Look at the schedules again now (one was added or changed elsewhere)."""
        self.ctx.plan_now.set()

    async def run(self) -> None:
        if self.ctx.options.burst:
            return
        failures = 0
        synced = False
        while True:
            self.ctx.plan_now.clear()
            try:
                if not synced:
                    await self.sync()
                    synced = True
                delay = (await self.run_once()).delay_seconds()
                failures = 0
            except DB_ERRORS as exc:
                self.ctx.db_error("planner", exc, failures)
                failures += 1
                await backoff_sleep(failures)
                continue
            if await self.ctx.sleep_or_close(MIN_GAP_SECONDS) or await self._sleep(delay):
                return

    async def sync(self) -> None:
        """Upsert this process's @periodic schedules; disable those gone from the code."""
        changes = await sync_code_schedules(self.store, self.ctx.options.timezone)
        by_change: dict[str, list[str]] = {}
        for row in changes:
            by_change.setdefault(row["change"], []).append(row["id"])
        for schedule_id in by_change.pop("cli_owned", []):
            log.warning("schedule_defined_by_cli", schedule_id=schedule_id,
                        hint="a schedule made with `pgsched add` has this id; the @periodic "
                             "definition is ignored until it is removed")
        if by_change:
            log.info("schedules_synced", **by_change)

    async def run_once(self, now: datetime | None = None) -> PlanResult:
        """Enqueue every due window; `now` replaces the database clock (tests only)."""
        result = PlanResult()
        while True:
            locked, jobs = await self.store.fire_due_schedules(
                plan=self._plan, limit=BATCH_SIZE, now=now,
                skip_grace_seconds=SKIP_TOLERANCE.total_seconds(),
                idle_timeout_seconds=IDLE_TIMEOUT_SECONDS,
                lookahead_seconds=LOOKAHEAD_SECONDS,
            )
            result.jobs += jobs
            if locked < BATCH_SIZE:
                break
        for job in result.jobs:
            window = {"schedule_id": job["schedule_id"], "job_id": job["id"],
                      "fire_time": format_instant(job["fire_time"])}
            if job["status"] == "pending":
                log.info("schedule_window_enqueued", **window)
            else:  # overlap = false and a run of the schedule was still active
                log.info("schedule_window_skipped", **window)
        result.wake_at, result.db_now = await self.store.next_schedule_fire(
            LOOKAHEAD_SECONDS)
        if now is not None:
            result.db_now = now
        return result

    def _plan(self, row: dict[str, Any]) -> ScheduleAdvance:
        """Decide one locked schedule's windows (runs inside the store's transaction)."""
        now, expected = row["db_now"], row["next_fire_at"]
        if row["args_unreadable"]:
            log.error("schedule_broken", schedule_id=row["id"],
                      error=f"its stored args or kwargs nest deeper than {MAX_JSON_DEPTH} "
                            "levels or hold an integer of thousands of digits; no worker "
                            "could decode its jobs, so none are made: redefine it with "
                            "`pgsched add --on-conflict replace` or remove it",
                      retry_in_s=BROKEN_RETRY.total_seconds())
            return ScheduleAdvance(row["id"], expected, now + BROKEN_RETRY)
        try:
            # A window planned ahead is decided as at its fire time: on time, so it runs
            # whatever the catch-up mode, and it is the only one.
            windows, next_fire = due_windows(
                timing_of(row), expected, max(now, expected), catch_up=row["catch_up"],
                tolerance=SKIP_TOLERANCE, limit=CATCH_UP_LIMIT,
            )
        except InvalidInput as exc:
            log.error("schedule_broken", schedule_id=row["id"], error=str(exc),
                      retry_in_s=BROKEN_RETRY.total_seconds())
            return ScheduleAdvance(row["id"], expected, now + BROKEN_RETRY)
        late = now - expected
        if late > SKIP_TOLERANCE:
            log.warning("schedule_catching_up", schedule_id=row["id"], catch_up=row["catch_up"],
                        missed_since=format_instant(expected), windows=len(windows))
        return ScheduleAdvance(
            row["id"], expected, next_fire,
            [(window_job_id(row["id"], fire), fire) for fire in windows],
        )

    async def _sleep(self, seconds: float) -> bool:
        """Sleep until woken or `seconds` pass; True once the worker is closing."""
        waiters = [asyncio.ensure_future(self.ctx.plan_now.wait()),
                   asyncio.ensure_future(self.ctx.closing.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        return self.ctx.closing.is_set()
