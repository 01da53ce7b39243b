"""Test fixtures: a real PostgreSQL and an isolated, migrated schema per test.

The server is PGSCHED_TEST_DSN when set (one pytest process only: some tests watch the
whole server); a throwaway cluster of the binaries in PGSCHED_TEST_PGBIN; otherwise an
embedded PostgreSQL (pgserver). The last two are started for each pytest process (-n 2
runs two) in a temporary directory and deleted at the end. Each test
gets its own schema (`t_<random>`), migrated, and dropped afterwards, which costs a few
milliseconds and lets tests run against one server without seeing each other.

Worker processes are real `python -m pgsched worker` subprocesses configured through a
generated pgsched.toml; `wait_until` polls with a deadline instead of sleeping.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgsched import Scheduler, WorkerOptions
from pgsched.store import Store, open_pool

ROOT = Path(__file__).resolve().parent.parent
WORKER_TASKS = Path(__file__).resolve().parent / "worker_tasks.py"


def pytest_configure(config: pytest.Config) -> None:
    workers = getattr(config.option, "numprocesses", None)
    if os.environ.get("PGSCHED_TEST_DSN") and workers not in (None, 0, 1):
        # Some tests watch or end the whole server's sessions (pg_stat_activity): two
        # pytest processes on one server would see each other's workers.
        raise pytest.UsageError(
            "PGSCHED_TEST_DSN is one server for every pytest process: run without -n, or "
            "use PGSCHED_TEST_PGBIN (a throwaway cluster per process) instead")


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    dsn = os.environ.get("PGSCHED_TEST_DSN")
    if dsn:
        yield dsn
        return
    if os.environ.get("PGSCHED_TEST_PGBIN"):
        # A server of those binaries for this session alone (one per xdist worker), so
        # that tests which look at the whole server (pg_stat_activity) never see another
        # session's workers.
        from faults.cluster import Cluster

        own = Cluster(Path(os.environ["PGSCHED_TEST_PGBIN"]))
        try:
            yield own.superuser_dsn
        finally:
            own.destroy()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    data = Path(tempfile.mkdtemp(prefix="pgsched-test-")) / "pg"
    server = pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL that tests may stop, crash, start, and create roles in
    (tests/faults/cluster.py); started on first use, shared by the session."""
    from faults.cluster import cluster_or_skip

    pgbin = os.environ.get("PGSCHED_TEST_PGBIN")
    owned = cluster_or_skip(Path(pgbin) if pgbin else None)
    yield owned
    owned.destroy()


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def db(pg_dsn, schema):
    """Run SQL in the test's schema: db(query, *params) -> list of dict rows."""
    with psycopg.connect(pg_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute(f'SET search_path TO "{schema}"')

        def run(query, *params):
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None

        yield run


@pytest.fixture
async def sched(pg_dsn: str, schema: str) -> AsyncIterator[Scheduler]:
    async with Scheduler(pg_dsn, schema=schema, options=fast_options()) as s:
        await s.migrate()
        yield s


def fast_options(**overrides: Any) -> WorkerOptions:
    base = dict(concurrency=8, lease_seconds=2.0, heartbeat_seconds=0.5, poll_seconds=1.0,
                shutdown_grace_seconds=5.0, retry_base_seconds=0.05, retry_max_seconds=0.2,
                vacuum_enabled=False)
    base.update(overrides)
    return WorkerOptions(**base)


async def wait_until(predicate: Callable[[], Any], timeout: float = 20.0,
                     interval: float = 0.05, what: str = "condition") -> Any:
    """Poll an (async or sync) predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class LoopGaps:
    """A task beside the code under test on the same event loop, sleeping `interval` at
    each turn (0: it yields at every turn, so the loop always has a callback ready) and
    recording the time between its turns: the longest gap is the longest anything else
    held the loop. Started on creation; `await stop()` ends it."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.gaps: list[float] = []
        self._running = True
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        last = time.monotonic()
        while self._running:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.gaps.append(now - last)
            last = now

    def longest(self) -> float:
        return max(self.gaps)

    async def stop(self) -> None:
        self._running = False
        await self._task


@pytest.fixture
async def one_connection_store(pg_dsn: str, sched: Scheduler) -> AsyncIterator[Store]:
    """A Store of `sched`'s (migrated) schema on a pool of its own with a single
    connection, as open_pool makes it (prepared statements and all): every statement it
    runs and every session setting it makes are on that one connection."""
    pool = await open_pool(pg_dsn, max_size=1)
    try:
        yield Store(pool, sched.schema)
    finally:
        await pool.close()


def claim_params(**overrides: Any) -> dict[str, Any]:
    """The parameters of a claim statement run by hand (claim_jobs and its variants in
    sql/queries.sql): a claim of 10 from every queue for worker 'w', nothing capped, its
    let-go NOTIFY on a channel no worker hears unless `channel` is given."""
    return {"worker_id": "w", "limit": 10, "lease_seconds": 60, "queues": None,
            "capped_queues": [], "capped_free": [], "limit_recheck_seconds": 0.5,
            "channel": "pgsched_unheard", **overrides}


def write_config(directory: Path, dsn: str, schema: str, **worker: Any) -> Path:
    settings = dict(tasks=str(WORKER_TASKS), concurrency=8, lease_seconds=2,
                    heartbeat_seconds=0.5, poll_seconds=1, shutdown_grace_seconds=5,
                    retry_base_seconds=0.05, retry_max_seconds=0.2)
    settings.update(worker)
    lines = ["[database]", f"dsn = {dsn!r}".replace("'", '"'), f'schema = "{schema}"',
             "", "[worker]"]
    for key, value in settings.items():
        lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    lines += ["", "[vacuum]", "enabled = false", "", "[log]", 'format = "json"']
    path = directory / "pgsched.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_")}
    env.update(extra)
    return env


def finished_jobs(dsn: str, schema: str, n: int, prefix: str) -> None:
    """n completed jobs, finished a day ago (past any --older-than of the tests)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".jobs (id, task, status, execution_time, finished_at) '
            "SELECT %s || i, 'noop', 'completed', now(), now() - interval '1 day' "
            "FROM generate_series(1, %s) i", [prefix, n])


def run_cli(*args: str, config: Path | None = None, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m pgsched ...` as a real process."""
    cmd = [sys.executable, "-m", "pgsched"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=input,
                          env=env or cli_env(), timeout=timeout, cwd=ROOT)


def audit_env(pg_dsn: str, schema: str) -> dict[str, str]:
    """Environment for workers running tests/worker_tasks.py's `record`; creates the
    audit table it writes to."""
    from worker_tasks import create_audit_table

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        create_audit_table(conn, schema)
    return cli_env(PGSCHED_TEST_AUDIT_DSN=pg_dsn, PGSCHED_TEST_AUDIT_SCHEMA=schema)


def audit_counts(pg_dsn: str, schema: str) -> dict[str, int]:
    """How many times each key's job body really ran."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        rows = conn.execute(f'SELECT key, count(*) FROM "{schema}".audit GROUP BY key')
        return dict(rows.fetchall())


class WorkerProcess:
    """`pgsched worker` as a real process; `prefix` wraps the command (e.g. `unshare`)."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: Sequence[str] = ()):
        self.log_path = config.parent / f"worker-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pgsched", "--config", str(config), "worker", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env or cli_env(), cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, what="worker exit")
        return self.proc.returncode

    async def wait_for_log(self, text: str, timeout: float = 30) -> None:
        await wait_until(lambda: text in self.log(), timeout, what=f"{text!r} in worker log")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(config: Path, *args: str, env: dict[str, str] | None = None,
              prefix: Sequence[str] = ()) -> WorkerProcess:
        w = WorkerProcess(config, *args, env=env, prefix=prefix)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()
