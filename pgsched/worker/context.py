"""What the worker's services share: the narrow context each of them gets.

Owns: the store and options, the worker id, the held attempts (`held`, keyed by (id,
attempt)), the outcomes waiting for the completer (and the count its write in flight
holds, `recording`), the wake-up events (`wake` for the
fetcher, `beat_now` for the heartbeater, `plan_now` for the planner), the fetcher's
due-time timer and notification token bucket, the shutdown flags (`stop_requested`,
`killed`, `closing`), stats, metrics, and the helpers every service uses to report database errors
and back off. Services get this object, never `daemon.Worker`; daemon.py builds one per
worker and wires the services to it.

Invariants:
- Held jobs are keyed by (id, attempt), never the id alone: after this worker's own
  recovery took a job back and claimed it again, the older attempt is cancelled and its
  late outcome touches nothing of the newer one. A claim of a key this worker already
  holds (the job was deleted, by vacuum or by hand, and added again with the same id
  while a stale run of it went on here) supersedes the old run the same way, and an
  entry is removed only by its own run (`forget`, by identity).
- Everything here runs on the worker's event loop (no locks): a method's check and its
  update are never interleaved with another service.
- Wake-ups are events that stay set until their service clears them (before its unit of
  work), so one that arrives during the work is not lost.

Failure: db_error() logs `db_unavailable` once per outage (the first attempt) and counts
every failure; it re-raises a cancellation psycopg turned into a connection error, so a
service being stopped still stops.
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

from ..control import RunningJob
from ..logs import get_logger
from ..store import Store
from ..version import __version__
from .executor import Outcome, TaskThreads
from .metrics import WorkerMetrics
from .systemd import SystemdNotifier
from .turns import TURN_MARGIN_SECONDS, Turns

log = get_logger("pgsched.worker")

DB_ERRORS = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.InterfaceError)
# NOTIFY payloads are untrusted (any role that can connect may send them). Notifications
# of jobs due now wake the fetcher from a token bucket: NOTIFY_WAKE_BURST at once, then
# NOTIFY_WAKE_RATE a second; a claim that finds jobs gives its token back, so only
# wake-ups that find nothing (a flood, or jobs another worker took first) are slowed, and
# those past the budget are folded into one timer instead of being dropped.
NOTIFY_WAKE_BURST = 20
NOTIFY_WAKE_RATE = 50.0
# The longest back-off between database retries once the worker is stopping.
SHUTDOWN_BACKOFF_SECONDS = 1.0
_EPOCH_RE = re.compile(r"^-?[0-9]{1,11}(\.[0-9]{1,9})?$")


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
    # (queue, global_concurrency, rate "JOBS/PERIOD"), None for one not given: written to
    # the database at start, where every worker's claim reads them
    global_limits: tuple[tuple[str, int | None, str | None], ...] = ()
    metrics_listen: str | None = None  # "host:port" for /metrics and /healthz
    systemd_notify: bool = False  # speak sd_notify when NOTIFY_SOCKET is set


@dataclass
class Held:
    """A claimed job this worker owns: running, or finished and waiting to be recorded."""

    id: str
    attempt: int
    task: asyncio.Task[None] | None = None
    lease_lost: bool = False
    finished: bool = False
    task_name: str = ""
    queue: str = ""
    cancel_requested: bool = False
    running: RunningJob | None = None  # what current_job() returned to the task
    suspect: bool = False  # claimed as a suspect: given back as one at shutdown
    # (id, attempt), never the id alone: an older attempt of the same job may still be
    # running here after this worker's own recovery took it back and claimed it again.
    # Made once: the fetcher, the completer and the heartbeat read it several times a job.
    key: tuple[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.key = (self.id, self.attempt)

    @property
    def completed_in_task(self) -> bool:
        """The task wrote its own completion (current_job().complete()): a heartbeat
        that finds the row no longer running is no lost lease."""
        return self.running is not None and self.running.completed

    def log_fields(self) -> dict[str, Any]:
        """What every job event carries (the README's promise): job_id, task, attempt."""
        return {"job_id": self.id, "task": self.task_name, "attempt": self.attempt}


@dataclass
class Completion:
    held: Held
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
    snoozed: int = 0  # the task raised Retry: due again later, not a failure
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


def backoff_delay(attempt: int, cap: float = 10.0) -> float:
    """How long to wait before retry `attempt` of a database call: doubling, jittered."""
    return min(cap, 0.1 * 2**min(attempt, 10)) * random.uniform(0.5, 1.0)


async def backoff_sleep(attempt: int, cap: float = 10.0,
                        stopping: asyncio.Event | None = None) -> None:
    """Back off before retrying a database call. With `stopping` (the worker's stop
    flag), a stop ends the sleep, and later sleeps are at most SHUTDOWN_BACKOFF_SECONDS:
    shutdown has a deadline, and a back-off grown during an outage or a table lock (up to
    `cap`) must not use it up once the database answers again."""
    if stopping is not None and stopping.is_set():
        cap = min(cap, SHUTDOWN_BACKOFF_SECONDS)
    delay = backoff_delay(attempt, cap)
    if stopping is None or stopping.is_set():
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), delay)


def is_due_time(payload: str) -> bool:
    """A NOTIFY payload that is a due time: plain decimal seconds since the epoch."""
    return _EPOCH_RE.match(payload) is not None


class WorkerContext:
    """The state and helpers the services of one worker share (see the module docstring)."""

    def __init__(self, store: Store, dsn: str, options: WorkerOptions, worker_id: str):
        self.store = store
        self.dsn = dsn
        self.options = options
        self.id = worker_id
        self.application_name = "pgsched-worker"
        self.stats = Stats()
        self.metrics = WorkerMetrics()
        self.systemd = SystemdNotifier.from_environment() if options.systemd_notify \
            else SystemdNotifier()
        self.held: dict[tuple[str, int], Held] = {}
        # [queues.NAME] concurrency: the queues capped within this worker (the fetcher's
        # claims, the listener's let-go wake-ups).
        self.queue_limits = dict(options.queue_concurrency)
        self.executing = 0
        self.recording = 0  # outcomes in the completer's write in flight (0: none)
        self.recording_since = 0.0  # loop.time() that write began
        # Outcomes the completer put aside behind a row lock (completer._park): held, but
        # waiting on another session, not on the database (fetcher.free_slots).
        self.parked = 0
        self.threads = TaskThreads(options.concurrency)
        self.completions: asyncio.Queue[Completion] = asyncio.Queue()
        self.wake = asyncio.Event()  # the fetcher: claim now
        self.retime = asyncio.Event()  # the fetcher: the timer moved, recompute the sleep
        self.beat_now = asyncio.Event()  # a cancel request: heartbeat without waiting
        self.plan_now = asyncio.Event()  # a schedule changed: the planner looks again
        self.stop_requested = asyncio.Event()  # stop() or kill(): the fetcher stops claiming
        self.killed = asyncio.Event()
        self.closing = asyncio.Event()  # set after draining: side services return
        self.slot_freed_wakes = False  # the fetcher waits for a free slot
        # loop.time() of the earliest note_due without a turn (a let-go, a retry of this
        # worker's) since the last claim began.
        self.noted_deadline: float | None = None
        self.turns = Turns(worker_id, options.queues)  # claims owed for notifications
        self.wake_tokens = float(NOTIFY_WAKE_BURST)  # of the notification token bucket
        self.wake_tokens_at = 0.0  # loop.time() the bucket was last filled
        # The database clock minus the loop's (monotonic) clock, from the last claim: not
        # the wall clock, which a step (NTP, a VM resumed) moves under the loop's timers.
        self.clock_offset = time.time() - time.monotonic()
        self.ready = asyncio.Event()  # set once registered and the first claim ran
        self.on_ready: list[Callable[[], Awaitable[None] | None]] = []
        self.listening = False  # the LISTEN connection is up
        self.last_db_ok: float | None = None  # loop.time() of the last heartbeat that worked
        self.job_log = log  # bound for real in Worker.run(), once logging is configured

    def running_by_queue(self) -> Counter[str]:
        """Running jobs per queue; only queues with a limit need counting."""
        if not self.queue_limits:
            return Counter()
        return Counter(h.queue for h in self.held.values() if not h.finished)

    # What /healthz and the scrape read (metrics.Observed).

    @property
    def running_jobs(self) -> int:
        return self.executing

    @property
    def stopping(self) -> bool:
        return self.stop_requested.is_set()

    @property
    def hung_threads(self) -> int:
        return self.threads.abandoned

    @property
    def threads_over_cap(self) -> bool:
        return self.threads.over_cap

    # Helpers of several services.

    def db_error(self, where: str, exc: BaseException, attempt: int) -> None:
        raise_if_cancelling()
        self.metrics.db_error(where)
        if attempt == 0:
            log.warning("db_unavailable", where=where, error=str(exc).strip().splitlines()[0]
                        if str(exc).strip() else type(exc).__name__)

    async def sleep_or_close(self, seconds: float) -> bool:
        """Sleep; True (early) once the worker is closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), max(0.0, seconds))
        return self.closing.is_set()

    async def register(self) -> None:
        """Enter the worker registry (at start, and when pruned while unreachable)."""
        attempt = 0
        while True:
            try:
                await self.store.register_worker(
                    id=self.id, host=socket.gethostname(), pid=os.getpid(), version=__version__,
                    concurrency=self.options.concurrency,
                    # An empty list is no queue, not every queue (NULL): not the peer
                    # of the workers of every queue (turns.group_key).
                    queues=list(self.options.queues) if self.options.queues is not None
                    else None,
                )
                self.last_db_ok = asyncio.get_running_loop().time()
                # The peers to take turns with from the first notification on, not from
                # the first heartbeat (a claim per peer per notification until then).
                self.turns.set_peers(await self.store.heartbeat_worker(
                    self.id, alive_seconds=self.peers_alive_seconds))
                return
            except DB_ERRORS as exc:
                self.db_error("register", exc, attempt)
                if self.stop_requested.is_set():
                    return  # the fetcher stops at once; shutdown is bounded by its deadline
                attempt += 1
                await backoff_sleep(attempt)

    @property
    def peers_alive_seconds(self) -> float:
        """A peer that has not heartbeated for this long is left out of the turns: three
        beats, so one slow beat does not drop it."""
        return 3 * self.options.heartbeat_seconds

    def count_lease_lost(self) -> None:
        self.stats.lease_lost += 1
        self.metrics.lease_lost()

    def lease_lost(self, held: Held) -> None:
        held.lease_lost = True
        self.count_lease_lost()
        log.warning("lease_lost", **held.log_fields(),
                    reason="recovered, cancelled or replaced by someone else")
        if held.finished:
            self.forget(held)  # the completer drops its outcome (lease_lost)
        elif held.task is not None:
            held.task.cancel()

    def forget(self, held: Held) -> None:
        """Drop a held attempt, unless its key already belongs to a newer claim (see
        `held`): the end of a superseded run must not take the newer run's entry."""
        if held.running is not None:
            held.running.end()
        if self.held.get(held.key) is held:
            del self.held[held.key]

    def free_slot(self) -> None:
        if self.slot_freed_wakes:
            self.wake.set()

    def db_time(self) -> float:
        """Now on the database clock: the loop's clock plus the offset the last claim
        measured (a wall clock step moves neither)."""
        return asyncio.get_running_loop().time() + self.clock_offset

    def _turn_deadline(self, now: float) -> float | None:
        """loop.time() of the earliest turn owed (turns.py keeps them on the database
        clock, so that each claim's fresh clock offset re-times them: a turn that came
        early finds its job not yet due, stays owed, and comes again when it is due,
        instead of at once), or None."""
        turn = self.turns.next_turn()
        if turn is None:
            return None
        return now + (turn - self.db_time()) + TURN_MARGIN_SECONDS

    def due_deadline(self) -> tuple[float | None, bool]:
        """loop.time() the fetcher claims next without a wake-up (or None), and whether it
        is a turn's own time: not one the notification budget set (note_due past it, or a
        turn held back for a token), which the fetcher must not reach early
        (fetcher.FINE_TIMER_SECONDS)."""
        now = asyncio.get_running_loop().time()
        own = self._turn_deadline(now)
        noted = self.noted_deadline
        if own is None:
            return noted, False
        # Claims for turns take tokens of the notification budget, as wake-ups do
        # (take_turn): a flood of forged notifications must not keep it claiming.
        turn = max(own, now + self._token_wait(now))
        if noted is not None and noted <= turn:
            return noted, False
        return turn, turn == own

    def note_due(self, due_epoch: float, payload: str | None = None) -> None:
        """A job was added for `due_epoch` (database clock): wake now, or move the timer
        (to when the notification budget allows a claim, for a job due now). With the
        notification's `payload`, the claim waits for this worker's turn (turns.py)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        db_now = self.db_time()
        delay = due_epoch - db_now
        if not math.isfinite(delay):
            return
        if payload is not None:
            lag = self.turns.lag(payload)
            # From when it is due, or heard: a due time long past (a job put back by a
            # recovery) must not make every turn come at once.
            self.turns.hear(payload, due_epoch, max(due_epoch, db_now) + lag, db_now)
            if lag > 0:
                self.retime.set()  # the fetcher sleeps until its turn (due_deadline)
                return
        if delay <= 0.001:
            delay = self._wake_budget(now)
            if delay == 0.0:
                self.wake.set()
                return
        deadline = now + delay
        if self.noted_deadline is None or deadline < self.noted_deadline:
            self.noted_deadline = deadline
            # Not a wake-up: the fetcher recomputes its sleep and claims when the timer
            # ends. Every worker hears every NOTIFY; a claim now would find nothing due.
            self.retime.set()

    def peer_took(self, db_now: float, next_due: float | None, heard: str) -> None:
        """A peer's claim (db_now, database clock), begun after it heard `heard`, took every
        job it saw due: drop the claims owed for what it covered, and owe one for its next
        due job."""
        self.turns.covered_by(heard, db_now)
        if next_due is not None:
            self.owe_turn(next_due)
        self.retime.set()  # the sleep may end later now, or sooner

    def owe_turn(self, due_epoch: float) -> bool:
        """A turn for a job a claim saw pending, due at `due_epoch`: ranked by the due time,
        the same on every peer that knows it, so one claims when it falls due. True if
        this worker did not owe one for that time yet."""
        db_now = self.db_time()
        return self.turns.owe(due_epoch,
                              max(due_epoch, db_now) + self.turns.lag(repr(due_epoch)), db_now)

    def _token_wait(self, now: float) -> float:
        """Refill the notification token bucket: 0.0 if a token is there, else how long
        until one is."""
        self.wake_tokens = min(float(NOTIFY_WAKE_BURST), self.wake_tokens
                               + (now - self.wake_tokens_at) * NOTIFY_WAKE_RATE)
        self.wake_tokens_at = now
        return 0.0 if self.wake_tokens >= 1.0 else (1.0 - self.wake_tokens) / NOTIFY_WAKE_RATE

    def _wake_budget(self, now: float) -> float:
        """Take a token for a wake-up now: 0.0 if there was one, else how long until the
        next one comes (the caller sets a timer; a timer already set earlier wins)."""
        wait = self._token_wait(now)
        if wait == 0.0:
            self.wake_tokens -= 1.0
        return wait

    def take_turn(self, now: float) -> None:
        """A claim made for a turn that has come takes a token (due_deadline)."""
        turn = self._turn_deadline(now)
        if turn is not None and turn <= now:
            self._wake_budget(now)
