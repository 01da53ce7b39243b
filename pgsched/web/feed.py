"""The change feed behind GET /api/events: one reader per service, fanned out to every
client.

Why a feed the service reads itself: the worker does not NOTIFY when a job finishes, and
its per-job path must not get slower for the sake of a dashboard. So one task holds one
connection that both LISTENs on the schema's channel (enqueues, schedule changes, queue
resumes and cancels are already notified) and, every `interval` seconds or at once after
a notification (but a claim's let-go, sent by nearly every claim of a backlog of several
queues), runs one indexed query (web_job_changes in sql/web.sql) for the jobs
created, started or finished since the last look, plus a tiny one for paused queues,
workers and schedules. Whatever changed becomes an event: `job` (a job summary), `queues`,
`workers`, `schedules`, or `resync` (the client should reload: events were lost).

Invariants:
- Each look goes back `overlap` seconds before the previous look's database time, because
  a transaction stamps its rows with its start time and may commit after the look that
  should have seen it; the `seen` map (id -> status, attempts) drops what was already sent,
  so a change is published once.
- Jobs last seen running are re-read by id on every look: their next change (a retry back
  to pending, a recovery) leaves no new timestamp to find them by.
- Events carry increasing ids; the last `buffer` are kept, so a client reconnecting with
  Last-Event-ID gets what it missed, or `resync` when that is no longer held.
- A client too slow to take `queue_size` events is dropped (its stream ends; EventSource
  reconnects and replays) rather than let it hold memory.

Failure: a lost connection is logged once, retried with backoff, and announced to clients
with `resync` when it comes back (changes meanwhile may have been missed by the overlap).
The feed never raises into a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..jobjson import priority_name, to_jsonable
from ..logs import get_logger
from ..store import Store, connect
from ..worker.daemon import DB_ERRORS

log = get_logger("pgsched.web")

CLOSE = object()  # put on a client's queue to end its stream


@dataclass(frozen=True)
class Event:
    id: str  # "<boot>:<n>": a restarted service never mistakes an old id for its own
    kind: str
    data: str  # JSON

    def encode(self) -> bytes:
        return f"id: {self.id}\nevent: {self.kind}\ndata: {self.data}\n\n".encode()


# What a `job` event carries: the columns web_job_changes reads (no args or result).
SUMMARY_KEYS = ("id", "task", "queue", "status", "priority", "attempts", "max_retries",
                "execution_time", "created_at", "started_at", "finished_at", "worker_id",
                "last_error")


def job_event(row: dict[str, Any]) -> dict[str, Any]:
    data = {key: row[key] for key in SUMMARY_KEYS}
    data["status"] = str(data["status"])
    data["priority"] = priority_name(data["priority"])
    data["last_error"] = (data["last_error"] or "")[:500] or None
    return to_jsonable(data)


@dataclass
class ChangeFeed:
    store: Store
    dsn: str
    interval: float = 0.15
    overlap: float = 1.0
    buffer: int = 1000
    queue_size: int = 1000
    batch: int = 2000
    _seq: int = 0
    _boot: str = field(default_factory=lambda: secrets.token_hex(4))
    _events: deque[Event] = field(default_factory=deque)
    _clients: set[asyncio.Queue] = field(default_factory=set)
    _seen: dict[str, tuple[str, int, float]] = field(default_factory=dict)
    _state: dict[str, Any] | None = None
    _since: datetime | None = None
    _task: asyncio.Task | None = None

    # -- clients -------------------------------------------------------------------------

    @property
    def last_id(self) -> str:
        return f"{self._boot}:{self._seq}"

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(self.queue_size)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._clients.discard(queue)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def replay(self, last_id: str) -> list[Event] | None:
        """Events after `last_id`, or None if some of them are no longer held (or the id
        is not one of this process's)."""
        boot, _, number = last_id.partition(":")
        # isdigit() alone takes "²", which int() refuses; a client writes this header.
        if boot != self._boot or not (number.isascii() and number.isdigit()) \
                or len(number) > 18 or int(number) > self._seq:
            return None
        after = int(number)
        if after == self._seq:
            return []
        first = self._seq - len(self._events) + 1  # the number of the oldest event held
        if first > after + 1:
            return None
        return list(self._events)[after + 1 - first:]

    def observe(self, rows: list[dict[str, Any]]) -> None:
        """Publish changes the service made itself (a retry from the dashboard leaves no
        timestamp the next look could find)."""
        self._publish_jobs([{k: row[k] for k in SUMMARY_KEYS} for row in rows])

    def publish(self, kind: str, data: Any) -> None:
        self._seq += 1
        event = Event(f"{self._boot}:{self._seq}", kind, json.dumps(data, separators=(",", ":")))
        self._events.append(event)
        if len(self._events) > self.buffer:
            self._events.popleft()
        for queue in list(self._clients):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._clients.discard(queue)
                queue.get_nowait()  # room for the CLOSE that ends its stream
                queue.put_nowait(CLOSE)

    def close_streams(self) -> None:
        """End every client's stream now (the service is stopping)."""
        for queue in list(self._clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(CLOSE)
        self._clients.clear()

    # -- reading -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="pgsched-web-feed")

    async def stop(self) -> None:
        self.close_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                async with await connect(self.dsn, "pgsched-web") as conn:
                    await self.store.listen(conn)
                    if failures:
                        log.info("web_feed_reconnected")
                        self.publish("resync", {})
                    failures = 0
                    await self._follow(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a schema not yet migrated, a lost connection...
                failures += 1
                if failures == 1:
                    log.warning("web_feed_unavailable", error=str(exc).strip()[:200],
                                db=isinstance(exc, DB_ERRORS))
                await asyncio.sleep(min(10.0, 0.5 * 2 ** min(failures, 5)))

    async def _follow(self, conn: Any) -> None:
        while True:
            await self.look(conn)
            # Wait for a notification (something was enqueued or changed) or the interval.
            # Not a claim's let-go ('let_go:<queues>', sql/queries.sql): nearly every claim
            # of a backlog of several queues sends one, and the jobs a claim starts are
            # seen at the next interval, as any start.
            async for notify in conn.notifies(timeout=self.interval):
                if not notify.payload.startswith("let_go:"):
                    break

    async def look(self, conn: Any) -> None:
        """One look at the database: publish every change since the previous one."""
        state = await self.store.web_state(conn)
        now = state["db_now"]
        if self._since is None:
            self._since = now  # events describe changes from now on
        watch = [i for i, (status, _, _) in self._seen.items() if status == "running"]
        rows = await self.store.job_changes(
            conn, since=self._since - timedelta(seconds=self.overlap), watch=watch,
            limit=self.batch)
        self._since = now
        self._publish_jobs(rows)
        self._publish_state(state)

    def _publish_jobs(self, rows: list[dict[str, Any]]) -> None:
        clock = time.monotonic()
        rows.sort(key=lambda r: (r["finished_at"] or r["started_at"] or r["created_at"]))
        for row in rows:
            key = (row["status"], row["attempts"])
            seen = self._seen.get(row["id"])
            self._seen[row["id"]] = (*key, clock)
            if seen is None or seen[:2] != key:
                self.publish("job", job_event(row))
        if len(rows) >= self.batch:
            self.publish("resync", {})  # more changed than one look reads
        # Forget what the overlap can no longer bring back (running jobs stay watched).
        horizon = clock - 3 * self.overlap
        for job_id in [i for i, (s, _, t) in self._seen.items() if t < horizon and s != "running"]:
            del self._seen[job_id]

    def _publish_state(self, state: dict[str, Any]) -> None:
        previous, self._state = self._state, state
        if previous is None:
            return
        if state["paused_queues"] != previous["paused_queues"]:
            self.publish("queues", {"paused": state["paused_queues"]})
        if state["workers"] != previous["workers"]:
            self.publish("workers", {"workers": state["workers"]})
        if (state["schedules_changed"], state["schedules"]) != \
                (previous["schedules_changed"], previous["schedules"]):
            self.publish("schedules", {})


async def stream(feed: ChangeFeed, last_event_id: str | None, *,
                 heartbeat: float) -> AsyncIterator[bytes]:
    """One client's event stream: missed events (Last-Event-ID), then live ones, with a
    comment line every `heartbeat` seconds so proxies and clients know it is alive."""
    # Subscribed and numbered in one step (no await between): events up to `sent` come
    # from the replay, later ones from the queue, none from both.
    queue = feed.subscribe()
    now_id = feed.last_id
    sent = _number(now_id)
    try:
        yield b"retry: 2000\n\n"
        if last_event_id is not None:
            missed = feed.replay(last_event_id)
            if missed is None:
                yield Event(now_id, "resync", "{}").encode()
            else:
                for event in missed:
                    if _number(event.id) <= sent:
                        yield event.encode()
        else:
            yield Event(now_id, "hello", "{}").encode()
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), heartbeat)
            except TimeoutError:
                yield b": ping\n\n"
                continue
            if item is CLOSE:
                return
            if _number(item.id) > sent:
                yield item.encode()
    finally:
        feed.unsubscribe(queue)


def _number(event_id: str) -> int:
    return int(event_id.rpartition(":")[2])
