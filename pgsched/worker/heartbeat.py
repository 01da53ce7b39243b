"""The heartbeater: keeps this worker in the registry and the leases of its jobs alive.

Owns: renewing, in one statement per beat, the lease of every held attempt (running, or
finished and waiting for the completer or the shutdown's release), and acting on what
the renewal says; the systemd watchdog ping.

Invariants:
- The registry row is written first, and never behind the job leases: orphan recovery
  spares the jobs of a worker alive by this heartbeat, and the workers table is one that
  job DDL does not lock. A worker pruned while unreachable registers again.
- A job whose lease was lost is cancelled locally (its late writes would be fenced out
  anyway), and so is a job whose cancel was requested (`pgsched cancel`; the NOTIFY
  'cancel:<worker id>' sets beat_now so the beat comes at once, the heartbeat itself is
  the fallback).
- Beats come every heartbeat interval less up to 10% jitter, so replicas spread out,
  except after a beat that gave up waiting for a row lock (lock_timeout): the next comes
  at once, so that while someone holds the registry row locked this worker is nearly
  always queued for it. Orphan recovery counts a locked registry row as alive, and a
  queued UPDATE keeps it locked until the worker's own heartbeat commits, so the worker
  is first when the row is let go, however long it was held (recover_orphans).

- Beats never wait behind the pool's slow work (claims, completions, vacuum, planner and
  metrics queries): they run on a connection of their own (store.DedicatedConnection),
  set up as the pool's, so one more server connection per worker.

Failure: a beat that fails with a connection error, or takes longer than a third of the
lease (BEAT_TIMEOUT_LEASES: a server that stopped answering, a network black hole), is
logged (`db_unavailable`); its connection is dropped if it was left broken or busy, and
the next beat reconnects after the usual backoff (at most a heartbeat interval).
last_db_ok (read by /healthz) is not moved on. A lease renewal stuck behind a table lock
fails after the session's lock_timeout, which is shorter still.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import psycopg

from ..logs import get_logger
from .context import DB_ERRORS, WorkerContext, backoff_delay

log = get_logger("pgsched.worker")
# 'cancel:<worker id>' makes the heartbeat come at once, but at most once per this gap: a
# flood of them (any role may send it) must not turn the heartbeater into a busy loop.
CANCEL_BEAT_MIN_GAP_SECONDS = 0.1
# A beat still unanswered after this fraction of the lease is abandoned and retried on a
# new connection: two more tries still fit in the lease it is renewing. Longer than the
# session's lock_timeout (a quarter of the lease at most), so a lock wait fails first,
# on the server, and the connection is kept.
BEAT_TIMEOUT_LEASES = 1 / 3


class Heartbeater:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    async def run(self) -> None:
        own = self.ctx.store.own_connection()
        try:
            with self.ctx.store.using(own):
                await self._beat()
        finally:
            if own is not None:
                with contextlib.suppress(*DB_ERRORS):
                    await own.close()

    async def _beat(self) -> None:
        interval = self.ctx.options.heartbeat_seconds
        timeout = self.ctx.options.lease_seconds * BEAT_TIMEOUT_LEASES
        loop = asyncio.get_running_loop()
        failures = 0
        blocked = False
        while True:
            if blocked:
                pause = 0.0  # queue for the locked row again: the lock wait was the pause
            elif failures == 0:
                pause = interval * random.uniform(0.9, 1.0)
            else:
                pause = backoff_delay(failures, cap=interval)
            if await self._until_next_beat(pause):
                return
            self.ctx.systemd.watchdog()
            try:
                async with asyncio.timeout(timeout):
                    await self.run_once()
                self.ctx.last_db_ok = loop.time()
                failures = 0
                blocked = False
            except (*DB_ERRORS, TimeoutError) as exc:
                self.ctx.db_error("heartbeat", exc, failures)
                failures += 1
                blocked = isinstance(exc, psycopg.errors.LockNotAvailable)
            if not blocked and await self.ctx.sleep_or_close(CANCEL_BEAT_MIN_GAP_SECONDS):
                return

    async def _until_next_beat(self, seconds: float) -> bool:
        """Sleep until the next heartbeat, or less when a cancel request arrives; True
        once the worker is closing."""
        waits = [asyncio.ensure_future(self.ctx.closing.wait()),
                 asyncio.ensure_future(self.ctx.beat_now.wait())]
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        self.ctx.beat_now.clear()
        return self.ctx.closing.is_set()

    async def run_once(self) -> None:
        # The registry first, and never behind the job leases: orphan recovery spares the
        # jobs of a worker alive by this heartbeat, and the workers table is one that job
        # DDL does not lock. A lease renewal stuck behind a table lock fails after the
        # pool's lock_timeout, and the next beat writes the registry again. A registry
        # write that fails (its row locked by someone, a lost connection) does not stop
        # the renewal, which skips locked rows and reconnects: kept leases keep the jobs.
        registry_failed: BaseException | None = None
        try:
            peers = await self.ctx.store.heartbeat_worker(
                self.ctx.id, alive_seconds=self.ctx.peers_alive_seconds)
            if peers is None:
                await self.ctx.register()  # pruned while we were unreachable: come back
            else:
                self.ctx.turns.set_peers(peers)
        except DB_ERRORS as exc:
            registry_failed = exc
        # Finished jobs too: until their outcome is written (the completer may be backing
        # off) or they are released at shutdown, an expired lease would get them run again.
        # Not a job its task completed itself: the task's open transaction may hold its row
        # lock (renewing it would wait, and fail the renewal of every other job), and
        # orphan recovery skips a locked row anyway.
        held = [h.key for h in self.ctx.held.values()
                if not h.lease_lost and not h.completed_in_task]
        if held:
            kept = await self.ctx.store.heartbeat_jobs(
                worker_id=self.ctx.id, held=held, lease_seconds=self.ctx.options.lease_seconds
            )
            # Losses are counted where a held attempt is found lost, not as held minus
            # kept: an attempt whose outcome committed while this renewal ran is missing
            # from `kept` too, and it lost nothing.
            self.ctx.metrics.leases_renewed(len(kept))
            for key in held:
                h = self.ctx.held.get(key)
                if h is None or h.finished or h.lease_lost:
                    continue
                if kept.get(key) and not h.cancel_requested:
                    h.cancel_requested = True
                    log.info("job_cancel_requested", **h.log_fields())
                    if h.task is not None:
                        h.task.cancel()
                elif key not in kept and not h.completed_in_task:
                    self.ctx.lease_lost(h)
        if registry_failed is not None:
            raise registry_failed
