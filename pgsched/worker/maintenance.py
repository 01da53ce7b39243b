"""The worker's housekeeping: orphan recovery, registry pruning and vacuum.

Every worker runs it; no leader is needed because each step is a single statement that
is safe to run concurrently (SKIP LOCKED, or a delete of rows nobody else writes).

- recovery, every heartbeat interval: running jobs whose lease expired go back to
  pending as suspects, which run alone (fetcher.py); a crash counts once, and only
  against a job its worker ran alone (a crash shared by several jobs counts against
  none), and a job counted `max_recoveries` times is failed as a poison pill. A registered
  worker's jobs are taken only once two passes in a row found it silent with the same
  registry heartbeat, so one that is alive but was kept from writing by a lock wins the
  race at the unlock (recover_orphans in sql/queries.sql). Skipped while
  this worker's own heartbeat has not worked for a lease (an outage, a freeze): it
  cannot tell silent workers from ones that are only reconnecting, itself included.
- pruning, every few minutes: workers silent for ten leases leave the registry.
- statistics, at the next pass after a claim came back full while the planner's
  statistics counted few pending jobs (Store.statistics_suspect): when the live pending
  jobs have outgrown them (a burst into a drained table that keeps its history), ANALYZE
  jobs, or every claim reads a pending index whole and sorts until autovacuum gets to it.
  A check costs one statement (an idle worker's claims never come back full, so it sends
  none); the ANALYZE skips the table when another holds it. A role that may not analyse
  the table is told so once (statistics_not_refreshed), and this worker stops trying.
- vacuum, every `vacuum_interval_seconds` (first run after one interval, so restarts do
  not stampede): finished jobs past their retention are deleted in small batches.

run_once() returns what it did; the loop logs at info only when something happened.
Connection errors are logged and retried on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..logs import get_logger
from ..store import FINISHED_STATUSES, Store
from .context import DB_ERRORS, WorkerContext, raise_if_cancelling

log = get_logger("pgsched.maintenance")

PRUNE_EVERY_SECONDS = 300.0


async def vacuum(
    store: Store, *, retention_seconds: dict[str, float], batch_size: int,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Delete finished jobs past retention, batch by batch; returns the count per status.
    on_batch(status, deleted) is called after each batch (the CLI's progress bar)."""
    deleted = {}
    for status, older_than in retention_seconds.items():
        total = 0
        while True:
            n = await store.vacuum_jobs(status=status, older_than_seconds=older_than,
                                        limit=batch_size)
            total += n
            if on_batch is not None:
                on_batch(status, n)
            if n < batch_size:
                break
            await asyncio.sleep(0)  # let the loop breathe between batches
        deleted[status] = total
    return deleted


def retention_by_status(retention_days: float, failed_retention_days: float) -> dict[str, float]:
    return {
        status: (failed_retention_days if status == "failed" else retention_days) * 86400
        for status in FINISHED_STATUSES
    }


class Maintenance:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self._last_prune = 0.0
        self._last_vacuum: float | None = None
        # The registered workers the last recovery pass found silent, with the registry
        # heartbeat each was judged by: a pass takes jobs only from a worker the previous
        # one saw silent with the same heartbeat (recover_orphans in sql/queries.sql).
        self._sighted: dict[str, datetime] = {}
        self._may_analyze = True

    async def run(self) -> None:
        opts = self.ctx.options
        loop = asyncio.get_running_loop()
        self._last_vacuum = loop.time()
        while True:
            try:
                await self.run_once()
            except DB_ERRORS as exc:
                raise_if_cancelling()
                log.warning("maintenance_db_error", error=str(exc).strip()[:200])
            if await self.ctx.sleep_or_close(opts.heartbeat_seconds * random.uniform(0.8, 1.0)):
                return

    def _in_touch_for(self, now: float) -> float:
        """How much longer this worker's own heartbeat counts as recent (within a lease).
        After an outage (or a freeze) every worker's registry heartbeat is stale, this
        one's included: until its own beat has gone through it cannot tell silent workers
        from ones that are only reconnecting, and would take its own running jobs back
        (counting a crash against them) instead of letting its heartbeat renew them."""
        last_ok = self.ctx.last_db_ok
        if last_ok is None:  # run_once() driven before run() registered: nothing missed
            return self.ctx.options.lease_seconds
        return last_ok + self.ctx.options.lease_seconds - now

    async def _recover(self, now: float) -> list[dict[str, Any]]:
        """Recover orphans while in touch; a recovery that cannot run before that ends
        (waiting for a connection through an outage) is given up, not run late."""
        in_touch = self._in_touch_for(now)
        if in_touch <= 0:
            self._sighted = {}  # what this worker saw before it lost touch is not judged on
            return []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(in_touch):
                recovery = await self.ctx.store.recover_seen_twice(
                    max_recoveries=self.ctx.options.max_recoveries, sighted=self._sighted)
                self._sighted = recovery.silent
                return recovery.recovered
        return []

    async def run_once(self) -> dict[str, object]:
        opts = self.ctx.options
        store = self.ctx.store
        loop = asyncio.get_running_loop()
        did: dict[str, object] = {}
        recovered = await self._recover(loop.time())
        for row in recovered:
            status = str(row["status"])
            fields = dict(job_id=row["id"], task=row["task"], attempt=row["attempts"],
                          previous_worker=row["previous_worker"])
            # Literal event names, so that grepping the code finds every documented event.
            if status == "pending":
                log.warning("job_recovered", **fields)
            elif status == "cancelled":
                log.warning("job_cancelled", reason="lease expired after a cancel request",
                            **fields)
            else:
                log.warning("job_poisoned", **fields)
            self.ctx.metrics.job_recovered(row["task"], row["queue"], status)
        if recovered:
            did["recovered"] = len(recovered)
            self.ctx.wake.set()  # recovered jobs are due now
        if loop.time() - self._last_prune >= PRUNE_EVERY_SECONDS:
            self._last_prune = loop.time()
            pruned = await store.prune_workers(older_than_seconds=opts.lease_seconds * 10)
            if pruned:
                did["pruned_workers"] = pruned
                log.info("workers_pruned", workers=pruned)
        if store.statistics_suspect and self._may_analyze:
            outcome, warning = await store.refresh_pending_statistics()
            if outcome == "analyzed":
                did["analyzed"] = True
                log.info("statistics_refreshed")
            elif outcome == "refused":
                self._may_analyze = False
                log.warning("statistics_not_refreshed", error=warning,
                            hint="claims after a burst into a drained table may read every "
                                 "pending job until autovacuum analyses jobs; see "
                                 "docs/operations.md")
        if (
            opts.vacuum_enabled
            and self._last_vacuum is not None
            and loop.time() - self._last_vacuum >= opts.vacuum_interval_seconds
        ):
            self._last_vacuum = loop.time()
            deleted = await vacuum(
                store,
                retention_seconds=retention_by_status(opts.retention_days,
                                                      opts.failed_retention_days),
                batch_size=opts.vacuum_batch_size,
            )
            if any(deleted.values()):
                did["vacuumed"] = deleted
                log.info("vacuum_done", **deleted)
        return did
