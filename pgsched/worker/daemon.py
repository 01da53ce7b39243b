"""The worker daemon: wires the services and supervises them.

A worker claims due jobs, runs them, keeps their leases and records their outcomes. Each
service is an asyncio task under one TaskGroup (a service that crashes stops the worker
loudly instead of letting it limp on), and each lives in its own module with its
invariants and failure modes: fetcher.py (the only claimer; it starts the jobs it
claims, executor.py runs them), completer.py (writes outcomes), heartbeat.py (leases,
cancel requests, the systemd watchdog), listener.py (LISTEN/NOTIFY wake-ups), watch.py
(a blocked event loop), maintenance.py (orphan recovery, registry pruning, vacuum) and
planner.py (recurring schedules). They share a WorkerContext (context.py), never the
Worker: this module only builds them, starts them and stops them.

Monitoring: counters in `self.metrics` (metrics.py), served with /healthz when
`metrics_listen` is set; systemd READY/STOPPING/WATCHDOG when `systemd_notify` is set
(systemd.py).

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
A worker started on an older schema stops at once (`schema_outdated`), saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..logs import get_logger
from ..queues import describe_limits, parse_rate
from ..store import Store, migrations
from .completer import Completer
from .context import (
    DB_ERRORS,
    Stats,
    WorkerContext,
    WorkerOptions,
    backoff_sleep,
    new_worker_id,
)
from .fetcher import Fetcher
from .heartbeat import Heartbeater
from .listener import Listener
from .maintenance import Maintenance
from .metrics import MetricsServer, WorkerMetrics
from .planner import Planner
from .systemd import SystemdNotifier
from .watch import LoopWatch

__all__ = ["Worker", "WorkerOptions"]

log = get_logger("pgsched.worker")

LATEST_SCHEMA = migrations()[-1][0]
# After a second signal, how long cancelled jobs still get to run their cleanup.
KILL_CLEANUP_SECONDS = 1.0
# After the grace (and cleanup), how long shutdown may still spend writing outcomes and
# releasing jobs; past it the worker exits anyway (the database is unreachable) and what
# it still held is recovered by lease expiry.
SHUTDOWN_DB_SECONDS = 5.0
DEFAULT_OPTIONS = WorkerOptions()


class Worker:
    def __init__(
        self,
        store: Store,
        dsn: str,
        options: WorkerOptions = DEFAULT_OPTIONS,
        *,
        worker_id: str | None = None,
    ):
        self.ctx = WorkerContext(store, dsn, options, worker_id or new_worker_id())
        self.fetcher = Fetcher(self.ctx)
        self.completer = Completer(self.ctx)
        self.heartbeater = Heartbeater(self.ctx)
        self.listener = Listener(self.ctx)
        self.watch = LoopWatch(self.ctx)
        self.maintenance = Maintenance(self.ctx)
        self.planner = Planner(self.ctx)
        self.schema_outdated = False
        self._ignoring_cancellation: set[asyncio.Task[None]] = set()
        self._shutdown_deadline: asyncio.Timeout | None = None  # armed by stop() and kill()

    # -- public control ------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop claiming, let running jobs finish within the grace period."""
        if self.ctx.stop_requested.is_set():
            self.kill()
        self.ctx.stop_requested.set()
        self.ctx.wake.set()
        self._arm_shutdown_deadline(self.options.shutdown_grace_seconds)

    def kill(self) -> None:
        """Immediate: cancel running jobs now and put them back to pending."""
        self.ctx.stop_requested.set()
        self.ctx.killed.set()
        self.ctx.wake.set()
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
    def store(self) -> Store:
        return self.ctx.store

    @property
    def dsn(self) -> str:
        return self.ctx.dsn

    @property
    def options(self) -> WorkerOptions:
        return self.ctx.options

    @property
    def id(self) -> str:
        return self.ctx.id

    @property
    def stats(self) -> Stats:
        return self.ctx.stats

    @property
    def metrics(self) -> WorkerMetrics:
        return self.ctx.metrics

    @property
    def systemd(self) -> SystemdNotifier:
        return self.ctx.systemd

    @property
    def ready(self) -> asyncio.Event:
        """Set once registered and the first claim ran."""
        return self.ctx.ready

    @property
    def on_ready(self) -> list[Callable[[], Awaitable[None] | None]]:
        return self.ctx.on_ready

    @property
    def closing(self) -> asyncio.Event:
        """Set after draining: side services return."""
        return self.ctx.closing

    @property
    def listening(self) -> bool:
        """The LISTEN connection is up."""
        return self.ctx.listening

    @property
    def last_db_ok(self) -> float | None:
        """loop.time() of the last heartbeat that worked."""
        return self.ctx.last_db_ok

    @property
    def running_jobs(self) -> int:
        return self.ctx.running_jobs

    @property
    def stopping(self) -> bool:
        return self.ctx.stopping

    @property
    def abandoned_threads(self) -> int:
        """Sync tasks still running in threads (the process must not wait for them)."""
        return self.ctx.threads.running

    @property
    def hung_threads(self) -> int:
        """Threads running a sync task whose job has moved on (timed out, cancelled)."""
        return self.ctx.hung_threads

    @property
    def threads_over_cap(self) -> bool:
        """Too many hung threads to replace: they take slots from new sync jobs."""
        return self.ctx.threads_over_cap

    @property
    def abandoned_tasks(self) -> int:
        """Async tasks that ignored the shutdown's cancellation and still run."""
        return sum(1 for task in self._ignoring_cancellation if not task.done())

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(worker_id=self.id)
        # Per-job events go through a bound logger: the module's lazy proxy binds anew on
        # every call, which costs more than a filtered-out event at thousands of jobs/s.
        self.ctx.job_log = log.bind()
        log.info("worker_starting", concurrency=self.options.concurrency, pid=os.getpid(),
                 burst=self.options.burst, queues=list(self.options.queues or ["*"]))
        self.systemd.check_watchdog(self.options.heartbeat_seconds)
        if not await self._schema_ready():
            return
        await self._write_global_limits()
        server = None
        if self.options.metrics_listen:
            server = MetricsServer(self.ctx, self.options.metrics_listen)
            await server.start()
        await self.ctx.register()
        try:
            async with asyncio.timeout(None) as self._shutdown_deadline:
                if self.ctx.stop_requested.is_set():  # signalled during start-up
                    self._arm_shutdown_deadline(0.0)
                await self._serve()
        except TimeoutError:
            for held in self.ctx.held.values():
                if held.task is not None:
                    held.task.cancel()
            log.error("shutdown_timed_out", held=len(self.ctx.held),
                      hint="the database could not be reached to record outcomes or release "
                           "jobs; their leases expire and another worker recovers them")
        finally:
            self._shutdown_deadline = None  # done with: a later stop() has nothing to bound
            if server is not None:
                await server.close()
            self.ctx.threads.shutdown()
            with contextlib.suppress(*DB_ERRORS, TimeoutError):
                async with asyncio.timeout(KILL_CLEANUP_SECONDS):
                    await self.ctx.store.unregister_worker(self.id)
            counts = {k: v for k, v in vars(self.ctx.stats).items() if v and k != "extra"}
            log.info("worker_stopped", **counts)

    async def _serve(self) -> None:
        """The services; returns once the fetcher stopped and running jobs were drained."""
        async with asyncio.TaskGroup() as services:
            fetcher = services.create_task(self.fetcher.run(), name="fetcher")
            side = [
                services.create_task(self.listener.run(), name="listener"),
                services.create_task(self.completer.run(), name="completer"),
                services.create_task(self.heartbeater.run(), name="heartbeater"),
                services.create_task(self.watch.run(), name="loop-watch"),
                services.create_task(self.maintenance.run(), name="maintenance"),
                services.create_task(self.planner.run(), name="planner"),
            ]
            await fetcher
            self.systemd.stopping(f"stopping: {self.ctx.executing} jobs running")
            await self._drain()
            # Loops also watch `closing`: a cancellation that lands inside a psycopg
            # call can be swallowed there, and must not leave the worker hanging.
            self.ctx.closing.set()
            for service in side:
                service.cancel()

    async def _schema_ready(self) -> bool:
        """A worker started with --no-migrate on an older schema stops, saying why,
        instead of failing query by query."""
        version = await self.ctx.store.schema_version() or 0
        self.schema_outdated = version < LATEST_SCHEMA
        if self.schema_outdated:
            log.error("schema_outdated", version=version, needed=LATEST_SCHEMA,
                      hint="run `pgsched migrate`, then start the worker again")
        return not self.schema_outdated

    async def _write_global_limits(self) -> None:
        """The [queues.NAME] global limits of this worker's configuration go to the
        database, where every claim reads them: a changed file takes effect when a worker
        starts with it. A limit the file does not give is left as it is. If the write
        fails (the row locked past lock_timeout, an outage) the worker says so and runs
        under the limits the database holds."""
        for queue, concurrency, rate in self.options.global_limits:
            try:
                limits = await self.ctx.store.set_queue_limits(
                    queue, global_concurrency=concurrency,
                    set_concurrency=concurrency is not None,
                    rate=parse_rate(rate) if rate is not None else None,
                    set_rate=rate is not None, set_by=f"config of worker {self.id}")
            except DB_ERRORS as exc:
                log.error("queue_limits_not_set", queue=queue, error=str(exc).strip(),
                          hint="set them with `pgsched queue limit`")
                continue
            log.info("queue_limits_set", queue=queue, global_concurrency=concurrency,
                     rate=rate, now=describe_limits(limits))

    # -- shutdown ------------------------------------------------------------------------

    async def _drain(self) -> None:
        """Wait for running jobs within the grace period, then cancel and release them."""
        running = {h.task for h in self.ctx.held.values() if h.task and not h.task.done()}
        if running and not self.ctx.killed.is_set():
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
        await self.ctx.completions.join()
        unfinished = [h for h in self.ctx.held.values() if not h.lease_lost]
        if unfinished:
            attempt = 0
            while True:
                try:
                    released = await self.ctx.store.release_jobs(
                        worker_id=self.id, held=[h.key for h in unfinished],
                        suspects=[h.id for h in unfinished if h.suspect])
                    break
                except DB_ERRORS as exc:
                    self.ctx.db_error("release", exc, attempt)
                    attempt += 1
                    if attempt > 5:
                        log.error("release_failed", jobs=len(unfinished),
                                  hint="their leases expire and another worker recovers them")
                        return
                    await backoff_sleep(attempt, stopping=self.ctx.stop_requested)
            self.ctx.stats.released += len(released)
            log.info("jobs_released", count=len(released))
        self.ctx.held.clear()

    async def _wait_unless_killed(
        self, tasks: set[asyncio.Task[None]], timeout: float | None
    ) -> set[asyncio.Task[None]]:
        """Wait until the tasks are done, the timeout passes or kill() is called; returns
        the tasks still running."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        killed: asyncio.Task[Any] = asyncio.create_task(self.ctx.killed.wait())
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
