"""A process whose wall clock is off: Python imports this at start-up when this folder is
on PYTHONPATH, and it shifts time.time(), time.time_ns() and datetime.now() by
PGSCHED_TEST_CLOCK_OFFSET_SECONDS, like a machine whose clock is that far off. (The
monotonic clock, which measures durations, is left alone, as NTP steps leave it.)
"""

import datetime as _datetime
import os as _os
import time as _time

_offset = float(_os.environ.get("PGSCHED_TEST_CLOCK_OFFSET_SECONDS") or 0)

if _offset:
    _time_time, _time_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _time_time() + _offset
    _time.time_ns = lambda: _time_time_ns() + int(_offset * 1e9)

    class _SkewedDatetime(_datetime.datetime):
        __slots__ = ()

        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + _datetime.timedelta(seconds=_offset)

        @classmethod
        def utcnow(cls):
            return super().utcnow() + _datetime.timedelta(seconds=_offset)

    _datetime.datetime = _SkewedDatetime
