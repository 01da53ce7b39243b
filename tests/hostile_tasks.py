"""Tasks that attack the worker through what they raise (tests/test_job_control_attacks.py):
Retry and Fail objects whose attributes raise (even KeyboardInterrupt and SystemExit), a
Fail reason that is a hostile str subclass, a retry_on class whose isinstance() raises,
and a sync task that completes its job from a thread left behind after a timeout.
Loaded by path from a generated config (worker processes) or imported (in-process)."""

import os
import time
from pathlib import Path

import psycopg

from pgsched import Fail, Retry, current_job, task


class _Raising(float):
    """A float that passes isinstance() but whose conversion and comparison raise `exc`."""

    exc: BaseException = SystemExit(3)

    def __ge__(self, other):
        raise self.exc

    __le__ = __ge__

    def __float__(self):
        raise self.exc


class _KeyboardFloat(_Raising):
    exc = KeyboardInterrupt()


class _BadStr(str):
    """A str whose methods the worker's escaping calls raise."""

    def encode(self, *args, **kwargs):
        raise RuntimeError("encode refused")

    def replace(self, *args, **kwargs):
        raise RuntimeError("replace refused")


class _DelayRaises(Retry):
    @property
    def delay(self):
        raise KeyboardInterrupt

    @delay.setter
    def delay(self, value):
        pass


class _ReasonRaises(Fail):
    @property
    def reason(self):
        raise SystemExit(4)

    @reason.setter
    def reason(self, value):
        pass


class _Meta(type):
    def __instancecheck__(cls, instance):
        raise SystemExit(5)


class Picky(Exception, metaclass=_Meta):
    pass


def _raise(kind: str) -> None:
    if kind == "delay_systemexit":
        exc = Retry(0)
        exc.delay = _Raising(1.0)
        raise exc
    if kind == "delay_keyboard":
        exc = Retry(0)
        exc.delay = _KeyboardFloat(1.0)
        raise exc
    if kind == "delay_property":
        raise _DelayRaises(0)
    if kind == "reason_str_subclass":
        raise Fail(_BadStr("declined"))
    if kind == "reason_property":
        raise _ReasonRaises("x")
    raise ValueError(kind)


@task(max_retries=0)
async def hostile(kind: str) -> None:
    _raise(kind)


@task(max_retries=0)
def hostile_sync(kind: str) -> None:
    """The same, raised in the worker's thread."""
    _raise(kind)


@task(max_retries=2, retry_on=Picky)
async def picky_meta() -> None:
    raise ValueError("not picky")


@task
async def hostile_fine() -> str:
    return "fine"


@task(max_retries=0, timeout=0.5)
def complete_late(release: str) -> None:
    """Outlives its timeout, then completes the job from the thread left behind."""
    while not Path(release).exists():
        time.sleep(0.02)
    with psycopg.connect(os.environ["PGSCHED_TEST_DSN_FOR_TASKS"]) as conn:
        try:
            current_job().complete(conn, "from the abandoned thread")
        except Exception as exc:
            Path(release + ".said").write_text(f"{type(exc).__name__}: {exc}")
            raise
        Path(release + ".said").write_text("written")


@task(max_retries=0)
def held_until(release: str) -> str:
    """Runs until the test releases it."""
    while not Path(release).exists():
        time.sleep(0.02)
    return "held"


class _BadDict(dict):
    def items(self):
        raise SystemExit(6)

    def keys(self):
        raise SystemExit(6)

    def __iter__(self):
        raise SystemExit(6)


@task(max_retries=0)
async def hostile_result() -> dict:
    return _BadDict(a=1)


@task(max_retries=1, retry_on=Picky, timeout=0.2)
async def picky_meta_timeout() -> None:
    import asyncio

    await asyncio.sleep(10)


def _side_write(key: str) -> None:
    schema = os.environ["PGSCHED_TEST_SCHEMA_FOR_TASKS"]
    with psycopg.connect(os.environ["PGSCHED_TEST_DSN_FOR_TASKS"], autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{schema}".side (key) VALUES (%s)', [key])


@task(queue="mine")
def slow_write(key: str, seconds: float) -> None:
    """Writes `key` once per run, after `seconds`: a run counted twice ran twice."""
    time.sleep(seconds)
    _side_write(key)


def _sleepy(failures: int) -> float:
    time.sleep(6)  # three leases of the tests' workers
    return 0.1


@task(max_retries=1, backoff=_sleepy, queue="mine")
async def sleepy_backoff() -> None:
    raise ConnectionError("again")


@task
async def window() -> list:
    job = current_job()
    return [job.schedule_id, job.fire_time.isoformat() if job.fire_time else None]


@task(max_retries=2)
def complete_then_wait(key: str, ready: str, release: str) -> None:
    """Writes, completes, tells the test (`ready`), and commits once released."""
    schema = os.environ["PGSCHED_TEST_SCHEMA_FOR_TASKS"]
    with psycopg.connect(os.environ["PGSCHED_TEST_DSN_FOR_TASKS"]) as conn:
        conn.execute(f'INSERT INTO "{schema}".side (key) VALUES (%s)', [key])
        current_job().complete(conn, current_job().attempt)
        Path(ready).touch()
        while not Path(release).exists():
            time.sleep(0.02)


@task(max_retries=0)
async def cancels_itself() -> None:
    import asyncio

    raise asyncio.CancelledError("the task's own")


@task(max_retries=0)
def cancels_itself_sync() -> None:
    import asyncio

    raise asyncio.CancelledError("the task's own, in a thread")


_LEAKED: list = []


@task(max_retries=0)
def complete_and_leak(release: str) -> None:
    """Completes in a transaction it leaves open (the connection kept, never committed)
    until the test releases it, then rolls back."""
    conn = psycopg.connect(os.environ["PGSCHED_TEST_DSN_FOR_TASKS"])
    current_job().complete(conn, "leaked")
    _LEAKED.append(conn)

    def roll_back_later() -> None:
        while not Path(release).exists():
            time.sleep(0.02)
        conn.rollback()
        conn.close()

    import threading

    threading.Thread(target=roll_back_later, daemon=True).start()
