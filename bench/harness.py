"""What every benchmark scenario needs: the server, schemas, worker processes, the machine.

Owns: starting the embedded PostgreSQL in a temporary data directory (or using --dsn),
one fresh schema per scenario (dropped again afterwards), writing a pgsched.toml for the
worker processes, starting and watching real `python -m pgsched worker` processes
(their peak resident memory is sampled while they run), and describing the machine and
server so that results are never quoted without them.

Invariants: every schema the benchmark creates is named `bench_*` and dropped when its
scenario ends, so --dsn never leaves anything behind on success. Worker processes are
killed if the benchmark fails or one of them overruns its deadline.

Failure: a worker that exits with a non-zero code, or misses a deadline, raises
BenchError with the tail of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import psycopg.conninfo
import tomli_w
from psycopg import sql

import pgsched
from pgsched import Scheduler

TASKS = Path(__file__).resolve().parent / "tasks.py"
RAW_LATENCY = Path(__file__).resolve().parent / "raw_latency.py"


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does (--quick shrinks everything)."""

    enqueue_loop: int = 10_000
    enqueue_bulk: int = 100_000
    enqueue_bulk_small: int = 10_000  # a second bulk size: fixed costs per call count
    drain: int = 10_000  # the jobs every drain works through, pgsched's and the peers'
    due_latency: int = 200
    enqueue_latency: int = 200
    backlog_finished: int = 1_000_000
    backlog_future: int = 200_000
    idle_seconds: float = 60.0
    raw_claim: int = 20_000
    raw_batch: int = 100
    # Worker concurrency of drain-1 and backlog: the raw loop's batch, since a worker
    # claims at most its free slots at once (drain-1-default and drain-2 run pgsched's
    # default configuration, as the targets ask).
    drain_concurrency: int = 100
    # Recurring at scale: this many schedules, each firing every recurring_every seconds,
    # for recurring_windows windows, across recurring_workers worker processes.
    recurring_schedules: int = 10_000
    recurring_every: float = 60.0
    recurring_windows: int = 3
    recurring_workers: int = 3
    cli_runs: int = 20  # runs of each command in cli-startup
    # scale (opt-in): these worker counts at scale_concurrency each, draining
    # scale_backlog jobs, then fed scale_rate jobs/s for scale_seconds.
    scale_workers: tuple[int, ...] = (1, 10, 50)
    scale_concurrency: int = 2
    scale_backlog: int = 5_000
    scale_rate: float = 200.0
    scale_seconds: float = 20.0
    # churn (opt-in): churn_jobs in batches of churn_batch; once churn_seconds have passed
    # a pass runs one last batch and stops, so a slow machine still finishes in bounded time.
    churn_jobs: int = 1_000_000
    churn_batch: int = 100_000
    churn_seconds: float = 150.0
    # retention (opt-in): finished jobs to delete, and the stream claimed meanwhile.
    retention_rows: int = 5_000_000
    retention_rate: float = 200.0
    retention_quiet_s: float = 20.0
    # ops (opt-in): the jobs table the operator statements are timed on.
    ops_rows: int = 5_000_000
    # queues (opt-in): claim_queues_claims claims of 10 with claim_queues_jobs due jobs
    # spread over each of these queue counts.
    claim_queues: tuple[int, ...] = (1, 10, 100, 1000)
    claim_queues_jobs: int = 20_000
    claim_queues_claims: int = 100


QUICK = Sizes(enqueue_loop=200, enqueue_bulk=2_000, enqueue_bulk_small=200, drain=500,
              due_latency=10, enqueue_latency=10, backlog_finished=5_000, backlog_future=1_000,
              idle_seconds=2.0, raw_claim=500, recurring_schedules=50, recurring_every=2.0,
              recurring_windows=2, cli_runs=3, scale_workers=(1, 2), scale_backlog=50,
              scale_rate=20.0, scale_seconds=1.0, churn_jobs=200, churn_batch=100,
              retention_rows=2_000, retention_rate=20.0, retention_quiet_s=1.0,
              ops_rows=20_000, claim_queues_jobs=2_000, claim_queues_claims=3)


@dataclass
class Harness:
    dsn: str
    sizes: Sizes
    workdir: Path
    server_log: Path | None = None  # set when we own the server and can read its log
    server_pid: int | None = None  # the postmaster, when we own the server
    pgbouncer: bool = False  # --pgbouncer: the scale scenario also runs through PgBouncer
    # Every metric measured so far in this run (a scenario may size itself from another's).
    measured: dict[str, Any] = field(default_factory=dict)
    _procs: list[WorkerProc] = field(default_factory=list)

    # -- schemas and connections ---------------------------------------------------------

    async def connect(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def fresh_schema(self, name: str, *, migrate: bool = True) -> str:
        schema = f"bench_{name}"
        await self.drop_schema(schema)
        if migrate:
            async with Scheduler(self.dsn, schema=schema) as sched:
                await sched.migrate()
        return schema

    async def drop_schema(self, schema: str) -> None:
        async with await self.connect() as conn:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                               .format(sql.Identifier(schema)))

    async def one(self, query: str | sql.Composable, params: Any = None) -> tuple:
        async with await self.connect() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

    async def analyze(self, schema: str) -> None:
        """VACUUM ANALYZE the jobs table, as autovacuum would on a long-lived table; run
        before a timed drain so its plan does not depend on when autovacuum woke up."""
        async with await self.connect() as conn:
            await conn.execute(sql.SQL("VACUUM ANALYZE {}.jobs").format(sql.Identifier(schema)))

    # -- worker processes ----------------------------------------------------------------

    def write_config(self, schema: str, *, dsn: str | None = None,
                     concurrency: int | None = None, log_level: str = "info",
                     database: dict[str, Any] | None = None) -> Path:
        worker: dict[str, Any] = {"tasks": str(TASKS)}
        if concurrency is not None:
            worker["concurrency"] = concurrency
        document = {
            "database": {"dsn": dsn or self.dsn, "schema": schema, **(database or {})},
            "worker": worker,
            # The daemon's default under systemd: JSON lines to a pipe (here a file).
            "log": {"format": "json", "level": log_level},
        }
        path = self.workdir / f"{schema}-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(tomli_w.dumps(document))
        path.chmod(0o600)
        return path

    def start_worker(self, schema: str, *args: str, dsn: str | None = None,
                     concurrency: int | None = None, log_level: str = "info",
                     database: dict[str, Any] | None = None) -> WorkerProc:
        config = self.write_config(schema, dsn=dsn, concurrency=concurrency,
                                   log_level=log_level, database=database)
        proc = WorkerProc(config, args)
        self._procs.append(proc)
        return proc

    def start_raw_latency(self, schema: str) -> WorkerProc:
        """The latency floor's plain psycopg loop (bench/raw_latency.py) on `schema`."""
        config = self.write_config(schema)  # only for its directory and log file name
        proc = WorkerProc(config, (), argv=[sys.executable, str(RAW_LATENCY), self.dsn,
                                            schema])
        self._procs.append(proc)
        return proc

    def start_web(self, schema: str, token: str) -> WorkerProc:
        """`pgsched web` on a free port (its log names it; see bench/web.py)."""
        config = self.write_config(schema)
        with config.open("a") as file:
            file.write(tomli_w.dumps({"web": {"token": token}}))
        proc = WorkerProc(config, ("--listen", "127.0.0.1:0"), command="web")
        self._procs.append(proc)
        return proc

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter(self.server_pid)

    async def wait_listening(self, schema: str, count: int = 1, timeout: float = 30) -> None:
        """Until `count` workers LISTEN on the schema's channel (their notifications work)."""
        deadline = time.monotonic() + timeout
        channel = f'LISTEN "pgsched_{schema}"'
        while True:
            (n,) = await self.one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = %s", [channel])
            if n >= count:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"no worker listening on {schema} after {timeout}s")
            await asyncio.sleep(0.05)

    async def wait_finished(self, schema: str, prefix: str, total: int,
                            timeout: float = 120) -> None:
        """Until every job whose id starts with `prefix` is completed (polls every 50 ms)."""
        deadline = time.monotonic() + timeout
        query = sql.SQL("SELECT count(*) FROM {}.jobs WHERE id LIKE %s AND status = 'completed'"
                        ).format(sql.Identifier(schema))
        while True:
            (done,) = await self.one(query, [prefix + "%"])
            if done >= total:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"only {done}/{total} {prefix}* jobs completed in {timeout}s")
            await asyncio.sleep(0.05)

    def kill_all(self) -> None:
        for proc in self._procs:
            proc.kill()

    # -- the server log (statement counting) ---------------------------------------------

    def statement_logging_dsn(self) -> str | None:
        """A DSN whose sessions log every statement, when we can read the server log."""
        if self.server_log is None:
            return None
        return psycopg.conninfo.make_conninfo(self.dsn, options="-c log_statement=all")

    # -- the machine -----------------------------------------------------------------------

    async def machine(self) -> dict[str, Any]:
        (version,) = await self.one("SELECT current_setting('server_version')")
        settings = {}
        for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections"):
            (settings[name],) = await self.one("SELECT current_setting(%s)", [name])
        return {
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(),
            "python": platform.python_version(),
            "postgresql": version,
            "postgresql_settings": settings,
            "server": "embedded (pgserver), same machine" if self.server_log else "--dsn",
            "pgsched": pgsched.__version__,
            "commit": _git_commit(),
        }


class CpuMeter:
    """CPU seconds used by worker processes and by the server.

    Workers are sampled often (one /proc read each) and `worker_between(t0, t1)` sums
    what they used between two wall-clock instants, from the samples nearest them, so
    the Python start-up of a worker does not count against the jobs it then drains.
    The server is read at the start and the end of a scenario: the postmaster's own CPU,
    plus its children's, live (backends, WAL writer, checkpointer) or exited and reaped
    (the kernel adds those to the postmaster's children times), so a backend that closed
    with its worker still counts. With --dsn the server is not ours to see: None.
    """

    def __init__(self, server_pid: int | None):
        self.server = psutil.Process(server_pid) if server_pid else None
        self.workers: list[psutil.Process] = []
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.server_start = self._server_total()

    def add_worker(self, proc: psutil.Process) -> None:
        self.workers.append(proc)

    def sample(self) -> None:
        seen: dict[int, float] = {}
        for proc in self.workers:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                seen[proc.pid] = times.user + times.system
        self.samples.append((time.time(), seen))

    def worker_between(self, start: float, end: float) -> float:
        before: dict[int, float] = {}
        after: dict[int, float] = {}
        for at, seen in self.samples:  # a process that exited keeps its last sample
            for pid, cpu in seen.items():
                if at <= start:
                    before[pid] = cpu
                if at <= end + 0.1:
                    after[pid] = cpu
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

    def server_used(self) -> float | None:
        """Server CPU seconds since this meter was made."""
        now = self._server_total()
        return None if now is None or self.server_start is None else now - self.server_start

    def _server_total(self) -> float | None:
        if self.server is None:
            return None
        with contextlib.suppress(psutil.Error):
            t = self.server.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in self.server.children():
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system
            return total
        return None


class WorkerProc:
    """One `python -m pgsched worker` process; its output goes to a log file (a pipe to
    journald would cost the same: the daemon renders JSON lines either way)."""

    def __init__(self, config: Path, args: tuple[str, ...], command: str = "worker",
                 argv: list[str] | None = None):
        self.log_path = config.with_suffix(".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCHED_")}
        if argv is None:
            argv = [sys.executable, "-m", "pgsched", "--config", str(config), command, *args]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=config.parent)
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0

    def sample_rss(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    async def wait(self, timeout: float, meter: CpuMeter | None = None) -> None:
        """Until the process exits (sampling its memory and the CPU meter); raises if it
        failed or overran."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.sample_rss()
            if meter is not None:
                meter.sample()
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"worker overran {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        if self.proc.returncode != 0:
            raise BenchError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")

    async def stop(self, timeout: float = 30) -> None:
        self.proc.terminate()
        await self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_embedded(workdir: Path) -> tuple[str, Path, int]:
    """Start a throw-away embedded server in workdir/pg: (dsn, its log file, its pid)."""
    from pgsched.embedded import embedded_dsn

    data = workdir / "pg"
    dsn = embedded_dsn(data)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return dsn, data / "log", pid


def stop_embedded(workdir: Path) -> None:
    import pgserver  # installed: start_embedded worked

    pgserver.get_server(workdir / "pg").cleanup()


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pgsched-bench-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
