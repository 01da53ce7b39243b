"""Turns: which worker of a fleet claims first for a notification (the thundering herd).

Owns: this worker's view of its peers (the live workers that serve the same queues, read
from the registry at each heartbeat), the recent due-time notifications it heard, and
the claims it owes for them (`entries`: a due time and the time its turn comes, both on
the database clock).

Every worker hears every enqueue's NOTIFY. Claiming on each made N - 1 of N workers
claim empty per notification (6 empty claims per job with 50 workers). Instead, the
peers take turns: for the notification with payload p, the peers sorted by id are
rotated by a hash of p, and the worker at position r claims ceil(log2(1 + r)) steps
(a step is 5-50 ms: about three of its claim round trips) after the job falls due,
position 0 at once, as before.
A worker whose claim came back short (it took everything due that it could see: no
per-queue cap cut it, and it left no due suspect) announces it with a NOTIFY `took:`
(fetcher.py), and each peer drops the claims it owes for the notifications that claim
covered; the claim's next due time is handed on in the `took:`, and owed once. A job
due later that a claim saw (its next due time) is a turn too, ranked by its due time,
so that one claim serves it when it falls due, not one per worker that knows it. So one
claim serves a notification when the first worker in turn is free, and the next takes
over one step later when it is busy or gone.

Invariants:
- What a `took:` covers is decided by the order in which notifications arrive, never by
  clocks: PostgreSQL delivers notifications to every listener in commit order, the
  claimer began its claim after it heard the notification it names (`heard`: its
  snapshot then shows every job committed before that notification was sent, and so
  every job of the notifications before it), and it took every due job it saw. A peer
  drops only the claims it owes for notifications it heard no later than that one (by
  the first time it heard the payload: two notifications can carry the same due time,
  and dropping too little costs a claim while dropping too much would leave a job to
  the safety poll), and only for jobs due by the claim's database time.
- Turns are kept on the database clock and turned into loop times with the clock offset
  (database clock minus the loop's monotonic clock, never the wall clock, which a step
  would move under them) of this worker's latest claim, so a claim that came early (an
  offset measured by a claim that reached the server late) re-times them: one early
  claim, not a claim per notification token until the job is due.
- A payload a peer never heard (it was not listening yet, or its history moved on)
  covers none of its notifications' turns, only the turns it owes for jobs a claim saw
  (order 0: any claim at or after their due time settles them). A claimer that heard
  no notification yet names NOTHING. (A peer whose LISTEN was down when the claimer
  heard the payload, and that heard the same due time again later, drops one turn too
  many; its peers that did not miss it still claim in turn.) A `took:` of another
  group (other queues), or of the worker itself, is ignored.
- Rank needs no agreement to be safe: peers whose lists differ (a worker that started
  or stopped since the last heartbeat) may both claim at once (one claim is empty) or
  one step later; a worker missing from its own list counts itself in.

Failure: nothing here touches the database. A forged `took:` (any role that may connect
may NOTIFY) can only make a peer wait for the next claim it makes for another reason,
at worst the safety poll ([worker] poll_seconds), as a lost notification would.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections import OrderedDict
from operator import itemgetter

# The gap between one worker's turn and the next: long enough for the worker before it
# to claim and send its `took:` (two round trips and a delivery), so that the next in
# turn usually hears it before its own turn comes. STEP_RTTS of this worker's recent
# claim round trips (a moving average), within these bounds: a loaded server slows
# every round trip, and a step shorter than that makes each turn claim, empty.
TURN_STEP_SECONDS = 0.005
TURN_STEP_MAX_SECONDS = 0.05
STEP_RTTS = 3.0
# Added to a turn's time so that the claim reaches the server just after the job falls
# due: one that arrives early claims nothing and costs another round trip.
TURN_MARGIN_SECONDS = 0.0005
# Due-time payloads remembered (first time heard), to find the one a `took:` names, and
# turns owed at most: past that the turn for the latest due time is dropped (Turns._add):
# one not due yet is reached again by the claims' next due jobs; when every turn owed is
# due (a worker that hears a flood and never claims, its peers silent) the worker claims
# at once, which settles them all.
HISTORY = 1024
_DUE = itemgetter(1)  # of an entry
TOOK = "took"  # 'took:<group> <db now> <next due or -> <payload heard> <worker id>'
# The payload a `took:` names when its claimer had heard no notification (a due time no
# enqueue sends: the epoch itself, written so).
NOTHING = "0.000000000"


def group_key(queues: tuple[str, ...] | list[str] | None) -> str:
    """Workers that serve the same set of queues take turns with each other: '*' for
    every queue (None), else a short hash of the sorted names (a name may hold any
    character). An empty list is no queue at all, not every queue: such a worker claims
    nothing, and its `took:` must cover nothing of the workers of every queue."""
    if queues is None:
        return "*"
    digest = hashlib.blake2b("\0".join(sorted(set(queues))).encode(), digest_size=8)
    return digest.hexdigest()


class Turns:
    def __init__(self, worker_id: str, queues: tuple[str, ...] | list[str] | None):
        self.id = worker_id
        self.group = group_key(queues)
        self.peers: list[str] = [worker_id]
        self.step = TURN_STEP_SECONDS  # the gap between turns (observe)
        self._rtt: float | None = None  # moving average of this worker's claim round trips
        self.heard = 0  # due-time notifications heard so far (their order)
        self.last: str | None = None  # the payload of the last one
        self._first: OrderedDict[str, int] = OrderedDict()  # payload -> first order heard
        # (order heard, due epoch, epoch this worker's turn comes), database clock
        self.entries: list[tuple[int, float, float]] = []
        self.behind = 0  # the latest order heard whose turn was dropped unsettled, or 0

    def set_peers(self, peers: list[str] | None) -> None:
        """The registry's live workers of this group (any order, possibly without this one)."""
        ids = sorted(set(peers or ()) | {self.id})
        self.peers = ids

    def observe(self, seconds: float) -> None:
        """A claim's round trip: the step between turns follows them."""
        if not seconds >= 0.0:  # NaN, or a clock that went back
            return
        self._rtt = seconds if self._rtt is None else 0.8 * self._rtt + 0.2 * seconds
        self.step = min(TURN_STEP_MAX_SECONDS, max(TURN_STEP_SECONDS, STEP_RTTS * self._rtt))

    def lag(self, key: str) -> float:
        """How long after a job falls due this worker's turn for it comes: position r in
        the turn order waits ceil(log2(1 + r)) steps (1: one step, 2-3: two, 4-7: three),
        so positions claim in doubling batches and the last of 1,000 peers waits 10 steps,
        not 999, when all before it are busy (full workers never claim)."""
        return self.step * self.rank(key).bit_length()

    def rank(self, payload: str) -> int:
        """This worker's place in the turn order for a notification: 0 claims at once."""
        n = len(self.peers)
        if n <= 1:
            return 0
        start = zlib.crc32(payload.encode()) % n
        return (self.peers.index(self.id) - start) % n

    def hear(self, payload: str, due_epoch: float, turn_at: float,
             db_now: float = math.inf) -> None:
        """Note a due-time notification and the time this worker's turn for it comes
        (`db_now`: the database clock now, as this worker estimates it)."""
        self.heard += 1
        self.last = payload
        if payload not in self._first:
            self._first[payload] = self.heard
            if len(self._first) > HISTORY:
                self._first.popitem(last=False)
        self._add((self.heard, due_epoch, turn_at), db_now)

    def _add(self, entry: tuple[int, float, float], db_now: float) -> None:
        """Past HISTORY the turn for the latest due time is dropped. One not due yet
        needs nothing: the turns before it are settled by claims (this worker's, or its
        peers' handed on in their `took:`) that each report the next due job, so the one
        at or before its due time reports it (dropping the oldest instead lost a job due
        soon behind a thousand reminders for tomorrow, and made every worker claim at
        each enqueue for later once that many were pending). One due already (every turn
        owed is due) makes the worker claim at once (`behind`), which sees it."""
        self.entries.append(entry)
        if len(self.entries) > HISTORY:
            order, due, _ = latest = max(self.entries, key=_DUE)
            self.entries.remove(latest)
            if due <= db_now:
                self.behind = max(self.behind, order or self.heard)

    def owe(self, due_epoch: float, turn_at: float, db_now: float = math.inf) -> bool:
        """A claim owed for a job a claim saw pending, due at `due_epoch` (this worker's
        own claim's next due job, or a peer's, handed on in its `took:`). Any claim at or
        after that time settles it, whatever it heard before (order 0): such a claim began
        after the job was seen pending, so it sees the job. None if a turn is owed already
        for that same due time. (Every `took:` repeats the next due time until that job
        runs: a turn owed for each filled the history, and past it every notification
        made every worker claim.) True if it is a new turn."""
        if any(e[1] == due_epoch for e in self.entries):
            return False
        self._add((0, due_epoch, turn_at), db_now)
        return True

    def cover(self, upto: int, db_now: float) -> int:
        """Drop the claims owed for notifications heard at or before order `upto` whose
        jobs are due by `db_now`; how many were dropped."""
        if upto >= self.behind:
            self.behind = 0
        kept = [e for e in self.entries if e[0] > upto or e[1] > db_now]
        dropped = len(self.entries) - len(kept)
        self.entries = kept
        return dropped

    def covered_by(self, payload: str, db_now: float) -> int:
        """A peer's claim at `db_now`, begun after it heard `payload`, took every job it
        saw due: drop what that covers (if this worker never heard it, or it is NOTHING
        (the peer had heard no notification), only the turns owed for jobs a claim saw,
        order 0, which any claim at or after their due time settles)."""
        return self.cover(self._first.get(payload, 0), db_now)

    def next_turn(self) -> float | None:
        """The time (database clock) of the earliest claim owed, or None; -inf (at once)
        while turns were dropped unsettled (HISTORY)."""
        if self.behind:
            return float("-inf")
        return min((e[2] for e in self.entries), default=None)


def took_payload(group: str, db_now: float, next_due: float | None, heard: str,
                 worker_id: str) -> str:
    """What a worker sends after a short claim begun once it had heard `heard` (the worker
    id last: the one part that may hold a space)."""
    nd = "-" if next_due is None else repr(next_due)
    return f"{TOOK}:{group} {db_now!r} {nd} {heard} {worker_id}"


def parse_took(body: str) -> tuple[str, float, float | None, str, str] | None:
    """(group, db now, next due, payload heard, worker id) of a `took:` payload after its
    prefix, or None if it is not one (any role may NOTIFY: nothing here is trusted)."""
    parts = body.split(" ", 4)
    if len(parts) != 5:
        return None
    group, now, nd, heard, worker = parts
    try:
        db_now = float(now)
        next_due = None if nd == "-" else float(nd)
    except ValueError:
        return None
    if not math.isfinite(db_now) or (next_due is not None and not math.isfinite(next_due)):
        return None
    return group, db_now, next_due, heard, worker
