"""Unique jobs (schedule(..., unique_for=...), add --unique-for): at most one pending or
running job per key and period bucket, enforced by the unique index under concurrent
enqueues from many processes; a new one once the first finished or the period passed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import ROOT, audit_counts, audit_env, cli_env, run_cli, wait_until, write_config

from pgsched import InvalidInput, JobConflict, Scheduler

UNIQUE_FOR = 600  # ENQUEUE's
ENQUEUE = """
import asyncio, sys
from pgsched import Scheduler

async def main(dsn, schema, key, start):
    async with Scheduler(dsn, schema=schema) as sched:
        while __import__("time").time() < start:  # every process at the same instant
            await asyncio.sleep(0.001)
        print(await sched.schedule("record", args=[key], unique_for=600))

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
"""


def active(pg_dsn: str, schema: str, key_like: str = "%") -> list[tuple]:
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            f'SELECT id, status::text, unique_until FROM "{schema}".jobs'
            " WHERE task || args::text LIKE %s"
            " AND status IN ('pending', 'running')", [key_like]).fetchall()


async def test_twenty_processes_enqueueing_at_once_make_exactly_one_job(pg_dsn, schema, sched):
    start = datetime.now(UTC).timestamp() + 3.0
    # A key's period is a bucket of the clock (600 s here): processes that a loaded machine
    # starts late could straddle a bucket's end and rightly make one job in each (seen
    # once in a full run, 886 ms apart). So they all start just after a bucket begins.
    start += UNIQUE_FOR - start % UNIQUE_FOR + 0.5 if start % UNIQUE_FOR > UNIQUE_FOR - 30 else 0
    procs = [subprocess.Popen([sys.executable, "-c", ENQUEUE, pg_dsn, schema, "k", str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=cli_env())
             for _ in range(20)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err for _, err in outputs][:2]
    ids = {out.strip() for out, _ in outputs}
    rows = active(pg_dsn, schema)
    assert len(rows) == 1, rows
    assert ids == {rows[0][0]}  # every caller got the one job's id


async def test_the_same_arguments_written_differently_are_one_key(sched):
    first = await sched.schedule("add", kwargs={"a": 1, "b": 2}, unique_for=60)
    again = await sched.schedule("add", kwargs={"b": 2, "a": 1}, unique_for=60)
    other = await sched.schedule("add", kwargs={"a": 1, "b": 3}, unique_for=60)
    assert again == first and other != first
    plain = await sched.schedule("add", kwargs={"a": 1, "b": 2})  # not unique: always added
    assert plain not in (first, other)


async def test_an_explicit_key_dedupes_across_arguments(sched):
    first = await sched.schedule("add", args=[1, 2], unique_for=60, unique_key="sum")
    assert await sched.schedule("add", args=[3, 4], unique_for=60, unique_key="sum") == first
    assert await sched.schedule("add", args=[1, 2], unique_for=60) != first


async def test_a_finished_job_frees_its_key(sched):
    first = await sched.schedule("noop", unique_for=600)
    claimed, _, _ = await sched.store.claim_jobs(worker_id="w", limit=1, lease_seconds=60)
    assert [j["id"] for j in claimed] == [first]
    assert await sched.schedule("noop", unique_for=600) == first  # running holds it
    assert await sched.store.complete_jobs(worker_id="w", done=[(first, 1, "null")])
    second = await sched.schedule("noop", unique_for=600)
    assert second != first
    assert await sched.schedule("noop", unique_for=600) == second


async def test_the_next_period_takes_a_new_job_though_the_first_is_pending(sched):
    await sched.schedule("noop", unique_for=1)
    async with sched.store.pool.connection() as conn:
        # Next period: the bucket of this job is over.
        await conn.execute(f'UPDATE "{sched.schema}".jobs SET unique_until = now()')
    await sched.schedule("noop", unique_for=1)
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(f'SELECT count(*) FROM "{sched.schema}".jobs')
        assert (await cur.fetchone())[0] == 2


async def test_a_retried_or_replaced_job_never_collides_with_a_live_key(sched):
    first = await sched.schedule("noop", job_id="a", unique_for=600)
    assert await sched.cancel_job(first)
    second = await sched.schedule("noop", unique_for=600)
    from pgsched.ops import retry_jobs

    assert await retry_jobs(sched.store, [first]) == [first]  # no unique violation
    await sched.schedule("noop", job_id="a", conflict_resolution="replace")
    assert (await sched.get_job(second))["status"] == "pending"
    assert await sched.schedule("noop", unique_for=600) == second


async def test_unique_options_are_checked(sched):
    with pytest.raises(InvalidInput, match="unique_for"):
        await sched.schedule("noop", unique_key="k")
    with pytest.raises(InvalidInput, match="unique_for"):
        await sched.schedule("noop", unique_for=0)
    for bad_key in ("", "x" * 256, "a\x00b", 7):
        with pytest.raises(InvalidInput, match="unique_key"):
            await sched.schedule("noop", unique_for=5, unique_key=bad_key)
    for bad_period in (1e-6, timedelta(days=4000), float("nan"), -1, True):
        with pytest.raises(InvalidInput, match="unique_for"):
            await sched.schedule("noop", unique_for=bad_period)
    with pytest.raises(InvalidInput, match="replace"):
        await sched.schedule("noop", unique_for=5, conflict_resolution="replace")
    from pgsched import JobSpec

    with pytest.raises(InvalidInput, match="schedule_bulk"):
        await sched.schedule_bulk([JobSpec("noop", unique_for=5)])
    await sched.schedule("noop", job_id="taken")
    with pytest.raises(JobConflict):
        await sched.schedule("noop", job_id="taken", unique_for=5)
    assert await sched.schedule("noop", job_id="taken", unique_for=5,
                                conflict_resolution="ignore") == "taken"


async def test_three_workers_run_a_unique_job_once_while_clients_keep_enqueueing(
        tmp_path, pg_dsn, schema, sched, workers):
    env = audit_env(pg_dsn, schema)
    config = write_config(tmp_path, pg_dsn, schema)
    for _ in range(3):
        workers(config, env=env)
    ids = set()
    async with Scheduler(pg_dsn, schema=schema) as client:
        for _ in range(4):  # four rounds: enqueue from 10 connections at once
            ids |= set(await asyncio.gather(*(
                client.schedule("record", args=["u", 0.3], unique_for=600)
                for _ in range(10))))
            await asyncio.sleep(0.1)
    await wait_until(lambda: not active(pg_dsn, schema), what="the unique jobs to finish")
    runs = audit_counts(pg_dsn, schema)["u"]
    assert runs == len(ids)  # each distinct job ran once: no duplicate was ever added
    assert runs < 40
    with psycopg.connect(pg_dsn) as conn:
        statuses = conn.execute(f'SELECT status::text, count(*) FROM "{schema}".jobs'
                                " GROUP BY 1").fetchall()
    assert statuses == [("completed", runs)]


def test_cli_unique_for_prints_the_first_jobs_id(tmp_path, pg_dsn, schema):
    config = write_config(tmp_path, pg_dsn, schema)
    assert run_cli("migrate", config=config).returncode == 0
    first = run_cli("add", "noop", "--unique-for", "5m", config=config)
    again = run_cli("add", "noop", "--unique-for", "5m", config=config)
    keyed = run_cli("add", "add", "--args", "[1, 2]", "--unique-for", "5m", "--unique-key", "k",
                    config=config)
    keyed_again = run_cli("add", "add", "--args", "[5, 6]", "--unique-for", "5m",
                          "--unique-key", "k", config=config)
    for result in (first, again, keyed, keyed_again):
        assert result.returncode == 0, result.stderr
    assert first.stdout == again.stdout and keyed.stdout == keyed_again.stdout
    assert first.stdout != keyed.stdout
    for args, message in ((["--unique-key", "k"], "unique_for"),
                          (["--unique-for", "soon"], "--unique-for")):
        bad = run_cli("add", "noop", *args, config=config)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert len(active(pg_dsn, schema)) == 2


async def test_the_period_bucket_is_aligned_to_the_epoch(sched):
    job_id = await sched.schedule("noop", unique_for=timedelta(minutes=5))
    job = await sched.get_job(job_id)
    until = job["unique_until"]
    assert until.timestamp() % 300 == 0
    assert timedelta(0) < until - job["created_at"] <= timedelta(minutes=5)
