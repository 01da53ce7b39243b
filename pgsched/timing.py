"""Time arithmetic: durations, instants, time zones, schedules and catch-up after downtime.

Owns parsing what users type (durations, ISO 8601 times, IANA zone names, cron
expressions), turning a schedule into fire instants, and deciding which missed windows to
enqueue after an outage (`due_windows`). Pure logic: no database and no clock reads;
every "now" is an argument, so replicas given the same inputs compute the same answers.

Invariants:
- Every datetime returned is aware and in UTC. A naive datetime is refused wherever an
  instant is meant; naive values are wall-clock readings and only `localize` (and
  `parse_time`) turn them into instants.
- Fire times are strictly increasing and never repeat.
- Cron expressions are matched against local wall-clock time in the schedule's zone and
  mapped to instants with one DST policy:
  * a local time skipped when clocks spring forward fires once, at the instant the gap
    ends (02:30 on New York's spring-forward night fires at 03:00 EDT); several skipped
    times, or a skipped time and a real one at the gap's end, still fire once;
  * a local time that happens twice when clocks fall back fires once, at its first
    occurrence, when the hour field is fixed (numbers, lists, ranges: `30 1 * * *`); when
    the hour field contains `*` or `/` (`*/15 * * * *`, `0 */2 * * *`) the schedule
    follows elapsed time and fires in both passes of the repeated hour.
  `localize` applies the same rule to naive times: nonexistent -> end of the gap,
  ambiguous -> first occurrence.

Failure: a bad value raises `InvalidInput` (a ValueError) with a one-line message naming
the value and how to fix it. The parsers (`parse_duration`, `parse_timezone`,
`parse_time`, `CronSchedule`) raise nothing else for any text. A cron expression that can
never fire is refused when the schedule is built, and so is one longer than MAX_CRON_LENGTH
or with a list of more than MAX_CRON_LIST_ITEMS items, before any parsing, so parsing time
stays bounded (a few milliseconds) even for stored expressions written with SQL.
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from itertools import islice
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgsched.errors import InvalidInput

__all__ = [
    "CATCH_UP_MODES",
    "EPOCH_UTC",
    "MAX_CRON_LENGTH",
    "MAX_CRON_LIST_ITEMS",
    "MAX_DURATION",
    "UTC",
    "CronSchedule",
    "IntervalSchedule",
    "Schedule",
    "due_windows",
    "format_duration",
    "localize",
    "parse_duration",
    "parse_time",
    "parse_timezone",
]

EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
MAX_DURATION = timedelta(days=36525)  # 100 years: anything longer is a typo, not a plan
CATCH_UP_MODES = ("latest", "skip", "all")

_NAIVE_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
_ZERO = timedelta(0)


def _show(value: object) -> str:
    """The value quoted for an error message: one line, and short even for huge input."""
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:56] + "...'"


def _text(value: object, what: str, hint: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"invalid {what} {_show(value)}: expected text; {hint}")
    return value.strip()


def _aware_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(
            f"{name} {value.isoformat()} has no time zone: pass an aware datetime, "
            "e.g. datetime(..., tzinfo=UTC)"
        )
    return value.astimezone(UTC)


# --- durations -----------------------------------------------------------------------

_UNIT_MICROSECONDS = {
    "d": 86_400_000_000,
    "h": 3_600_000_000,
    "m": 60_000_000,
    "s": 1_000_000,
    "ms": 1_000,
}
_UNITS = tuple(_UNIT_MICROSECONDS)
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_NUMBER, re.ASCII)
# "ms" is listed before "m" so that 250ms is not read as 250 minutes and a stray "s".
_DURATION_PART = re.compile(rf"\s*({_NUMBER})(ms|s|m|h|d)", re.ASCII)
_DURATION_HINT = "use a number with a unit s, m, h or d, like 90s, 5m, 1h30m"


def parse_duration(text: str) -> timedelta:
    """Parse `90s`, `5m`, `1h30m`, `1.5h`, `250ms`, or a plain number of seconds.

    Units are d, h, m, s and ms, each at most once and largest first; spaces between the
    parts are allowed. Zero is accepted (callers decide whether it makes sense).
    """
    cleaned = _text(text, "duration", _DURATION_HINT)

    def bad(reason: str = _DURATION_HINT) -> InvalidInput:
        return InvalidInput(f"invalid duration {_show(text)}: {reason}")

    if cleaned.startswith("-"):
        raise bad(f"durations cannot be negative; {_DURATION_HINT}")
    # Longer input cannot be a sane duration and would only feed Decimal huge numbers.
    if not cleaned or len(cleaned) > 64:
        raise bad()
    if _PLAIN_NUMBER.fullmatch(cleaned):
        micros = Decimal(cleaned) * _UNIT_MICROSECONDS["s"]
    else:
        micros, position, previous_rank = Decimal(0), 0, -1
        while position < len(cleaned):
            part = _DURATION_PART.match(cleaned, position)
            if part is None:
                raise bad()
            rank = _UNITS.index(part[2])
            if rank <= previous_rank:
                raise bad("give each unit once, largest first, like 1d2h or 1h30m")
            micros += Decimal(part[1]) * _UNIT_MICROSECONDS[part[2]]
            position, previous_rank = part.end(), rank
    whole = int(micros.to_integral_value(rounding=ROUND_HALF_EVEN))
    if whole > MAX_DURATION // _MICROSECOND:
        raise bad("it is longer than 100 years; use a shorter duration")
    return timedelta(microseconds=whole)


def format_duration(td: timedelta) -> str:
    """Render a duration the way `parse_duration` reads it: 1h30m, 1m30s, 250ms, 0s."""
    micros = td // _MICROSECOND
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, micros = divmod(micros, _UNIT_MICROSECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    if micros:
        millis, fraction = divmod(micros, 1000)
        parts.append(f"{millis}.{fraction:03d}".rstrip("0").rstrip(".") + "ms")
    return sign + ("".join(parts) or "0s")


# --- time zones and instants ---------------------------------------------------------

_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*", re.ASCII)
_ZONE_HINT = "use an IANA name like UTC, Europe/Paris or America/New_York"


def parse_timezone(name: object) -> ZoneInfo:
    """Look up an IANA time zone by name; `utc` in any case means UTC."""
    cleaned = _text(name, "time zone", _ZONE_HINT)
    if cleaned.upper() == "UTC":
        return ZoneInfo("UTC")
    if cleaned == "localtime":
        # It names whatever zone the host is set to, so two replicas could disagree.
        raise InvalidInput(f"time zone {_show(name)} depends on the host: {_ZONE_HINT}")
    # The pattern keeps out '.', '..', absolute paths and odd characters before they
    # reach the file system.
    if len(cleaned) > 64 or not _ZONE_NAME.fullmatch(cleaned):
        raise InvalidInput(f"unknown time zone {_show(name)}: {_ZONE_HINT}")
    try:
        return ZoneInfo(cleaned)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # Not found, a directory such as "America", or a tzdata file that is not a zone.
        raise InvalidInput(f"unknown time zone {_show(name)}: {_ZONE_HINT}") from None


def _zone(tz: str | ZoneInfo | timezone) -> ZoneInfo:
    if isinstance(tz, ZoneInfo):
        return tz
    if tz is UTC:
        return ZoneInfo("UTC")
    return parse_timezone(tz)  # non-text is refused there with InvalidInput


def _seconds_since_epoch(naive_utc: datetime, *, round_up: bool) -> int:
    if round_up:
        return -((_NAIVE_EPOCH - naive_utc) // _SECOND)
    return (naive_utc - _NAIVE_EPOCH) // _SECOND


def _gap_end(local: datetime, tz: ZoneInfo, before: timedelta, after: timedelta) -> datetime:
    """The instant a spring-forward gap containing `local` ends (offsets `before` -> `after`).

    zoneinfo does not expose transitions, but offsets only change on whole seconds, so
    bisect the seconds between the two readings of `local` for the first one whose wall
    time is already past it.
    """
    low = _seconds_since_epoch(local - after, round_up=False)  # wall time before the gap
    high = _seconds_since_epoch(local - before, round_up=True)  # wall time after the gap
    while high - low > 1:
        middle = (low + high) // 2
        wall = (EPOCH_UTC + timedelta(seconds=middle)).astimezone(tz).replace(tzinfo=None)
        if wall > local:
            high = middle
        else:
            low = middle
    return EPOCH_UTC + timedelta(seconds=high)


def _place(local: datetime, tz: ZoneInfo) -> tuple[datetime, datetime | None]:
    """The instants a wall-clock time denotes: (first, second), second only if it repeats.

    A time that does not exist maps to the end of its gap.
    """
    first = local.replace(tzinfo=tz, fold=0)
    second = local.replace(tzinfo=tz, fold=1)
    offset_first, offset_second = first.utcoffset(), second.utcoffset()
    assert offset_first is not None and offset_second is not None
    # PEP 495: in a gap, fold=0 reads the time with the offset from before the gap.
    if offset_first < offset_second:
        return _gap_end(local, tz, offset_first, offset_second), None
    if offset_first > offset_second:
        return first.astimezone(UTC), second.astimezone(UTC)
    return first.astimezone(UTC), None


def localize(naive: datetime, tz: ZoneInfo) -> datetime:
    """Turn a wall-clock reading in `tz` into an aware UTC instant, with the DST policy.

    A time skipped by a spring-forward maps to the instant the gap ends; a time that
    happens twice maps to its first occurrence.
    """
    if naive.tzinfo is not None:
        raise InvalidInput(
            f"localize() needs a naive datetime, got {naive.isoformat()}: "
            "use astimezone(UTC) for aware values"
        )
    return _place(naive, _zone(tz))[0]


def parse_time(text: str, *, tz: str | ZoneInfo = "UTC") -> datetime:
    """Parse an ISO 8601 time into an aware UTC instant.

    With an offset or `Z` the text names an instant; without one it is a wall-clock
    time in `tz`, placed with `localize`'s DST policy.
    """
    zone = _zone(tz)
    hint = (
        "use ISO 8601 like 2026-03-08T14:30:00Z, 2026-03-08T14:30+01:00, "
        f"or 2026-03-08 14:30 for local time in {zone.key}"
    )
    cleaned = _text(text, "time", hint)
    try:
        parsed = datetime.fromisoformat(cleaned)
    except ValueError:
        raise InvalidInput(f"invalid time {_show(text)}: {hint}") from None
    try:
        if parsed.tzinfo is None:
            return localize(parsed, zone)
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidInput(
            f"invalid time {_show(text)}: it falls outside years 1 to 9999 in UTC"
        ) from None


# --- schedules -----------------------------------------------------------------------

_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# A cron expression is at most this long, and each field lists at most this many items
# (a field has at most 60 distinct values): enough for any real schedule.
MAX_CRON_LENGTH = 1000
MAX_CRON_LIST_ITEMS = 60
_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#\-]+", re.ASCII)
_CRON_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31 or L"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
    ("second", "0-59"),
)
_CRON_HINT = (
    "use 5 fields (minute hour day-of-month month day-of-week) and optionally seconds "
    "as a 6th, like '*/15 * * * *' or '30 2 * * 1-5'"
)
# Errors croniter raises for malformed fields; none of them means a bug on our side.
_CRONITER_ERRORS = (ValueError, TypeError, LookupError, OverflowError)


def _cron_fields(expr: str) -> list[str]:
    """Split and validate a cron expression; returns its fields, aliases expanded."""

    from croniter import croniter  # here: a CLI that never parses cron never loads it

    def bad(reason: str) -> InvalidInput:
        return InvalidInput(f"invalid cron expression {_show(expr)}: {reason}")

    # Parsing costs time in proportion to the text, and the planner parses stored
    # expressions inside its transaction: no legitimate expression comes near either limit.
    if len(expr) > MAX_CRON_LENGTH:
        raise bad(f"it is {len(expr)} characters long; the limit is {MAX_CRON_LENGTH}")
    # Split on ASCII blanks only, as croniter does: other spaces make a field invalid.
    fields = re.findall(r"\S+", _CRON_ALIASES.get(expr.lower(), expr), re.ASCII)
    if len(fields) not in (5, 6):
        raise bad(_CRON_HINT)
    for index, field in enumerate(fields):
        name, allowed = _CRON_FIELDS[index]
        if not _CRON_FIELD.fullmatch(field):
            raise bad(f"the {name} field {_show(field)} has characters cron does not use")
        if field[0] in "hHrR":
            raise bad(f"hashed (H) and random (R) values are not supported; write the {name}")
        items = field.split(",")
        if len(items) > MAX_CRON_LIST_ITEMS:
            raise bad(f"the {name} field lists {len(items)} values; the limit is "
                      f"{MAX_CRON_LIST_ITEMS} (use a range or a step such as */5)")
        for item in items:
            ends = item.split("/")[0].split("-")
            # croniter reads an equal-ended range such as 9-9 as the whole field, which
            # would run a daily job every hour.
            if len(ends) == 2 and ends[0].lower().lstrip("0") == ends[1].lower().lstrip("0"):
                raise bad(f"the range {_show(item)} has equal ends; write {ends[0]}")
        # Checking each field alone lets the message say which one is wrong.
        alone = ["*"] * len(fields)
        alone[index] = field
        try:
            croniter.expand(" ".join(alone))
        except _CRONITER_ERRORS:
            raise bad(f"the {name} field {_show(field)} is not valid; use {allowed}") from None
    joined = " ".join(fields)
    try:
        # strict only catches days no month has (31 2); it ignores the weekday field,
        # which under cron's either-day rule could still fire, so use it only without one.
        croniter.expand(joined, strict=fields[4] in ("*", "?"))
        croniter(joined, datetime(2000, 1, 1)).get_next()
    except _CRONITER_ERRORS:
        raise bad("it never fires; check the day-of-month, month and day-of-week fields") from None
    return fields


class CronSchedule:
    """A cron expression read in a time zone; see the module docstring for the DST rules.

    Fields are minute, hour, day-of-month, month, day-of-week and optionally seconds last
    (croniter's order). When both day fields are restricted a day matches if either one
    does, as in classic cron (croniter intersects them instead when one uses # or W).
    Ranges may wrap (hour 22-2 is 22, 23, 0, 1, 2); an equal-ended range such as 9-9 is
    refused because croniter would read it as the whole field. Aliases @hourly, @daily,
    @midnight, @weekly, @monthly, @yearly and @annually are accepted; hashed (H) and
    random (R) values are not, because every replica must compute the same times.
    """

    def __init__(self, expr: str, tz: str | ZoneInfo = "UTC"):
        self.tz = _zone(tz)
        self.expr = _text(expr, "cron expression", _CRON_HINT)
        fields = _cron_fields(self.expr)
        self._cron = " ".join(fields)
        # An hour written as * or a step means "every so often": during a fall-back night
        # the repeated hour is real elapsed time, so it fires in both passes.
        self._follows_elapsed_time = "*" in fields[1] or "/" in fields[1]

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, tz={self.tz.key!r})"

    def next_after(self, after: datetime) -> datetime:
        """The first fire time strictly after `after`, as an aware UTC datetime."""
        after = _aware_utc(after, "after")
        for instant in self._instants_after(after):
            return instant
        raise InvalidInput(
            f"cron expression {_show(self.expr)} does not fire after {after.isoformat()}"
        )

    def fire_times(self, after: datetime, count: int) -> list[datetime]:
        """The first `count` fire times strictly after `after`."""
        _check_count(count, "count", minimum=0)
        return list(islice(self._instants_after(_aware_utc(after, "after")), count))

    def recent_fire_times(self, since: datetime, until: datetime, limit: int) -> list[datetime]:
        """The latest `limit` fire times t with since <= t <= until, oldest first.

        Walks back from `until` rather than forward from `since`, so the work is bounded
        by `limit`, not by the length of the outage.
        """
        _check_count(limit, "limit", minimum=1)
        since, until = _aware_utc(since, "since"), _aware_utc(until, "until")
        if since > until:
            return []
        start, distinct = since, list[datetime]()
        for first in self._first_instants_backwards(until):
            if first < since:
                break
            if not distinct or first != distinct[-1]:
                distinct.append(first)
            if len(distinct) == limit:
                start = first
                break
        windows: deque[datetime] = deque(maxlen=limit)
        for instant in self._instants_after(start - _MICROSECOND):
            if instant > until:
                break
            windows.append(instant)
        return list(windows)

    def _instants_after(self, after: datetime) -> Iterator[datetime]:
        wall = after.astimezone(self.tz).replace(tzinfo=None)
        first, second = _place(wall, self.tz)
        # If `after` is in the first pass of a repeated hour, the second pass of earlier
        # wall times is still ahead of it, so start scanning one fold earlier.
        start = wall - (second - first) if second is not None else wall
        last = after
        for instant in self._instants_from(start):
            # The filter also drops the duplicates that gaps produce.
            if instant > last:
                last = instant
                yield instant

    def _instants_from(self, start: datetime) -> Iterator[datetime]:
        """Fire instants in increasing order for wall-clock candidates from `start` on.

        A first reading never precedes an earlier candidate's first reading, and second
        readings come later still, so every held instant up to the current first reading
        is final and can be released in order. May repeat an instant.
        """
        held: list[datetime] = []
        for first, second in self._placed_candidates(start):
            heapq.heappush(held, first)
            if second is not None and self._follows_elapsed_time:
                heapq.heappush(held, second)
            while held and held[0] <= first:
                yield heapq.heappop(held)
        while held:
            yield heapq.heappop(held)

    def _placed_candidates(self, start: datetime) -> Iterator[tuple[datetime, datetime | None]]:
        from croniter import croniter

        candidates = croniter(self._cron, start - _SECOND, ret_type=datetime)
        while True:
            try:
                yield _place(candidates.get_next(), self.tz)
            except (OverflowError, ValueError):  # CroniterBadDateError is a ValueError
                # No match within croniter's search horizon, or past year 9999.
                return

    def _first_instants_backwards(self, until: datetime) -> Iterator[datetime]:
        wall = until.astimezone(self.tz).replace(tzinfo=None)
        from croniter import croniter

        # get_prev excludes its start, and croniter drops sub-second digits.
        candidates = croniter(self._cron, wall.replace(microsecond=0) + _SECOND, ret_type=datetime)
        while True:
            try:
                local = candidates.get_prev()
            except (OverflowError, ValueError):
                return
            if local <= wall:
                yield _place(local, self.tz)[0]


@dataclass(frozen=True)
class IntervalSchedule:
    """Fires at anchor + k * every for every integer k (also before the anchor).

    The grid depends only on `anchor` and `every`, never on when a replica looked at it,
    so all replicas agree. `every` must be positive and at most 100 years.
    """

    every: timedelta
    anchor: datetime = EPOCH_UTC

    def __post_init__(self) -> None:
        if not isinstance(self.every, timedelta) or not _ZERO < self.every <= MAX_DURATION:
            shown = format_duration(self.every) if isinstance(self.every, timedelta) else "?"
            raise InvalidInput(
                f"invalid interval {shown}: it must be more than 0 and at most 100 years, "
                "like 30s or 1h"
            )
        object.__setattr__(self, "anchor", _aware_utc(self.anchor, "anchor"))

    def next_after(self, after: datetime) -> datetime:
        """The first grid point strictly after `after`, as an aware UTC datetime."""
        steps = (_aware_utc(after, "after") - self.anchor) // self.every + 1
        return self.anchor + steps * self.every

    def fire_times(self, after: datetime, count: int) -> list[datetime]:
        """The first `count` grid points strictly after `after`."""
        _check_count(count, "count", minimum=0)
        first = self.next_after(after)
        return [first + index * self.every for index in range(count)]

    def recent_fire_times(self, since: datetime, until: datetime, limit: int) -> list[datetime]:
        """The latest `limit` grid points t with since <= t <= until, oldest first."""
        _check_count(limit, "limit", minimum=1)
        since, until = _aware_utc(since, "since"), _aware_utc(until, "until")
        newest = (until - self.anchor) // self.every
        oldest = max(-((self.anchor - since) // self.every), newest - limit + 1)
        return [self.anchor + step * self.every for step in range(oldest, newest + 1)]


Schedule = CronSchedule | IntervalSchedule


def _check_count(value: int, name: str, *, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"invalid {name} {_show(value)}: use a whole number >= {minimum}")


def due_windows(
    schedule: Schedule,
    next_fire: datetime,
    now: datetime,
    *,
    catch_up: str = "latest",
    tolerance: timedelta = timedelta(seconds=60),
    limit: int = 100,
) -> tuple[list[datetime], datetime]:
    """Decide which fire times to enqueue now: returns (windows, new next_fire).

    `next_fire` is the first window not yet enqueued. The due windows are the fire times
    t with next_fire <= t <= now; which of them are returned depends on `catch_up`:
    - "latest": only the most recent one; one run stands for all that were missed.
    - "skip": only those not late, i.e. now - t <= tolerance (so an on-time tick still
      fires); older missed windows are dropped. At most `limit`, the most recent.
    - "all": every due window, but at most `limit` of them, the most recent; older ones
      are dropped so a long outage cannot flood the queue.
    Windows come oldest first. The new next_fire is the first fire time after `now`; if
    nothing is due yet the answer is ([], next_fire). The work is bounded by `limit`
    however long the outage was.
    """
    if catch_up not in CATCH_UP_MODES:
        raise InvalidInput(f"unknown catch_up {_show(catch_up)}: use latest, skip or all")
    _check_count(limit, "limit", minimum=1)
    if tolerance < _ZERO:
        raise InvalidInput(f"invalid tolerance {format_duration(tolerance)}: it must be >= 0")
    next_fire, now = _aware_utc(next_fire, "next_fire"), _aware_utc(now, "now")
    if next_fire > now:
        return [], next_fire
    if catch_up == "latest":
        windows = schedule.recent_fire_times(next_fire, now, 1)
    elif catch_up == "skip":
        windows = schedule.recent_fire_times(max(next_fire, now - tolerance), now, limit)
    else:
        windows = schedule.recent_fire_times(next_fire, now, limit)
    return windows, schedule.next_after(now)
