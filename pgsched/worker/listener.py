"""The listener: holds the LISTEN connection and turns notifications into wake-ups.

Owns: one connection of its own (outside the pool) listening on the schema's channel.

Invariants:
- Payloads are untrusted (any role that can connect may NOTIFY): only pgsched's own
  forms are accepted: 'schedules' wakes the planner, 'cancel:<worker id>' this worker's
  heartbeater, and a due time (plain decimal seconds since the epoch) the fetcher, through
  context.note_due and its token bucket (NOTIFY_WAKE_BURST); 'let_go:<queue> <queue>...'
  (a claim let those queues' due rows go, sql/queries.sql) does the same as a due time of
  now, but only in a worker that serves one of those queues and is not held at its
  per-queue cap: any other would claim nothing. A due time waits for this worker's turn
  among its peers (turns.py), and 'took:...' (a peer's short claim, fetcher.py) drops
  the turns it covered. Anything else is counted (`stats.notify_ignored`) and ignored.
- After a (re)connect it wakes the fetcher, the planner and the heartbeater, since
  notifications sent meanwhile are lost. `listening` (read by /healthz) is True only
  while the connection is up.

Failure: a lost connection is logged (`db_unavailable`), counted, and reconnected with
backoff; `listener_reconnected` when it is back. The connection has TCP keepalives
(store.LISTEN_KEEPALIVES): a server or network gone silent fails the read within about a
minute instead of leaving the listener deaf (the fetcher's safety poll covers the gap).
It returns once the worker is closing.
"""

from __future__ import annotations

import psycopg

from ..logs import get_logger
from ..queues import capped_free_slots
from ..store import connect
from .context import DB_ERRORS, WorkerContext, backoff_sleep, is_due_time
from .turns import TOOK, parse_took

log = get_logger("pgsched.worker")

SCHEDULES_CHANGED = "schedules"  # NOTIFY payload of sql/recurring.sql; others are epochs
LET_GO = "let_go"  # 'let_go:<queue> <queue>...' of a claim (sql/queries.sql)


class Listener:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    async def run(self) -> None:
        failures = 0
        while not self.ctx.closing.is_set():
            conn = None
            try:
                conn = await connect(self.ctx.dsn, application_name=self.ctx.application_name)
                await conn.execute(psycopg.sql.SQL("LISTEN {}").format(
                    psycopg.sql.Identifier(self.ctx.store.channel)))
                if failures:
                    log.info("listener_reconnected")
                    self.ctx.metrics.db_reconnected()
                failures = 0
                self.ctx.listening = True
                self.ctx.wake.set()  # anything added while we were away
                self.ctx.plan_now.set()
                self.ctx.beat_now.set()  # and any cancel request
                async for notify in conn.notifies():
                    self.on_notify(notify.payload)
            except DB_ERRORS as exc:
                self.ctx.db_error("listen", exc, failures)
                failures += 1
                await backoff_sleep(failures)
            finally:
                self.ctx.listening = False
                if conn is not None:
                    await conn.close()

    def on_notify(self, payload: str) -> None:
        """'cancel:<worker id>': a job of that worker is to be cancelled; 'schedules';
        'let_go:<queues>': due rows of those queues were let go; else a due time. Anything
        else is ignored: any role that can connect may NOTIFY."""
        if payload == SCHEDULES_CHANGED:
            self.ctx.plan_now.set()
            return
        kind, _, target = payload.partition(":")
        if kind == "cancel":
            if target == self.ctx.id:
                self.ctx.beat_now.set()
            return
        if kind == LET_GO:
            if self._could_claim(target.split(" ")):
                self.ctx.note_due(0.0)  # due already: a claim now, within the budget
            return
        if kind == TOOK:
            took = parse_took(target)
            if took is not None and is_due_time(took[3]):
                group, db_now, next_due, heard, worker = took
                if group == self.ctx.turns.group and worker != self.ctx.id:
                    self.ctx.peer_took(db_now, next_due, heard)
                return
        if is_due_time(payload):
            self.ctx.note_due(float(payload), payload)
            return
        self.ctx.stats.notify_ignored += 1
        log.debug("notify_ignored", payload=payload[:80])

    def _could_claim(self, queues: list[str]) -> bool:
        """Whether a claim here could take a job of one of `queues`: one it serves whose
        per-queue cap ([queues.NAME] concurrency) its running jobs leave room in. A worker
        held at a queue's cap claims again when one of those jobs ends (a freed slot)."""
        served = self.ctx.options.queues
        room = dict(zip(*capped_free_slots(self.ctx.queue_limits,
                                           self.ctx.running_by_queue()), strict=True))
        return any((not served or q in served) and room.get(q, 1) > 0 for q in queues)
