"""A stateful property test of the job lifecycle: the real Store against a real PostgreSQL.

Three simulated workers claim, heartbeat, complete, fail, release and finish cancelled
jobs; an operator schedules (IGNORE or REPLACE an existing id, one job or several),
cancels pending and running jobs, and retries finished ones; leases expire and orphan
recovery takes the jobs back, all in any order hypothesis chooses. No worker process and
no mock: each rule is one Store call, as the worker or the CLI would make it.

Time: every query takes now() from the database clock, and claims take a 60 s lease, so a
lease never ends by itself within an example. Leases expire when the `expire_leases`
rules move `lease_until` into the past, which is the row a real expiry leaves behind.
A "late" job was due an hour ago with a 10 minute misfire grace: its first claim expires
it, while a retry or a recovery (due again now, or started in time) runs it.

The reference model is small: `current` maps a running job to the claim (a Run: worker,
attempt and a token unique to that claim) that owns it; a worker keeps every Run it was
ever handed and may use a stale one at any time, as a hung or partitioned worker would.
Checked after every step, against the rows:
- the fence: a step changes only the rows it is entitled to change (a write by a Run
  that is not the current owner changes nothing, and a rule checks what it got back);
- `attempts` never decreases for a job id;
- every row is in exactly one consistent state (running: a worker and a lease; pending:
  neither; finished: a finish time and no lease; completed: a result), and the model
  agrees on who runs what;
- a finished row (completion included) never changes again, except through an explicit
  replace or retry.

Recovery judges a crash once per worker (a recorded crash with no job heartbeat since is
the same one): it counts against the job the worker ran when it ran only one, against
none when it ran several, and every job it puts back is a suspect, which only a suspect
claim takes (the `recover_orphans` and `claim_jobs` blocks in sql/queries.sql); the
model does the same.

Run longer: PGSCHED_LIFECYCLE_PROFILE=long (2,000 examples of up to 60 steps).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from pgsched.store import FINISHED_STATUSES, NewJob, Store, open_pool

PROFILES = {
    "ci": settings(max_examples=120, stateful_step_count=40, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow]),
    "long": settings(max_examples=2000, stateful_step_count=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow]),
}
PROFILE = os.environ.get("PGSCHED_LIFECYCLE_PROFILE", "ci")

WORKERS = ("w1", "w2", "w3")
JOB_IDS = ("j1", "j2", "j3", "j4", "j5")
LEASE_SECONDS = 60.0  # never ends on its own within an example: expire_leases ends it
LATE_ODDS = st.sampled_from((False, False, False, True))  # most jobs are due now
LATE = timedelta(hours=1)  # how long before its scheduling a late job was due
GRACE_SECONDS = 600.0  # a late job's misfire grace: longer than any example
MAX_RECOVERIES = 2
RETRYABLE = ("failed", "cancelled", "expired")  # what an operator's retry may pick
FAR_FUTURE = datetime(2999, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Run:
    """One claim, as the worker that made it remembers it; `token` is unique per claim,
    so two claims that the database numbers alike (bug 4) stay apart in the model."""

    token: int
    worker: str
    job_id: str
    attempt: int

    @property
    def held(self) -> list[tuple[str, int]]:
        return [(self.job_id, self.attempt)]


class Database:
    """The store under test, driven from synchronous rules on a private event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Store):
        self.loop = loop
        self.store = store

    def call(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def execute(self, query: str, params: Any = ()) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            async with self.store.pool.connection() as conn:
                cur = conn.cursor(row_factory=psycopg.rows.dict_row)
                await cur.execute(sql.SQL(query).format(
                    jobs=self._jobs(),
                    crashes=sql.Identifier(self.store.schema, "worker_crashes")), params)
                return await cur.fetchall() if cur.description else []

        return self.call(run())

    def _jobs(self) -> sql.Composed:
        return sql.SQL("{}.jobs").format(sql.Identifier(self.store.schema))

    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["id"]: row for row in self.execute("SELECT * FROM {jobs}")}


def new_job(job_id: str, max_retries: int, due: datetime | None = None) -> NewJob:
    """A job due now (`due` None), or due at `due` with a misfire grace (a late job)."""
    return NewJob(id=job_id, task="t", queue="default", args="[]", kwargs="{}", priority=5,
                  execution_time=due, misfire_grace_seconds=None if due is None else GRACE_SECONDS,
                  max_retries=max_retries, timeout_seconds=None)


def misfired(row: dict[str, Any], now: datetime) -> bool:
    """Whether a claim at `now` expires this pending row: it has not started since it fell
    due (new, replaced, retried, or due again after a failure) and its grace ended."""
    grace = row["misfire_grace_seconds"]
    not_started = row["started_at"] is None or row["started_at"] < row["execution_time"]
    return (grace is not None and not_started
            and now > row["execution_time"] + timedelta(seconds=grace))


class JobLifecycle(RuleBasedStateMachine):
    db: Database  # set by the test, on a subclass

    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        self.db.execute("TRUNCATE {jobs}")
        self.seen: dict[str, dict[str, Any]] = {}  # the rows after the previous step
        self.may_change: set[str] = set()  # ids the current step is entitled to change
        self.current: dict[str, Run] = {}  # running job id -> the claim that owns it
        self.max_attempts: dict[str, int] = {}
        self.finished: dict[str, dict[str, Any]] = {}  # finished rows, frozen until reset
        self.tokens = itertools.count(1)

    # -- operator -------------------------------------------------------------------------

    @initialize(job_ids=st.lists(st.sampled_from(JOB_IDS), min_size=1, unique=True),
                max_retries=st.integers(0, 2))
    def start_with_jobs(self, job_ids: list[str], max_retries: int) -> None:
        """Every example starts with work to claim (claims of nothing teach little)."""
        self._schedule(job_ids, max_retries, replace=False, late=False)

    @rule(job_id=st.sampled_from(JOB_IDS), max_retries=st.integers(0, 2),
          replace=st.booleans(), late=LATE_ODDS)
    def schedule(self, job_id: str, max_retries: int, replace: bool, late: bool) -> None:
        self._schedule([job_id], max_retries, replace, late)

    @rule(job_ids=st.lists(st.sampled_from(JOB_IDS), min_size=2, max_size=3, unique=True),
          max_retries=st.integers(0, 2), replace=st.booleans(), late=LATE_ODDS)
    def schedule_bulk(self, job_ids: list[str], max_retries: int, replace: bool,
                      late: bool) -> None:
        self._schedule(job_ids, max_retries, replace, late)

    def _schedule(self, job_ids: list[str], max_retries: int, replace: bool,
                  late: bool) -> None:
        due = self.db.call(self.db.store.db_now()) - LATE if late else None
        jobs = [new_job(job_id, max_retries, due) for job_id in job_ids]
        written = self.db.call(self.db.store.insert_jobs(jobs, replace=replace))
        expected = {job_id for job_id in job_ids if job_id not in self.seen
                    or (replace and self.seen[job_id]["status"] != "running")}
        assert written == expected, f"schedule(replace={replace}) wrote {written}"
        self.may_change = expected
        for job_id in expected:
            self.finished.pop(job_id, None)  # scheduled again from scratch: a new history
        rows = self.db.rows()
        for job_id in expected:
            assert rows[job_id]["status"] == "pending"
            assert rows[job_id]["max_retries"] == max_retries

    @rule(job_id=st.sampled_from(JOB_IDS), pending_only=st.booleans())
    def cancel(self, job_id: str, pending_only: bool) -> None:
        if pending_only:
            self._cancel_pending(job_id)
        else:
            self._request_cancel(job_id)

    def _request_cancel(self, job_id: str) -> None:
        """`pgsched cancel`: pending jobs end at once, running ones are marked."""
        status = self._status(job_id)
        got = self.db.call(self.db.store.request_cancel(ids=[job_id]))
        expected = {"pending": {job_id: "cancelled"}, "running": {job_id: "running"}}
        assert got == expected.get(status, {}), f"cancel of a {status} job: {got}"
        self.may_change = set(got)
        if status == "running":
            row = self.db.rows()[job_id]
            assert row["cancel_requested_at"] is not None
            assert row["worker_id"] == self.seen[job_id]["worker_id"]

    def _cancel_pending(self, job_id: str) -> None:
        """Scheduler.cancel: only a pending job is cancelled."""
        got = self.db.call(self.db.store.cancel_jobs([job_id]))
        assert got == ({job_id} if self._status(job_id) == "pending" else set())
        self.may_change = got

    @rule(job_id=st.sampled_from(JOB_IDS))
    def retry(self, job_id: str) -> None:
        """`pgsched retry ID`: a failed, cancelled or expired job goes back to pending."""
        got = self.db.call(self.db.store.retry_jobs(
            statuses=RETRYABLE, cutoff=FAR_FUTURE, limit=10, ids=[job_id]))
        assert got == ([job_id] if self._status(job_id) in RETRYABLE else [])
        self.may_change = set(got)
        if got:
            self.finished.pop(job_id)
            row = self.db.rows()[job_id]
            assert row["status"] == "pending"
            assert row["attempts"] == self.seen[job_id]["attempts"]

    # -- time -----------------------------------------------------------------------------

    @rule(run=runs)
    def expire_leases(self, run: Run) -> None:
        """The leases of every job run.worker runs end (it froze, or lost the network);
        drawn from the claims so that it mostly picks a worker that holds something."""
        self.may_change = self._expire(run.worker)

    @rule(max_recoveries=st.integers(1, 3))
    def recover_orphans(self, max_recoveries: int) -> None:
        self.may_change = self._recover(max_recoveries)

    @rule(run=runs, max_recoveries=st.integers(1, 3))
    def crash(self, run: Run, max_recoveries: int) -> None:
        """run.worker dies and another worker's recovery takes its jobs back at once (the
        two rules above, in one step, so that hypothesis reaches recoveries often)."""
        self.may_change = self._expire(run.worker) | self._recover(max_recoveries)

    def _expire(self, worker: str) -> set[str]:
        changed = self.db.execute(
            "UPDATE {jobs} SET lease_until = now() - interval '1 second'"
            " WHERE worker_id = %s AND status = 'running' RETURNING id", [worker])
        return {row["id"] for row in changed}

    def _recover(self, max_recoveries: int) -> set[str]:
        rows = self.db.rows()
        now = self.db.call(self.db.store.db_now())
        lapsed = {job_id for job_id, row in rows.items()
                  if row["status"] == "running" and row["lease_until"] < now}
        records = {r["worker_id"]: r["counted_at"] for r in self.db.execute(
            "SELECT c.* FROM {crashes} c")}
        got = self.db.call(self.db.store.recover_orphans(max_recoveries=max_recoveries))
        assert {row["id"] for row in got} == lapsed, f"recovered {got}, lapsed {lapsed}"
        # A crash is judged once per worker (a record, and no job heartbeat since, is the
        # same crash), and counted only against a job its worker ran alone.
        blamed = set()
        for worker in {rows[j]["worker_id"] for j in lapsed}:
            running = {j for j, row in rows.items()
                       if row["status"] == "running" and row["worker_id"] == worker}
            judged = worker not in records or any(
                rows[j]["heartbeat_at"] > records[worker] for j in running)
            if judged and len(running) == 1:
                blamed |= running
        for row in got:
            before = rows[row["id"]]
            counted = row["id"] in blamed
            assert self.db.rows()[row["id"]]["recoveries"] == before["recoveries"] + counted
            if before["cancel_requested_at"] is not None:
                expected = "cancelled"
            elif counted and before["recoveries"] + 1 >= max_recoveries:
                expected = "failed"
            else:
                expected = "pending"
            assert row["status"] == expected, f"recovered {before} as {row}"
            del self.current[row["id"]]
        return lapsed

    # -- workers --------------------------------------------------------------------------

    @rule(target=runs, worker=st.sampled_from(WORKERS), limit=st.integers(1, 3),
          suspects=st.booleans())
    def claim(self, worker: str, limit: int, suspects: bool) -> Any:
        pending = {job_id for job_id, row in self.seen.items()
                   if row["status"] == "pending" and row["suspect"] == suspects}
        now = self.db.call(self.db.store.db_now())
        claimed, _, _ = self.db.call(self.db.store.claim_jobs(
            worker_id=worker, limit=limit, lease_seconds=LEASE_SECONDS, suspects=suspects))
        ids = {row["id"] for row in claimed}
        # Every pending job is due: jobs are due now, retries and releases too. A suspect
        # claim takes one.
        assert ids <= pending and len(ids) == min(1 if suspects else limit, len(pending)), (
            ids, pending)
        self.may_change = ids
        new_runs = []
        for row in claimed:
            before = self.seen[row["id"]]
            assert row["expired"] == misfired(before, now), f"claimed {before} as {row}"
            if row["expired"]:
                assert row["attempts"] == before["attempts"]
                continue
            assert row["attempts"] == before["attempts"] + 1
            run = Run(next(self.tokens), worker, row["id"], row["attempts"])
            self.current[run.job_id] = run
            new_runs.append(run)
        return multiple(*new_runs)

    @rule(run=runs)
    def heartbeat(self, run: Run) -> None:
        # Keyed by (id, attempt): the worker tells its attempts of one job apart.
        got = {job_id: cancel for (job_id, _), cancel in self.db.call(
            self.db.store.heartbeat_jobs(
                worker_id=run.worker, held=run.held, lease_seconds=LEASE_SECONDS)).items()}
        if self._fenced(run, set(got)):
            requested = self.seen[run.job_id]["cancel_requested_at"] is not None
            assert got[run.job_id] == requested, f"heartbeat of {self.seen[run.job_id]}: {got}"

    @rule(run=runs)
    def complete(self, run: Run) -> None:
        result = json.dumps({"token": run.token})
        got = self.db.call(self.db.store.complete_jobs(
            worker_id=run.worker, done=[(run.job_id, run.attempt, result)]))
        assert got <= {(run.job_id, run.attempt)}, got
        if self._fenced(run, {job_id for job_id, _ in got}):
            del self.current[run.job_id]
            row = self.db.rows()[run.job_id]
            assert row["status"] == "completed" and row["result"] == {"token": run.token}

    @rule(run=runs)
    def fail(self, run: Run) -> None:
        got = self.db.call(self.db.store.fail_job(
            worker_id=run.worker, job_id=run.job_id, attempt=run.attempt, error="boom",
            traceback=None, retry_delay_seconds=0))
        if self._fenced(run, set() if got is None else {run.job_id}):
            del self.current[run.job_id]
            before = self.seen[run.job_id]
            if before["cancel_requested_at"] is not None:
                expected = "cancelled"
            elif before["failures"] + 1 <= before["max_retries"]:
                expected = "pending"
            else:
                expected = "failed"
            assert got["status"] == expected, f"failed {before} as {got}"

    @rule(run=runs)
    def release(self, run: Run) -> None:
        got = self.db.call(self.db.store.release_jobs(worker_id=run.worker, held=run.held))
        if self._fenced(run, got):
            del self.current[run.job_id]
            requested = self.seen[run.job_id]["cancel_requested_at"] is not None
            assert self._status(run.job_id, fresh=True) == (
                "cancelled" if requested else "pending")

    @rule(run=runs)
    def finish_cancelled(self, run: Run) -> None:
        got = self.db.call(self.db.store.finish_cancelled_jobs(
            worker_id=run.worker, held=run.held))
        requested = run.job_id in self.seen and (
            self.seen[run.job_id]["cancel_requested_at"] is not None)
        if self._fenced(run, got, applies=requested):
            del self.current[run.job_id]
            assert self._status(run.job_id, fresh=True) == "cancelled"

    def _fenced(self, run: Run, written: set[str], *, applies: bool = True) -> bool:
        """Check a write by `run`: it lands exactly when `run` owns its job (and the write
        applies to the job's state); returns whether it landed."""
        owner = self.current.get(run.job_id) == run and applies
        assert written == ({run.job_id} if owner else set()), (
            f"fence: {run} (owner: {self.current.get(run.job_id)}) wrote {written}; "
            f"row before: {self.seen.get(run.job_id)}")
        self.may_change = set(written)
        return owner

    def _status(self, job_id: str, *, fresh: bool = False) -> str | None:
        rows = self.db.rows() if fresh else self.seen
        return rows[job_id]["status"] if job_id in rows else None

    # -- after every step -----------------------------------------------------------------

    @invariant()
    def rows_agree(self) -> None:
        rows = self.db.rows()
        for job_id in self.seen.keys() | rows.keys():
            if job_id not in self.may_change:
                assert rows.get(job_id) == self.seen.get(job_id), (
                    f"a step changed job {job_id} it had no right to: "
                    f"{self.seen.get(job_id)} -> {rows.get(job_id)}")
        for job_id, row in rows.items():
            self._check_shape(row)
            self._check_attempts(row)
            self._check_finished(row)
            run = self.current.get(job_id)
            if row["status"] == "running":
                assert run is not None and (row["worker_id"], row["attempts"]) == (
                    run.worker, run.attempt), f"running {row}, model owner {run}"
            else:
                assert run is None, f"model owner {run} of a {row['status']} job"
        self.seen = rows
        self.may_change = set()

    def _check_shape(self, row: dict[str, Any]) -> None:
        status = row["status"]
        leased = (row["worker_id"] is not None, row["lease_until"] is not None)
        if status == "running":
            assert leased == (True, True) and row["finished_at"] is None, row
        elif status == "pending":
            assert leased == (False, False) and row["finished_at"] is None, row
        else:
            assert status in FINISHED_STATUSES, row
            assert row["lease_until"] is None and row["finished_at"] is not None, row
            if status == "completed":
                assert row["result"] is not None, row

    def _check_attempts(self, row: dict[str, Any]) -> None:
        job_id = row["id"]
        assert row["attempts"] >= self.max_attempts.get(job_id, 0), (
            f"attempts of {job_id} went down from {self.max_attempts[job_id]}: {row}")
        self.max_attempts[job_id] = row["attempts"]

    def _check_finished(self, row: dict[str, Any]) -> None:
        frozen = self.finished.get(row["id"])
        if frozen is not None:
            assert row == frozen, f"finished job changed: {frozen} -> {row}"
        elif row["status"] in FINISHED_STATUSES:
            self.finished[row["id"]] = row


@pytest.fixture
def database(pg_dsn: str, schema: str) -> Any:
    """The store on its own event loop: hypothesis drives rules synchronously."""
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(open_pool(pg_dsn, max_size=2))
    try:
        store = Store(pool, schema)
        loop.run_until_complete(store.migrate())
        yield Database(loop, store)
    finally:
        loop.run_until_complete(pool.close())
        loop.close()


def test_job_lifecycle(database: Database) -> None:
    if PROFILE not in PROFILES:
        pytest.fail(f"PGSCHED_LIFECYCLE_PROFILE={PROFILE!r}: use one of {', '.join(PROFILES)}")
    machine = type("JobLifecycle", (JobLifecycle,), {"db": database})
    run_state_machine_as_test(machine, settings=PROFILES[PROFILE])


def test_replace_keeps_attempts(database: Database) -> None:
    """Replace after a recovery must not reuse the attempt number of the lost run: that
    number fences the lost run's late completion out."""
    store = database.store
    database.call(store.insert_jobs([new_job("j", 0)]))
    database.call(store.claim_jobs(worker_id="w1", limit=1, lease_seconds=LEASE_SECONDS))
    database.execute("UPDATE {jobs} SET lease_until = now() - interval '1 second'")
    database.call(store.recover_orphans(max_recoveries=MAX_RECOVERIES))
    database.call(store.insert_jobs([new_job("j", 0)], replace=True))
    claimed, _, _ = database.call(store.claim_jobs(
        worker_id="w1", limit=1, lease_seconds=LEASE_SECONDS))
    late = database.call(store.complete_jobs(worker_id="w1", done=[("j", 1, '"stale"')]))
    row = database.rows()["j"]
    assert (late, row["status"], claimed[0]["attempts"]) == (set(), "running", 2), (
        f"the first run's completion of attempt 1 landed on the replaced job: {row}")
