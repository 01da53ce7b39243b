"""Adversarial review of the worker's kept cursors (Store._hot_cursor) and claim rows read
as tuples (_ClaimShape): what a kept cursor holds between uses, and what it does after a
statement on it failed."""

import gc

import psycopg


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
