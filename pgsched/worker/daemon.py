"""The worker daemon: claims due jobs, runs them, keeps their leases, records outcomes.

Services, each an asyncio task under one TaskGroup (a service that crashes stops the
worker loudly instead of letting it limp on):

- fetcher: the only claimer. Claims at most its free slots (fewer while more than one
  batch of outcomes waits for the completer), in one statement, then sleeps until the
  earliest of: a NOTIFY for a job due now, a timer set to the next known due time, a
  freed slot while a backlog remains, or the safety poll. With every slot busy it sleeps
  until a slot frees or a wake-up arrives (never on a due time it cannot act on). Wake-ups
  are cleared before the claim, so one that arrives during it is not lost, and a timer set
  during the claim is kept if it is earlier than the claim's.
- listener: holds the LISTEN connection and turns notifications into wake-ups; after a
  reconnect it wakes the fetcher, since notifications sent meanwhile are lost. Payloads
  are untrusted (any role may NOTIFY): only pgsched's own forms are accepted, and wake-ups
  for jobs due now come from a token bucket (see NOTIFY_WAKE_BURST).
- completer: writes finished jobs in one statement per batch; a batch forms naturally
  while the previous write is in flight. A batch the database refuses because of a value
  in it is written job by job, and the job whose outcome cannot be stored fails; a job
  whose task is unknown here is put back for a worker that knows it (defer_job).
- heartbeater: renews all held leases in one statement; a job whose lease was lost is
  cancelled locally (its late writes would be fenced out anyway), and so is a job whose
  cancel was requested (`pgsched cancel`; the NOTIFY 'cancel:<worker id>' makes the
  heartbeat come at once, the heartbeat itself is the fallback). It also pings systemd's
  watchdog.
- loop-watch: only sleeps, and logs `event_loop_blocked` when it wakes more than a
  heartbeat late (a task doing CPU work in `async def`).
- maintenance: orphan recovery, worker-registry pruning and vacuum (maintenance.py).
- planner: enqueues the due windows of recurring schedules (planner.py).

Held jobs are keyed by (id, attempt): after this worker's own recovery took a job back and
claimed it again, the older attempt is cancelled and its late outcome touches nothing of
the newer one.

Queues: a worker claims from `options.queues` (None: every queue) except paused ones,
and at most `queue_concurrency[q]` jobs of queue q at once. Monitoring: counters in
`self.metrics` (metrics.py), served with /healthz when `metrics_listen` is set; systemd
READY/STOPPING/WATCHDOG when `systemd_notify` is set (systemd.py).

Lifecycle: run() returns after stop() (SIGTERM/SIGINT): claiming stops, running jobs get
`shutdown_grace_seconds` to finish, the rest are cancelled and put back to pending
(not a failure). kill() (a second signal) skips the grace and gives cancelled jobs at
most KILL_CLEANUP_SECONDS, even if a task ignores its cancellation. Jobs are never left
running by a clean exit; after a crash their leases expire and another worker recovers
them. Whatever the database does, run() returns within the grace plus
KILL_CLEANUP_SECONDS plus SHUTDOWN_DB_SECONDS of the signal: past that deadline pending
writes are abandoned (`shutdown_timed_out`) and leases left behind expire as after a crash.

Database outages: every service catches connection errors, logs `db_unavailable`, backs
off with jitter and carries on; a job whose outcome cannot be written keeps its slot in
the completer until it can (or its lease expires and it is recovered: at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
import structlog

from .. import __version__
from ..logs import get_logger
from ..queues import capped_free_slots, saturated
from ..store import Store, connect, migrations
from ..tasks import JobPriority
from .executor import CANCELLED, Outcome, TaskThreads, failed, retry_delay, run_job
from .maintenance import Maintenance
from .metrics import MetricsServer, WorkerMetrics
from .planner import Planner
from .systemd import SystemdNotifier

log = get_logger("pgsched.worker")

SCHEDULES_CHANGED = "schedules"  # NOTIFY payload of sql/recurring.sql; others are epochs
LATEST_SCHEMA = migrations()[-1][0]
# Added to a due-time timer so that the claim reaches the server just after the job falls
# due: one that arrives early claims nothing and costs another round trip.
TIMER_MARGIN_SECONDS = 0.0005
DB_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.InterfaceError)
# Writes a batch cannot survive because of what is in it (a value PostgreSQL refuses):
# the batch is written job by job, and the job that cannot be written fails. A value over
# one of PostgreSQL's size limits is an OperationalError: caught before DB_ERRORS, or it
# would be retried for ever like an outage, holding up every later outcome.
DATA_ERRORS = (psycopg.DataError, UnicodeEncodeError, psycopg.errors.ProgramLimitExceeded,
               psycopg.errors.StatementTooComplex)
# After a second signal, how long cancelled jobs still get to run their cleanup.
KILL_CLEANUP_SECONDS = 1.0
# After the grace (and cleanup), how long shutdown may still spend writing outcomes and
# releasing jobs; past it the worker exits anyway (the database is unreachable) and what
# it still held is recovered by lease expiry.
SHUTDOWN_DB_SECONDS = 5.0
# A job whose task this worker does not know (rolling deploy): due again after 60 s,
# doubling up to an hour, and failed once it has been deferred for a day.
UNKNOWN_TASK_DELAY_SECONDS = 60.0
UNKNOWN_TASK_MAX_DELAY_SECONDS = 3600.0
UNKNOWN_TASK_GIVE_UP_SECONDS = 86400.0
# NOTIFY payloads are untrusted (any role that can connect may send them): a due time is
# plain decimal seconds since the epoch. Notifications of jobs due now wake the fetcher
# from a token bucket: NOTIFY_WAKE_BURST at once, then NOTIFY_WAKE_RATE a second; a claim
# that finds jobs gives its token back, so only wake-ups that find nothing (a flood, or
# jobs another worker took first) are slowed, and those past the budget are folded into
# one timer instead of being dropped.
_EPOCH_RE = re.compile(r"^-?[0-9]{1,11}(\.[0-9]{1,9})?$")
NOTIFY_WAKE_BURST = 20
NOTIFY_WAKE_RATE = 50.0
# 'cancel:<worker id>' makes the heartbeat come at once, but at most once per this gap: a
# flood of them (any role may send it) must not turn the heartbeater into a busy loop.
CANCEL_BEAT_MIN_GAP_SECONDS = 0.1


@dataclass(frozen=True)
class WorkerOptions:
    concurrency: int = 25
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    shutdown_grace_seconds: float = 30.0
    poll_seconds: float = 5.0
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    max_recoveries: int = 3
    burst: bool = False
    vacuum_enabled: bool = True
    vacuum_interval_seconds: float = 3600.0
    retention_days: float = 7.0
    failed_retention_days: float = 30.0
    vacuum_batch_size: int = 1000
    timezone: str = "UTC"  # of @periodic cron schedules that name none ([jobs] timezone)
    queues: tuple[str, ...] | None = None  # None: every queue
    queue_concurrency: tuple[tuple[str, int], ...] = ()  # (queue, limit) within this worker
    metrics_listen: str | None = None  # "host:port" for /metrics and /healthz
    systemd_notify: bool = False  # speak sd_notify when NOTIFY_SOCKET is set


@dataclass
class _Held:
    """A claimed job this worker owns: running, or finished and waiting to be recorded."""

    id: str
    attempt: int
    task: asyncio.Task[None] | None = None
    lease_lost: bool = False
    finished: bool = False
    task_name: str = ""
    queue: str = ""
    cancel_requested: bool = False

    @property
    def key(self) -> tuple[str, int]:
        # (id, attempt), never the id alone: an older attempt of the same job may still be
        # running here after this worker's own recovery took it back and claimed it again.
        return self.id, self.attempt


@dataclass
class _Completion:
    held: _Held
    outcome: Outcome
    failures: int
    duration_s: float = 0.0
    lateness_ms: float = 0.0  # how long after its due time the job started


@dataclass
class Stats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    expired: int = 0
    released: int = 0
    lease_lost: int = 0
    deferred: int = 0  # unknown task: put back for a worker that knows it
    claims: int = 0  # claim statements run
    wakeups: int = 0  # turns of the fetcher's loop
    notify_ignored: int = 0  # notification payloads that did not parse
    extra: dict[str, int] = field(default_factory=dict)


def new_worker_id() -> str:
    # host and pid for people; the random part so that a restarted process that gets the
    # same pid (containers) never inherits the leases of its previous life.
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def raise_if_cancelling() -> None:
    """psycopg may turn a cancellation that lands mid-query into a connection error; a
    service being stopped must still stop, so the cancellation is restored."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def backoff_sleep(attempt: int, cap: float = 10.0) -> None:
    await asyncio.sleep(min(cap, 0.1 * 2**min(attempt, 10)) * random.uniform(0.5, 1.0))


class Worker:
    def __init__(
        self,
        store: Store,
        dsn: str,
        options: WorkerOptions = WorkerOptions(),
        *,
        worker_id: str | None = None,
    ):
        self.store = store
        self.dsn = dsn
        self.options = options
        self.id = worker_id or new_worker_id()
        self.stats = Stats()
        self._held: dict[tuple[str, int], _Held] = {}
        self._executing = 0
        self._threads = TaskThreads(options.concurrency)
        self._ignoring_cancellation: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._completions: asyncio.Queue[_Completion] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._killed = asyncio.Event()
        self.closing = asyncio.Event()  # set after draining: side services return
        self._slot_freed_wakes = False
        self._next_due_deadline: float | None = None  # loop.time() of the next known due job
        self._noted_deadline: float | None = None  # the earliest note_due since the claim began
        self._wake_tokens = float(NOTIFY_WAKE_BURST)  # of the notification token bucket
        self._wake_tokens_at = 0.0  # loop.time() the bucket was last filled
        self._shutdown_deadline: asyncio.Timeout | None = None  # armed by stop() and kill()
        self._clock_offset = 0.0  # database clock minus local clock, from the last claim
        self._priorities = sorted(int(p) for p in JobPriority)
        self.ready = asyncio.Event()  # set once registered and the first claim ran
        self.on_ready: list[Callable[[], Awaitable[None] | None]] = []
        self.maintenance = Maintenance(self)
        self.application_name = "pgsched-worker"
        self.planner = Planner(self)
        self.schema_outdated = False
        self.metrics = WorkerMetrics()
        self.systemd = SystemdNotifier.from_environment() if options.systemd_notify \
            else SystemdNotifier()
        self._queue_limits = dict(options.queue_concurrency)
        self._beat_now = asyncio.Event()  # a cancel request: heartbeat without waiting
        self.listening = False  # the LISTEN connection is up
        self.last_db_ok: float | None = None  # loop.time() of the last heartbeat that worked
        self._job_log = log  # bound for real in run(), once logging is configured

    # -- public control ------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop claiming, let running jobs finish within the grace period."""
        if self._stopping.is_set():
            self.kill()
        self._stopping.set()
        self._wake.set()
        self._arm_shutdown_deadline(self.options.shutdown_grace_seconds)

    def kill(self) -> None:
        """Immediate: cancel running jobs now and put them back to pending."""
        self._stopping.set()
        self._killed.set()
        self._wake.set()
        self._arm_shutdown_deadline(0.0)

    def _arm_shutdown_deadline(self, grace: float) -> None:
        """However the database behaves, run() returns this long after a signal: past it,
        everything still in progress is cancelled (a claim or write waiting on an
        unreachable server included) and leases left behind expire as after a crash."""
        if self._shutdown_deadline is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + KILL_CLEANUP_SECONDS + SHUTDOWN_DB_SECONDS
        when = self._shutdown_deadline.when()
        if when is None or deadline < when:
            self._shutdown_deadline.reschedule(deadline)

    @property
    def running_jobs(self) -> int:
        return self._executing

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def abandoned_threads(self) -> int:
        """Sync tasks still running in threads (the process must not wait for them)."""
        return self._threads.running

    @property
    def hung_threads(self) -> int:
        """Threads running a sync task whose job has moved on (timed out, cancelled)."""
        return self._threads.abandoned

    @property
    def threads_over_cap(self) -> bool:
        """Too many hung threads to replace: they take slots from new sync jobs."""
        return self._threads.over_cap

    @property
    def abandoned_tasks(self) -> int:
        """Async tasks that ignored the shutdown's cancellation and still run."""
        return sum(1 for task in self._ignoring_cancellation if not task.done())

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self.id)
        # Per-job events go through a bound logger: the module's lazy proxy binds anew on
        # every call, which costs more than a filtered-out event at thousands of jobs/s.
        self._job_log = log.bind()
        log.info("worker_starting", concurrency=self.options.concurrency, pid=os.getpid(),
                 burst=self.options.burst, queues=list(self.options.queues or ["*"]))
        self.systemd.check_watchdog(self.options.heartbeat_seconds)
        if not await self._schema_ready():
            return
        server = None
        if self.options.metrics_listen:
            server = MetricsServer(self, self.options.metrics_listen)
            await server.start()
        await self._register()
        try:
            async with asyncio.timeout(None) as self._shutdown_deadline:
                if self._stopping.is_set():  # signalled during start-up
                    self._arm_shutdown_deadline(0.0)
                await self._serve()
        except TimeoutError:
            for held in self._held.values():
                if held.task is not None:
                    held.task.cancel()
            log.error("shutdown_timed_out", held=len(self._held),
                      hint="the database could not be reached to record outcomes or release "
                           "jobs; their leases expire and another worker recovers them")
        finally:
            self._shutdown_deadline = None  # done with: a later stop() has nothing to bound
            if server is not None:
                await server.close()
            self._threads.shutdown()
            with contextlib.suppress(*DB_ERRORS, TimeoutError):
                async with asyncio.timeout(KILL_CLEANUP_SECONDS):
                    await self.store.unregister_worker(self.id)
            counts = {k: v for k, v in vars(self.stats).items() if v and k != "extra"}
            log.info("worker_stopped", **counts)

    async def _serve(self) -> None:
        """The services; returns once the fetcher stopped and running jobs were drained."""
        async with asyncio.TaskGroup() as services:
            fetcher = services.create_task(self._fetch_loop(), name="fetcher")
            side = [
                services.create_task(self._listen_loop(), name="listener"),
                services.create_task(self._complete_loop(), name="completer"),
                services.create_task(self._heartbeat_loop(), name="heartbeater"),
                services.create_task(self._watch_loop(), name="loop-watch"),
                services.create_task(self.maintenance.run(), name="maintenance"),
                services.create_task(self.planner.run(), name="planner"),
            ]
            await fetcher
            self.systemd.stopping(f"stopping: {self._executing} jobs running")
            await self._drain()
            # Loops also watch `closing`: a cancellation that lands inside a psycopg
            # call can be swallowed there, and must not leave the worker hanging.
            self.closing.set()
            for service in side:
                service.cancel()

    async def _schema_ready(self) -> bool:
        """A worker started with --no-migrate on an older schema stops, saying why,
        instead of failing query by query."""
        version = await self.store.schema_version() or 0
        self.schema_outdated = version < LATEST_SCHEMA
        if self.schema_outdated:
            log.error("schema_outdated", version=version, needed=LATEST_SCHEMA,
                      hint="run `pgsched migrate`, then start the worker again")
        return not self.schema_outdated

    # -- registration ----------------------------------------------------------------------

    async def _register(self) -> None:
        attempt = 0
        while True:
            try:
                await self.store.register_worker(
                    id=self.id, host=socket.gethostname(), pid=os.getpid(), version=__version__,
                    concurrency=self.options.concurrency,
                    queues=list(self.options.queues) if self.options.queues else None,
                )
                self.last_db_ok = asyncio.get_running_loop().time()
                return
            except DB_ERRORS as exc:
                self._db_error("register", exc, attempt)
                if self._stopping.is_set():
                    return  # the fetcher stops at once; shutdown is bounded by its deadline
                attempt += 1
                await backoff_sleep(attempt)

    def _db_error(self, where: str, exc: BaseException, attempt: int) -> None:
        raise_if_cancelling()
        self.metrics.db_error(where)
        if attempt == 0:
            log.warning("db_unavailable", where=where, error=str(exc).strip().splitlines()[0]
                        if str(exc).strip() else type(exc).__name__)

    # -- fetcher -------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            self.stats.wakeups += 1
            # Cleared before the claim: a wake-up that arrives while it runs (a NOTIFY, a
            # stop) must end the sleep that follows it.
            self._wake.clear()
            free = self._free_slots()
            claimed_full = False
            if free > 0:
                try:
                    claimed_full = await self._claim(free)
                    failures = 0
                except DB_ERRORS as exc:
                    self._db_error("claim", exc, failures)
                    failures += 1
                    await backoff_sleep(failures)
                    continue
            if not self.ready.is_set():
                self.ready.set()
                served = ", ".join(self.options.queues or ["every queue"])
                self.systemd.ready(f"claiming from {served}")
                for callback in self.on_ready:
                    result = callback()
                    if result is not None:
                        await result
            if claimed_full:
                continue  # more may be due right now
            if self.options.burst and free > 0 and self._executing == 0:
                log.info("burst_done")
                return
            # With every slot busy, a freed slot is the next reason to claim.
            self._slot_freed_wakes = free <= 0 or self.options.burst or saturated(
                self._queue_limits, self._running_by_queue(), self.options.queues)
            timeout = self.options.poll_seconds
            # A busy worker cannot claim, so a due time is no reason to wake: only a freed
            # slot or a wake-up is (the due time may also be long past: not refreshed).
            if free > 0 and self._next_due_deadline is not None:
                timeout = min(timeout, max(0.0, self._next_due_deadline - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _free_slots(self) -> int:
        """Jobs to claim now: free execution slots, less whatever the completer's backlog
        holds beyond one full batch. When the database records outcomes slower than jobs
        finish, the fetcher waits for the completer instead of taking ever more leases
        (a backlog of thousands made every completion statement slower still)."""
        concurrency = self.options.concurrency
        return min(concurrency - self._executing, 2 * concurrency - len(self._held))

    async def _claim(self, free: int) -> bool:
        """Claim up to `free` jobs and start them; True if the claim was full."""
        loop = asyncio.get_running_loop()
        # db_now is read when the statement starts, right after it is sent: timing from the
        # answer instead would set the timer late by the claim's own duration (1-3 ms).
        sent, sent_wall = loop.time(), time.time()
        self._noted_deadline = None
        self.stats.claims += 1
        jobs, next_due, db_now = await self.store.claim_jobs(
            worker_id=self.id, limit=free, lease_seconds=self.options.lease_seconds,
            priorities=self._priorities, queues=self.options.queues,
            capped=capped_free_slots(self._queue_limits, self._running_by_queue()),
        )
        self._clock_offset = db_now.timestamp() - sent_wall
        claimed_due = (sent + (next_due - db_now).total_seconds() + TIMER_MARGIN_SECONDS
                       if next_due is not None else None)
        # A job noted while the claim ran may be one the claim did not see: keep the earliest.
        self._next_due_deadline = min(
            (d for d in (claimed_due, self._noted_deadline) if d is not None), default=None)
        if jobs:  # a useful wake-up: give its notification token back
            self._wake_tokens = min(float(NOTIFY_WAKE_BURST), self._wake_tokens + 1.0)
        for job in jobs:
            if job["expired"]:
                self.stats.expired += 1
                self.metrics.job("expired", job["task"], job["queue"])
                log.warning("job_expired", job_id=job["id"], task=job["task"],
                            execution_time=job["execution_time"].isoformat())
                continue
            self.stats.claimed += 1
            self.metrics.job("started", job["task"], job["queue"])
            held = _Held(job["id"], job["attempts"], task_name=job["task"], queue=job["queue"])
            self._lose_older_attempts(held)
            self._held[held.key] = held
            self._executing += 1
            held.task = asyncio.create_task(self._execute(job, held), name=f"job:{job['id']}")
        return len(jobs) >= free

    def _lose_older_attempts(self, newer: _Held) -> None:
        """Claiming attempt n of a job proves every earlier attempt lost its lease (this
        worker's own recovery took it back): stop those runs, their outcome is void."""
        for held in list(self._held.values()):
            if held.id == newer.id and held.attempt < newer.attempt:
                self._lease_lost(held)

    def _lease_lost(self, held: _Held) -> None:
        held.lease_lost = True
        self.stats.lease_lost += 1
        log.warning("lease_lost", job_id=held.id, attempt=held.attempt,
                    reason="recovered, cancelled or replaced by someone else")
        if held.finished:
            self._held.pop(held.key, None)  # its late write would be fenced out anyway
        elif held.task is not None:
            held.task.cancel()

    def _running_by_queue(self) -> Counter[str]:
        """Running jobs per queue; only queues with a limit need counting."""
        if not self._queue_limits:
            return Counter()
        return Counter(h.queue for h in self._held.values() if not h.finished)

    def note_due(self, due_epoch: float) -> None:
        """A job was added for `due_epoch` (database clock): wake now, or move the timer
        (to when the notification budget allows a claim, for a job due now)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = due_epoch - (time.time() + self._clock_offset)
        if not math.isfinite(delay):
            return
        if delay <= 0.001:
            delay = self._wake_budget(now)
            if delay == 0.0:
                self._wake.set()
                return
        deadline = now + delay
        if self._noted_deadline is None or deadline < self._noted_deadline:
            self._noted_deadline = deadline
        if self._next_due_deadline is None or deadline < self._next_due_deadline:
            self._next_due_deadline = deadline
            self._wake.set()  # the fetcher recomputes its sleep; it claims only if due

    def _wake_budget(self, now: float) -> float:
        """Take a token for a wake-up now: 0.0 if there was one, else how long until the
        next one comes (the caller sets a timer; a timer already set earlier wins)."""
        self._wake_tokens = min(float(NOTIFY_WAKE_BURST), self._wake_tokens
                                + (now - self._wake_tokens_at) * NOTIFY_WAKE_RATE)
        self._wake_tokens_at = now
        if self._wake_tokens >= 1.0:
            self._wake_tokens -= 1.0
            return 0.0
        return (1.0 - self._wake_tokens) / NOTIFY_WAKE_RATE

    async def sleep_or_close(self, seconds: float) -> bool:
        """Sleep; True (early) once the worker is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), max(0.0, seconds))
        return self.closing.is_set()

    # -- executing one job ---------------------------------------------------------------

    async def _execute(self, job: dict[str, Any], held: _Held) -> None:
        structlog.contextvars.bind_contextvars(
            job_id=job["id"], task=job["task"], attempt=job["attempts"]
        )
        started = time.monotonic()
        lateness_ms = round(
            (time.time() + self._clock_offset - job["execution_time"].timestamp()) * 1000, 1)
        # debug, not info: with job_completed (which repeats lateness_ms) that would be two
        # lines per job, a third of the worker's CPU per no-op job, and journald's rate
        # limit would drop the warnings that matter.
        self._job_log.debug("job_started", lateness_ms=lateness_ms)
        try:
            outcome = await run_job(job, self._threads)
        except asyncio.CancelledError:
            self._executing -= 1
            held.finished = True
            if held.lease_lost:
                self._held.pop(held.key, None)
                log.warning("job_abandoned", reason="lease lost")
            elif held.cancel_requested:
                self.metrics.job_ran(held.task_name, held.queue, "cancelled",
                                     time.monotonic() - started)
                self._completions.put_nowait(_Completion(held, CANCELLED, job["failures"]))
            else:
                log.info("job_interrupted", reason="shutdown")
            self._free_slot()
            return  # shutdown releases what is still held
        self._executing -= 1
        held.finished = True
        duration = round(time.monotonic() - started, 4)
        self.metrics.job_ran(held.task_name, held.queue,
                             "completed" if outcome.ok else "failed", duration)
        if held.lease_lost:
            self._held.pop(held.key, None)
            log.warning("job_outcome_dropped", reason="lease lost", duration_s=duration)
        else:
            self._completions.put_nowait(
                _Completion(held, outcome, job["failures"], duration, lateness_ms))
            if not outcome.ok and not outcome.unknown_task:  # task_unknown follows
                log.info("job_attempt_failed", error=outcome.error, duration_s=duration)
        self._free_slot()

    def _free_slot(self) -> None:
        if self._slot_freed_wakes:
            self._wake.set()

    # -- completer -----------------------------------------------------------------------

    async def _complete_loop(self) -> None:
        while True:
            batch = [await self._completions.get()]
            while not self._completions.empty():
                batch.append(self._completions.get_nowait())
            try:
                await self._record(batch)
            finally:
                for _ in batch:
                    self._completions.task_done()
            self._free_slot()  # the fetcher may be waiting for this backlog to shrink

    async def _record(self, batch: list[_Completion]) -> None:
        attempt = 0
        pending = batch
        while pending:
            try:
                pending = await self._record_once(pending)
            except DATA_ERRORS:
                pending = await self._record_apart(pending)
            except DB_ERRORS as exc:
                self._db_error("complete", exc, attempt)
                attempt += 1
                if self._killed.is_set() and attempt > 5:
                    log.error("completion_not_recorded", jobs=len(pending),
                              hint="their leases expire and another worker runs them again")
                    for c in pending:
                        self._held.pop(c.held.key, None)
                    return
                await backoff_sleep(attempt)

    async def _record_apart(self, batch: list[_Completion]) -> list[_Completion]:
        """A batch PostgreSQL refused because of a value in it: write each job on its own,
        and fail the one whose result cannot be stored. Returns what is left to write
        after a connection error."""
        for i, c in enumerate(batch):
            try:
                try:
                    await self._record_once([c])
                except DATA_ERRORS as exc:
                    if not c.outcome.ok:
                        raise
                    log.error("job_result_not_storable", job_id=c.held.id, error=str(exc))
                    c = batch[i] = _Completion(
                        c.held, failed(f"the task's return value could not be stored: {exc}"),
                        c.failures, c.duration_s, c.lateness_ms)
                    await self._record_once([c])
            except DATA_ERRORS as exc:
                log.error("completion_not_recorded", job_id=c.held.id, error=str(exc),
                          hint="its lease expires and another worker runs it again")
                self._held.pop(c.held.key, None)
            except DB_ERRORS:
                return batch[i:]
        return []

    async def _record_once(self, batch: list[_Completion]) -> list[_Completion]:
        """Write a batch; returns what is left to write (failures are written one by one)."""
        successes = [c for c in batch if c.outcome.ok]
        if successes:
            written = await self.store.complete_jobs(
                worker_id=self.id,
                done=[(c.held.id, c.held.attempt, c.outcome.result_json) for c in successes],
            )
            for c in successes:
                self._held.pop(c.held.key, None)
                if c.held.key in written:
                    self.stats.completed += 1
                    self.metrics.job("completed", c.held.task_name, c.held.queue)
                    self._job_log.info("job_completed", job_id=c.held.id,
                                       duration_s=c.duration_s, lateness_ms=c.lateness_ms)
                else:
                    self.stats.lease_lost += 1
                    log.warning("job_completion_rejected", job_id=c.held.id,
                                reason="lease lost before the result was recorded")
        await self._record_cancelled([c for c in batch if c.outcome.cancelled])
        for c in batch:
            if not c.outcome.ok and not c.outcome.cancelled:
                await self._record_failure(c)
        return []

    async def _record_failure(self, c: _Completion) -> None:
        """A failed attempt (retried while the budget lasts), or a job whose task this
        worker does not know (put back for one that does, without counting a failure)."""
        if c.outcome.unknown_task:
            row = await self.store.defer_job(
                worker_id=self.id, job_id=c.held.id, attempt=c.held.attempt,
                error=c.outcome.error, base_delay_seconds=UNKNOWN_TASK_DELAY_SECONDS,
                max_delay_seconds=UNKNOWN_TASK_MAX_DELAY_SECONDS,
                give_up_seconds=UNKNOWN_TASK_GIVE_UP_SECONDS)
        else:
            row = await self.store.fail_job(
                worker_id=self.id, job_id=c.held.id, attempt=c.held.attempt,
                error=c.outcome.error, traceback=c.outcome.traceback,
                retry_delay_seconds=retry_delay(c.failures + 1, self.options.retry_base_seconds,
                                                self.options.retry_max_seconds))
        self._held.pop(c.held.key, None)
        if row is None:
            self.stats.lease_lost += 1
            log.warning("job_failure_rejected", job_id=c.held.id, reason="lease lost")
        elif row["status"] == "pending" and c.outcome.unknown_task:
            self.stats.deferred += 1
            log.warning("task_unknown", job_id=c.held.id, task=c.held.task_name,
                        retry_at=row["execution_time"].isoformat(),
                        hint="deploy the code that defines it to this worker, or let a "
                             "worker that has it run the job")
        elif row["status"] == "pending":
            self.stats.retried += 1
            self.metrics.job("retried", c.held.task_name, c.held.queue)
            log.info("job_retry_scheduled", job_id=c.held.id, error=c.outcome.error,
                     retry_at=row["execution_time"].isoformat())
            self.note_due(row["execution_time"].timestamp())
        elif row["status"] == "cancelled":  # a cancel was requested while it failed
            self.stats.cancelled += 1
            self.metrics.job("cancelled", c.held.task_name, c.held.queue)
            log.info("job_cancelled", job_id=c.held.id, error=c.outcome.error)
        else:
            self.stats.failed += 1
            self.metrics.job("failed", c.held.task_name, c.held.queue)
            log.error("job_failed", job_id=c.held.id, error=c.outcome.error)

    async def _record_cancelled(self, cancelled: list[_Completion]) -> None:
        if not cancelled:
            return
        written = await self.store.finish_cancelled_jobs(
            worker_id=self.id, held=[(c.held.id, c.held.attempt) for c in cancelled])
        for c in cancelled:
            self._held.pop(c.held.key, None)
            if c.held.id in written:
                self.stats.cancelled += 1
                self.metrics.job("cancelled", c.held.task_name, c.held.queue)
                log.info("job_cancelled", job_id=c.held.id, task=c.held.task_name)
            else:
                self.stats.lease_lost += 1
                log.warning("job_cancel_rejected", job_id=c.held.id, reason="lease lost")

    # -- heartbeater ---------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.options.heartbeat_seconds
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            planned = loop.time() + interval * random.uniform(0.9, 1.0)
            if await self._until_next_beat(planned - loop.time()):
                return
            self.systemd.watchdog()
            try:
                await self.heartbeat_once()
                self.last_db_ok = loop.time()
                failures = 0
            except DB_ERRORS as exc:
                self._db_error("heartbeat", exc, failures)
                failures += 1
            if await self.sleep_or_close(CANCEL_BEAT_MIN_GAP_SECONDS):
                return

    async def _watch_loop(self) -> None:
        """Report a blocked event loop. Its own task, doing nothing but sleep, so that any
        lateness is the loop's: the heartbeat's lateness would also include its database
        round trips, and a freeze during one of them would go unseen."""
        interval = self.options.heartbeat_seconds
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + interval
            if await self.sleep_or_close(interval):
                return
            blocked = loop.time() - planned
            if blocked > interval:
                log.warning("event_loop_blocked", seconds=round(blocked, 2),
                            hint="a task runs CPU work in `async def`; make it a plain def "
                                 "so it runs in a thread")

    async def _until_next_beat(self, seconds: float) -> bool:
        """Sleep until the next heartbeat, or less when a cancel request arrives; True
        once the worker is closing."""
        waits = [asyncio.ensure_future(self.closing.wait()),
                 asyncio.ensure_future(self._beat_now.wait())]
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        self._beat_now.clear()
        return self.closing.is_set()

    async def heartbeat_once(self) -> None:
        # The registry first, and never behind the job leases: orphan recovery spares the
        # jobs of a worker alive by this heartbeat, and the workers table is one that job
        # DDL does not lock. A lease renewal stuck behind a table lock fails after the
        # pool's lock_timeout, and the next beat writes the registry again.
        if not await self.store.heartbeat_worker(self.id):
            await self._register()  # pruned while we were unreachable: come back
        # Finished jobs too: until their outcome is written (the completer may be backing
        # off) or they are released at shutdown, an expired lease would get them run again.
        held = [h.key for h in self._held.values() if not h.lease_lost]
        if held:
            kept = await self.store.heartbeat_jobs(
                worker_id=self.id, held=held, lease_seconds=self.options.lease_seconds
            )
            self.metrics.leases(renewed=len(kept), lost=len(held) - len(kept))
            for key in held:
                h = self._held.get(key)
                if h is None or h.finished or h.lease_lost:
                    continue
                if kept.get(key) and not h.cancel_requested:
                    h.cancel_requested = True
                    log.info("job_cancel_requested", job_id=h.id, task=h.task_name)
                    if h.task is not None:
                        h.task.cancel()
                elif key not in kept:
                    self._lease_lost(h)

    # -- listener ------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        failures = 0
        while not self.closing.is_set():
            conn = None
            try:
                conn = await connect(self.dsn, application_name=self.application_name)
                await conn.execute(psycopg.sql.SQL("LISTEN {}").format(
                    psycopg.sql.Identifier(self.store.channel)))
                if failures:
                    log.info("listener_reconnected")
                    self.metrics.db_reconnected()
                failures = 0
                self.listening = True
                self._wake.set()  # anything added while we were away
                self.planner.wake()
                self._beat_now.set()  # and any cancel request
                async for notify in conn.notifies():
                    self._on_notify(notify.payload)
            except DB_ERRORS as exc:
                self._db_error("listen", exc, failures)
                failures += 1
                await backoff_sleep(failures)
            finally:
                self.listening = False
                if conn is not None:
                    await conn.close()

    def _on_notify(self, payload: str) -> None:
        """'cancel:<worker id>': a job of that worker is to be cancelled; 'schedules'; else
        a due time. Anything else is ignored: any role that can connect may NOTIFY."""
        if payload == SCHEDULES_CHANGED:
            self.planner.wake()
            return
        kind, _, target = payload.partition(":")
        if kind == "cancel":
            if target == self.id:
                self._beat_now.set()
            return
        if _EPOCH_RE.match(payload):
            self.note_due(float(payload))
            return
        self.stats.notify_ignored += 1
        log.debug("notify_ignored", payload=payload[:80])

    # -- shutdown ------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait for running jobs within the grace period, then cancel and release them."""
        running = {h.task for h in self._held.values() if h.task and not h.task.done()}
        if running and not self._killed.is_set():
            log.info("shutdown_waiting", running=len(running),
                     grace_seconds=self.options.shutdown_grace_seconds)
            running = await self._wait_unless_killed(
                running, self.options.shutdown_grace_seconds)
        for task in running:
            task.cancel()
        if running:
            # Cancelled tasks may await their cleanup. One that ignores the cancellation
            # is left behind after a second signal (the process is about to exit).
            await asyncio.wait(running, timeout=KILL_CLEANUP_SECONDS)
            self._ignoring_cancellation = await self._wait_unless_killed(
                {t for t in running if not t.done()}, None)
            if self._ignoring_cancellation:
                log.warning("jobs_ignored_cancellation", count=len(self._ignoring_cancellation),
                            hint="a task caught asyncio.CancelledError and kept running")
        # Outcomes of finished jobs are recorded first; what is still held after that was
        # interrupted and goes back to pending.
        await self._completions.join()
        unfinished = [h.key for h in self._held.values() if not h.lease_lost]
        if unfinished:
            attempt = 0
            while True:
                try:
                    released = await self.store.release_jobs(worker_id=self.id, held=unfinished)
                    break
                except DB_ERRORS as exc:
                    self._db_error("release", exc, attempt)
                    attempt += 1
                    if attempt > 5:
                        log.error("release_failed", jobs=len(unfinished),
                                  hint="their leases expire and another worker recovers them")
                        return
                    await backoff_sleep(attempt)
            self.stats.released += len(released)
            log.info("jobs_released", count=len(released))
        self._held.clear()

    async def _wait_unless_killed(
        self, tasks: set[asyncio.Task[None]], timeout: float | None
    ) -> set[asyncio.Task[None]]:
        """Wait until the tasks are done, the timeout passes or kill() is called; returns
        the tasks still running."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        killed = asyncio.create_task(self._killed.wait())
        try:
            while tasks and not killed.done():
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    break
                _, tasks = await asyncio.wait(
                    tasks | {killed}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                tasks.discard(killed)
        finally:
            killed.cancel()
        return tasks
