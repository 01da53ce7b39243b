"""Priorities 0-9 (lower first): parsing names and numbers, the claim's order over every
priority present in a queue, and the CLI's --priority."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from conftest import run_cli, write_config

from pgsched import InvalidInput, JobPriority
from pgsched.tasks import PRIORITIES


@pytest.mark.parametrize(("given", "expected"), [
    (0, 0), (9, 9), ("3", 3), (" 7 ", 7), ("critical", 1), ("NORMAL", 5),
    (JobPriority.CRITICAL, 1), (5, 5),
])
def test_priority_parses_numbers_0_to_9_and_names(given, expected):
    assert JobPriority.parse(given) == expected


def test_named_values_come_back_as_their_names():
    assert JobPriority.parse(1) is JobPriority.CRITICAL
    assert JobPriority.parse("5") is JobPriority.NORMAL
    assert type(JobPriority.parse(3)) is int


@pytest.mark.parametrize("bad", [-1, 10, "10", "x", "", "1.5", True, 2.0, "٣"])
def test_priority_outside_0_to_9_is_refused_naming_the_range(bad):
    with pytest.raises(InvalidInput, match=r"0 \(first\) to 9"):
        JobPriority.parse(bad)


async def test_the_claim_takes_every_priority_0_to_9_lowest_first(sched):
    now = datetime.now(UTC) - timedelta(seconds=1)
    for priority in (9, 2, 0, 5, 7, 1, 3):
        await sched.schedule("noop", job_id=f"p{priority}", execution_time=now,
                             priority=priority)
    order = []
    for _ in range(8):
        claimed, _, _ = await sched.store.claim_jobs(worker_id="w", limit=1, lease_seconds=60)
        order += [job["id"] for job in claimed]
    assert order == ["p0", "p1", "p2", "p3", "p5", "p7", "p9"]


async def test_a_capped_queue_fills_its_cap_from_the_lowest_priorities(sched):
    now = datetime.now(UTC) - timedelta(seconds=1)
    for n, priority in enumerate([8, 8, 4, 6, 4, 0]):
        await sched.schedule("noop", job_id=f"j{n}-p{priority}", execution_time=now,
                             priority=priority, queue="q")
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id="w", limit=10, lease_seconds=60, queues=["q"], capped=(["q"], [3]))
    assert sorted(job["priority"] for job in claimed) == [0, 4, 4]


async def test_next_due_sees_future_jobs_of_any_priority(sched):
    soon = datetime.now(UTC) + timedelta(minutes=3)
    await sched.schedule("noop", execution_time=soon, priority=8)
    claimed, next_due, _ = await sched.store.claim_jobs(worker_id="w", limit=1,
                                                        lease_seconds=60)
    assert claimed == []
    assert next_due is not None and abs((next_due - soon).total_seconds()) < 0.001


def test_cli_priority_takes_a_number_or_a_name(tmp_path, pg_dsn, schema):
    import psycopg

    config = write_config(tmp_path, pg_dsn, schema)
    assert run_cli("migrate", config=config).returncode == 0
    ids = {}
    for given in ("0", "critical", "9", "normal"):
        result = run_cli("add", "noop", "--priority", given, config=config)
        assert result.returncode == 0, result.stderr
        ids[given] = result.stdout.strip()
    with psycopg.connect(pg_dsn) as conn:
        stored = dict(conn.execute(f'SELECT id, priority FROM "{schema}".jobs').fetchall())
    assert {given: stored[job_id] for given, job_id in ids.items()} == {
        "0": 0, "critical": 1, "9": 9, "normal": 5}
    for bad in ("10", "urgent"):
        result = run_cli("add", "noop", "--priority", bad, config=config)
        assert result.returncode == 2
        assert "is not a priority" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f'SELECT count(*) FROM "{schema}".jobs').fetchone()[0] == 4


def test_every_priority_fits_the_tables_check():
    assert list(PRIORITIES) == list(range(10))
