"""Suspects: the jobs of a crash shared by several jobs (recover_orphans, migration 0019).

- A crash with several jobs running counts against none of them: each becomes a
  suspect; a crash split over passes is still one shared crash.
- A suspect runs alone: ordinary claims leave it, a suspect claim takes it and nothing
  else, under the same queue rules (served queues, paused queues, per-queue caps).
- A steady stream of ordinary jobs, which keeps a real worker always busy, does not
  starve a due suspect: the worker drains, runs it alone, and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
from datetime import timedelta

import psycopg
import pytest
from conftest import claim_params, fast_options, wait_until
from rich.console import Console
from test_limits import tuples_read
from test_ops_plans import seq_scans
from test_queues import rows_read_from_jobs

from pgsched import Scheduler
from pgsched.cli.views import job_view
from pgsched.ops import job_json
from pgsched.store import migrations, split_statements

from .kit import audit, audit_env, db_now, fault_config, query
from .test_recovery_review import LIVE, _dead_worker_holding, _recoveries


async def _suspects(sched) -> dict[str, bool]:
    rows = await query(sched, "SELECT id, suspect FROM {schema}.jobs")
    return {r["id"]: r["suspect"] for r in rows}


async def _claim(sched, *, suspects: bool, limit: int = 10, **kwargs) -> list[str]:
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id="host:9:claimer9", limit=limit, lease_seconds=60, suspects=suspects,
        **kwargs)
    return sorted(j["id"] for j in claimed)


async def test_a_shared_crash_counts_against_none_of_its_jobs_and_marks_each_suspect(sched):
    await _dead_worker_holding(sched, LIVE, False, {"a": (30, 1), "b": (30, 2), "c": (10, 3)})
    recovered = [r["id"] for r in await sched.store.recover_orphans(max_recoveries=1)]
    assert sorted(recovered) == ["a", "b", "c"]
    assert await _recoveries(sched) == {"a": 0, "b": 0, "c": 0}
    assert await _suspects(sched) == {"a": True, "b": True, "c": True}
    rows = await query(sched, "SELECT status::text, last_error, errors -> -1 ->> 'counted' "
                              "AS counted FROM {schema}.jobs")
    assert {(r["status"], r["counted"]) for r in rows} == {("pending", "false")}
    assert all("not counted" in r["last_error"] for r in rows)


async def test_a_shared_crash_split_over_passes_counts_against_none(sched):
    """The last job recovered is the only one its dead worker still runs by then: it is
    the same shared crash (worker_crashes), not one of its own."""
    await _dead_worker_holding(sched, LIVE, False, {"a": (30, 1), "b": (20, 2)})
    for _ in range(2):
        await sched.store.recover_orphans(max_recoveries=1, limit=1)
    assert await _recoveries(sched) == {"a": 0, "b": 0}
    assert await _suspects(sched) == {"a": True, "b": True}


async def test_a_crash_of_one_job_counts_against_it(sched):
    await _dead_worker_holding(sched, LIVE, False, {"alone": (30, 1)})
    await sched.store.recover_orphans(max_recoveries=3)
    assert await _recoveries(sched) == {"alone": 1}
    assert await _suspects(sched) == {"alone": True}


async def _one_suspect_beside(sched, *others: str, queue: str = "default") -> None:
    await _dead_worker_holding(sched, LIVE, False, {"s": (30, 1), "t": (30, 1)})
    await sched.store.recover_orphans(max_recoveries=3)
    await query(sched, "UPDATE {schema}.jobs SET queue = %s WHERE id = 's' RETURNING id",
                [queue])
    await query(sched, "DELETE FROM {schema}.jobs WHERE id = 't' RETURNING id")
    for job_id in others:
        await sched.schedule("noop", job_id=job_id)


async def test_a_suspect_is_claimed_alone_and_ordinary_claims_leave_it(sched):
    await _one_suspect_beside(sched, "x", "y")
    assert await _claim(sched, suspects=False) == ["x", "y"]
    assert sched.store.suspect_due
    await query(sched, "UPDATE {schema}.jobs SET status = 'pending', worker_id = NULL "
                       "WHERE id IN ('x', 'y') RETURNING id")
    assert await _claim(sched, suspects=True) == ["s"]
    # Claimed, it is no longer a suspect: a retry after a failure runs as any job.
    assert await _suspects(sched) == {"s": False, "x": False, "y": False}
    assert await _claim(sched, suspects=True) == []
    assert not sched.store.suspect_due


async def test_a_suspect_keeps_to_the_queue_rules(sched):
    await _one_suspect_beside(sched, queue="tenant")
    # A worker of other queues neither hears of it nor takes it.
    assert await _claim(sched, suspects=True, queues=["default"]) == []
    assert not sched.store.suspect_due
    # Its queue's per-queue cap is full.
    assert await _claim(sched, suspects=True, queues=["tenant"],
                        capped=(["tenant"], [0])) == []
    await sched.store.pause_queues(["tenant"])
    for queues in (None, ["tenant"]):
        assert await _claim(sched, suspects=True, queues=queues) == []
        assert not sched.store.suspect_due
    await sched.store.resume_queues(["tenant"])
    assert await _claim(sched, suspects=False, queues=["tenant"]) == []
    assert sched.store.suspect_due
    assert await _claim(sched, suspects=True, queues=["tenant"]) == ["s"]


async def test_a_steady_stream_does_not_starve_a_due_suspect(
        sched, pg_dsn, schema, workers, tmp_path):
    """One worker of two slots, fed jobs of 0.3 s every 0.1 s: always busy, with a
    backlog. A suspect that falls due meanwhile runs, and nothing runs beside it."""
    env = audit_env(pg_dsn, schema)
    worker = workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2), env=env)
    stop = asyncio.Event()

    async def stream() -> None:
        n = 0
        while not stop.is_set():
            await sched.schedule("sleep_then_record", args=(f"o{n:04}", 0.3),
                                 job_id=f"o{n:04}")
            n += 1
            await asyncio.sleep(0.1)

    feeding = asyncio.create_task(stream())
    try:
        await wait_until(lambda: _running(sched, 2), timeout=30, what="a busy worker")
        await sched.schedule("sleep_then_record", args=("suspect", 1.0), job_id="suspect",
                             execution_time=await db_now(sched) + timedelta(hours=1))
        await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                           "WHERE id = 'suspect' RETURNING id")

        async def suspect_ran() -> bool:
            return any(a["key"] == "suspect" for a in await audit(sched))

        await wait_until(suspect_ran, timeout=60, what="the suspect to run")

        async def one_ran_after() -> bool:
            ran = {a["key"]: a["at"] for a in await audit(sched)}
            rows = await query(sched, "SELECT id FROM {schema}.jobs WHERE started_at > %s",
                               [ran["suspect"]])
            return any(r["id"] in ran for r in rows)

        # The stream goes on after it: waited for, since a fixed second was not always
        # enough on a loaded machine for the next job to be claimed, run and audited.
        await wait_until(one_ran_after, timeout=30, what="a job of the stream run after it")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
    assert worker.proc.poll() is None
    ran = {a["key"]: a["at"] for a in await audit(sched)}
    rows = await query(sched, "SELECT id, started_at FROM {schema}.jobs "
                              "WHERE started_at IS NOT NULL")
    started = {r["id"]: r["started_at"] for r in rows}
    # From its run's start (it sleeps 1 s, then audits): claimed by a busy worker, its row
    # says it started when claimed, and it waited there for the jobs beside it to end.
    alone = (ran["suspect"] - timedelta(seconds=1.0), ran["suspect"])
    beside = [key for key, at in ran.items() if key != "suspect"
              and started[key] < alone[1] and at > alone[0]]
    assert beside == []
    assert any(started[key] > alone[1] for key in ran if key != "suspect")


async def _claimed(sched, job_id: str) -> bool:
    rows = await query(sched, "SELECT status::text FROM {schema}.jobs WHERE id = %s",
                       [job_id])
    return rows[0]["status"] != "pending"


async def _running(sched, n: int) -> bool:
    rows = await query(sched, "SELECT count(*) AS n FROM {schema}.jobs "
                              "WHERE status = 'running'")
    return rows[0]["n"] >= n


async def _rows_read_by_claims(sched, names) -> dict[str, int]:
    """Rows each named claim statement reads from jobs (EXPLAIN ANALYZE, rolled back),
    after an ANALYZE: a suspect claim takes one, the others ten."""
    store = sched.store
    async with store.pool.connection() as conn:
        await conn.execute(f'ANALYZE "{sched.schema}".jobs')
    reads = {}
    for name in names:
        async with store.pool.connection() as conn, conn.transaction(force_rollback=True):
            cur = await conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + store._q[name],
                claim_params(limit=1 if "suspects" in name else 10))
            reads[name] = rows_read_from_jobs((await cur.fetchone())[0][0]["Plan"])
    return reads


async def test_a_suspect_claim_and_the_claims_beside_it_read_no_due_backlog(sched):
    """Structural, not timed: 3,000 ordinary jobs due before the suspect in its queue and
    priority. The suspect claim reads the suspect index, not the backlog; an ordinary
    claim reads what it takes, and suspect_due one probe."""
    await _one_suspect_beside(sched)
    await query(sched, "UPDATE {schema}.jobs SET execution_time = now() WHERE id = 's' "
                       "RETURNING id")
    await query(sched, "INSERT INTO {schema}.jobs (id, task, execution_time) "
                       "SELECT 'n' || g, 'noop', now() - make_interval(secs => g) "
                       "FROM generate_series(1, 3000) g RETURNING id")
    store = sched.store
    reads = await _rows_read_by_claims(sched, (
        "claim_jobs", "claim_jobs_unlimited", store._suspect_claim("claim_jobs"),
        store._suspect_claim("claim_jobs_unlimited")))
    print(reads)
    assert all(n < 100 for n in reads.values()), reads


async def test_suspects_run_one_after_another_without_waiting_for_the_poll(
        sched, pg_dsn, schema, workers, tmp_path):
    """A worker that polls once a minute: each suspect that ends (and is recorded) must
    wake it for the next one; no NOTIFY does. (Seen failing: each waited for the poll.)"""
    for n in range(3):
        await sched.schedule("sleep_then_record", args=(f"s{n}", 0.2), job_id=f"s{n}",
                             execution_time=await db_now(sched) + timedelta(hours=1))
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                       "RETURNING id")
    env = audit_env(pg_dsn, schema)
    workers(fault_config(tmp_path, pg_dsn, schema, concurrency=4, poll_seconds=60), env=env)

    async def all_ran() -> bool:
        return len(await audit(sched)) == 3

    await wait_until(all_ran, timeout=20, what="the three suspects to run")
    ran = sorted((a["at"], a["key"]) for a in await audit(sched))
    rows = await query(sched, "SELECT id, started_at FROM {schema}.jobs")
    started = {r["id"]: r["started_at"] for r in rows}
    # One at a time: each started after the one before it ran.
    assert all(started[key] >= before for (before, _), (_, key) in itertools.pairwise(ran))


async def test_an_upgrade_to_0019_with_a_crash_running_makes_its_jobs_suspects(pg_dsn, schema):
    """Jobs of a dead worker still running when 0019 is applied (the claim of this code
    needs 0019: claimed by SQL): recovered afterwards, they are suspects and counted
    against none. 0019 runs outside a transaction, so each statement must be safe to run
    again after a failure half-way."""
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as sched:
        assert await sched.store.migrate(target=18) == 18
        for job_id in ("a", "b"):
            await sched.schedule("noop", job_id=job_id)
        await query(sched, "UPDATE {schema}.jobs SET status = 'running', attempts = 1, "
                           "worker_id = %s, heartbeat_at = now() - interval '1 hour', "
                           "started_at = now() - interval '1 hour', "
                           "lease_until = now() - interval '1 minute' RETURNING id", [LIVE])
        assert await sched.store.migrate() == migrations()[-1][0]
        [(_, _, text)] = [m for m in migrations() if m[0] == 19]
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            for statement in split_statements(text):
                await conn.execute(statement.replace("{schema}", f'"{schema}"'))
        recovered = await sched.store.recover_orphans(max_recoveries=1)
        assert sorted(r["id"] for r in recovered) == ["a", "b"]
        assert await _recoveries(sched) == {"a": 0, "b": 0}
        assert await _suspects(sched) == {"a": True, "b": True}
        assert await _claim(sched, suspects=True) == ["a"]


async def test_show_marks_a_waiting_suspect(sched):
    await _one_suspect_beside(sched)
    data = job_json(await sched.store.get_job("s"), await sched.store.db_now())
    console = Console(width=120, record=True)
    console.print(job_view(data))
    assert data["suspect"] is True
    assert "yes: runs alone" in console.export_text()


async def _drained(sched, n: int) -> str:
    """Schedule ordinary job `d{n}` and return its id once it has stayed pending for 3 s
    beside a free slot: the worker has stopped claiming (it drains for a suspect)."""
    job_id = f"d{n}"
    await sched.schedule("sleep_then_record", args=(job_id, 0.0), job_id=job_id)
    await asyncio.sleep(3.0)
    rows = await query(sched, "SELECT status::text FROM {schema}.jobs WHERE id = %s",
                       [job_id])
    return job_id if rows[0]["status"] == "pending" else ""


async def test_a_worker_waiting_to_run_a_suspect_that_is_cancelled_claims_again(
        sched, pg_dsn, schema, workers, tmp_path):
    """A worker busy with a long job reserves a due suspect and waits for the long job to
    end before it claims it; the suspect is cancelled meanwhile. The worker must notice
    and claim ordinary jobs again, not sit idle until its long job ends. (Seen failing,
    when a busy worker drained without claiming: it claimed nothing until the long job
    ended.)"""
    env = audit_env(pg_dsn, schema)
    release = tmp_path / "release"
    workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2), env=env)
    await sched.schedule("hold", args=("long", str(release)), job_id="long")
    await wait_until(lambda: _running(sched, 1), timeout=30, what="the long job")
    await sched.schedule("sleep_then_record", args=("s", 0.0), job_id="s",
                         execution_time=await db_now(sched) + timedelta(hours=1))
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                       "WHERE id = 's' RETURNING id")
    n = itertools.count()
    blocked = await wait_until(lambda: _drained(sched, next(n)), timeout=40,
                               what="the worker to drain for the suspect")
    # Reserved, not claimed: still pending, so cancelled at once.
    assert await sched.store.request_cancel(ids=["s"]) == {"s": "cancelled"}

    async def ran() -> bool:
        return any(a["key"] == blocked for a in await audit(sched))

    try:
        await wait_until(ran, timeout=15, what=f"{blocked} to run beside the long job")
        rows = await query(sched, "SELECT status::text FROM {schema}.jobs WHERE id = 'long'")
        assert rows[0]["status"] == "running"
    finally:
        release.touch()


async def test_a_suspect_whose_outcome_is_not_recorded_yet_still_runs_alone(
        sched, pg_dsn, schema, workers, tmp_path):
    """The suspect's task has returned, but its completion waits (here on a row lock an
    operator's session holds): its row is still running in the database, so a crash now
    is shared with it and would count against none. The worker must claim nothing beside
    it until the outcome is recorded, as it claimed the suspect only once it held nothing.
    (Seen failing: the ordinary jobs were claimed as soon as the task returned.)"""
    env = audit_env(pg_dsn, schema)
    release = tmp_path / "release"
    await sched.schedule("hold", args=("s", str(release)), job_id="s",
                         execution_time=await db_now(sched) + timedelta(hours=1))
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                       "WHERE id = 's' RETURNING id")
    workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2), env=env)
    await wait_until(lambda: _running(sched, 1), timeout=30, what="the suspect to run")
    for n in range(2):
        await sched.schedule("sleep_then_record", args=(f"o{n}", 0.0), job_id=f"o{n}")
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn, conn.transaction():
        await conn.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                           ["s"])
        release.touch()

        async def s_returned() -> bool:
            return any(a["key"] == "s" for a in await audit(sched))

        await wait_until(s_returned, timeout=20, what="the suspect's task to return")
        await asyncio.sleep(1.5)  # the completion of s waits on the lock meanwhile
        beside = await query(sched, "SELECT id, status::text FROM {schema}.jobs "
                                    "WHERE id <> 's' AND status <> 'pending'")
        recorded = await query(sched, "SELECT status::text FROM {schema}.jobs "
                                      "WHERE id = 's'")
    assert recorded[0]["status"] == "running"
    assert beside == []

    async def all_done() -> bool:
        rows = await query(sched, "SELECT count(*) AS n FROM {schema}.jobs "
                                  "WHERE status = 'completed'")
        return rows[0]["n"] == 3

    await wait_until(all_done, timeout=20, what="every job to complete")


async def test_ordinary_claims_do_not_wade_through_many_suspects(sched):
    """Structural, not timed: a whole fleet killed at once (a host rebooted, an OOM kill of
    every worker) leaves every job it ran a suspect, due before the backlog (their due
    time is their first attempt's). They are taken one per idle worker, so they stay for
    a while; meanwhile every ordinary claim walks the pending indexes past all of them."""
    await _suspects_before_a_backlog(sched)
    reads = await _rows_read_by_claims(sched, (
        "claim_jobs", "claim_jobs_unlimited", sched.store._flat_claim(10)))
    print(reads)
    assert all(n < 100 for n in reads.values()), reads


CLAIM = claim_params()
# The claim forms beside the three above: served queues listed, a queue capped, and a
# global limit that binds (claim_room probes the due rows of the limited queue).
FORMS = {
    "listed": ("claim_jobs_unlimited", {"queues": ["default"]}),
    "capped": ("claim_jobs_unlimited", {"capped_queues": ["default"], "capped_free": [3]}),
    "limited": ("claim_jobs", {"global_concurrency": 5}),
    "limited, listed": ("claim_jobs", {"queues": ["default"], "global_concurrency": 5}),
}


async def _suspects_before_a_backlog(sched, global_concurrency: int | None = None) -> None:
    """2,000 suspects due before 3,000 ordinary jobs, all due, in one queue."""
    await query(sched, "INSERT INTO {schema}.jobs (id, task, execution_time, suspect) "
                       "SELECT 's' || g, 'noop', now() - interval '1 hour' "
                       "- make_interval(secs => g), true "
                       "FROM generate_series(1, 2000) g RETURNING id")
    await query(sched, "INSERT INTO {schema}.jobs (id, task, execution_time) "
                       "SELECT 'n' || g, 'noop', now() - make_interval(secs => g) "
                       "FROM generate_series(1, 3000) g RETURNING id")
    if global_concurrency:
        await sched.store.set_queue_limits("default", global_concurrency=global_concurrency,
                                           set_concurrency=True)
    async with sched.store.pool.connection() as conn:
        await conn.execute(f'ANALYZE "{sched.schema}".jobs')


@pytest.mark.parametrize("form", FORMS)
async def test_no_claim_form_wades_through_many_suspects(sched, form):
    """As above for the other forms, counted by the session's statistics, so that what
    claim_room reads (not in EXPLAIN) counts too."""
    name, params = FORMS[form]
    params = dict(params)
    await _suspects_before_a_backlog(sched, params.pop("global_concurrency", None))
    async with sched.store.pool.connection() as conn, conn.transaction(force_rollback=True):
        before = await tuples_read(conn, sched.schema)
        cur = await conn.execute(sched.store._q[name], {**CLAIM, **params})
        ids = [c.name for c in cur.description].index("id")
        claimed = [r[ids] for r in await cur.fetchall()]
        read = await tuples_read(conn, sched.schema) - before
    print(form, len(claimed), read)
    assert all(job_id.startswith("n") for job_id in claimed) and claimed, claimed
    assert read < 100, read


async def test_no_claim_statement_needs_a_sequential_scan(sched):
    """With sequential scans priced out, a scan of jobs is left only where no index
    serves a statement: each claim, ordinary or suspect, must find one whose predicate
    its WHERE implies."""
    await _suspects_before_a_backlog(sched, global_concurrency=5)
    store = sched.store
    names = ["claim_jobs", "claim_jobs_unlimited", store._flat_claim(10),
             store._suspect_claim("claim_jobs"), store._suspect_claim("claim_jobs_unlimited")]
    async with store.pool.connection() as conn, conn.transaction(force_rollback=True):
        await conn.execute("SET LOCAL enable_seqscan = off")
        for name in names:
            for queues in (None, ["default"]):
                cur = await conn.execute("EXPLAIN (FORMAT JSON) " + store._q[name],
                                         {**CLAIM, "queues": queues})
                plan = (await cur.fetchone())[0][0]["Plan"]
                assert "jobs" not in seq_scans(plan), (name, queues, plan)


async def test_the_operator_views_still_count_and_list_suspects(sched):
    """Suspects are in an index of their own (0020): `top`'s next jobs, its counts and
    `pgsched queues` read it beside the ordinary one. A suspect due before the others
    (its first attempt's due time) comes first, and counts, in a queue of its own too."""
    await query(sched, "INSERT INTO {schema}.jobs (id, task, queue, execution_time, suspect) "
                       "VALUES ('s', 'noop', 'default', now() - interval '1 hour', true), "
                       "('t', 'noop', 'alone', now() - interval '2 hours', true) RETURNING id")
    await query(sched, "INSERT INTO {schema}.jobs (id, task, execution_time) "
                       "SELECT 'n' || g, 'noop', now() - make_interval(secs => g) "
                       "FROM generate_series(1, 3) g RETURNING id")
    nexts = await sched.store.next_jobs(limit=10, priorities=range(10))
    assert [j["id"] for j in nexts] == ["t", "s", "n3", "n2", "n1"]
    stats = {q["queue"]: q for q in await sched.store.queue_stats()}
    exact = {q["queue"]: q for q in await sched.store.queue_stats(exact=True)}
    assert stats["default"]["due"] == exact["default"]["due"] == 4
    assert stats["alone"]["due"] == exact["alone"]["due"] == 1
    assert stats["alone"]["lag_seconds"] >= 7000


async def test_a_suspect_released_at_shutdown_is_still_a_suspect(
        sched, pg_dsn, schema, workers, tmp_path):
    """A worker stopped gracefully while it runs a suspect gives it back (release_jobs).
    Nothing has told it apart from the jobs of its shared crash yet: it must run alone
    again, or the next crash it causes is shared with innocent jobs once more and they
    are all run again. (Seen failing: released, it was an ordinary job again.)"""
    env = audit_env(pg_dsn, schema)
    await _one_suspect_beside(sched)
    await query(sched, "UPDATE {schema}.jobs SET task = 'hold', args = %s, "
                       "execution_time = now() WHERE id = 's' RETURNING id",
                [psycopg.types.json.Jsonb(["s", str(tmp_path / "never")])])
    worker = workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2,
                                  shutdown_grace_seconds=0.5), env=env)
    await wait_until(lambda: _running(sched, 1), timeout=30, what="the suspect to run")
    worker.signal(signal.SIGTERM)
    await worker.wait()
    rows = await query(sched, "SELECT status::text, suspect FROM {schema}.jobs "
                              "WHERE id = 's'")
    assert (rows[0]["status"], rows[0]["suspect"]) == ("pending", True)


async def test_a_suspect_of_a_queue_with_a_global_limit_of_one_is_not_starved(
        sched, pg_dsn, schema, workers, tmp_path):
    """Two workers, one queue whose global limit lets one job run at a time, and a backlog
    of it that never empties: whichever worker holds the queue's one slot has a job, and
    the other's suspect claim finds no room. The suspect must still run, alone."""
    env = audit_env(pg_dsn, schema)
    await sched.store.set_queue_limits("q", global_concurrency=1, set_concurrency=True)
    for _ in range(2):
        workers(fault_config(tmp_path, pg_dsn, schema, concurrency=2), env=env)
    stop = asyncio.Event()

    async def stream() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            rows = await query(sched, "SELECT count(*) AS n FROM {schema}.jobs "
                                      "WHERE status = 'pending' AND NOT suspect")
            if rows[0]["n"] < 4:
                await sched.schedule("sleep_then_record", args=(f"o{n:04}", 0.4),
                                     job_id=f"o{n:04}", queue="q")
            await asyncio.sleep(0.1)

    feeding = asyncio.create_task(stream())
    try:
        await wait_until(lambda: _running(sched, 1), timeout=30, what="a busy queue")
        await sched.schedule("sleep_then_record", args=("suspect", 0.2), job_id="suspect",
                             queue="q", execution_time=await db_now(sched) + timedelta(hours=1))
        await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                           "WHERE id = 'suspect' RETURNING id")

        async def suspect_ran() -> bool:
            return any(a["key"] == "suspect" for a in await audit(sched))

        await wait_until(suspect_ran, timeout=60, what="the suspect to run")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding


# Seen failing before the busy worker claimed the suspect it waits for: every busy worker
# drained once it had seen it due for 5-10 s, and d4 stayed pending (['', '', '', '', 'd4']).
async def test_one_suspect_does_not_make_every_busy_worker_drain(
        sched, pg_dsn, schema, workers, tmp_path):
    env = audit_env(pg_dsn, schema)
    release = tmp_path / "release"
    for queue in ("a", "b"):
        (tmp_path / queue).mkdir()
        workers(fault_config(tmp_path / queue, pg_dsn, schema, concurrency=2,
                             queues=[queue, "default"]), env=env)
        await sched.schedule("hold", args=(queue, str(release)), job_id=queue, queue=queue)
    await wait_until(lambda: _running(sched, 2), timeout=30, what="a long job on each")
    await sched.schedule("sleep_then_record", args=("s", 0.0), job_id="s",
                         execution_time=await db_now(sched) + timedelta(hours=1))
    await query(sched, "UPDATE {schema}.jobs SET suspect = true, execution_time = now() "
                       "WHERE id = 's' RETURNING id")
    try:
        # Past the longest drain delay (10 s): some worker still claims ordinary jobs.
        left = [await _drained(sched, n) for n in range(5)]
        # One left pending 3 s may only have waited for the CPU on a loaded machine: it
        # must still be claimed while the long jobs run (were every worker drained, it
        # would wait for them, released only below).
        for job_id in filter(None, left):
            await wait_until(lambda j=job_id: _claimed(sched, j), timeout=15,
                             what=f"{job_id} claimed while both long jobs run")
    finally:
        release.touch()


async def test_a_claim_of_none_takes_nothing_and_says_whether_a_suspect_is_due(sched):
    """A draining worker's probe (Fetcher.run): by each claim statement, with or without a
    global limit, for a worker of every queue (the flat walk) or of a list."""
    await _one_suspect_beside(sched, "x", queue="q")
    for limited in (1, None):
        await sched.store.set_queue_limits("q", global_concurrency=limited,
                                           set_concurrency=True)
        for queues in (None, ["q", "default"]):
            assert await _claim(sched, suspects=False, queues=queues, limit=0) == []
            assert sched.store.suspect_due
    await sched.cancel_job("s")
    assert await _claim(sched, suspects=False, limit=0) == []
    assert not sched.store.suspect_due
    rows = await query(sched, "SELECT count(*) AS n FROM {schema}.jobs "
                              "WHERE status = 'running'")
    assert rows[0]["n"] == 0
