"""Turns: which worker of a fleet claims first for a notification (the thundering herd).

Owns: this worker's view of its peers (the live workers that serve the same queues, read
from the registry at each heartbeat), the recent due-time notifications it heard, and
the claims it owes for them (`entries`: a due time and the loop time its turn comes).

Every worker hears every enqueue's NOTIFY. Claiming on each made N - 1 of N workers
claim empty per notification (6 empty claims per job with 50 workers). Instead, the
peers take turns: for the notification with payload p, the peers sorted by id are
rotated by a hash of p, and the worker at position r claims r x TURN_STEP_SECONDS after
the job falls due (position 0 at once, as before). A worker whose claim came back short
(it took everything due that it could see: no per-queue cap cut it, and it left no due
suspect) announces it with a NOTIFY `took:` (fetcher.py), and each peer drops the claims
it owes for the notifications that claim covered; the claim's next due time is handed on
in the `took:`, and owed once. So one claim serves a notification
when the first worker in turn is free, and the next takes over one step later when it
is busy or gone.

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
- A claim of this worker's own re-times the turns for jobs it found not due yet by its
  database clock (never sooner), so that a wall clock running ahead costs one early
  claim, not a claim per notification token until the job is due.
- A payload a peer never heard (it was not listening yet, or its history moved on)
  covers nothing. A `took:` of another group (other queues), or of the worker itself,
  is ignored.
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

# The gap between one worker's turn and the next: more than a claim's round trip plus
# the `took:` that follows it (about 1-2 ms on an idle server), so that the next worker
# in turn usually hears the claim before its own turn comes.
TURN_STEP_SECONDS = 0.005
# Due-time payloads remembered (first time heard), to find the one a `took:` names, and
# turns owed at most: past that (a worker that hears a flood and never claims, its peers
# silent) the oldest are dropped and the worker claims at once, which settles them all.
HISTORY = 1024
TOOK = "took"  # 'took:<group> <db now> <next due or -> <payload heard> <worker id>'


def group_key(queues: tuple[str, ...] | list[str] | None) -> str:
    """Workers that serve the same set of queues take turns with each other: '*' for
    every queue, else a short hash of the sorted names (a name may hold any character)."""
    if not queues:
        return "*"
    digest = hashlib.blake2b("\0".join(sorted(set(queues))).encode(), digest_size=8)
    return digest.hexdigest()


class Turns:
    def __init__(self, worker_id: str, queues: tuple[str, ...] | list[str] | None):
        self.id = worker_id
        self.group = group_key(queues)
        self.peers: list[str] = [worker_id]
        self.heard = 0  # due-time notifications heard so far (their order)
        self.last: str | None = None  # the payload of the last one
        self._first: OrderedDict[str, int] = OrderedDict()  # payload -> first order heard
        # (order heard, due epoch, loop time this worker's turn comes, how long after the
        # job falls due that is: its place in the turn order, rank x TURN_STEP_SECONDS)
        self.entries: list[tuple[int, float, float, float]] = []
        self.behind = 0  # the latest order heard whose turn was dropped unsettled, or 0

    def set_peers(self, peers: list[str] | None) -> None:
        """The registry's live workers of this group (any order, possibly without this one)."""
        ids = sorted(set(peers or ()) | {self.id})
        self.peers = ids

    def rank(self, payload: str) -> int:
        """This worker's place in the turn order for a notification: 0 claims at once."""
        n = len(self.peers)
        if n <= 1:
            return 0
        start = zlib.crc32(payload.encode()) % n
        return (self.peers.index(self.id) - start) % n

    def hear(self, payload: str, due_epoch: float, turn_at: float, step: float = 0.0) -> None:
        """Note a due-time notification and the loop time this worker's turn for it comes
        (`step` after the job falls due)."""
        self.heard += 1
        self.last = payload
        if payload not in self._first:
            self._first[payload] = self.heard
            if len(self._first) > HISTORY:
                self._first.popitem(last=False)
        self._add((self.heard, due_epoch, turn_at, step))

    def _add(self, entry: tuple[int, float, float, float]) -> None:
        self.entries.append(entry)
        if len(self.entries) > HISTORY:
            dropped = self.entries[:len(self.entries) - HISTORY]
            del self.entries[:len(dropped)]
            self.behind = max(self.behind, max(e[0] for e in dropped))

    def owe(self, due_epoch: float, turn_at: float, step: float = 0.0) -> None:
        """A claim owed for a due time learned from a peer's `took:` (its next due job):
        ordered after everything heard so far. None if a turn is owed already for that
        same due time: only a claim at or after it settles that one, and such a claim
        sees this job (due later than its own claim's time, so added before it fell due).
        Every `took:` repeats the next due time until that job runs: a turn owed for each
        filled the history, and past it every notification made every worker claim. (Not
        for an earlier due time: a `took:` that covers that one may come from a claim
        begun before this job was added.)"""
        if any(e[1] == due_epoch for e in self.entries):
            return
        self._add((self.heard, due_epoch, turn_at, step))

    def cover(self, upto: int, db_now: float, db_now_at: float | None = None) -> int:
        """Drop the claims owed for notifications heard at or before order `upto` whose
        jobs are due by `db_now`; how many were dropped. With `db_now_at`, the loop time
        this worker's own claim read the database clock at `db_now`, the turns for jobs
        not due yet come no sooner than it says: a turn timed by a wall clock that ran
        ahead (the offset of an earlier claim) came before its job was due, and stayed
        due, so the worker claimed again at every notification token until the job was.
        (Never sooner than timed: a job added after this claim began, due now, may be due
        after `db_now`.)"""
        if upto >= self.behind:
            self.behind = 0
        kept = [e for e in self.entries if e[0] > upto or e[1] > db_now]
        dropped = len(self.entries) - len(kept)
        if db_now_at is not None:
            kept = [(o, due, max(turn, db_now_at + (due - db_now) + step)
                     if due > db_now else turn, step) for o, due, turn, step in kept]
        self.entries = kept
        return dropped

    def covered_by(self, payload: str, db_now: float) -> int:
        """A peer's claim at `db_now`, begun after it heard `payload`, took every job it
        saw due: drop what that covers (nothing if this worker never heard it)."""
        upto = self._first.get(payload)
        return 0 if upto is None else self.cover(upto, db_now)

    def next_turn(self) -> float | None:
        """The loop time of the earliest claim owed, or None; at once while turns were
        dropped unsettled (HISTORY)."""
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
