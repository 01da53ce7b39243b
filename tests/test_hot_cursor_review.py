"""Adversarial review of the worker's kept cursors (Store._hot_cursor) and claim rows read
as tuples (_ClaimShape): what a kept cursor holds between uses, and what it does after a
statement on it failed."""

import gc

import psycopg

from tests.conftest import wait_until


def _large_results_held() -> list[int]:
    """The lengths of the large values held by the results of every live psycopg cursor."""
    held = []
    for obj in gc.get_objects():
        if isinstance(obj, psycopg.AsyncCursor | psycopg.Cursor) and obj.pgresult is not None:
            res = obj.pgresult
            values = [res.get_value(r, c) for r in range(res.ntuples)
                      for c in range(res.nfields)]
            held += [len(v) for v in values if v is not None and len(v) > 100_000]
    return held


async def test_a_claim_leaves_no_result_held_after_it_returned(sched):
    # A job's payload may be 1 MiB (MAX_PAYLOAD_BYTES), a claim of 25 such 25 MiB. A cursor
    # kept for a connection and a claim statement name held the last result it read until
    # that connection ran that name again: each claim variant (the flat claim's one per
    # walk bound, the suspect claims) on each pool connection kept its last batch's
    # payloads in libpq's memory, for as long as the worker ran.
    big = "x" * 400_000
    await sched.schedule("noop", kwargs={"blob": big})
    claimed, _, _ = await sched.store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
    assert [len(job["kwargs"]["blob"]) for job in claimed] == [400_000]
    done = await sched.store.complete_jobs(
        worker_id="w", done=[(claimed[0]["id"], claimed[0]["attempts"], "null")])
    assert done == {(claimed[0]["id"], claimed[0]["attempts"])}
    del claimed
    gc.collect()
    assert _large_results_held() == []


async def test_a_kept_cursor_runs_again_after_its_statements_failed(sched, pg_dsn, schema):
    # One connection, so every claim and completion runs on the same kept cursors: each
    # first fails (lock_timeout behind a table lock; then the connection abandoned by
    # Store.bounded), and the next runs of the same names still read the right columns.
    from pgsched.store import NoAnswer, Store, open_pool

    pool = await open_pool(pg_dsn, min_size=1, max_size=1, lock_timeout_seconds=0.2)
    try:
        store = Store(pool, schema)
        ids = [await sched.schedule("noop", args=(n,)) for n in range(3)]
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'LOCK TABLE "{schema}".jobs IN ACCESS EXCLUSIVE MODE')
            for _ in range(2):
                try:
                    await store.claim_jobs(worker_id="w", limit=1, lease_seconds=60)
                except psycopg.errors.LockNotAvailable:
                    pass
                else:
                    raise AssertionError("claimed through an exclusive lock")
            await locker.rollback()
        claimed, _, db_now = await store.claim_jobs(worker_id="w", limit=1, lease_seconds=60)
        assert [job["args"] for job in claimed] == [[0]] and claimed[0]["id"] == ids[0]
        assert claimed[0]["expired"] is False and db_now is not None
        done = [(claimed[0]["id"], claimed[0]["attempts"], "1")]
        async with await psycopg.AsyncConnection.connect(pg_dsn) as locker:
            await locker.execute(f'SELECT 1 FROM "{schema}".jobs WHERE id = %s FOR UPDATE',
                                 (claimed[0]["id"],))
            with Store.bounded(0.05):  # before lock_timeout: the connection is shut down
                try:
                    await store.complete_jobs(worker_id="w", done=done)
                except NoAnswer:
                    pass
                else:
                    raise AssertionError("completed through a row lock")
            # The abandoned write still waits on the server: ended before the lock is let
            # go, or it would commit after all (an outcome this test is not about).
            await locker.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE %s AND pid <> pg_backend_pid()",
                (f'%UPDATE "{schema}".jobs AS j SET%status = \'completed\'%',))
            await wait_until(lambda: _waiting(pg_dsn, schema) == 0)
            await locker.rollback()
        assert await store.complete_jobs(worker_id="w", done=done) == {done[0][:2]}
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert sorted(job["args"][0] for job in claimed) == [1, 2]
        assert await store.complete_jobs(
            worker_id="w", done=[(j["id"], j["attempts"], "2") for j in claimed]) == {
                (j["id"], j["attempts"]) for j in claimed}
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert claimed == []
        # The cursors of the abandoned connection are not kept (nor it, through them).
        assert not [key for key in getattr(store, "_hot_cursors", {}) if key[0].closed]
    finally:
        await pool.close()


def _waiting(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s"
                           " AND wait_event_type = 'Lock'",
                           (f'%UPDATE "{schema}".jobs AS j SET%',)).fetchone()
        return row[0] if row else 0


_JOB_COLUMNS = {"id", "task", "queue", "args", "kwargs", "priority", "execution_time",
                "attempts", "failures", "max_retries", "timeout_seconds", "expired",
                "schedule_id", "fire_time"}


async def test_every_claim_variant_reads_its_jobs_by_name(sched, db):
    # Each variant read as tuples (its own _ClaimShape, on its own kept cursor), run twice
    # so the second run reads with the columns cached from the first: the flat claim, the
    # per-queue claim of a worker of listed queues (claim_jobs_unlimited), the claim with
    # global limits (claim_jobs), the suspect claims, an expired job and one whose args
    # cannot be decoded.
    store = sched.store
    deep = "[" * 2000 + "]" * 2000
    names = []
    for variant in range(2):
        ids = [await sched.schedule("noop", args=(variant, n), kwargs={"k": n},
                                    priority=n) for n in range(2)]
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert sorted((j["id"], j["args"], j["kwargs"], j["priority"]) for j in claimed) == \
            sorted((ids[n], [variant, n], {"k": n}, n) for n in range(2))
        q = await sched.schedule("noop", args=("q", variant), queue="other")
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60,
                                               queues=["other"])
        assert [(j["id"], j["args"], j["queue"]) for j in claimed] == \
            [(q, ["q", variant], "other")]
        s = await sched.schedule("noop", args=("s", variant))
        db("UPDATE jobs SET suspect = true WHERE id = %s", s)
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60,
                                               suspects=True)
        assert [(j["id"], j["args"]) for j in claimed] == [(s, ["s", variant])]
        e = await sched.schedule("noop", args=("e", variant), misfire_grace_time=1)
        db("UPDATE jobs SET execution_time = now() - interval '1 hour', args = %s::jsonb"
           " WHERE id = %s", deep if variant else '["e"]', e)
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert [(j["id"], j["expired"]) for j in claimed] == [(e, True)]
        assert ("undecodable" in claimed[0]) == bool(variant)
        u = await sched.schedule("noop")
        db("UPDATE jobs SET args = %s::jsonb WHERE id = %s", deep, u)
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert [(j["id"], j["args"], j["expired"]) for j in claimed] == [(u, [], False)]
        assert "undecodable" in claimed[0]
        await store.set_queue_limits("limited", global_concurrency=5, set_concurrency=True)
        g = await sched.schedule("noop", args=("g", variant), queue="limited")
        claimed, _, _ = await store.claim_jobs(worker_id="w", limit=5, lease_seconds=60)
        assert [(j["id"], j["args"]) for j in claimed] == [(g, ["g", variant])]
        assert _JOB_COLUMNS <= set(claimed[0]) <= _JOB_COLUMNS | {"next_due", "db_now"}
        claimed, _, db_now = await store.claim_jobs(worker_id="w", limit=5,
                                                    lease_seconds=60)
        assert claimed == [] and db_now is not None
        await store.set_queue_limits("limited", global_concurrency=None,
                                     set_concurrency=True)
        names = sorted(getattr(store, "_claim_shapes", {}))
    # the variants ran (no shapes on main)
    assert not names or {"claim_jobs", "claim_jobs_unlimited",
                         "claim_jobs_unlimited/suspects"} < set(names)
