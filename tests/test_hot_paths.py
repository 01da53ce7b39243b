"""The fast paths of issue 4 against a real PostgreSQL: what they must still get right.

Enqueue: schedule() writes one row with scalar parameters; schedule_bulk() streams rows
with COPY straight into the table and falls back to a staging table when ids clash.
Worker: fenced writes find their rows by primary key (migration 0004), lease_until is set
exactly while a job runs, and the fetcher waits for a lagging completer.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import worker_tasks  # noqa: F401  (registers the tasks the in-process worker runs)
from conftest import fast_options, wait_until, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from pgsched import ConflictResolution, InvalidInput, JobConflict, JobSpec, Worker
from pgsched.store import _QUERIES, Store, _bind, encode_json
from pgsched.worker.fetcher import WRITE_WAIT_SECONDS

# What COPY's text format escapes (tab, newline, CR, backslash, \N) and then some.
AWKWARD = "tab\there, new\nline, cr\r, back\\slash, \\N, quote' \"dq\", ünï 🚀, {braces}"
AWKWARD_ID = "back\\slash \\N quote' \"dq\" ünï 🚀 {braces}"  # ids refuse control characters


async def jobs_by_id(sched) -> dict[str, dict]:
    return {j["id"]: j for j in await sched.store.list_jobs(limit=100_000)}


async def test_awkward_text_survives_copy_and_the_single_row_insert(sched):
    # Queue names are validated (letters, digits, _ . : -), so the awkward text travels in
    # ids, args and kwargs; the queue still goes through COPY and the single-row insert.
    args, kwargs = (AWKWARD, "", None, 1.5, [AWKWARD]), {AWKWARD: AWKWARD, "n": None}
    queue = "q.with:odd-chars_1"
    await sched.schedule_bulk([
        JobSpec("noop", job_id=f"bulk {AWKWARD_ID} {i}", args=args, kwargs=kwargs, queue=queue)
        for i in range(3)])
    await sched.schedule("noop", job_id=f"one {AWKWARD_ID}", args=args, kwargs=kwargs,
                         queue=queue)
    rows = await jobs_by_id(sched)
    assert set(rows) == {f"bulk {AWKWARD_ID} {i}" for i in range(3)} | {f"one {AWKWARD_ID}"}
    for row in rows.values():
        assert (row["args"], row["kwargs"], row["queue"]) == (list(args), kwargs, queue)


async def test_bulk_clashing_with_existing_ids_skips_exactly_those(sched):
    later = datetime.now(UTC) + timedelta(hours=1)
    for job_id in ("e1", "e3"):
        await sched.schedule("add", job_id=job_id, args=(0, 0), execution_time=later)
    specs = [JobSpec("add", job_id=f"e{i}", args=(i, i)) for i in range(5)]
    specs.append(JobSpec("add", job_id="e0", args=(9, 9)))  # repeated within the call
    assert await sched.schedule_bulk(specs) == ["e0", None, "e2", None, "e4", None]
    rows = await jobs_by_id(sched)
    assert {k: r["args"] for k, r in rows.items()} == {
        "e0": [0, 0], "e1": [0, 0], "e2": [2, 2], "e3": [0, 0], "e4": [4, 4]}

    with pytest.raises(JobConflict, match="'e1' already exists"):
        await sched.schedule_bulk([JobSpec("add", job_id=f"n{i}") for i in range(3)]
                                  + [JobSpec("add", job_id="e1")], conflict_resolution="raise")
    assert set(await jobs_by_id(sched)) == {f"e{i}" for i in range(5)}


async def test_an_invalid_job_deep_in_a_bulk_call_writes_nothing(sched):
    # Far enough in that the first rows have reached the server when it is found.
    specs = [JobSpec("noop") for _ in range(20_000)]
    specs.insert(15_000, JobSpec("noop", args=(float("nan"),)))
    with pytest.raises(InvalidInput, match="NaN"):
        await sched.schedule_bulk(specs)
    assert await sched.store.list_jobs() == []
    assert len(await sched.schedule_bulk(specs[:10])) == 10  # the connection is usable


async def test_bulk_replace_overwrites_all_but_the_running_job(sched):
    await sched.schedule_bulk([JobSpec("add", job_id=k, args=(0, 0)) for k in ("a", "b")])
    claimed, _, _ = await sched.store.claim_jobs(
        worker_id="w", limit=1, lease_seconds=60)
    running = claimed[0]["id"]
    specs = [JobSpec("add", job_id=k, args=(1, 1)) for k in ("a", "b", "c")]
    result = await sched.schedule_bulk(specs, conflict_resolution=ConflictResolution.REPLACE)
    assert result == [None if k == running else k for k in ("a", "b", "c")]
    rows = await jobs_by_id(sched)
    assert rows[running]["status"] == "running" and rows[running]["args"] == [0, 0]
    assert all(r["args"] == [1, 1] for k, r in rows.items() if k != running)


async def test_every_enqueue_path_wakes_workers_once_with_the_earliest_due_time(
        sched, pg_dsn):
    base = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    at = [base + timedelta(seconds=s) for s in (30, 10, 20)]
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{sched.store.channel}"')

        async def wakes() -> list[float]:
            return [float(n.payload) async for n in listener.notifies(timeout=0.5)]

        await sched.schedule("noop", job_id="one", execution_time=at[0])
        assert await wakes() == [at[0].timestamp()]
        await sched.schedule_bulk([JobSpec("noop", execution_time=t) for t in at])  # COPY
        assert await wakes() == [at[1].timestamp()]
        await sched.schedule_bulk(  # a clash: through the staging table
            [JobSpec("noop", job_id="one"), *(JobSpec("noop", execution_time=t) for t in at)])
        assert await wakes() == [at[1].timestamp()]
        await sched.schedule_bulk([JobSpec("noop", job_id="one", execution_time=at[2])],
                                  conflict_resolution="replace")
        assert await wakes() == [at[2].timestamp()]
        await sched.schedule_bulk([JobSpec("noop", job_id="one")])  # nothing written
        assert await wakes() == []


async def _lease_mismatches(sched) -> list[tuple[str, str]]:
    """Jobs whose lease or running-index predicate (migration 0009) disagrees with their
    status."""
    return [(j["id"], j["status"]) for j in (await jobs_by_id(sched)).values()
            if {j["lease_until"] is not None,
                j["worker_id"] is not None and j["finished_at"] is None}
            != {j["status"] == "running"}]


async def test_lease_until_is_set_exactly_while_a_job_runs(sched):
    """jobs_running_idx (migration 0009) stands for the running jobs: every way into and
    out of running must set or clear lease_until, worker_id or finished_at with the
    status."""
    past = datetime.now(UTC) - timedelta(minutes=10)
    await sched.schedule("noop", job_id="completed")
    await sched.schedule("fail", job_id="failed")
    await sched.schedule("fail", job_id="retried", max_retries=1)
    await sched.schedule("noop", job_id="expired", execution_time=past, misfire_grace_time=1)
    await sched.schedule("sleep", args=(60,), job_id="released")
    await sched.schedule("noop", job_id="cancelled", execution_time=past + timedelta(hours=1))
    await sched.cancel_job("cancelled")
    worker = Worker(sched.store, sched._dsn, fast_options(shutdown_grace_seconds=0.1))
    runner = asyncio.create_task(worker.run())

    async def settled() -> bool:
        rows = await jobs_by_id(sched)
        return rows["released"]["status"] == "running" and rows["retried"]["failures"] == 2

    await wait_until(settled, what="every job but the sleeper to finish")
    assert await _lease_mismatches(sched) == []
    worker.stop()
    await runner  # the sleeper goes back to pending
    claimed, _, _ = await sched.store.claim_jobs(  # a worker that then vanishes
        worker_id="gone", limit=1, lease_seconds=0.05)
    assert [j["id"] for j in claimed] == ["released"]
    await wait_until(lambda: sched.store.recover_orphans(max_recoveries=3), what="recovery")
    await sched.schedule("noop", job_id="completed", conflict_resolution="replace")
    await sched.store.retry_jobs(statuses=["failed"], cutoff=datetime.now(UTC), limit=10,
                                 ids=["failed"])
    statuses = {k: r["status"] for k, r in (await jobs_by_id(sched)).items()}
    assert statuses == {"completed": "pending", "failed": "pending", "retried": "failed",
                        "expired": "expired", "released": "pending", "cancelled": "cancelled"}
    assert await _lease_mismatches(sched) == []


PARAM_TYPES = {"worker_id": "text", "ids": "text[]", "attempts": "int[]",
               "results": "jsonb[]", "lease_seconds": "float8", "channel": "text",
               "suspects": "text[]"}


def _prepare(text: str, name: str) -> tuple[str, list[str]]:
    """A PREPARE statement for a named query: %(param)s becomes $n in order of use."""
    names: list[str] = []

    def number(m: re.Match) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    query = re.sub(r"%\((\w+)\)s", number, text)
    types = ", ".join(PARAM_TYPES[n] for n in names)
    return f"PREPARE {name} ({types}) AS {query}", names


@pytest.mark.parametrize("query", ["complete_jobs", "heartbeat_jobs", "release_jobs"])
async def test_fenced_writes_probe_the_primary_key_whatever_the_statistics(
        sched, pg_dsn, schema, query):
    """Statistics taken before a drain say no job runs; the generic plan must still look
    each id up by primary key instead of walking every running row per id."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, execution_time) '
            "SELECT 'j' || g, 'noop', now() FROM generate_series(1, 20000) g")
        await conn.execute(f'ANALYZE "{schema}".jobs')
        claimed, _, _ = await sched.store.claim_jobs(
            worker_id="w", limit=500, lease_seconds=60)
        statement, params = _prepare(_bind(_QUERIES[query], schema), "fenced")
        await conn.execute(statement)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        values = {"worker_id": "w", "ids": [j["id"] for j in claimed],
                  "attempts": [1] * len(claimed), "results": ["null"] * len(claimed),
                  "lease_seconds": 60, "channel": sched.store.channel,
                  "suspects": [j["id"] for j in claimed[:1]]}
        arguments = psycopg.sql.SQL(", ").join(
            psycopg.sql.SQL("{}::{}").format(values[p], psycopg.sql.SQL(PARAM_TYPES[p]))
            for p in params)
        cur = await conn.execute(
            psycopg.sql.SQL("EXPLAIN EXECUTE fenced({})").format(arguments))
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "jobs_pkey" in plan, plan
    assert "jobs_running_idx" not in plan and "Seq Scan on jobs" not in plan, plan


async def test_fetcher_holds_back_while_the_completer_lags(sched):
    """Slots count jobs that run; outcomes not yet written may add one batch more, then
    the fetcher waits for the completer instead of taking ever more leases."""
    worker = Worker(Store(sched.store.pool, sched.schema), sched._dsn,
                    fast_options(concurrency=4))
    ctx = worker.ctx
    assert worker.fetcher.free_slots() == 4
    ctx.held = {str(i): None for i in range(4)}  # four finished, not yet written
    assert worker.fetcher.free_slots() == 4
    ctx.executing, ctx.held = 2, {str(i): None for i in range(6)}
    assert worker.fetcher.free_slots() == 2
    ctx.executing, ctx.held = 0, {str(i): None for i in range(8)}
    assert worker.fetcher.free_slots() == 0


async def test_fetcher_waits_for_a_write_in_flight_instead_of_claiming_a_fragment(sched):
    """While the completer's backlog holds the fetcher back, the slots a write in flight
    is about to free are claimed with it, after it: claiming only what the backlog
    allows split a worker of 25 slots into claims of 19 and 6 that kept that split for
    good (the due-latency-load benchmark: 1,091 claims of each, two claims per 25 jobs;
    the worker completed about 2,500 jobs/s of a 4,300 jobs/s stream, which it kept up
    with in a run whose claims stayed whole)."""
    worker = Worker(Store(sched.store.pool, sched.schema), sched._dsn,
                    fast_options(concurrency=25))
    ctx = worker.ctx
    ctx.executing, ctx.held = 0, {str(i): None for i in range(31)}  # 6 over one batch
    ctx.recording = 6  # being written: the backlog shrinks to one batch when it returns
    ctx.recording_since = asyncio.get_running_loop().time()
    assert worker.fetcher.free_slots() == 0
    ctx.recording_since -= WRITE_WAIT_SECONDS  # a write that stopped answering: not waited for
    assert worker.fetcher.free_slots() == 19
    ctx.recording_since += WRITE_WAIT_SECONDS
    ctx.recording = 0  # the completer idle: nothing to wait for, claim what is allowed
    assert worker.fetcher.free_slots() == 19
    ctx.executing, ctx.held, ctx.recording = 0, {str(i): None for i in range(25)}, 25
    assert worker.fetcher.free_slots() == 25  # the backlog holds nothing back: claim all


WHEN = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad, refusal", [
    (JobSpec("noop", execution_time=datetime(2030, 1, 1)), "timezone-aware"),
    (JobSpec("noop", execution_time="2030-01-01T00:00:00Z"), "timezone-aware"),
    (JobSpec("no op", execution_time=WHEN), "invalid task name"),
    (JobSpec("noop", execution_time=WHEN, args=(float("nan"),)), "NaN"),
    (JobSpec("noop", execution_time=WHEN, kwargs={"x": float("inf")}), "NaN/Infinity"),
    (JobSpec("noop", execution_time=WHEN, args=("x" * (1 << 20),)), "limit is"),
    (JobSpec("noop", execution_time=WHEN, args=("a\x00b",)), "NUL"),
    (JobSpec("noop", execution_time=WHEN, kwargs={"k": ["\x00"]}), "NUL"),
    (JobSpec("noop", execution_time=WHEN, args=object()), "list or tuple"),
    (JobSpec("noop", execution_time=WHEN, timeout=float("nan")), "timeout"),
    (JobSpec("noop", execution_time=WHEN, queue="bad queue"), "queue name"),
    (JobSpec("noop", execution_time=WHEN, job_id="a\nb"), "control characters"),
])
async def test_the_plain_spec_fast_path_refuses_what_the_full_check_refuses(sched, bad, refusal):
    # Thousands of plain specs (same task, same time object, no args) go through the fast
    # path before and after the bad one, which shares as much with them as it can.
    plain = [JobSpec("noop", execution_time=WHEN) for _ in range(3000)]
    with pytest.raises(InvalidInput, match=refusal):
        await sched.schedule_bulk([*plain, bad, *plain[:10]])
    assert await sched.store.list_jobs() == []


async def test_plain_specs_keep_their_own_times_and_options(sched):
    later = WHEN + timedelta(hours=1)
    shapes = [JobSpec("noop", execution_time=WHEN), JobSpec("noop", execution_time=later),
              JobSpec("noop"), JobSpec("noop", execution_time=WHEN, priority="critical"),
              JobSpec("noop", execution_time=WHEN, kwargs={})]
    specs = [shapes[i % len(shapes)] for i in range(2000)]
    ids = await sched.schedule_bulk(specs)
    rows = await jobs_by_id(sched)
    now = datetime.now(UTC)
    for job_id, spec in zip(ids, specs, strict=True):
        row = rows[job_id]
        if spec.execution_time is None:
            assert abs(row["execution_time"] - now) < timedelta(minutes=1)
        else:
            assert row["execution_time"] == spec.execution_time
        assert row["priority"] == (1 if spec.priority == "critical" else 5)
        assert (row["args"], row["kwargs"]) == ([], {})


async def test_a_nul_in_arguments_is_refused_in_one_line_not_by_the_server(sched):
    # Before: psycopg.errors.UntranslatableCharacter from the server (jsonb has no NUL).
    with pytest.raises(InvalidInput, match="args contain a NUL"):
        await sched.schedule("noop", args=["a\x00b"])
    with pytest.raises(InvalidInput, match="kwargs contain a NUL"):
        await sched.schedule("noop", kwargs={"k": "\\\x00"})  # a backslash, then a NUL
    assert await sched.schedule("noop", args=["\\u0000"])  # the text \u0000 is no NUL


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_the_reused_json_encoder_writes_what_json_dumps_writes(value):
    assert encode_json(value, "args") == json.dumps(value, allow_nan=False,
                                                    separators=(",", ":"))
    assert json.loads(encode_json(value, "args")) == value  # exactly, floats included


@pytest.mark.parametrize("value, refusal", [
    ([float("nan")], "NaN"), ({"x": [float("-inf")]}, "NaN"), ([object()], "custom objects"),
    ([datetime(2030, 1, 1, tzinfo=UTC)], "custom objects"), ({(1, 2): 3}, "custom objects"),
])
def test_the_reused_json_encoder_refuses_what_json_refuses(value, refusal):
    with pytest.raises(InvalidInput, match=refusal):
        encode_json(value, "args")


def test_a_value_that_contains_itself_is_refused_in_one_line():
    looped: list = [1]
    looped.append({"again": looped})
    with pytest.raises(InvalidInput, match="refers to itself"):
        encode_json(looped, "args")
    assert encode_json([[1]], "args") == "[[1]]"  # nothing left over from the failed call


async def test_a_worker_started_on_a_small_table_completes_by_primary_key_once_it_grows(
        sched, pg_dsn, schema, tmp_path, workers):
    """A worker that starts on a small jobs table prepares its statements there, and
    PostgreSQL keeps a prepared statement's generic plan until jobs is analysed again:
    the completion's, made for a table of a page, read the whole table per batch once a
    stream had filled it (the due-latency-load benchmark: 38M rows read in 1,811
    completions, the worker fell to half its rate). Autovacuum is off here, as it has
    not come round yet in the first minute of a new table."""
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f'ALTER TABLE "{schema}".jobs SET (autovacuum_enabled = off)')
    config = write_config(tmp_path, pg_dsn, schema, heartbeat_seconds=60, lease_seconds=120)
    worker = workers(config)

    async def run_one(job_id: str) -> None:
        await sched.schedule("noop", job_id=job_id)
        await wait_until(lambda: _status(sched, job_id), what=f"{job_id} completed")

    # One completion each, until every connection of the worker's pool has run its
    # prepared completion past PostgreSQL's 5 custom plans (8 jobs were not enough).
    for i in range(30):
        await run_one(f"small-{i}")
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, status, execution_time, finished_at) '
            "SELECT 'old' || g, 'noop', 'completed', now(), now() "
            "FROM generate_series(1, 20000) g")
    for i in range(8):  # on the old code: 8 scans of 20,000 rows
        await run_one(f"grown-{i}")
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0  # its sessions end, and their statistics are written
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT seq_tup_read FROM pg_stat_user_tables WHERE schemaname = %s "
            "AND relname = 'jobs'", [schema])
        (read,) = await cur.fetchone()
    assert read < 20000, f"the worker's statements read {read} rows of jobs by scans"


async def _status(sched, job_id: str) -> bool:
    job = await sched.get_job(job_id)
    return job is not None and job["status"] == "completed"
