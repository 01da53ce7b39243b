"""Dependencies between jobs (schedule(depends_on=...), add --depends-on) against a real
PostgreSQL: a job waits until every dependency completed, is cancelled (transitively)
when one ends otherwise, and the release holds whichever transaction ends the last
dependency, with real worker processes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import audit_env, run_cli, wait_until, write_config

from pgsched import InvalidInput, JobConflict, JobSpec, Scheduler
from pgsched.store import Store


async def status(sched, job_id: str) -> str:
    return str((await sched.get_job(job_id))["status"])


async def claim(store: Store, worker: str = "w") -> list[dict]:
    jobs, _, _ = await store.claim_jobs(worker_id=worker, limit=100, lease_seconds=30)
    return jobs


async def _a_lock_waited_for(sched) -> bool:
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute("SELECT 1 FROM pg_stat_activity "
                                 "WHERE wait_event_type = 'Lock'")
        return await cur.fetchone() is not None


async def complete(store: Store, job: dict, worker: str = "w") -> None:
    done = await store.complete_jobs(worker_id=worker,
                                     done=[(job["id"], job["attempts"], "null")])
    assert done


async def test_a_job_waits_until_every_dependency_completed(sched):
    a = await sched.schedule("noop", job_id="a")
    b = await sched.schedule("noop", job_id="b")
    c = await sched.schedule("noop", job_id="c", depends_on=[a, b])
    claimed = {j["id"]: j for j in await claim(sched.store)}
    assert set(claimed) == {"a", "b"}  # c is never claimable while it waits
    await complete(sched.store, claimed["a"])
    assert await claim(sched.store) == [] and await status(sched, c) == "pending"
    await complete(sched.store, claimed["b"])
    assert [j["id"] for j in await claim(sched.store)] == ["c"]
    assert (await sched.get_job(c))["depends_on"] == [
        {"id": "a", "status": "completed"}, {"id": "b", "status": "completed"}]


async def test_a_released_job_keeps_a_later_due_time(sched):
    a = await sched.schedule("noop")
    later = datetime.now(UTC) + timedelta(hours=1)
    c = await sched.schedule("noop", depends_on=[a], execution_time=later)
    await complete(sched.store, (await claim(sched.store))[0])
    job = await sched.get_job(c)
    assert job["execution_time"] == later.replace(microsecond=job["execution_time"].microsecond)
    assert job["due_after_dependencies"] is None


@pytest.mark.parametrize("ending", ["fail", "cancel", "expire"])
async def test_a_dependency_that_does_not_complete_cancels_dependents_transitively(
        sched, pg_dsn, ending):
    a = await sched.schedule("noop", misfire_grace_time=1 if ending == "expire" else None,
                             execution_time=datetime.now(UTC) - timedelta(seconds=5)
                             if ending == "expire" else None)
    b = await sched.schedule("noop", depends_on=[a])
    c = await sched.schedule("noop", depends_on=[b])
    if ending == "fail":
        job = (await claim(sched.store))[0]
        await sched.store.fail_job(worker_id="w", job_id=a, attempt=job["attempts"],
                                   error="boom", traceback=None, retry_delay_seconds=0)
    elif ending == "cancel":
        await sched.cancel_job(a)
    else:
        assert (await claim(sched.store))[0]["expired"]
    assert [await status(sched, j) for j in (a, b, c)] == [
        {"fail": "failed", "cancel": "cancelled", "expire": "expired"}[ending],
        "cancelled", "cancelled"]
    assert (await sched.get_job(b))["last_error"].startswith(f"cancelled: dependency {a} ")
    assert (await sched.get_job(c))["last_error"].startswith(f"cancelled: dependency {b} ")


async def test_unknown_ids_and_cycles_are_refused_and_nothing_is_written(sched, pg_dsn):
    a = await sched.schedule("noop", job_id="a")
    with pytest.raises(InvalidInput, match="depends_on: no job 'nope'"):
        await sched.schedule("noop", job_id="x", depends_on=[a, "nope"])
    with pytest.raises(InvalidInput, match="cannot wait for itself"):
        await sched.schedule("noop", job_id="y", depends_on=["y"])
    with pytest.raises(InvalidInput, match="REPLACE"):
        await sched.schedule("noop", job_id="z", depends_on=[a], conflict_resolution="replace")
    assert await sched.get_job("x") is None
    assert not (await sched.get_job(a))["has_dependents"]
    # A cycle can only close through a job that existed, was deleted behind pgsched's back
    # while another waited for it, and is added again waiting for that one.
    b = await sched.schedule("noop", job_id="b", depends_on=[a])
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f'DELETE FROM "{sched.schema}".jobs WHERE id = %s', [a])
    with pytest.raises(InvalidInput, match="a cycle"):
        await sched.schedule("noop", job_id="a", depends_on=[b])


async def test_dependencies_completing_at_once_in_two_transactions_release_the_dependent(
        sched, pg_dsn):
    """Each completion, judged in its own statement's snapshot, sees the other dependency
    still running. settle_waiting locks c and judges after the lock, so the second sees
    the first's commit; judged without the lock, c would wait for ever."""
    for round_ in range(3):
        a = await sched.schedule("noop", job_id=f"a{round_}")
        b = await sched.schedule("noop", job_id=f"b{round_}")
        c = await sched.schedule("noop", job_id=f"c{round_}", depends_on=[a, b])
        claimed = {j["id"]: j for j in await claim(sched.store)}
        async with (await psycopg.AsyncConnection.connect(pg_dsn) as one,
                    await psycopg.AsyncConnection.connect(pg_dsn) as two):
            done = f'UPDATE "{sched.schema}".jobs SET status = \'completed\', ' \
                   "finished_at = now() WHERE id = %s"
            await one.execute(done, [a])  # one's trigger locks c; b still runs for it
            second = asyncio.create_task(two.execute(done, [b]))
            await asyncio.sleep(0.1)  # two's trigger now waits for one's lock on c
            await one.commit()
            await second
            await two.commit()
        assert claimed.keys() == {a, b}
        assert [j["id"] for j in await claim(sched.store)] == [c], round_


async def test_a_dependency_completing_while_its_dependent_is_scheduled(sched, pg_dsn):
    """The completion is in flight (uncommitted) when the dependent is scheduled: the
    insert waits for it and then sees it completed, or the completion's trigger sees
    the dependent: never neither."""
    a = await sched.schedule("noop", job_id="a")
    job = (await claim(sched.store))[0]
    # Scheduled by a client with the default lock_timeout (LOCK_TIMEOUT_SECONDS), not the
    # fixture's worker-length one (0.5 s), which a loaded machine's pause before the
    # commit could pass: the insert then failed on lock_timeout, no race made.
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, \
            Scheduler(pg_dsn, schema=sched.schema) as client:
        await conn.execute(
            f'UPDATE "{sched.schema}".jobs SET status = \'completed\', finished_at = now() '
            "WHERE id = %s", [a])
        scheduling = asyncio.create_task(client.schedule("noop", job_id="c", depends_on=[a]))
        await wait_until(lambda: _a_lock_waited_for(sched) if not scheduling.done() else True,
                         what="the insert waiting for the dependency's row")
        assert not scheduling.done()  # waits for the dependency's row
        await conn.commit()
    await scheduling
    assert [j["id"] for j in await claim(sched.store)] == ["c"]
    del job


async def test_retry_of_a_cancelled_dependent_waits_for_its_retried_dependency(sched):
    a = await sched.schedule("noop", job_id="a")
    c = await sched.schedule("noop", job_id="c", depends_on=[a])
    await sched.cancel_job(a)
    assert await status(sched, c) == "cancelled"
    assert await sched.store.retry_jobs(statuses=["cancelled"], ids=[a, c],
                                        cutoff=datetime.now(UTC), limit=10) in ([a, c], [c, a])
    assert [j["id"] for j in await claim(sched.store)] == [a]  # c waits again
    await complete(sched.store, (await sched.get_job(a)) | {"attempts": 1})
    assert [j["id"] for j in await claim(sched.store)] == [c]


async def test_cancel_and_vacuum_know_waiting_jobs(sched):
    a = await sched.schedule("noop", job_id="a")
    c = await sched.schedule("noop", job_id="c", depends_on=[a])
    assert await sched.cancel_job(c)
    assert await status(sched, c) == "cancelled"
    await complete(sched.store, (await claim(sched.store))[0])  # nothing left to release
    assert await status(sched, c) == "cancelled"
    assert await sched.store.vacuum_jobs(status="cancelled", older_than_seconds=-1,
                                         limit=10) == 1
    async with sched.store.pool.connection() as conn:
        cur = await conn.execute(f'SELECT count(*) FROM "{sched.schema}".job_dependencies')
        assert (await cur.fetchone())[0] == 0


async def test_three_workers_start_no_dependent_before_its_dependencies_complete(
        sched, pg_dsn, schema, tmp_path, workers):
    config = write_config(tmp_path, pg_dsn, schema, concurrency=4)
    env = audit_env(pg_dsn, schema)
    for _ in range(3):
        workers(config, env=env)
    roots = [await sched.schedule("span", args=(f"r{i}", 0.2), job_id=f"r{i}")
             for i in range(6)]
    middles = [await sched.schedule("span", args=(f"m{i}", 0.1), job_id=f"m{i}",
                                    depends_on=[roots[i], roots[(i + 1) % 6]])
               for i in range(6)]
    last = await sched.schedule("span", args=("z", 0), job_id="z", depends_on=middles)
    edges = [(m, d) for i, m in enumerate(middles) for d in (roots[i], roots[(i + 1) % 6])]
    edges += [(last, m) for m in middles]

    async def finished() -> bool:
        return (await sched.get_job(last))["status"] == "completed"

    await wait_until(finished, timeout=60, what="the last job")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        audit = dict(conn.execute(
            f'SELECT key, at FROM "{schema}".audit').fetchall())
    jobs = {j: await sched.get_job(j) for j in [*roots, *middles, last]}
    for job, dependency in edges:
        assert audit[f"{job}:start"] > audit[f"{dependency}:end"], (job, dependency)
        assert jobs[job]["started_at"] >= jobs[dependency]["finished_at"], (job, dependency)
    assert all(j["status"] == "completed" for j in jobs.values())


async def test_add_show_and_ls_show_what_a_job_waits_for(sched, pg_dsn, schema, tmp_path):
    config = write_config(tmp_path, pg_dsn, schema)
    a = await sched.schedule("noop", job_id="a")
    result = run_cli("add", "noop", "--id", "c", "--depends-on", a, "--depends-on", a,
                     config=config)
    assert result.returncode == 0 and result.stdout.strip() == "c", result.stderr
    shown = json.loads(run_cli("show", "c", "--json", config=config).stdout)
    assert shown["waiting_for"] == ["a"] and shown["depends_on"] == [
        {"id": "a", "status": "pending"}]
    text = run_cli("show", "c", config=config).stdout
    assert "when a completed, not before" in text and "a (pending)" in text
    listed = {r["id"]: r for r in json.loads(run_cli("ls", "--json", config=config).stdout)}
    assert listed["c"]["waiting_for"] == ["a"] and listed["a"]["waiting_for"] is None
    assert "waits for a" in run_cli("ls", config=config).stdout
    bad = run_cli("add", "noop", "--depends-on", "ghost", config=config)
    assert bad.returncode != 0 and "depends_on: no job 'ghost'" in bad.stderr
    assert bad.stderr.count("\n") == 1


async def test_a_waiting_job_replaced_without_dependencies_is_an_ordinary_job(sched):
    a = await sched.schedule("noop", job_id="a")
    await sched.schedule("noop", job_id="c", depends_on=[a])
    await sched.schedule("noop", job_id="c", conflict_resolution="replace")
    for job_id in ("c", "c2"):  # one statement, then the bulk (staging) path
        if job_id == "c2":
            await sched.schedule("noop", job_id="c2", depends_on=[a])
            await sched.schedule_bulk([JobSpec("noop", job_id="c2")],
                                      conflict_resolution="replace")
        job = await sched.get_job(job_id)
        assert job["waiting_for"] is None and job["due_after_dependencies"] is None
    assert {j["id"] for j in await claim(sched.store)} == {"a", "c", "c2"}


@pytest.mark.parametrize("on_conflict", ["raise", "ignore"])
async def test_a_dependent_whose_id_is_taken_leaves_its_dependencies_unmarked(
        sched, on_conflict):
    # Nothing waits for `a`: its end must not fire the trigger, and a planned run that
    # nothing waits for stays withdrawable (withdrawn_overlap_window).
    a = await sched.schedule("noop", job_id="a")
    await sched.schedule("noop", job_id="taken")
    if on_conflict == "raise":
        with pytest.raises(JobConflict, match="already exists"):
            await sched.schedule("noop", job_id="taken", depends_on=[a])
    else:
        assert await sched.schedule("noop", job_id="taken", depends_on=[a],
                                    conflict_resolution="ignore") == "taken"
    assert not (await sched.get_job(a))["has_dependents"]
