"""Example tests for pgsched.timing: parsers, DST policy, schedules and catch-up.

Every expected instant is written out in UTC and was worked out by hand from the zone's
rules; nothing sleeps or reads the clock. Zones used and their 2026 transitions:
- America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z);
  2026-11-01 02:00 EDT -> 01:00 EST (06:00Z).
- Europe/London: 2026-03-29 01:00 GMT -> 02:00 BST (01:00Z);
  2026-10-25 02:00 BST -> 01:00 GMT (01:00Z).
- Australia/Lord_Howe (+10:30 / +11, a 30-minute shift): 2026-04-05 02:00 -> 01:30
  (2026-04-04 15:00Z); 2026-10-04 02:00 -> 02:30 (2026-10-03 15:30Z).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from pgsched.errors import InvalidInput
from pgsched.timing import (
    CATCH_UP_MODES,
    EPOCH_UTC,
    UTC,
    CronSchedule,
    IntervalSchedule,
    due_windows,
    format_duration,
    localize,
    parse_duration,
    parse_time,
    parse_timezone,
)

NEW_YORK = "America/New_York"
LONDON = "Europe/London"
LORD_HOWE = "Australia/Lord_Howe"


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def hm(instants: list[datetime]) -> list[str]:
    """Instants as compact UTC strings, so a failing assertion reads like the rule."""
    return [t.strftime("%m-%d %H:%M:%S") for t in instants]


# --- parse_duration / format_duration --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d2h", timedelta(days=1, hours=2)),
        ("1.5h", timedelta(minutes=90)),
        ("250ms", timedelta(milliseconds=250)),
        ("1s250ms", timedelta(seconds=1, milliseconds=250)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("30", timedelta(seconds=30)),
        ("0.5", timedelta(milliseconds=500)),
        (".5s", timedelta(milliseconds=500)),
        ("  5m\n", timedelta(minutes=5)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("0.1s", timedelta(milliseconds=100)),
        ("36525d", timedelta(days=36525)),
    ],
)
def test_parse_duration_accepts(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "5x",
        "-5m",
        "-5",
        "+5m",
        "nan",
        "inf",
        "-inf",
        "1e3",
        "5 m",
        "5M",
        "m",
        "1.2.3s",
        "30m1h",
        "1h1h",
        "36526d",
        "99999999999999999999h",
        "1" * 100,
        "\u0663s",  # an Arabic-Indic digit three
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_duration(text)


def test_parse_duration_message_names_value_and_fix() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_duration("5x")
    assert str(caught.value) == (
        "invalid duration '5x': use a number with a unit s, m, h or d, like 90s, 5m, 1h30m"
    )


def test_parse_duration_message_stays_one_line() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_duration("5\nx" + "y" * 500)
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) < 200


def test_parse_duration_refuses_non_text() -> None:
    with pytest.raises(InvalidInput):
        parse_duration(30)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("duration", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=1, hours=2), "1d2h"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(seconds=1, milliseconds=500), "1s500ms"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(microseconds=1), "0.001ms"),
        (-timedelta(seconds=90), "-1m30s"),
    ],
)
def test_format_duration(duration: timedelta, text: str) -> None:
    assert format_duration(duration) == text


# --- parse_timezone --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("UTC", "UTC"),
        ("utc", "UTC"),
        ("America/New_York", "America/New_York"),
        (" Europe/London ", "Europe/London"),
        ("Australia/Lord_Howe", "Australia/Lord_Howe"),
        ("Etc/GMT+5", "Etc/GMT+5"),
    ],
)
def test_parse_timezone_accepts(name: str, key: str) -> None:
    assert parse_timezone(name).key == key


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Mars/Base",
        "../etc",
        "../../etc/passwd",
        "/etc/passwd",
        "Europe/../UTC",
        "America",  # a directory of zones, not a zone
        "zone.tab",  # a tzdata file that is not a zone
        "localtime",
        "America//New_York",
        "\x00",
        "a" * 300,
        "Europe/Lon don",
    ],
)
def test_parse_timezone_rejects(name: str) -> None:
    with pytest.raises(InvalidInput, match="time zone"):
        parse_timezone(name)


# --- parse_time and localize -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tz", "expected"),
    [
        ("2026-03-08T12:00:00Z", "UTC", utc(2026, 3, 8, 12)),
        ("2026-03-08T12:00:00+01:00", NEW_YORK, utc(2026, 3, 8, 11)),
        ("2026-03-08 12:00-05:00", LONDON, utc(2026, 3, 8, 17)),
        ("2026-03-08 02:30", "UTC", utc(2026, 3, 8, 2, 30)),
        ("2026-07-01 12:00", NEW_YORK, utc(2026, 7, 1, 16)),
        ("2026-03-08", NEW_YORK, utc(2026, 3, 8, 5)),
        ("  2026-03-08T09:15:30.25  ", "UTC", datetime(2026, 3, 8, 9, 15, 30, 250000, UTC)),
        # nonexistent local times: the instant the gap ends
        ("2026-03-08 02:30", NEW_YORK, utc(2026, 3, 8, 7)),
        ("2026-03-08T02:30:00", NEW_YORK, utc(2026, 3, 8, 7)),
        ("2026-03-08T02:00:00", NEW_YORK, utc(2026, 3, 8, 7)),
        ("2026-03-29 01:30", LONDON, utc(2026, 3, 29, 1)),
        ("2026-10-04 02:15", LORD_HOWE, utc(2026, 10, 3, 15, 30)),
        # ambiguous local times: the first occurrence
        ("2026-11-01 01:30", NEW_YORK, utc(2026, 11, 1, 5, 30)),
        ("2026-10-25 01:30", LONDON, utc(2026, 10, 25, 0, 30)),
        ("2026-04-05 01:45", LORD_HOWE, utc(2026, 4, 4, 14, 45)),
        # the first existing minute after the gap, and right after the repeated hour
        ("2026-03-08 03:00", NEW_YORK, utc(2026, 3, 8, 7)),
        ("2026-11-01 02:00", NEW_YORK, utc(2026, 11, 1, 7)),
    ],
)
def test_parse_time(text: str, tz: str, expected: datetime) -> None:
    parsed = parse_time(text, tz=tz)
    assert parsed == expected
    assert parsed.tzinfo is UTC


def test_parse_time_takes_a_zoneinfo() -> None:
    assert parse_time("2026-03-08 02:30", tz=ZoneInfo(NEW_YORK)) == utc(2026, 3, 8, 7)


@pytest.mark.parametrize(
    ("text", "tz"),
    [
        ("", "UTC"),
        ("yesterday", "UTC"),
        ("now", "UTC"),
        ("2026-13-01", "UTC"),
        ("2026-02-30", "UTC"),
        ("2026-03-08T25:00", "UTC"),
        ("2026-03-08T12:00+25:00", "UTC"),
        ("12:00", "UTC"),
        ("9999-12-31T23:59", NEW_YORK),  # after UTC conversion it is in year 10000
        ("0001-01-01T00:00", "Asia/Tokyo"),  # ... and here before year 1
        ("2026-01-01", "Nowhere/Special"),
    ],
)
def test_parse_time_rejects(text: str, tz: str) -> None:
    with pytest.raises(InvalidInput):
        parse_time(text, tz=tz)


def test_localize_applies_the_policy() -> None:
    ny = ZoneInfo(NEW_YORK)
    assert localize(datetime(2026, 3, 8, 2, 30), ny) == utc(2026, 3, 8, 7)
    assert localize(datetime(2026, 11, 1, 1, 30), ny) == utc(2026, 11, 1, 5, 30)
    assert localize(datetime(2026, 11, 1, 1, 30, fold=1), ny) == utc(2026, 11, 1, 5, 30)
    assert localize(datetime(2026, 1, 15, 9), ny) == utc(2026, 1, 15, 14)
    assert localize(datetime(2026, 1, 15, 9), ny).tzinfo is UTC


def test_localize_refuses_aware_datetimes() -> None:
    with pytest.raises(InvalidInput, match="naive"):
        localize(utc(2026, 1, 1), ZoneInfo(NEW_YORK))


# --- CronSchedule: construction ----------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "* * * * *",
        "*/15 * * * *",
        "30 2 * * 1-5",
        "0 9 * * mon-fri",
        "0 0 1 jan,jul *",
        "0 0 29 2 *",
        "0 0 30 2 mon",  # never the 30th, but Mondays in February still fire
        "0 0 L * *",
        "0 22-2 * * *",
        "0 0 * * 7",
        "0 0 * * 0-7",
        "* * * * * */10",
        "@daily",
        "@HOURLY",
        "  0 0 * * *  ",
    ],
)
def test_cron_accepts(expr: str) -> None:
    schedule = CronSchedule(expr, NEW_YORK)
    assert schedule.expr == expr.strip()
    assert schedule.tz.key == NEW_YORK


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("", "5 fields"),
        ("* * * *", "5 fields"),
        ("* * * * * * *", "5 fields"),
        ("@reboot", "5 fields"),
        ("60 * * * *", "minute field '60'"),
        ("* 24 * * *", "hour field '24'"),
        ("* * 0 * *", "day-of-month field '0'"),
        ("* * * 13 *", "month field '13'"),
        ("* * * * 8", "day-of-week field '8'"),
        ("* * * * * 60", "second field '60'"),
        ("*/0 * * * *", "minute field"),
        ("a b c d e", "minute field"),
        ("0 0 * * mon#6", "day-of-week field"),
        ("0 9-9 * * *", "equal ends"),
        ("0 9 * jan-jan *", "equal ends"),
        ("H * * * *", "hashed"),
        ("0 R * * *", "hashed"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 31 4,6 *", "never fires"),
        ("0 0 * * 1\u00a0*", "characters"),
        ("0 0 * * 1;", "characters"),
    ],
)
def test_cron_rejects(expr: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match="invalid cron expression") as caught:
        CronSchedule(expr)
    assert fragment in str(caught.value)


def test_cron_rejects_bad_zone() -> None:
    with pytest.raises(InvalidInput, match="time zone"):
        CronSchedule("* * * * *", "Mars/Base")


def test_cron_refuses_naive_after() -> None:
    with pytest.raises(InvalidInput, match="no time zone"):
        CronSchedule("* * * * *").next_after(datetime(2026, 1, 1))


def test_cron_fire_times_count() -> None:
    schedule = CronSchedule("0 * * * *")
    assert schedule.fire_times(utc(2026, 1, 1), 0) == []
    with pytest.raises(InvalidInput):
        schedule.fire_times(utc(2026, 1, 1), -1)


# --- CronSchedule: plain behaviour ---------------------------------------------------------


def test_next_after_is_strictly_after() -> None:
    schedule = CronSchedule("*/15 * * * *")
    assert schedule.next_after(utc(2026, 1, 1, 10)) == utc(2026, 1, 1, 10, 15)
    assert schedule.next_after(utc(2026, 1, 1, 10, 14, 59, 999999)) == utc(2026, 1, 1, 10, 15)
    assert schedule.next_after(utc(2026, 1, 1, 10).astimezone(ZoneInfo(NEW_YORK))) == utc(
        2026, 1, 1, 10, 15
    )


def test_results_are_aware_utc() -> None:
    for instant in CronSchedule("0 9 * * *", LORD_HOWE).fire_times(utc(2026, 1, 1), 3):
        assert instant.tzinfo is UTC


def test_weekday_zone_schedule() -> None:
    schedule = CronSchedule("30 9 * * mon-fri", NEW_YORK)
    # Friday 2026-01-02, then Monday 2026-01-05 (EST, UTC-5)
    assert schedule.fire_times(utc(2026, 1, 2), 2) == [
        utc(2026, 1, 2, 14, 30),
        utc(2026, 1, 5, 14, 30),
    ]


def test_either_day_field_matches_when_both_are_restricted() -> None:
    # the 13th or any Friday: Fri 2026-02-06, Fri 02-13 (both), Fri 02-20
    fires = CronSchedule("0 0 13 * fri").fire_times(utc(2026, 2, 1), 3)
    assert fires == [utc(2026, 2, 6), utc(2026, 2, 13), utc(2026, 2, 20)]


def test_wrapping_hour_range() -> None:
    fires = CronSchedule("0 22-2 * * *").fire_times(utc(2026, 1, 1, 12), 5)
    assert hm(fires) == [
        "01-01 22:00:00",
        "01-01 23:00:00",
        "01-02 00:00:00",
        "01-02 01:00:00",
        "01-02 02:00:00",
    ]


def test_seconds_are_the_sixth_field() -> None:
    fires = CronSchedule("* * * * * */20").fire_times(utc(2026, 1, 1, 0, 0, 5), 3)
    assert hm(fires) == ["01-01 00:00:20", "01-01 00:00:40", "01-01 00:01:00"]
    fires = CronSchedule("30 10 * * * 15").fire_times(utc(2026, 1, 1), 2)
    assert fires == [utc(2026, 1, 1, 10, 30, 15), utc(2026, 1, 2, 10, 30, 15)]


@pytest.mark.parametrize(
    ("tz", "after", "expected"),
    [
        ("UTC", utc(2023, 1, 1), [utc(2024, 2, 29), utc(2028, 2, 29), utc(2032, 2, 29)]),
        (
            NEW_YORK,
            utc(2023, 1, 1),
            [utc(2024, 2, 29, 5), utc(2028, 2, 29, 5), utc(2032, 2, 29, 5)],
        ),
        (LORD_HOWE, utc(2024, 3, 1), [utc(2028, 2, 28, 13), utc(2032, 2, 28, 13)]),
        # 2100 is not a leap year
        ("UTC", utc(2097, 1, 1), [utc(2104, 2, 29), utc(2108, 2, 29)]),
    ],
)
def test_leap_day(tz: str, after: datetime, expected: list[datetime]) -> None:
    assert CronSchedule("0 0 29 2 *", tz).fire_times(after, len(expected)) == expected


# --- CronSchedule: spring forward -----------------------------------------------------------


def test_nonexistent_time_fires_once_at_gap_end_new_york() -> None:
    schedule = CronSchedule("30 2 * * *", NEW_YORK)
    fires = schedule.fire_times(utc(2026, 3, 7, 12), 2)
    # 2026-03-08 02:30 does not exist: 03:00 EDT; the next day 02:30 EDT
    assert fires == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]


def test_gap_candidates_collapse_with_real_one_new_york() -> None:
    # 02:00, 02:15, 02:30, 02:45 are all skipped and 03:00 is real: one run at 07:00Z
    fires = CronSchedule("*/15 * * * *", NEW_YORK).fire_times(utc(2026, 3, 8, 6, 30), 3)
    assert hm(fires) == ["03-08 06:45:00", "03-08 07:00:00", "03-08 07:15:00"]


def test_gap_candidates_collapse_without_real_one() -> None:
    # fixed hour 2 only: 02:00..02:45 collapse into one run at 03:00 EDT
    fires = CronSchedule("0,15,30,45 2 * * *", NEW_YORK).fire_times(utc(2026, 3, 7, 12), 5)
    assert hm(fires) == [
        "03-08 07:00:00",
        "03-09 06:00:00",
        "03-09 06:15:00",
        "03-09 06:30:00",
        "03-09 06:45:00",
    ]


def test_gap_with_seconds_field() -> None:
    fires = CronSchedule("30 2 * * * 0,30", NEW_YORK).fire_times(utc(2026, 3, 8), 2)
    assert fires == [utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]


def test_nonexistent_time_london() -> None:
    fires = CronSchedule("30 1 * * *", LONDON).fire_times(utc(2026, 3, 28, 12), 2)
    # 01:30 on 2026-03-29 is skipped: 02:00 BST = 01:00Z; then 01:30 BST = 00:30Z
    assert fires == [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)]


def test_lord_howe_half_hour_gap() -> None:
    fires = CronSchedule("15 2 * * *", LORD_HOWE).fire_times(utc(2026, 10, 3), 2)
    # 02:15 is skipped (02:00 -> 02:30 +11): 15:30Z; the next day 02:15 +11 = 15:15Z
    assert fires == [utc(2026, 10, 3, 15, 30), utc(2026, 10, 4, 15, 15)]
    fires = CronSchedule("*/15 * * * *", LORD_HOWE).fire_times(utc(2026, 10, 3, 15), 3)
    assert hm(fires) == ["10-03 15:15:00", "10-03 15:30:00", "10-03 15:45:00"]
    # 02:45 exists on the spring-forward night and is not moved
    fires = CronSchedule("45 2 * * *", LORD_HOWE).fire_times(utc(2026, 10, 3), 1)
    assert fires == [utc(2026, 10, 3, 15, 45)]


# --- CronSchedule: fall back ------------------------------------------------------------------


def test_fixed_hour_fires_first_occurrence_new_york() -> None:
    fires = CronSchedule("30 1 * * *", NEW_YORK).fire_times(utc(2026, 10, 31, 12), 2)
    # 01:30 EDT (05:30Z) only, not 01:30 EST; then 01:30 EST the next day
    assert fires == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_fixed_hour_list_and_range_fire_once() -> None:
    for expr in ("0,30 1 * * *", "0,30 0-1 * * *", "0,30 1,5 * * *"):
        fires = CronSchedule(expr, NEW_YORK).fire_times(utc(2026, 11, 1, 4, 45), 3)
        assert hm(fires)[:2] == ["11-01 05:00:00", "11-01 05:30:00"]
        assert fires[2] > utc(2026, 11, 1, 7)


def test_wildcard_hour_fires_in_both_passes_new_york() -> None:
    fires = CronSchedule("*/30 * * * *", NEW_YORK).fire_times(utc(2026, 11, 1, 4, 45), 5)
    # 01:00 EDT, 01:30 EDT, 01:00 EST, 01:30 EST, 02:00 EST
    assert hm(fires) == [
        "11-01 05:00:00",
        "11-01 05:30:00",
        "11-01 06:00:00",
        "11-01 06:30:00",
        "11-01 07:00:00",
    ]


def test_step_hour_follows_elapsed_time() -> None:
    fires = CronSchedule("15 */1 * * *", NEW_YORK).fire_times(utc(2026, 11, 1, 4, 30), 3)
    assert hm(fires) == ["11-01 05:15:00", "11-01 06:15:00", "11-01 07:15:00"]
    # hour 1 is not a multiple of 2, so nothing runs in the repeated hour at all
    fires = CronSchedule("0 */2 * * *", NEW_YORK).fire_times(utc(2026, 11, 1, 3), 3)
    assert hm(fires) == ["11-01 04:00:00", "11-01 07:00:00", "11-01 09:00:00"]


def test_next_after_inside_the_repeated_hour() -> None:
    schedule = CronSchedule("*/30 * * * *", NEW_YORK)
    # 01:50 EDT: the second pass (01:00 EST) is next, although its wall time is earlier
    assert schedule.next_after(utc(2026, 11, 1, 5, 50)) == utc(2026, 11, 1, 6)
    # 01:10 EST, in the second pass
    assert schedule.next_after(utc(2026, 11, 1, 6, 10)) == utc(2026, 11, 1, 6, 30)
    fixed = CronSchedule("30 1 * * *", NEW_YORK)
    assert fixed.next_after(utc(2026, 11, 1, 5, 50)) == utc(2026, 11, 2, 6, 30)


def test_fall_back_london() -> None:
    fires = CronSchedule("30 1 * * *", LONDON).fire_times(utc(2026, 10, 24, 12), 2)
    assert fires == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    fires = CronSchedule("*/30 * * * *", LONDON).fire_times(utc(2026, 10, 24, 23, 45), 5)
    assert hm(fires) == [
        "10-25 00:00:00",
        "10-25 00:30:00",
        "10-25 01:00:00",
        "10-25 01:30:00",
        "10-25 02:00:00",
    ]


def test_lord_howe_half_hour_fall_back() -> None:
    fires = CronSchedule("45 1 * * *", LORD_HOWE).fire_times(utc(2026, 4, 4), 2)
    # 01:45 +11 (14:45Z) only; the next day 01:45 +10:30 = 15:15Z
    assert fires == [utc(2026, 4, 4, 14, 45), utc(2026, 4, 5, 15, 15)]
    fires = CronSchedule("*/15 * * * *", LORD_HOWE).fire_times(utc(2026, 4, 4, 14), 6)
    # 01:15, 01:30, 01:45 at +11, then 01:30, 01:45 again at +10:30, then 02:00
    assert hm(fires) == [
        "04-04 14:15:00",
        "04-04 14:30:00",
        "04-04 14:45:00",
        "04-04 15:00:00",
        "04-04 15:15:00",
        "04-04 15:30:00",
    ]
    # 01:15 happens once (the repeated span is only 01:30-01:59)
    fires = CronSchedule("15 1 * * *", LORD_HOWE).fire_times(utc(2026, 4, 4), 1)
    assert fires == [utc(2026, 4, 4, 14, 15)]


# --- IntervalSchedule ---------------------------------------------------------------------------


def test_interval_grid_from_epoch() -> None:
    schedule = IntervalSchedule(timedelta(hours=1))
    assert schedule.anchor == EPOCH_UTC
    assert schedule.next_after(utc(2026, 1, 1, 10, 30)) == utc(2026, 1, 1, 11)
    assert schedule.next_after(utc(2026, 1, 1, 11)) == utc(2026, 1, 1, 12)
    assert schedule.fire_times(utc(2026, 1, 1, 10, 30), 3) == [
        utc(2026, 1, 1, 11),
        utc(2026, 1, 1, 12),
        utc(2026, 1, 1, 13),
    ]


def test_interval_grid_extends_before_anchor() -> None:
    schedule = IntervalSchedule(timedelta(seconds=10), utc(2026, 1, 1, 0, 0, 7))
    assert schedule.next_after(utc(2025, 12, 31, 23, 59, 59)) == utc(2026, 1, 1, 0, 0, 7)
    assert schedule.next_after(utc(2025, 12, 31, 23, 59, 56)) == utc(2025, 12, 31, 23, 59, 57)


def test_interval_anchor_is_normalised_to_utc() -> None:
    anchor = datetime(2026, 1, 1, 9, tzinfo=ZoneInfo(NEW_YORK))
    schedule = IntervalSchedule(timedelta(days=1), anchor)
    assert schedule.anchor == utc(2026, 1, 1, 14) and schedule.anchor.tzinfo is UTC
    # elapsed time, not wall time: across spring forward the run moves to 10:00 EDT
    assert schedule.next_after(utc(2026, 3, 9)) == utc(2026, 3, 9, 14)


@pytest.mark.parametrize(
    "every", [timedelta(0), timedelta(seconds=-1), timedelta(days=36526), "5m"]
)
def test_interval_rejects_bad_every(every: timedelta) -> None:
    with pytest.raises(InvalidInput, match="interval"):
        IntervalSchedule(every)


def test_interval_rejects_naive_anchor() -> None:
    with pytest.raises(InvalidInput, match="no time zone"):
        IntervalSchedule(timedelta(minutes=1), datetime(2026, 1, 1))


# --- due_windows --------------------------------------------------------------------------------


def test_nothing_due_yet() -> None:
    schedule = IntervalSchedule(timedelta(minutes=5))
    assert due_windows(schedule, utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 4)) == (
        [],
        utc(2026, 1, 1, 10, 5),
    )


@pytest.mark.parametrize("mode", CATCH_UP_MODES)
def test_on_time_tick_fires_in_every_mode(mode: str) -> None:
    schedule = IntervalSchedule(timedelta(minutes=5))
    windows, following = due_windows(
        schedule, utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 5, 2), catch_up=mode
    )
    assert windows == [utc(2026, 1, 1, 10, 5)]
    assert following == utc(2026, 1, 1, 10, 10)


@pytest.mark.parametrize("mode", CATCH_UP_MODES)
def test_due_exactly_at_now(mode: str) -> None:
    schedule = CronSchedule("*/5 * * * *")
    windows, following = due_windows(
        schedule, utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 5), catch_up=mode
    )
    assert windows == [utc(2026, 1, 1, 10, 5)]
    assert following == utc(2026, 1, 1, 10, 10)


def test_catch_up_modes_after_an_outage() -> None:
    schedule = IntervalSchedule(timedelta(minutes=1))
    next_fire, now = utc(2026, 1, 1, 10), utc(2026, 1, 1, 10, 5, 30)
    minutes = [utc(2026, 1, 1, 10, m) for m in range(6)]
    assert due_windows(schedule, next_fire, now, catch_up="latest") == (
        minutes[-1:],
        utc(2026, 1, 1, 10, 6),
    )
    assert due_windows(schedule, next_fire, now, catch_up="all") == (
        minutes,
        utc(2026, 1, 1, 10, 6),
    )
    assert due_windows(schedule, next_fire, now, catch_up="all", limit=2)[0] == minutes[-2:]
    # 10:05 is 30 s late, 10:04 is 90 s late
    assert due_windows(schedule, next_fire, now, catch_up="skip")[0] == minutes[-1:]
    skipped = due_windows(
        schedule, next_fire, now, catch_up="skip", tolerance=timedelta(seconds=95)
    )
    assert skipped[0] == minutes[-2:]
    # everything missed is older than the tolerance
    late = due_windows(
        schedule,
        next_fire,
        utc(2026, 1, 1, 10, 5, 59),
        catch_up="skip",
        tolerance=timedelta(seconds=30),
    )
    assert late == ([], utc(2026, 1, 1, 10, 6))


def test_next_fire_between_grid_points() -> None:
    schedule = IntervalSchedule(timedelta(minutes=10))
    windows, _ = due_windows(
        schedule, utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 25), catch_up="all"
    )
    assert windows == [utc(2026, 1, 1, 10, 10), utc(2026, 1, 1, 10, 20)]
    windows, _ = due_windows(
        schedule, utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 10, 5), catch_up="all"
    )
    assert windows == []


@pytest.mark.parametrize(
    "schedule",
    [
        IntervalSchedule(timedelta(microseconds=1)),
        CronSchedule("* * * * * *"),
        CronSchedule("* * * * *", NEW_YORK),
    ],
    ids=["interval-1us", "cron-every-second", "cron-every-minute"],
)
def test_long_outage_with_tiny_interval_is_bounded(schedule: object) -> None:
    next_fire, now = utc(2016, 1, 1), utc(2026, 1, 1, 12, 0, 0, 500)
    started = time.perf_counter()
    windows, following = due_windows(schedule, next_fire, now, catch_up="all")  # type: ignore[arg-type]
    latest, _ = due_windows(schedule, next_fire, now, catch_up="latest")  # type: ignore[arg-type]
    skipped, _ = due_windows(schedule, next_fire, now, catch_up="skip")  # type: ignore[arg-type]
    assert time.perf_counter() - started < 2  # ten years of windows were not walked
    assert len(windows) == 100
    assert windows == sorted(set(windows))
    assert windows[-1] <= now < following
    assert latest == windows[-1:]
    assert skipped == [t for t in windows if now - t <= timedelta(seconds=60)]


def test_due_windows_across_fall_back() -> None:
    schedule = CronSchedule("*/30 * * * *", NEW_YORK)
    next_fire, now = utc(2026, 11, 1, 5), utc(2026, 11, 1, 6, 40)
    assert due_windows(schedule, next_fire, now, catch_up="latest") == (
        [utc(2026, 11, 1, 6, 30)],
        utc(2026, 11, 1, 7),
    )
    windows, _ = due_windows(schedule, next_fire, now, catch_up="all")
    assert hm(windows) == ["11-01 05:00:00", "11-01 05:30:00", "11-01 06:00:00", "11-01 06:30:00"]
    windows, _ = due_windows(schedule, next_fire, now, catch_up="all", limit=3)
    assert hm(windows) == ["11-01 05:30:00", "11-01 06:00:00", "11-01 06:30:00"]
    fixed = CronSchedule("30 1 * * *", NEW_YORK)
    assert due_windows(fixed, utc(2026, 11, 1, 5, 30), now, catch_up="all") == (
        [utc(2026, 11, 1, 5, 30)],
        utc(2026, 11, 2, 6, 30),
    )


def test_due_windows_across_spring_forward() -> None:
    schedule = CronSchedule("*/15 * * * *", NEW_YORK)
    windows, following = due_windows(
        schedule, utc(2026, 3, 8, 6, 45), utc(2026, 3, 8, 7, 5), catch_up="all"
    )
    assert windows == [utc(2026, 3, 8, 6, 45), utc(2026, 3, 8, 7)]
    assert following == utc(2026, 3, 8, 7, 15)


def test_due_windows_rare_cron_long_outage() -> None:
    schedule = CronSchedule("0 0 29 2 *")
    windows, following = due_windows(
        schedule, utc(2001, 1, 1), utc(2026, 1, 1), catch_up="all", limit=3
    )
    assert windows == [utc(2016, 2, 29), utc(2020, 2, 29), utc(2024, 2, 29)]
    assert following == utc(2028, 2, 29)


def test_due_windows_rejects_bad_arguments() -> None:
    schedule = IntervalSchedule(timedelta(minutes=1))
    with pytest.raises(InvalidInput, match="catch_up"):
        due_windows(schedule, utc(2026, 1, 1), utc(2026, 1, 2), catch_up="some")
    with pytest.raises(InvalidInput, match="limit"):
        due_windows(schedule, utc(2026, 1, 1), utc(2026, 1, 2), limit=0)
    with pytest.raises(InvalidInput, match="tolerance"):
        due_windows(schedule, utc(2026, 1, 1), utc(2026, 1, 2), tolerance=timedelta(seconds=-1))
    with pytest.raises(InvalidInput, match="no time zone"):
        due_windows(schedule, datetime(2026, 1, 1), utc(2026, 1, 2))
