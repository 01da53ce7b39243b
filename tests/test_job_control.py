"""Job control from inside a task (issue 13): current_job(), Retry, Fail, retry_on,
backoff and a task's own complete(), against a real PostgreSQL and the real in-process
Worker; the tests that need worker processes (three, or one killed) are at the end."""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import control_tasks  # noqa: F401  (registers the tasks the in-process workers run)
import psycopg
import pytest
from conftest import cli_env, wait_until, write_config
from test_worker_core import ended, sql, start, stop

from pgsched import Backoff, Fail, NoCurrentJob, Retry, current_job, task
from pgsched.control import MAX_SNOOZE_SECONDS
from pgsched.errors import InvalidInput
from pgsched.worker.executor import task_retry_delay

CONTROL_TASKS = Path(__file__).resolve().parent / "control_tasks.py"


@pytest.fixture
def side(pg_dsn: str, schema: str, sched, monkeypatch) -> Iterator[dict[str, str]]:
    """The table tasks write to through their own connections, and where they find it."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".side (key text, job_id text, attempt int)')
    env = {"PGSCHED_TEST_DSN_FOR_TASKS": pg_dsn, "PGSCHED_TEST_SCHEMA_FOR_TASKS": schema}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield env


@pytest.fixture
async def worker(sched):
    """The real Worker, in-process, for the test's schema."""
    running, runner = await start(sched)
    yield running
    await stop(running, runner)


async def side_rows(sched) -> list[tuple]:
    return await sql(sched, "SELECT key, job_id, attempt FROM {schema}.side ORDER BY attempt")


# -- pure: what a task can raise, and its policy ----------------------------------------


def test_current_job_outside_a_task_says_where_it_works():
    with pytest.raises(NoCurrentJob, match="only available inside a task"):
        current_job()


@pytest.mark.parametrize("delay", [math.nan, -1, 10**30, "soon", math.inf, True, None])
def test_retry_refuses_a_delay_that_is_not_seconds_from_zero_to_a_year(delay):
    with pytest.raises(InvalidInput, match="invalid Retry delay"):
        Retry(delay)


def test_retry_takes_seconds_or_a_timedelta():
    assert Retry(timedelta(minutes=2)).delay == 120.0
    assert Retry(MAX_SNOOZE_SECONDS).delay == MAX_SNOOZE_SECONDS


@pytest.mark.parametrize("bad", [dict(base=-1), dict(cap=math.nan), dict(jitter=2),
                                 dict(base=10, cap=1), dict(base="1")])
def test_backoff_refuses_nonsense(bad):
    with pytest.raises(InvalidInput, match="invalid Backoff"):
        Backoff(**bad)


def test_backoff_doubles_to_its_cap():
    policy = Backoff(base=2, cap=10, jitter=0)
    assert [policy(n) for n in (1, 2, 3, 4, 100)] == [2, 4, 8, 10, 10]


def test_task_refuses_a_retry_policy_it_cannot_use():
    with pytest.raises(InvalidInput, match="invalid retry_on"):
        task(name="bad_retry_on", retry_on=("ConnectionError",))(lambda: None)
    with pytest.raises(InvalidInput, match="invalid backoff"):
        task(name="bad_backoff", backoff=5)(lambda: None)
    with pytest.raises(InvalidInput, match="invalid max_snoozes"):
        task(name="bad_snoozes", max_snoozes=-1)(lambda: None)


def test_a_backoff_function_that_raises_or_returns_nonsense_gives_the_default():
    for name in ("backoff_raises", "backoff_nan", "backoff_text"):
        assert 0.08 <= task_retry_delay(name, 1, 0.1, 0.2) <= 0.2
    assert task_retry_delay("backoff_hour", 2, 0.1, 0.2) == 7200


def test_fail_keeps_its_reason():
    assert Fail("no such customer").reason == "no such customer"


# -- in-process worker ------------------------------------------------------------------


async def test_current_job_describes_the_run_for_async_and_sync_tasks(sched, worker):
    due = datetime.now(UTC) - timedelta(seconds=1)
    ids = [await sched.schedule(name, execution_time=due) for name in
           ("whoami", "whoami_sync")]
    for job_id, name in zip(ids, ("whoami", "whoami_sync"), strict=True):
        row = await wait_until(lambda job_id=job_id: ended(sched, job_id), what=name)
        assert str(row["status"]) == "completed", row["last_error"]
        assert row["result"] == {
            "id": job_id, "attempt": 1, "queue": "control", "task": name,
            "scheduled_at": row["execution_time"].isoformat(),
            "schedule_id": None, "fire_time": None}


async def test_retry_snoozes_without_counting_a_failure(sched, worker):
    job_id = await sched.schedule("snooze_until", args=(3, 0.05), max_retries=0)
    row = await wait_until(lambda: ended(sched, job_id), what="snoozed job")
    assert str(row["status"]) == "completed" and row["result"] == 3
    assert (row["failures"], row["snoozes"]) == (0, 2)
    assert [e["outcome"] for e in row["errors"]] == ["snoozed", "snoozed"]
    assert worker.stats.snoozed == 2 and worker.stats.failed == 0


async def test_a_job_that_snoozes_past_max_snoozes_fails_saying_so(sched, worker):
    job_id = await sched.schedule("snooze_forever")
    row = await wait_until(lambda: ended(sched, job_id), what="capped job")
    assert str(row["status"]) == "failed"
    assert row["snoozes"] == 3 and row["attempts"] == 4
    assert "snoozed 3 times, the task's max_snoozes" in row["last_error"]


async def test_retry_with_a_bad_delay_fails_the_attempt_and_the_worker_goes_on(sched, worker):
    jobs = [await sched.schedule(name, args=(kind,), max_retries=0)
            for name in ("bad_retry", "retry_constructed_badly")
            for kind in ("nan", "negative", "huge", "text")]
    for job_id in jobs:
        row = await wait_until(lambda job_id=job_id: ended(sched, job_id), what="bad retry")
        assert str(row["status"]) == "failed", row
        assert "invalid Retry delay" in row["last_error"] and row["snoozes"] == 0
    after = await sched.schedule("whoami")
    assert str((await wait_until(lambda: ended(sched, after)))["status"]) == "completed"


async def test_fail_fails_at_once_with_its_reason_even_with_retries_left(sched, worker):
    job_id = await sched.schedule("fail_with", args=("card declined<NUL>!",))
    row = await wait_until(lambda: ended(sched, job_id), what="failed job")
    assert str(row["status"]) == "failed" and row["attempts"] == 1
    assert row["last_error"] == "card declined\\x00!"


async def test_retry_on_retries_only_the_exceptions_it_names(sched, worker):
    retried = await sched.schedule("picky", args=("connection",))
    final = await sched.schedule("picky", args=("value",))
    row = await wait_until(lambda: ended(sched, retried), what="retried job")
    assert str(row["status"]) == "failed" and row["attempts"] == 4  # 1 + max_retries
    row = await wait_until(lambda: ended(sched, final), what="final job")
    assert str(row["status"]) == "failed" and row["attempts"] == 1
    assert row["last_error"] == "ValueError: bad input"


async def test_backoff_sets_the_retry_time_and_a_broken_one_falls_back(sched, worker):
    hour = await sched.schedule("backoff_hour")
    broken = await sched.schedule("backoff_raises")
    row = await wait_until(lambda: ended(sched, broken), what="broken backoff's job")
    assert str(row["status"]) == "failed" and row["attempts"] == 3
    row = await wait_until(lambda: _failed_once(sched, hour), what="first failure")
    failed_at = datetime.fromisoformat(row["errors"][0]["at"])
    assert 3590 < (row["execution_time"] - failed_at).total_seconds() < 3610


async def _failed_once(sched, job_id):
    row = await sched.get_job(job_id)
    return row if row["failures"] == 1 else None


# -- a task's own transaction -----------------------------------------------------------


async def test_complete_commits_with_the_tasks_writes(sched, worker, side):
    sync_id = await sched.schedule("complete_in_tx", args=("s",))
    async_id = await sched.schedule("complete_in_tx_async", args=("a",))
    row = await wait_until(lambda: ended(sched, sync_id), what="sync completion")
    assert str(row["status"]) == "completed" and row["result"] == {"key": "s"}
    row = await wait_until(lambda: ended(sched, async_id), what="async completion")
    assert str(row["status"]) == "completed" and row["result"] == {"async": "a"}
    assert sorted(r[0] for r in await side_rows(sched)) == ["a", "s"]
    await wait_until(lambda: worker.stats.completed == 2, what="both counted")
    assert worker.stats.lease_lost == 0


async def test_complete_rolled_back_fails_the_job_and_leaves_no_writes(sched, worker, side):
    job_id = await sched.schedule("complete_and_roll_back", args=("r",))
    row = await wait_until(lambda: ended(sched, job_id), what="rolled back")
    assert str(row["status"]) == "failed"
    assert "did not commit" in row["last_error"]
    assert await side_rows(sched) == []
    assert worker.stats.lease_lost == 0


async def test_complete_twice_is_refused_and_the_first_stands(sched, worker, side):
    job_id = await sched.schedule("complete_twice")
    row = await wait_until(lambda: ended(sched, job_id), what="twice")
    assert str(row["status"]) == "completed" and row["result"] == 1
    [(said, _, _)] = await side_rows(sched)
    assert said.startswith("LeaseLost: ") and "no longer running" in said


@pytest.mark.parametrize("kind, said", [
    ("closed", "InvalidInput: complete() was given a closed connection"),
    ("autocommit", "InvalidInput: complete() must run inside the transaction"),
    ("not_a_connection", "InvalidInput: complete() needs a psycopg Connection"),
    ("nul", "InvalidInput: the task's return value contains a NUL"),
])
async def test_complete_misused_raises_in_the_task_and_writes_nothing(sched, worker, side, kind,
                                                                     said):
    job_id = await sched.schedule("complete_misuse", args=(kind,))
    row = await wait_until(lambda: ended(sched, job_id), what="misuse")
    assert str(row["status"]) == "completed" and row["result"].startswith(said), row


async def test_current_job_names_the_schedule_window_a_job_came_from(sched, worker):
    fire = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    job_id = await sched.schedule("whoami", execution_time=datetime.now(UTC) + timedelta(days=1))
    await sql(sched, "UPDATE {schema}.jobs SET schedule_id = 'nightly', fire_time = %s, "
                     "execution_time = now() WHERE id = %s", [fire, job_id])
    row = await wait_until(lambda: ended(sched, job_id), what="window job")
    assert (row["result"]["schedule_id"], row["result"]["fire_time"]) == (
        "nightly", fire.isoformat())


# -- worker processes -------------------------------------------------------------------


async def test_sigkill_between_the_tasks_write_and_commit_reruns_the_job_without_its_writes(
        sched, side, tmp_path, pg_dsn, schema, workers):
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(CONTROL_TASKS))
    env = cli_env(**side)
    first = workers(config, env=env)
    ready = tmp_path / "ready"
    job_id = await sched.schedule("complete_then_hang", args=("k", str(ready)))
    await wait_until(ready.exists, what="the task's write and complete(), not committed")
    row = await sched.get_job(job_id)
    assert str(row["status"]) == "running" and await side_rows(sched) == []
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    assert str((await sched.get_job(job_id))["status"]) == "running"  # nothing committed
    assert await side_rows(sched) == []
    for _ in range(2):  # the recovery, and a bystander
        workers(config, env=env)
    row = await wait_until(lambda: ended(sched, job_id), timeout=60, what="re-run")
    assert str(row["status"]) == "completed" and row["result"] == {"attempt": 2}
    assert row["errors"][0]["outcome"] == "lease_expired"
    assert await side_rows(sched) == [("k", job_id, 2)]


async def test_complete_after_the_lease_was_lost_is_refused_and_the_write_rolls_back(
        sched, worker, side, tmp_path):
    release = tmp_path / "release"
    job_id = await sched.schedule("complete_when_released", args=("x", str(release)))
    await wait_until(lambda: _status(sched, job_id, "running"), what="running")
    # Another worker's recovery took it back (what recover_orphans writes).
    await sql(sched, "UPDATE {schema}.jobs SET status = 'pending', worker_id = NULL, "
                     "execution_time = now() + interval '1 day' WHERE id = %s", [job_id])
    release.touch()
    await wait_until(lambda: worker.stats.lease_lost >= 1, what="the loss noticed")
    await wait_until(lambda: worker.abandoned_threads == 0, what="its thread ended")
    row = await sched.get_job(job_id)
    assert str(row["status"]) == "pending" and row["result"] is None
    assert await side_rows(sched) == []


async def _status(sched, job_id, status):
    return str((await sched.get_job(job_id))["status"]) == status


async def test_snoozes_fails_and_retry_on_hold_across_three_worker_processes(
        sched, side, tmp_path, pg_dsn, schema, workers):
    config = write_config(tmp_path, pg_dsn, schema, tasks=str(CONTROL_TASKS))
    for _ in range(3):
        workers(config, env=cli_env(**side))
    snoozers = [await sched.schedule("snooze_until", args=(3, 0.05)) for _ in range(30)]
    failing = [await sched.schedule("fail_with", args=(f"no {i}",)) for i in range(10)]
    picky = [await sched.schedule("picky", args=("value",)) for _ in range(10)]
    rows = [await sched.wait(job_id, timeout=60) for job_id in snoozers + failing + picky]
    done = rows[:30]
    assert {(str(r["status"]), r["result"], r["snoozes"], r["failures"]) for r in done} == {
        ("completed", 3, 2, 0)}
    assert all((str(r["status"]), r["attempts"]) == ("failed", 1) for r in rows[30:])
    assert [r["last_error"] for r in rows[30:40]] == [f"no {i}" for i in range(10)]
