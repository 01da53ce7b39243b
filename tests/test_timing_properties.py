"""Property tests for pgsched.timing, including a brute-force cron reference.

The reference shares no code with pgsched or croniter: it walks UTC minute by minute (or
second by second for 6-field expressions), reads the local wall clock, matches the fields
with the small matcher below and applies the DST policy from the UTC side:
- when the UTC offset grows between two steps, the wall-clock times skipped in between
  fire once, at the first step after the jump (the end of the gap);
- when it shrinks, wall-clock times up to the last one seen before the jump are repeats,
  and a repeat fires only if the hour field contains `*` or `/`.
Horizons and example counts are small so the file runs in a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

from pgsched.errors import InvalidInput
from pgsched.timing import (
    MAX_DURATION,
    UTC,
    CronSchedule,
    IntervalSchedule,
    due_windows,
    format_duration,
    parse_duration,
    parse_time,
    parse_timezone,
)

ZONES = ("America/New_York", "Europe/London", "Australia/Lord_Howe", "UTC")
# 2025-2027 transitions of the zones above, as UTC instants
TRANSITIONS = {
    "America/New_York": [
        datetime(2025, 3, 9, 7, tzinfo=UTC),
        datetime(2025, 11, 2, 6, tzinfo=UTC),
        datetime(2026, 3, 8, 7, tzinfo=UTC),
        datetime(2026, 11, 1, 6, tzinfo=UTC),
        datetime(2027, 3, 14, 7, tzinfo=UTC),
    ],
    "Europe/London": [
        datetime(2025, 3, 30, 1, tzinfo=UTC),
        datetime(2025, 10, 26, 1, tzinfo=UTC),
        datetime(2026, 3, 29, 1, tzinfo=UTC),
        datetime(2026, 10, 25, 1, tzinfo=UTC),
    ],
    "Australia/Lord_Howe": [
        datetime(2025, 4, 5, 15, tzinfo=UTC),
        datetime(2025, 10, 4, 15, 30, tzinfo=UTC),
        datetime(2026, 4, 4, 15, tzinfo=UTC),
        datetime(2026, 10, 3, 15, 30, tzinfo=UTC),
    ],
    "UTC": [datetime(2024, 2, 28, 12, tzinfo=UTC), datetime(2026, 12, 31, 12, tzinfo=UTC)],
}
MINUTE = timedelta(minutes=1)
SECOND = timedelta(seconds=1)
HORIZON = timedelta(hours=36)
FIELD_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6), (0, 59))


# --- an independent cron matcher -------------------------------------------------------


def expand(field: str, low: int, high: int) -> set[int]:
    """The values a field allows; supports the syntax the strategies below generate."""
    values: set[int] = set()
    for item in field.split(","):
        body, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            first, last = low, high
        elif "-" in body:
            first, last = (int(end) for end in body.split("-"))
        else:
            first = int(body)
            last = high if step_text else first
        values.update(range(first, last + 1, step))
    return values


class Matcher:
    def __init__(self, fields: list[str]):
        self.allowed = [
            expand(field, *bounds) for field, bounds in zip(fields, FIELD_BOUNDS, strict=False)
        ]
        self.allowed[4] = {day % 7 for day in self.allowed[4]}  # 7 is Sunday too
        self.either_day = fields[2] != "*" and fields[4] != "*"
        self.with_seconds = len(fields) == 6

    def matches(self, wall: datetime) -> bool:
        minutes, hours, days, months, weekdays = self.allowed[:5]
        if self.with_seconds and wall.second not in self.allowed[5]:
            return False
        if wall.minute not in minutes or wall.hour not in hours or wall.month not in months:
            return False
        day, weekday = wall.day in days, wall.isoweekday() % 7 in weekdays
        return (day or weekday) if self.either_day else (day and weekday)


def wall_and_offset(instant: datetime, zone: ZoneInfo) -> tuple[datetime, timedelta]:
    local = instant.astimezone(zone)
    offset = local.utcoffset()
    assert offset is not None
    return local.replace(tzinfo=None, fold=0), offset


def reference_fire_times(
    fields: list[str], zone: ZoneInfo, start: datetime, end: datetime
) -> list[datetime]:
    """Fire instants in (start, end] found by walking UTC one step at a time."""
    matcher = Matcher(fields)
    elapsed = "*" in fields[1] or "/" in fields[1]
    step = SECOND if matcher.with_seconds else MINUTE
    # Start early enough to have seen the first pass of any repeated hour before `start`.
    instant = start.replace(second=0, microsecond=0) - timedelta(hours=3)
    wall, offset = wall_and_offset(instant, zone)
    repeats_until: datetime | None = None
    fires = []
    while instant < end:
        instant += step
        previous_wall, previous_offset = wall, offset
        wall, offset = wall_and_offset(instant, zone)
        due = matcher.matches(wall)
        if offset > previous_offset:
            skipped = previous_wall + step
            while skipped < wall:
                due = due or matcher.matches(skipped)
                skipped += step
        elif offset < previous_offset:
            repeats_until = previous_wall
        if repeats_until is not None and wall <= repeats_until and not elapsed:
            due = False
        if due and start < instant <= end:
            fires.append(instant)
    return fires


# --- strategies ------------------------------------------------------------------------


def field_values(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    ranges = st.tuples(value, value).filter(lambda ends: ends[0] < ends[1])
    steps = st.integers(2, max(2, (high - low) // 2))
    return st.one_of(
        st.just("*"),
        value.map(str),
        st.lists(value, min_size=2, max_size=4, unique=True).map(
            lambda values: ",".join(map(str, sorted(values)))
        ),
        ranges.map(lambda ends: f"{ends[0]}-{ends[1]}"),
        steps.map(lambda step: f"*/{step}"),
        st.tuples(ranges, steps).map(lambda rs: f"{rs[0][0]}-{rs[0][1]}/{rs[1]}"),
    )


def restricted_day_field(low: int, high: int) -> st.SearchStrategy[str]:
    # croniter decides "restricted" from the expanded set when the other day field holds
    # a '*'; a non-'*' field covering every day is left out so the either-day rule stays
    # the plain textual one in the matcher.
    full = set(range(low, high + 1))
    return field_values(low, high).filter(lambda f: f == "*" or expand(f, low, high) != full)


hours_near_transitions = st.one_of(field_values(0, 23), field_values(0, 3))
daily_expressions = st.tuples(field_values(0, 59), hours_near_transitions).map(
    lambda mh: [mh[0], mh[1], "*", "*", "*"]
)
full_expressions = st.tuples(
    field_values(0, 59),
    hours_near_transitions,
    st.one_of(st.just("*"), restricted_day_field(1, 31)),
    st.one_of(st.just("*"), field_values(1, 12)),
    st.one_of(st.just("*"), restricted_day_field(0, 6), st.just("7")),
).map(list)


@st.composite
def starts_near_transitions(draw: st.DrawFn, zone: str) -> datetime:
    transition = draw(st.sampled_from(TRANSITIONS[zone]))
    offset = draw(st.integers(-30 * 3600, 6 * 3600))
    return transition + timedelta(seconds=offset, microseconds=draw(st.integers(0, 999_999)))


@st.composite
def zone_and_start(draw: st.DrawFn) -> tuple[str, datetime]:
    zone = draw(st.sampled_from(ZONES))
    anywhere = st.datetimes(datetime(2024, 1, 1), datetime(2027, 12, 31), timezones=st.just(UTC))
    return zone, draw(st.one_of(starts_near_transitions(zone), anywhere))


def check_against_reference(fields: list[str], zone: str, start: datetime) -> list[datetime]:
    try:
        schedule = CronSchedule(" ".join(fields), zone)
    except InvalidInput:
        reject()  # e.g. day 31 in a month that never has one
    end = start + HORIZON
    expected = reference_fire_times(fields, ZoneInfo(zone), start, end)
    actual = schedule.fire_times(start, len(expected) + 1)
    assert actual[: len(expected)] == expected
    assert all(later > earlier for earlier, later in pairwise(actual))
    assert all(instant.tzinfo is UTC for instant in actual)
    if len(actual) > len(expected):
        assert actual[-1] > end
    return expected


# --- cron against the reference -----------------------------------------------------------

# No deadline (hypothesis's default: 200 ms an example) on any test here: an example
# that waits for the CPU that long on a loaded CI machine, then runs fast when hypothesis
# replays it, fails the test as flaky ("Unreliable test timings"). A speed check is no
# part of these properties.
no_deadline = settings(deadline=None)

reference_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)


@reference_settings
@given(fields=daily_expressions, zone_start=zone_and_start(), data=st.data())
def test_daily_cron_matches_reference(
    fields: list[str], zone_start: tuple[str, datetime], data: st.DataObject
) -> None:
    zone, start = zone_start
    expected = check_against_reference(fields, zone, start)
    if expected:
        # Restarting from inside the sequence (also inside a repeated hour) agrees too.
        schedule = CronSchedule(" ".join(fields), zone)
        index = data.draw(st.integers(0, len(expected) - 1))
        assert schedule.next_after(expected[index] - timedelta(microseconds=1)) == expected[index]
        if index + 1 < len(expected):
            assert schedule.next_after(expected[index]) == expected[index + 1]


@reference_settings
@given(fields=full_expressions, zone_start=zone_and_start())
def test_cron_matches_reference(fields: list[str], zone_start: tuple[str, datetime]) -> None:
    check_against_reference(fields, *zone_start)


@settings(max_examples=25, deadline=None)
@given(
    minute_hour=st.tuples(field_values(0, 59), hours_near_transitions),
    seconds=field_values(0, 59).filter(lambda f: f not in ("*", "*/2")),
    zone=st.sampled_from(ZONES[:3]),
    data=st.data(),
)
def test_cron_with_seconds_matches_reference(
    minute_hour: tuple[str, str], seconds: str, zone: str, data: st.DataObject
) -> None:
    fields = [*minute_hour, "*", "*", "*", seconds]
    transition = data.draw(st.sampled_from(TRANSITIONS[zone]))
    start = transition - timedelta(seconds=data.draw(st.integers(0, 5400)))
    schedule = CronSchedule(" ".join(fields), zone)
    end = start + timedelta(hours=2)
    expected = reference_fire_times(fields, ZoneInfo(zone), start, end)
    actual = schedule.fire_times(start, len(expected) + 1)
    assert actual[: len(expected)] == expected
    assert all(later > earlier for earlier, later in pairwise(actual))


@reference_settings
@given(
    fields=daily_expressions,
    zone_start=zone_and_start(),
    data=st.data(),
    mode=st.sampled_from(("latest", "skip", "all")),
    limit=st.integers(1, 5),
    tolerance=st.integers(0, 7200).map(lambda s: timedelta(seconds=s)),
)
def test_cron_due_windows_match_reference(
    fields: list[str],
    zone_start: tuple[str, datetime],
    data: st.DataObject,
    mode: str,
    limit: int,
    tolerance: timedelta,
) -> None:
    zone, start = zone_start
    schedule = CronSchedule(" ".join(fields), zone)
    fires = reference_fire_times(fields, ZoneInfo(zone), start, start + HORIZON)
    assume(len(fires) >= 2)
    next_fire = data.draw(st.sampled_from(fires[:-1]))
    now = next_fire + timedelta(seconds=data.draw(st.integers(0, 24 * 3600)))
    assume(now < fires[-1])
    due = [t for t in fires if next_fire <= t <= now]
    expected = {
        "latest": due[-1:],
        "skip": [t for t in due if now - t <= tolerance][-limit:],
        "all": due[-limit:],
    }[mode]
    windows, following = due_windows(
        schedule, next_fire, now, catch_up=mode, tolerance=tolerance, limit=limit
    )
    assert windows == expected
    assert following == min(t for t in fires if t > now)


# --- intervals ----------------------------------------------------------------------------

instants = st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.just(UTC))
intervals = st.one_of(
    st.integers(1, 10**6).map(lambda us: timedelta(microseconds=us)),
    st.integers(1, 10**9).map(lambda s: timedelta(seconds=s)),
)


@no_deadline
@given(every=intervals, anchor=instants, after=instants)
def test_interval_next_after_is_the_next_grid_point(
    every: timedelta, anchor: datetime, after: datetime
) -> None:
    schedule = IntervalSchedule(every, anchor)
    following = schedule.next_after(after)
    assert after < following <= after + every
    assert (following - anchor) % every == timedelta(0)
    assert schedule.fire_times(after, 3) == [following + k * every for k in range(3)]


@no_deadline
@given(
    every=intervals,
    anchor=instants,
    next_fire=instants,
    gap=st.integers(0, 50 * 365 * 86400).map(lambda s: timedelta(seconds=s)),
    mode=st.sampled_from(("latest", "skip", "all")),
    limit=st.integers(1, 200),
)
def test_interval_due_windows_after_any_outage(
    every: timedelta,
    anchor: datetime,
    next_fire: datetime,
    gap: timedelta,
    mode: str,
    limit: int,
) -> None:
    schedule = IntervalSchedule(every, anchor)
    now = next_fire + gap
    tolerance = timedelta(seconds=60)
    windows, following = due_windows(
        schedule, next_fire, now, catch_up=mode, tolerance=tolerance, limit=limit
    )
    assert following == schedule.next_after(now)
    oldest = next_fire if mode != "skip" else max(next_fire, now - tolerance)
    assert all(oldest <= t <= now and (t - anchor) % every == timedelta(0) for t in windows)
    assert all(later - earlier == every for earlier, later in pairwise(windows))
    # nothing newer was left out, and only the limit (or the mode) stopped older ones
    assert not windows or windows[-1] + every > now
    missed_before = (windows[0] if windows else following) - every
    if missed_before >= oldest:
        assert len(windows) == (1 if mode == "latest" else limit)


# --- parsers never fail with anything but InvalidInput --------------------------------------


def accepts_or_refuses(parse: Callable[[str], object], text: str) -> None:
    try:
        parse(text)
    except InvalidInput as error:
        assert "\n" not in str(error)


@no_deadline
@given(st.one_of(st.text(), st.text(alphabet="0123456789.smhd -+eEnaif \t")))
def test_parse_duration_fuzz(text: str) -> None:
    accepts_or_refuses(parse_duration, text)


@no_deadline
@given(st.one_of(st.text(), st.text(alphabet="0123456789-:.TZ+ WW")))
def test_parse_time_fuzz(text: str) -> None:
    accepts_or_refuses(parse_time, text)
    accepts_or_refuses(lambda t: parse_time(t, tz="Australia/Lord_Howe"), text)


@no_deadline
@given(st.one_of(st.text(), st.text(alphabet="AEUacmort/._-+0 "), st.sampled_from(ZONES)))
def test_parse_timezone_fuzz(text: str) -> None:
    accepts_or_refuses(parse_timezone, text)


cron_field_text = st.text(alphabet="0123456789*/,-?#LWHRlwhr", min_size=1, max_size=6)


@no_deadline
@given(
    st.one_of(
        st.text(),
        st.lists(cron_field_text, min_size=4, max_size=7).map(" ".join),
        st.lists(
            st.one_of(cron_field_text, st.sampled_from(["jan", "MON", "sun-sat", "fri#2"])),
            min_size=5,
            max_size=6,
        ).map(" ".join),
    )
)
def test_cron_expression_fuzz(text: str) -> None:
    accepts_or_refuses(CronSchedule, text)


@no_deadline
@given(st.timedeltas(min_value=timedelta(0), max_value=MAX_DURATION))
def test_format_duration_round_trips(duration: timedelta) -> None:
    assert parse_duration(format_duration(duration)) == duration


@no_deadline
@given(
    st.lists(st.integers(0, 99), min_size=5, max_size=5),
    st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_parse_duration_adds_its_parts(counts: list[int], present: list[bool]) -> None:
    units = ("d", "h", "m", "s", "ms")
    sizes = (timedelta(days=1), timedelta(hours=1), MINUTE, SECOND, timedelta(milliseconds=1))
    parts = [
        (c, unit, size)
        for c, unit, size, keep in zip(counts, units, sizes, present, strict=True)
        if keep
    ]
    assume(parts)
    text = "".join(f"{count}{unit}" for count, unit, _ in parts)
    assert parse_duration(text) == sum((count * size for count, _, size in parts), timedelta())
