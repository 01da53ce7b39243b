"""An adversary's attacks on the worker core (issue 9's review), against a real PostgreSQL
and the real in-process Worker: what a task raises or returns, rows with values
PostgreSQL accepts but the worker could not read (the parametrized cases include some
that held; they guard), and NOTIFY floods any role can send."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process workers run)
from conftest import fast_options, wait_until
from test_worker_core import ended, start, stop

from pgsched import Scheduler, task
from pgsched.store import Store
from pgsched.worker.heartbeat import CANCEL_BEAT_MIN_GAP_SECONDS
from pgsched.worker.planner import MIN_GAP_SECONDS as PLANNER_MIN_GAP_SECONDS


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ of this exception raises")


@task
async def adv_raises_unprintable() -> None:
    raise StrRaises()


@task
async def adv_raises_generator_exit() -> None:
    raise GeneratorExit("a task raised GeneratorExit")


@task
def adv_sync_raises_generator_exit() -> None:
    raise GeneratorExit("a sync task raised GeneratorExit")


@task
async def adv_raises_system_exit() -> None:
    raise SystemExit(3)  # asyncio re-raises it out of the event loop: the worker exits


@task
async def adv_raises_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


async def test_exception_whose_str_raises_fails_its_job_and_frees_the_slot(sched):
    worker, runner = await start(sched, concurrency=1)
    try:
        bad = await sched.schedule("adv_raises_unprintable")
        row = await wait_until(lambda: ended(sched, bad), what="unprintable error recorded")
        assert str(row["status"]) == "failed", row
        assert "StrRaises" in row["last_error"]
        after = await sched.schedule("add", args=(1, 2))
        assert (await wait_until(lambda: ended(sched, after), what="next job"))["result"] == 3
        assert worker.running_jobs == 0
    finally:
        await stop(worker, runner)


async def test_base_exceptions_raised_by_a_task_fail_its_job_and_free_the_slot(sched):
    worker, runner = await start(sched, concurrency=1)
    try:
        for name, error in [("adv_raises_generator_exit", "GeneratorExit"),
                            ("adv_sync_raises_generator_exit", "GeneratorExit"),
                            ("adv_raises_system_exit", "SystemExit: 3"),
                            ("adv_raises_keyboard_interrupt", "KeyboardInterrupt")]:
            bad = await sched.schedule(name)
            row = await wait_until(lambda bad=bad: ended(sched, bad), what=f"{name} recorded")
            assert str(row["status"]) == "failed", row
            assert error in row["last_error"], row["last_error"]
        assert not runner.done()
        assert worker.running_jobs == 0
    finally:
        await stop(worker, runner)


class ItemsRaise(dict):
    def items(self):  # the JSON encoder calls it for a dict subclass
        raise RuntimeError("items() of this result raises")


@task
async def adv_returns_unencodable() -> dict:
    return ItemsRaise(a=1)


async def test_result_whose_encoding_raises_fails_its_job_and_frees_the_slot(sched):
    worker, runner = await start(sched, concurrency=1)
    try:
        bad = await sched.schedule("adv_returns_unencodable")
        row = await wait_until(lambda: ended(sched, bad), what="unencodable result recorded")
        assert str(row["status"]) == "failed", row
        assert "items() of this result raises" in row["last_error"], row["last_error"]
        assert worker.running_jobs == 0
    finally:
        await stop(worker, runner)


async def sql(sched: Scheduler, text: str) -> list[tuple]:
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(text.replace("{schema}", f'"{sched.schema}"'))
        return await cur.fetchall() if cur.description else []


async def completed(sched: Scheduler, job_id: str) -> bool:
    """Without loading the row (psycopg cannot load an infinite timestamp)."""
    rows = await sql(sched, f"SELECT status::text FROM {{schema}}.jobs WHERE id = '{job_id}'")
    return rows[0][0] == "completed"


async def test_job_rows_due_at_infinity_do_not_stop_the_worker(sched):
    # PostgreSQL accepts 'infinity' and '-infinity' for timestamptz, and so does the
    # column; psycopg cannot load them into a datetime.
    await sql(sched, "INSERT INTO {schema}.jobs (id, task, execution_time) VALUES "
                     "('never', 'noop', 'infinity'), ('always', 'noop', '-infinity')")
    worker, runner = await start(sched)
    try:
        after = await sched.schedule("add", args=(1, 2))
        row = await wait_until(lambda: ended(sched, after) if not runner.done() else True,
                               what="the next job")
        assert not runner.done(), runner.exception()
        assert row["result"] == 3
        await wait_until(lambda: completed(sched, "always"), what="the -infinity job run")
    finally:
        if not runner.done():
            await stop(worker, runner)


async def test_schedule_row_firing_at_infinity_does_not_stop_the_worker(sched):
    await sql(sched, "INSERT INTO {schema}.schedules (id, task, every, origin, next_fire_at) "
                     "VALUES ('never', 'noop', '1 hour', 'cli', 'infinity')")
    worker, runner = await start(sched)
    try:
        await asyncio.sleep(1.0)  # the planner's first pass reads the row
        after = await sched.schedule("add", args=(1, 2))
        row = await wait_until(lambda: ended(sched, after) if not runner.done() else True,
                               what="the next job")
        assert not runner.done(), runner.exception()
        assert row["result"] == 3
    finally:
        if not runner.done():
            await stop(worker, runner)


async def test_schedule_rows_with_times_before_year_1_do_not_stop_the_worker(sched):
    await sql(sched, "INSERT INTO {schema}.schedules (id, task, every, origin, next_fire_at, "
                     "anchor) VALUES ('past', 'noop', '1 hour', 'cli', '-infinity', "
                     "'-infinity')")
    worker, runner = await start(sched)
    try:
        await asyncio.sleep(1.0)  # the planner's first pass reads the row
        after = await sched.schedule("add", args=(1, 2))
        row = await wait_until(lambda: ended(sched, after) if not runner.done() else True,
                               what="the next job")
        assert not runner.done(), runner.exception()
        assert row["result"] == 3
    finally:
        if not runner.done():
            await stop(worker, runner)


class CountedStore(Store):
    """The real store; counts the registry heartbeats (one per turn of the heartbeater)."""

    def __init__(self, store: Store):
        super().__init__(store.pool, store.schema)
        self.beats = 0

    async def heartbeat_worker(self, worker_id: str, **kw):
        self.beats += 1
        return await super().heartbeat_worker(worker_id, **kw)


async def test_cancel_notify_flood_costs_a_bounded_number_of_heartbeats(sched, pg_dsn):
    store = CountedStore(sched.store)
    worker, runner = await start(sched, store, heartbeat_seconds=30, lease_seconds=120)
    try:
        # Any role that can connect may send it; one transaction each, or PostgreSQL
        # folds the duplicates into one.
        with psycopg.connect(pg_dsn, autocommit=True) as intruder:
            notify = psycopg.sql.SQL("NOTIFY {}, {}").format(
                psycopg.sql.Identifier(sched.store.channel),
                psycopg.sql.Literal(f"cancel:{worker.id}"))
            before, started = store.beats, time.monotonic()
            for _ in range(1000):
                intruder.execute(notify)
                await asyncio.sleep(0)
            await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
        beats = store.beats - before
        budget = 2 + elapsed / CANCEL_BEAT_MIN_GAP_SECONDS
        assert beats <= budget, (beats, round(elapsed, 2), budget)
        assert beats >= 1  # a cancel request is still served at once
    finally:
        await stop(worker, runner)


POISONED_SCHEDULES = {
    "huge_every": "every => '170000000 years'",
    "bad_tz": "cron => '* * * * *', tz => 'Nowhere/Atlantis'",
    "empty_cron": "cron => '', tz => 'UTC'",
    "odd_cron": "cron => '99999999999 * * * *', tz => 'UTC'",
    "cron_text": "cron => '@reboot', tz => 'UTC'",
    "year_1_anchor": "every => '1 second', anchor => '0001-01-04Z', catch_up => 'all'",
    "last_second": "every => '1 second', anchor => '9999-12-29Z'",
}


@pytest.mark.parametrize("poison", sorted(POISONED_SCHEDULES))
async def test_poisoned_schedule_row_does_not_stop_the_worker_or_other_schedules(sched, poison):
    columns = dict(part.split(" => ") for part in POISONED_SCHEDULES[poison].split(", "))
    names = ", ".join(["id", "task", "origin", "next_fire_at", *columns])
    values = ", ".join(["'bad'", "'noop'", "'cli'", "now() - interval '1 minute'",
                        *columns.values()])
    await sql(sched, f"INSERT INTO {{schema}}.schedules ({names}) VALUES ({values})")
    await sql(sched, "INSERT INTO {schema}.schedules (id, task, every, origin, next_fire_at) "
                     "VALUES ('good', 'noop', '1 second', 'cli', now())")
    worker, runner = await start(sched)
    try:
        rows = await wait_until(
            lambda: sql(sched, "SELECT 1 FROM {schema}.jobs WHERE schedule_id = 'good'")
            if not runner.done() else [True], what="the good schedule's first window")
        assert not runner.done(), runner.exception()
        assert rows
    finally:
        if not runner.done():
            await stop(worker, runner)


POISONED_JOBS: dict[str, dict[str, str]] = {
    "attempts_max": {"attempts": "2147483647"},
    "failures_max": {"failures": "2147483647", "task": "'fail'"},
    "timeout_nan": {"timeout_seconds": "'NaN'"},
    "timeout_inf": {"timeout_seconds": "'Infinity'"},
    "grace_nan": {"misfire_grace_seconds": "'NaN'"},
    "grace_inf": {"misfire_grace_seconds": "'Infinity'"},
    "grace_minus_inf": {"misfire_grace_seconds": "'-Infinity'"},
    "grace_huge": {"misfire_grace_seconds": "1e300"},
    "args_not_a_list": {"args": "'5'"},
    "kwargs_a_list": {"kwargs": "'[1]'"},
    "kwargs_odd_keys": {"kwargs": """'{"": 1, "a b": 2}'"""},
    "long_task_name": {"task": "repeat('t', 100000)"},
    "long_queue_name": {"queue": "repeat('q', 100000)"},
    "recovered_recoveries_max": {
        "status": "'running'", "worker_id": "'gone'", "recoveries": "2147483647",
        "lease_until": "now() - interval '1 hour'",
        "heartbeat_at": "now() - interval '2 hours'"},
}


@pytest.mark.parametrize("poison", sorted(POISONED_JOBS))
async def test_poisoned_job_row_does_not_stop_the_worker(sched, poison):
    columns = {"task": "'noop'", **POISONED_JOBS[poison]}
    names = ", ".join(["id", "execution_time", *columns])
    values = ", ".join(["'bad'", "now()", *columns.values()])
    await sql(sched, f"INSERT INTO {{schema}}.jobs ({names}) VALUES ({values})")
    worker, runner = await start(sched)
    try:
        after = await sched.schedule("add", args=(1, 2))
        row = await wait_until(lambda: ended(sched, after) if not runner.done() else True,
                               what="the next job")
        await asyncio.sleep(1.5)  # maintenance and the completer get to the bad row
        assert not runner.done(), runner.exception()
        assert row["result"] == 3
    finally:
        if not runner.done():
            await stop(worker, runner)


@task
async def adv_notes_nan_timers() -> bool:
    """Sleeps past a moment, then says whether the loop holds a NaN timer: asyncio's timer
    heap orders by `when`, and NaN compares false with everything, so one such timer
    corrupts the heap and other timers (a sleep, a wait_for) may never fire."""
    await asyncio.sleep(0.3)
    return any(h.when() != h.when() for h in asyncio.get_running_loop()._scheduled)


async def test_a_nan_timeout_read_from_a_row_is_no_timeout(sched):
    # CI hung on the timeout_nan case above: asyncio.timeout(NaN) put a NaN timer on
    # the loop. NaN is no length of time: the job runs without a timeout.
    await sql(sched, "INSERT INTO {schema}.jobs (id, execution_time, task, timeout_seconds) "
                     "VALUES ('nan', now(), 'adv_notes_nan_timers', 'NaN')")
    worker, runner = await start(sched)
    try:
        row = await wait_until(lambda: ended(sched, "nan"), what="the NaN-timeout job")
        assert (str(row["status"]), row["result"]) == ("completed", False), row
    finally:
        await stop(worker, runner)


@task
async def adv_returns_too_long_for_jsonb() -> str:
    return "x" * 2**28  # one character more than a jsonb string holds (54000)


async def test_result_over_postgres_size_limit_fails_that_job_and_others_are_recorded(
        pg_dsn, schema):
    # Encoding 256 MB blocks the loop for seconds: a lease long enough to outlast it, and
    # a pool made for that lease (its statement_timeout is half of it: the server takes
    # seconds to refuse the value).
    options = dict(lease_seconds=120, heartbeat_seconds=1)
    async with Scheduler(pg_dsn, schema=schema, options=fast_options(**options)) as sched:
        await sched.migrate()
        await _result_over_size_limit(sched, options)


async def _result_over_size_limit(sched: Scheduler, options: dict[str, Any]) -> None:
    worker, runner = await start(sched, **options)
    try:
        big = await sched.schedule("adv_returns_too_long_for_jsonb")
        # Generous: encoding and refusing 256 MB took over 60 s at load 15 (the same on
        # the code before and after the change it failed beside); what is asserted is the
        # outcome, not its speed.
        row = await wait_until(lambda: ended(sched, big), timeout=240,
                               what="big result recorded")
        assert str(row["status"]) == "failed", row["status"]
        assert "could not be stored" in row["last_error"], row["last_error"][:200]
        after = await sched.schedule("add", args=(1, 2))
        assert (await wait_until(lambda: ended(sched, after), what="next job"))["result"] == 3
    finally:
        await stop(worker, runner)


async def defer(sched: Scheduler, give_up_seconds: float) -> str:
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id="old-code", limit=1, lease_seconds=60)
    [job] = claimed
    row = await sched.store.defer_job(
        worker_id="old-code", job_id=job["id"], attempt=job["attempts"], error="unknown task",
        base_delay_seconds=0, max_delay_seconds=0, give_up_seconds=give_up_seconds)
    return str(row["status"])


async def test_retried_job_gets_a_fresh_unknown_task_deferral_budget(sched):
    await sched.schedule("only_in_new_code", job_id="j")
    assert await defer(sched, give_up_seconds=3600) == "pending"
    # Deferred until it gave up (the first deferral is now older than the give-up time).
    await asyncio.sleep(0.3)
    assert await defer(sched, give_up_seconds=0.2) == "failed"
    await sched.store.retry_jobs(statuses=["failed"], ids=["j"], limit=10,
                                 cutoff=datetime.now(UTC) + timedelta(minutes=1))
    # The operator retried it: an old worker claiming it first must defer it again.
    assert await defer(sched, give_up_seconds=0.2) == "pending"


class PassCountingStore(Store):
    """The real store; counts the planner's passes (one next_schedule_fire each)."""

    def __init__(self, store: Store):
        super().__init__(store.pool, store.schema)
        self.passes = 0

    async def next_schedule_fire(self, *args: Any, **kwargs: Any) -> Any:
        self.passes += 1
        return await super().next_schedule_fire(*args, **kwargs)


async def test_schedules_notify_flood_costs_a_bounded_number_of_planner_passes(sched, pg_dsn):
    store = PassCountingStore(sched.store)
    worker, runner = await start(sched, store)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as intruder:
            notify = psycopg.sql.SQL("NOTIFY {}, 'schedules'").format(
                psycopg.sql.Identifier(sched.store.channel))
            before, started = store.passes, time.monotonic()
            for _ in range(1000):
                intruder.execute(notify)
                await asyncio.sleep(0)
            await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
        passes = store.passes - before
        budget = 2 + elapsed / PLANNER_MIN_GAP_SECONDS
        assert passes <= budget, (passes, round(elapsed, 2), budget)
        assert passes >= 1  # a changed schedule is still looked at once
    finally:
        await stop(worker, runner)
