"""Global limits per queue (global_concurrency, rate) against a real PostgreSQL: the claim
enforces them across claimers, real worker processes never exceed them, and unlimited
queues are untouched. Parsing the values is pure logic, tested first."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import psycopg
import pytest
from conftest import audit_env, claim_params, run_cli, wait_until, write_config

from pgsched import InvalidInput, JobSpec
from pgsched.queues import check_global_concurrency, parse_rate
from pgsched.store import Store, open_pool

# -- values --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "jobs", "seconds"), [
    ("100/1m", 100, 60.0), ("10/s", 10, 1.0), ("5 / 30s", 5, 30.0), ("1/7d", 1, 604800.0),
    ("2147483647/1h", 2**31 - 1, 3600.0)])
def test_rates_parse(text, jobs, seconds):
    assert parse_rate(text) == (jobs, seconds)


@pytest.mark.parametrize("text", ["", "100", "0/1m", "-1/1m", "1.5/1m", "10/0s", "10/500ms",
                                  "10/8d", "2147483648/1m", "a/b", "1/1m/2", None, 5])
def test_bad_rates_are_refused_in_one_line(text):
    with pytest.raises(InvalidInput, match="invalid rate") as info:
        parse_rate(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -1, 2**31, True, 1.5, "3"])
def test_bad_global_concurrency_is_refused(value):
    with pytest.raises(InvalidInput, match="invalid global concurrency"):
        check_global_concurrency(value)


# -- the claim -----------------------------------------------------------------------


async def claim(store: Store, worker: str, limit: int = 10, queues=None) -> list[str]:
    jobs, _, _ = await store.claim_jobs(worker_id=worker, limit=limit, lease_seconds=30,
                                        queues=queues)
    return [job["id"] for job in jobs]


async def running(pg_dsn: str, schema: str, queue: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            f'SELECT count(*) FROM "{schema}".jobs WHERE status = \'running\' AND queue = %s',
            [queue])
        return (await cur.fetchone())[0]


def test_the_claim_block_makes_a_statement_with_limits_and_a_cheaper_one_without():
    from pgsched.store import _QUERIES

    limited, unlimited = _QUERIES["claim_jobs"], _QUERIES["claim_jobs_unlimited"]
    assert "{schema}.claim_room(" in limited and "count_starts(" in limited
    assert "{schema}.claim_room(" not in unlimited and "count_starts(" not in unlimited
    assert "-- if limits" not in limited + unlimited and "-- else" not in limited + unlimited
    # What both share is one text: everything up to the limits part is the same (the
    # statements are sent without their comments: store._compact).
    shared = limited.index("limited AS (")
    assert shared == unlimited.index("served AS (")
    assert limited[:shared] == unlimited[:shared]
    assert limited.endswith(unlimited[unlimited.rindex("EXISTS (SELECT 1"):])


async def tuples_read(conn: psycopg.AsyncConnection, schema: str) -> int:
    """Rows and index entries of jobs this session has read and not yet reported: what
    EXPLAIN does not show, the statements inside claim_room included."""
    cur = await conn.execute(
        "SELECT sum(pg_stat_get_xact_tuples_returned(c.oid))::bigint FROM pg_class c "
        "WHERE c.oid = %s::regclass OR c.oid IN "
        "(SELECT indexrelid FROM pg_index WHERE indrelid = %s::regclass)",
        [f'"{schema}".jobs'] * 2)
    return (await cur.fetchone())[0]


async def test_a_queue_held_at_its_limit_reads_none_of_its_jobs_due_later(sched):
    """Structural, not timed: a queue at its global limit with jobs due now, which the
    limit holds back, and 20,000 due later. claim_room asks whether the limit held any
    back: a probe per priority of the due rows, which must stop at the first. (Seen
    failing while 0020 left the probe without an index: 6 sequential scans, 300,036 rows
    a claim with 50,000 due later.)"""
    await sched.store.set_queue_limits("q", global_concurrency=2, set_concurrency=True)
    for job_id in ("r1", "r2", "d1", "d2", "d3"):
        await sched.schedule("noop", job_id=job_id, queue="q")
    assert await claim(sched.store, "w", limit=2) == ["r1", "r2"]
    # Without the fixture pool's statement_timeout (1 s, a worker's), which 20,000 rows
    # come near on a loaded machine.
    async with sched.store.pool.connection() as conn:
        await conn.execute("SET statement_timeout = 0")
        await conn.execute(psycopg.sql.SQL(
            "INSERT INTO {} (id, task, queue, execution_time) SELECT 'f' || g, 'noop', 'q', "
            "now() + make_interval(mins => g) FROM generate_series(1, 20000) g").format(
                psycopg.sql.Identifier(sched.schema, "jobs")))
        await conn.execute(f'ANALYZE "{sched.schema}".jobs')
        await conn.execute("RESET statement_timeout")  # the pool's again
    async with sched.store.pool.connection() as conn, conn.transaction(force_rollback=True):
        before = await tuples_read(conn, sched.schema)
        cur = await conn.execute(sched.store._q["claim_jobs"], claim_params(worker_id="w2"))
        ids = [c.name for c in cur.description].index("id")
        claimed = [r[ids] for r in await cur.fetchall()]
        read = await tuples_read(conn, sched.schema) - before
    assert claimed == [None]  # the limit holds the three due jobs back
    print("rows read", read)
    assert read < 100, read


async def test_a_worker_on_the_cheaper_claim_obeys_a_limit_set_meanwhile(sched):
    """A store starts on claim_jobs_unlimited; the first claim after a limit appears takes
    nothing with it and claims again, at once, with the limit; once the limit is gone
    the store goes back to the cheaper statement."""
    store = sched.store
    for _ in range(6):
        await sched.schedule("noop", queue="lim")
    assert await claim(store, "w0", limit=1, queues=["lim"])  # no limit yet: the cheap one
    assert store._claim_limits is False
    await store.set_queue_limits("lim", global_concurrency=2, set_concurrency=True)
    assert len(await claim(store, "w1", queues=["lim"])) == 1  # 1 running + 1 = the limit
    assert store._claim_limits is True
    assert await claim(store, "w2", queues=["lim"]) == []
    await store.set_queue_limits("lim", global_concurrency=None, set_concurrency=True)
    assert len(await claim(store, "w3", queues=["lim"])) == 4  # no limit: the rest
    assert store._claim_limits is False


async def test_claims_sharing_a_store_each_claim_when_a_limit_appears(sched, pg_dsn, schema):
    """Two claimers share one store (two Workers on Scheduler.store): both start on the
    cheaper statement and both find the limit that appeared. Each must claim again with
    it, not only the first to flip the store's choice."""
    await sched.schedule_bulk([JobSpec("noop", queue="q") for _ in range(4)])
    # On another queue: claims of q itself would skip each other's hold of its limit row.
    await sched.store.set_queue_limits("other", global_concurrency=5, set_concurrency=True)
    pool = await open_pool(pg_dsn, max_size=2)
    try:
        store = Store(pool, schema)
        got = await asyncio.gather(*(
            store.claim_jobs(worker_id=f"w{i}", limit=1, lease_seconds=30, queues=["q"])
            for i in range(2)))
        assert [len(jobs) for jobs, _, _ in got] == [1, 1]
    finally:
        await pool.close()


async def test_a_claim_returns_every_job_it_took_while_another_saw_the_limit_go(
        sched, pg_dsn, schema):
    """A claim on the limited statement whose snapshot still holds a limit ends after
    another claim of the same store saw the last limit go. What it claimed is the worker's:
    it must come back, not be dropped by a claim run again (the jobs would stay running,
    leased to a worker that never runs them)."""
    gated = await sched.schedule("noop", queue="gated")
    await sched.store.set_queue_limits("other", global_concurrency=5, set_concurrency=True)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as holder:
        # Holds the claim of queue `gated` after its snapshot, inside its UPDATE.
        await holder.execute(f"""
            CREATE FUNCTION "{schema}".gate() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
            CREATE TRIGGER gate BEFORE UPDATE ON "{schema}".jobs FOR EACH ROW
                WHEN (NEW.queue = 'gated') EXECUTE FUNCTION "{schema}".gate()""")
        await holder.execute("SELECT pg_advisory_lock(4242)")
        pool = await open_pool(pg_dsn, max_size=2)
        try:
            store = Store(pool, schema)
            assert await claim(store, "w0", queues=["free"]) == []  # now on claim_jobs
            held = asyncio.create_task(claim(store, "wa", queues=["gated"]))

            async def gate_waits() -> bool:
                cur = await holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND objid = 4242 AND NOT granted")
                return (await cur.fetchone())[0] == 1

            await wait_until(gate_waits, what="the gated claim to wait")
            await sched.store.set_queue_limits("other", global_concurrency=None,
                                               set_concurrency=True)
            assert await claim(store, "wb", queues=["free"]) == []  # saw no limit
            await holder.execute("SELECT pg_advisory_unlock(4242)")
            assert await held == [gated]
        finally:
            await pool.close()
    assert (await sched.get_job(gated))["worker_id"] == "wa"


async def test_concurrent_claims_never_exceed_global_concurrency(sched, pg_dsn, schema):
    await sched.schedule_bulk([JobSpec("noop", queue="q") for _ in range(200)])
    await sched.store.set_queue_limits("q", global_concurrency=7, set_concurrency=True)
    pool = await open_pool(pg_dsn, max_size=12)
    try:
        store = Store(pool, schema)
        # Twelve claimers at once, each asking for ten: one claim holds the queue's row
        # at a time, the others skip it (room 0), so seven in total start.
        got = await asyncio.gather(*(claim(store, f"w{i}") for i in range(12)))
        assert sum(map(len, got)) == 7
        assert await running(pg_dsn, schema, "q") == 7
        # Room comes back as jobs end, never more.
        assert await claim(store, "again") == []
        first = next(ids for ids in got if ids)
        worker = f"w{got.index(first)}"
        await store.complete_jobs(worker_id=worker, done=[(i, 1, "null") for i in first[:2]])
        assert len(await claim(store, "again")) == 2
        assert await running(pg_dsn, schema, "q") == 7
    finally:
        await pool.close()


async def test_rate_counts_starts_in_a_sliding_window(sched, pg_dsn, schema):
    await sched.schedule_bulk([JobSpec("noop", queue="r") for _ in range(50)])
    await sched.store.set_queue_limits("r", rate=(4, 2.0), set_rate=True)
    started = []
    deadline = asyncio.get_running_loop().time() + 5
    while asyncio.get_running_loop().time() < deadline:
        started += await claim(sched.store, "w", limit=3)
        await asyncio.sleep(0.05)
    times = await started_times(pg_dsn, schema, "r")
    assert len(times) == len(started) >= 8  # the rate lets jobs go on, window by window
    assert max_in_window(times, timedelta(seconds=2)) <= 4


async def test_a_locked_limit_row_holds_back_only_its_queue(sched, pg_dsn, schema):
    free = await sched.schedule("noop", queue="free")
    await sched.schedule("noop", queue="q")
    await sched.store.set_queue_limits("q", global_concurrency=5, set_concurrency=True)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as holder:
        # An operator's open transaction holds the limit row (or a claim that hangs).
        await holder.execute(f'SELECT * FROM "{schema}".queue_limits FOR UPDATE')
        jobs, next_due, db_now = await sched.store.claim_jobs(
            worker_id="w", limit=10, lease_seconds=30)
        assert [j["id"] for j in jobs] == [free]
        # ... and the worker is told to look again soon, not at the next poll.
        assert next_due - db_now < timedelta(seconds=1)
        await holder.rollback()
    assert len(await claim(sched.store, "w")) == 1


async def test_limits_are_checked_by_the_database_too(sched, pg_dsn, schema):
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        for values in ("('a', 0, NULL, NULL)", "('a', -3, NULL, NULL)",
                       "('a', NULL, 0, 60)", "('a', NULL, 5, 0.5)", "('a', NULL, 5, NULL)"):
            with pytest.raises(psycopg.errors.CheckViolation):
                await conn.execute(
                    f'INSERT INTO "{schema}".queue_limits (queue, global_concurrency, '
                    f"rate_jobs, rate_period_seconds) VALUES {values}")


async def test_huge_limits_and_removed_limits_leave_the_queue_unlimited(sched):
    await sched.schedule_bulk([JobSpec("noop", queue="h") for _ in range(20)])
    await sched.store.set_queue_limits("h", global_concurrency=2**31 - 1,
                                       rate=(2**31 - 1, 1.0), set_concurrency=True,
                                       set_rate=True)
    assert len(await claim(sched.store, "w", limit=5)) == 5
    await sched.store.set_queue_limits("h", global_concurrency=1, set_concurrency=True)
    assert await claim(sched.store, "w") == []  # lowered below what runs: nothing starts
    assert await sched.store.set_queue_limits(
        "h", set_concurrency=True, set_rate=True) is None  # both removed: the row goes
    assert len(await claim(sched.store, "w")) == 10


async def started_times(pg_dsn: str, schema: str, queue: str) -> list[datetime]:
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        cur = await conn.execute(
            f'SELECT started_at FROM "{schema}".jobs WHERE queue = %s AND started_at IS NOT '
            "NULL ORDER BY started_at", [queue])
        return [row[0] for row in await cur.fetchall()]


def max_in_window(times: list[datetime], window: timedelta) -> int:
    """The most starts in any half-open window of that length (times sorted)."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - window:
            first += 1
        best = max(best, last - first + 1)
    return best


# -- real worker processes -----------------------------------------------------------


async def test_three_workers_never_run_more_than_global_concurrency(
        sched, pg_dsn, schema, tmp_path, workers):
    config = write_config(tmp_path, pg_dsn, schema, concurrency=8)
    # Set by the workers' own file when they start: the limit then lives in the database.
    config.write_text(config.read_text() + "\n[queues.lim]\nglobal_concurrency = 3\n")
    env = audit_env(pg_dsn, schema)
    ids = [await sched.schedule("span", args=(f"k{i}", 0.3), queue="lim") for i in range(24)]
    for _ in range(3):
        workers(config, env=env)
    await wait_until(lambda: jobs_done(sched, ids), timeout=90, what="24 limited jobs done")
    spans = audited_spans(pg_dsn, schema)
    assert len(spans) == 24
    assert max_overlap(spans) <= 3
    limits = await sched.store.queue_limits("lim")
    assert limits[0]["global_concurrency"] == 3 and "config of worker" in limits[0]["set_by"]


async def test_three_workers_keep_a_rate_set_while_they_run(
        sched, pg_dsn, schema, tmp_path, workers):
    config = write_config(tmp_path, pg_dsn, schema, concurrency=8)
    env = audit_env(pg_dsn, schema)
    for _ in range(3):
        workers(config, env=env)
    ids = [await sched.schedule("noop", queue="rq") for _ in range(3)]
    await wait_until(lambda: jobs_done(sched, ids), what="unlimited start")
    result = run_cli("queue", "limit", "rq", "--rate", "4/1s", config=config)
    assert result.returncode == 0, result.stderr
    ids = [await sched.schedule("noop", queue="rq") for _ in range(14)]
    await wait_until(lambda: jobs_done(sched, ids), timeout=60, what="14 rated jobs done")
    times = [(await sched.get_job(i))["started_at"] for i in ids]
    assert max_in_window(sorted(times), timedelta(seconds=1)) <= 4


async def jobs_done(sched, ids) -> bool:
    return [(await sched.get_job(i))["status"] for i in ids] == ["completed"] * len(ids)


def audited_spans(pg_dsn: str, schema: str) -> list[tuple[datetime, datetime]]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT split_part(key, ':', 1), min(at) FILTER (WHERE key LIKE '%%:start'), "
            f"max(at) FILTER (WHERE key LIKE '%%:end') FROM \"{schema}\".audit "
            "GROUP BY 1").fetchall()
    return [(start, end) for _, start, end in rows]


def max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    """The most spans open at one instant (an end and a start at the same instant do
    not overlap)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = open_now = 0
    for _, step in events:
        open_now += step
        best = max(best, open_now)
    return best


async def test_queue_limit_command_sets_shows_and_refuses(sched, pg_dsn, schema, tmp_path):
    config = write_config(tmp_path, pg_dsn, schema)
    for args, wrong in [(("--global-concurrency", "0"), "invalid global concurrency 0"),
                        (("--global-concurrency", "x"), "'x' is not a whole number"),
                        (("--rate", "5/0s"), "--rate: invalid rate '5/0s'"),
                        (("--clear", "--rate", "5/1s"), "--clear removes both")]:
        result = run_cli("queue", "limit", "q", *args, config=config)
        assert result.returncode != 0 and wrong in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    assert await sched.store.queue_limits() == []  # nothing half-written
    result = run_cli("queue", "limit", "q", "--global-concurrency", "4", "--rate", "100/1m",
                     "--json", config=config)
    assert result.returncode == 0, result.stderr
    shown = json.loads(run_cli("queue", "limit", "--json", config=config).stdout)
    assert [(r["queue"], r["global_concurrency"], r["rate"]) for r in shown] == [
        ("q", 4, "100/1m")]
    run_cli("queue", "limit", "q", "--rate", "none", config=config)
    assert (await sched.store.queue_limits("q"))[0]["rate_jobs"] is None
    result = run_cli("queue", "limit", "q", "--clear", config=config)
    assert result.returncode == 0 and await sched.store.queue_limits() == []
    assert "q: no global limits" in run_cli("queue", "limit", "q", config=config).stdout
