"""The scale scenarios of issue 14 (opt-in): many workers, churn, retention.

Owns three scenarios, each on a PostgreSQL cluster of its own (tests/faults/cluster.py,
Debian's binaries, which ship pg_stat_statements; the embedded server does not), so
that the server's statistics, log and processes are the benchmark's to read:
- scale: N worker processes (small concurrency each) against the one server, directly
  or through PgBouncer in transaction mode (tests/faults/pgbouncer.py; the workers'
  LISTEN connection goes straight to PostgreSQL with `listen_dsn`), draining a backlog
  and then sustaining a steady arrival rate;
- churn: up to a million jobs through one table in bulk batches drained by real
  workers, with and without `pgsched vacuum` after each batch;
- retention: `pgsched vacuum` deleting a few million finished jobs while a worker
  claims a steady stream, against the same stream without it.

How each figure is read (the server is ours, so nothing is estimated from the client):
- claim latency: the claim statement's execution time from the server log, logged with
  `log_min_duration_statement = 0` (ALTER SYSTEM, reloaded) only during the window;
- empty claims: pg_stat_statements' calls and rows of the claim. A claim returns its
  jobs, or one row of NULLs when it got none, so empty claims = rows - jobs claimed;
- connections: peak of the application role's sessions in pg_stat_activity (10 Hz);
- PostgreSQL CPU: the postmaster's and its children's CPU time from /proc (CpuMeter).

Invariants: the cluster, PgBouncer and every worker are stopped and deleted when a
scenario ends, failed or not. Failure: BenchError (no Debian PostgreSQL with
pg_stat_statements, a worker that dies, jobs that never complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgsched import Scheduler

from .harness import BenchError, Harness, WorkerProc
from .scenarios import _add_due, _feed, percentiles

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests/ is a directory of the checkout, like bench/
    sys.path.insert(0, str(ROOT))

from tests.faults.cluster import APP_ROLE, Cluster  # noqa: E402
from tests.faults.pgbouncer import PgBouncer, find_pgbouncer  # noqa: E402

Metrics = dict[str, Any]
# The claim (claim_jobs in pgsched/sql/queries.sql) is sent with its comment, so its text
# starts with the comment's first words, in the log and in pg_stat_statements alike.
CLAIM_START = "-- Claim up to "
CLAIM_LOGGED = re.compile(
    r"duration: ([\d.]+) ms  (?:execute|statement)[^:]*: " + re.escape(CLAIM_START))
CLAIM_STATS = ("SELECT coalesce(sum(calls), 0), coalesce(sum(rows), 0) FROM pg_stat_statements"
               f" WHERE query LIKE '{CLAIM_START}%'")


def _debian_binaries() -> Path:
    for path in sorted(Path("/usr/lib/postgresql").glob("*"), reverse=True):
        if (path / "lib" / "pg_stat_statements.so").exists() and (path / "bin").is_dir():
            return path / "bin"
    raise BenchError("the scale scenarios need PostgreSQL with pg_stat_statements: "
                     "apt-get install -y postgresql")


class Server:
    """A cluster with pg_stat_statements loaded, and PgBouncer in front when asked."""

    def __init__(self, pgbouncer: bool = False) -> None:
        self.cluster = Cluster(bin_dir=_debian_binaries())
        self.bouncer: PgBouncer | None = None
        try:
            with (self.cluster.data / "postgresql.conf").open("a") as conf:
                conf.write("shared_preload_libraries = 'pg_stat_statements'\n"
                           "max_connections = 300\n")
            self.cluster.stop()
            self.cluster.start()
            with psycopg.connect(self.cluster.superuser_dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
                # options (and so pgsched's lock_timeout) do not pass PgBouncer
                conn.execute(f"ALTER ROLE {APP_ROLE} SET lock_timeout = '5s'")
                (version,) = conn.execute("SHOW server_version").fetchone()
            self.description = (f"PostgreSQL {version} (own cluster, fsync off, "
                                "shared_buffers 128MB)"
                                + (f", {pgbouncer_version()}" if pgbouncer else ""))
            if pgbouncer:
                self.bouncer = PgBouncer(self.cluster, pool_size=20)
        except BaseException:
            self.destroy()
            raise

    @property
    def log(self) -> Path:
        return self.cluster.root / "log"

    def harness(self, h: Harness) -> Harness:
        """The run's harness, pointed at this server as superuser (statistics, activity)."""
        pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        return Harness(self.cluster.superuser_dsn, h.sizes, h.workdir, server_log=self.log,
                       server_pid=pid, pgbouncer=h.pgbouncer)

    def worker_settings(self) -> tuple[str, dict[str, Any]]:
        """The workers' DSN and extra [database] keys (docs/pgbouncer.md)."""
        if self.bouncer is None:
            return self.cluster.app_dsn(), {}
        return self.bouncer.dsn(), {"prepare_threshold": "none",
                                    "listen_dsn": self.cluster.app_dsn()}

    def destroy(self) -> None:
        if self.bouncer is not None:
            self.bouncer.destroy()
        self.cluster.destroy()


def pgbouncer_version() -> str:
    done = subprocess.run([find_pgbouncer(), "--version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.stdout else "PgBouncer"


@contextlib.asynccontextmanager
async def own_server(h: Harness, pgbouncer: bool = False) -> AsyncIterator[tuple[Server, Harness]]:
    server = await asyncio.to_thread(Server, pgbouncer)
    inner = server.harness(h)
    try:
        yield server, inner
    finally:
        inner.kill_all()
        await asyncio.to_thread(server.destroy)


async def app_schema(server: Server, h: Harness, name: str) -> str:
    """A fresh schema migrated (so owned) by the application role the workers log in as."""
    schema = f"bench_{name}"
    await h.drop_schema(schema)
    async with Scheduler(server.cluster.app_dsn(), schema=schema) as sched:
        await sched.migrate()
    return schema


async def set_logging(h: Harness, on: bool) -> None:
    """Every statement's duration in the server log (on) or none (off), for every session
    at once: ALTER SYSTEM and a reload, which backends apply before their next statement."""
    async with await h.connect() as conn:
        await conn.execute("ALTER SYSTEM SET log_min_duration_statement = 0" if on
                           else "ALTER SYSTEM RESET log_min_duration_statement")
        await conn.execute("SELECT pg_reload_conf()")
    await asyncio.sleep(0.3)


class Window:
    """One measured stretch: claim durations from the log, claim calls and rows from
    pg_stat_statements, server CPU, and the peak of the application role's sessions."""

    async def __aenter__(self) -> Window:
        await set_logging(self.h, True)
        async with await self.h.connect() as conn:
            await conn.execute("SELECT pg_stat_statements_reset()")
        self.offset = self.h.server_log.stat().st_size
        self.meter = self.h.cpu_meter()
        self.peak = 0
        self.sampler = asyncio.create_task(self._sample())
        return self

    def __init__(self, h: Harness) -> None:
        self.h = h

    async def _sample(self) -> None:
        async with await self.h.connect() as conn:
            while True:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [APP_ROLE])
                self.peak = max(self.peak, (await cur.fetchone())[0])
                await asyncio.sleep(0.1)

    async def __aexit__(self, *exc: object) -> None:
        self.sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sampler
        self.server_cpu = self.meter.server_used() or 0.0
        calls, rows = await self.h.one(CLAIM_STATS)
        self.calls, self.rows = int(calls), int(rows)
        await set_logging(self.h, False)
        with self.h.server_log.open("rb") as f:
            f.seek(self.offset)
            text = f.read().decode("utf-8", "replace")
        self.claim_ms = [float(m.group(1)) for m in CLAIM_LOGGED.finditer(text)]

    def metrics(self, name: str, jobs: int) -> Metrics:
        out: Metrics = {f"{name}_jobs": jobs, f"{name}_claims": self.calls,
                        f"{name}_empty_claims_per_job": (self.rows - jobs) / max(jobs, 1),
                        f"{name}_connections_peak": self.peak,
                        f"{name}_server_cpu_us_per_job": self.server_cpu / max(jobs, 1) * 1e6}
        out.update(claim_percentiles(self.claim_ms, name))
        return out


def claim_percentiles(values: list[float], name: str) -> Metrics:
    if not values:  # nothing claimed in the window (a tiny --quick run)
        return {f"{name}_claim_p50_ms": None, f"{name}_claim_p95_ms": None}
    return percentiles(values, f"{name}_claim")


async def feed(h: Harness, schema: str, rate: float, seconds: float, prefix: str,
               until: WorkerProc | None = None) -> int:
    """_feed() from the harness's own connection, stopping early when `until` exits."""
    async with Scheduler(h.dsn, schema=schema) as sched:
        sent, _ = await _feed(sched, rate, seconds, prefix,
                              until=until and (lambda: until.proc.poll() is not None))
    return sent


async def drain_span(h: Harness, schema: str, prefix: str) -> float:
    """Seconds from the first start to the last finish of the jobs with this prefix."""
    first, last = await h.one(sql.SQL(
        "SELECT min(started_at), max(finished_at) FROM {}.jobs WHERE id LIKE %s")
        .format(sql.Identifier(schema)), [prefix + "%"])
    return (last - first).total_seconds()


# -- scale ---------------------------------------------------------------------------------


async def scale(h: Harness) -> Metrics:
    """N workers (each at concurrency scale_concurrency) draining a backlog, then a steady
    arrival rate; for every N in sizes.scale_workers, directly and, with --pgbouncer,
    through PgBouncer in transaction mode."""
    metrics: Metrics = {}
    for through in ["direct"] + (["pgbouncer"] if h.pgbouncer else []):
        async with own_server(h, pgbouncer=through == "pgbouncer") as (server, inner):
            for n in h.sizes.scale_workers:
                metrics.update(await _scale_one(server, inner, n, f"scale_{through}_{n}"))
            metrics["own_server"] = server.description
    return metrics


async def _scale_one(server: Server, h: Harness, n: int, name: str) -> Metrics:
    sizes = h.sizes
    schema = await app_schema(server, h, name)
    dsn, database = server.worker_settings()
    procs = [h.start_worker(schema, "--no-migrate", dsn=dsn, database=database,
                            concurrency=sizes.scale_concurrency, log_level="warning")
             for _ in range(n)]
    await h.wait_listening(schema, count=n, timeout=60 + 3 * n)
    await asyncio.sleep(1)  # start-up claims and registrations settle
    async with Window(h) as drain:
        await _add_due(h, schema, sizes.scale_backlog, "b-")
        await h.wait_finished(schema, "b-", sizes.scale_backlog,
                              timeout=60 + sizes.scale_backlog / 50)
    async with Window(h) as steady:
        fed = await feed(h, schema, sizes.scale_rate, sizes.scale_seconds, "s-")
        await h.wait_finished(schema, "s-", fed, timeout=60 + fed / 50)
    await asyncio.gather(*(proc.stop(timeout=60) for proc in procs))
    metrics = {**drain.metrics(f"{name}_drain", sizes.scale_backlog),
               **steady.metrics(f"{name}_steady", fed),
               **await start_delay(h, schema, "s-", f"{name}_steady"),
               f"{name}_drain_jobs_per_s": sizes.scale_backlog / await drain_span(
                   h, schema, "b-"),
               f"{name}_steady_jobs_per_s": fed / await drain_span(h, schema, "s-")}
    await h.drop_schema(schema)
    return metrics


async def start_delay(h: Harness, schema: str, prefix: str, name: str) -> Metrics:
    """p50/p95 of started_at - execution_time of the jobs with this prefix: how long a job
    due now waited for a claim (both on the database clock; the claim's start)."""
    p50, p95 = await h.one(sql.SQL(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.95)"
        " WITHIN GROUP (ORDER BY d) FROM (SELECT (extract(epoch FROM started_at"
        " - execution_time) * 1000)::float8 AS d FROM {}.jobs WHERE id LIKE %s) s")
        .format(sql.Identifier(schema)), [prefix + "%"])
    return {f"{name}_start_delay_p50_ms": p50, f"{name}_start_delay_p95_ms": p95}


# -- churn ---------------------------------------------------------------------------------

TABLE_HEALTH = """
SELECT s.n_live_tup, s.n_dead_tup, s.autovacuum_count, pg_table_size(s.relid),
       pg_indexes_size(s.relid)
FROM pg_stat_user_tables s WHERE s.schemaname = %s AND s.relname = 'jobs'
"""


def run_vacuum(h: Harness, schema: str, dsn: str, older_than: str,
               *extra: str) -> WorkerProc:
    """`pgsched vacuum --older-than ...` as a process (what cron or a timer runs)."""
    config = h.write_config(schema, dsn=dsn)
    proc = WorkerProc(config, ("--older-than", older_than, *extra), command="vacuum")
    h._procs.append(proc)
    return proc


async def churn(h: Harness) -> Metrics:
    """Jobs through the table in bulk batches drained by two workers, with and without
    `pgsched vacuum` (everything finished) after each batch; each pass stops early when
    it has used up sizes.churn_seconds, and says how many jobs it got through."""
    metrics: Metrics = {}
    for retention in (False, True):
        name = "churn_vacuum" if retention else "churn_plain"
        async with own_server(h) as (server, inner):
            metrics.update(await _churn_pass(server, inner, name, retention))
            metrics["own_server"] = server.description
    return metrics


async def _churn_pass(server: Server, h: Harness, name: str, retention: bool) -> Metrics:
    sizes = h.sizes
    schema = await app_schema(server, h, name)
    dsn = server.cluster.app_dsn()
    procs = [h.start_worker(schema, "--no-migrate", dsn=dsn, concurrency=50,
                            log_level="warning") for _ in range(2)]
    await h.wait_listening(schema, count=len(procs))
    batches = sizes.churn_jobs // sizes.churn_batch
    started, done, health, vacuuming = time.monotonic(), 0, {}, 0.0
    for i in range(batches):
        last = i == batches - 1 or time.monotonic() - started > sizes.churn_seconds
        prefix = f"c{i:03d}-"
        if i == 0 or last:
            window = Window(h)
            async with window:
                await _add_due(h, schema, sizes.churn_batch, prefix)
                await h.wait_finished(schema, prefix, sizes.churn_batch, timeout=600)
            label = "start" if i == 0 else "end"
            health.update(claim_percentiles(window.claim_ms, f"{name}_{label}"))
        else:
            await _add_due(h, schema, sizes.churn_batch, prefix)
            await h.wait_finished(schema, prefix, sizes.churn_batch, timeout=600)
        done += sizes.churn_batch
        if retention:  # deletes the batch, then (100,000 jobs) VACUUM (ANALYZE) of the table
            began = time.monotonic()
            await run_vacuum(h, schema, dsn, "0s").wait(timeout=600)
            vacuuming += time.monotonic() - began
        if last:
            break
    elapsed = time.monotonic() - started
    await asyncio.gather(*(proc.stop(timeout=60) for proc in procs))
    async with await h.connect() as conn:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    live, dead, autovacuums, table, indexes = await h.one(TABLE_HEALTH, [schema])
    # Server-wide, left at its default: autovacuum visits the database once per naptime
    # whatever the table's settings, so the figures hold only with it said.
    (naptime,) = await h.one("SHOW autovacuum_naptime")
    await h.drop_schema(schema)
    return {**health, f"{name}_jobs": done, f"{name}_seconds": elapsed,
            f"{name}_vacuum_seconds": vacuuming, f"{name}_autovacuum_naptime": naptime,
            f"{name}_live_tuples": live, f"{name}_dead_tuples": dead,
            f"{name}_autovacuums": autovacuums, f"{name}_table_mb": table / 2**20,
            f"{name}_indexes_mb": indexes / 2**20}


# -- retention -----------------------------------------------------------------------------


async def retention(h: Harness) -> Metrics:
    """`pgsched vacuum` over sizes.retention_rows finished jobs (8 days old) while one
    worker claims a steady stream, against the same stream without it."""
    sizes = h.sizes
    async with own_server(h) as (server, inner):
        schema = await app_schema(server, inner, "retention")
        async with await inner.connect() as conn:
            await conn.execute(sql.SQL(
                "INSERT INTO {}.jobs (id, task, status, execution_time, attempts, worker_id,"
                " result, created_at, started_at, finished_at)"
                " SELECT 'old-' || g, 'noop', 'completed', now() - interval '8 days', 1, 'old',"
                " 'null', now() - interval '8 days', now() - interval '8 days',"
                " now() - interval '8 days' + g * interval '1 ms'"
                " FROM generate_series(1, %s) g").format(sql.Identifier(schema)),
                [sizes.retention_rows])
        await inner.analyze(schema)
        dsn = server.cluster.app_dsn()
        worker = inner.start_worker(schema, "--no-migrate", dsn=dsn, concurrency=10,
                                    log_level="warning")
        await inner.wait_listening(schema)
        async with Window(inner) as quiet:
            fed = await feed(inner, schema, sizes.retention_rate, sizes.retention_quiet_s, "q-")
            await inner.wait_finished(schema, "q-", fed)
        async with Window(inner) as busy:
            started = time.monotonic()
            # The delete alone: the VACUUM that would end it is timed apart, below.
            vacuum = run_vacuum(inner, schema, dsn, "7d", "--no-reclaim")
            fed_busy = await feed(inner, schema, sizes.retention_rate, 3600, "v-",
                                  until=vacuum)
            await vacuum.wait(timeout=3600)
            elapsed = time.monotonic() - started
            await inner.wait_finished(schema, "v-", fed_busy)
        await worker.stop()
        # The deleted rows stay as dead tuples until (auto)vacuum reclaims them: time that too.
        reclaim = time.monotonic()
        await inner.analyze(schema)
        reclaim = time.monotonic() - reclaim
        described = server.description
        (left,) = await inner.one(sql.SQL("SELECT count(*) FROM {}.jobs WHERE id LIKE 'old-%%'")
                                  .format(sql.Identifier(schema)))
        await inner.drop_schema(schema)
    if left:
        raise BenchError(f"retention: vacuum left {left} of {sizes.retention_rows} old jobs")
    rate = sizes.retention_rows / elapsed
    return {
        "own_server": described,
        **claim_percentiles(quiet.claim_ms, "retention_quiet"),
        **claim_percentiles(busy.claim_ms, "retention_busy"),
        "retention_rows": sizes.retention_rows,
        "retention_vacuum_seconds": elapsed,
        "retention_delete_rows_per_s": rate,
        "retention_stream_jobs_per_s": sizes.retention_rate,
        "retention_busy_stream_jobs": fed_busy,
        # Seven days' history is deleted a day's worth per day: vacuum running all day
        # keeps up with rate x 86,400 new jobs a day; the table then holds 7 days of them.
        "retention_sustained_jobs_per_day": rate * 86_400,
        "retention_reclaim_seconds": reclaim,
        "retention_server_cpu_us_per_row": busy.server_cpu / sizes.retention_rows * 1e6,
    }


# -- the report ----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


LABELS = {"direct": "direct", "pgbouncer": "PgBouncer"}


def tables(m: Metrics) -> str:
    """The scale, churn and retention tables, for the scenarios that ran."""
    out: list[str] = [f"server: {m['own_server']}", ""] if "own_server" in m else []
    rows = sorted({k.rsplit("_drain_jobs_per_s", 1)[0] for k in m
                   if k.startswith("scale_") and k.endswith("_drain_jobs_per_s")},
                  key=lambda k: (k.split("_")[1], int(k.split("_")[2])))
    if rows:
        out += ["| scale | phase | jobs | jobs/s | claim p50 / p95 ms | empty claims per job"
                " | connections (peak) | PostgreSQL CPU per job | start delay p50 / p95 ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        for key in rows:
            _, through, n = key.split("_")
            for phase in ("drain", "steady"):
                p = f"{key}_{phase}"
                out.append(
                    f"| {n} worker{'' if n == '1' else 's'}, {LABELS[through]} | {phase} | "
                    f"{_fmt(m[p + '_jobs'])} | "
                    f"{_fmt(m[p + '_jobs_per_s'], 0)} | {_fmt(m[p + '_claim_p50_ms'], 2)} / "
                    f"{_fmt(m[p + '_claim_p95_ms'], 2)} | "
                    f"{_fmt(m[p + '_empty_claims_per_job'], 2)} | "
                    f"{_fmt(m[p + '_connections_peak'])} | "
                    f"{_fmt(m[p + '_server_cpu_us_per_job'], 0)} us | "
                    f"{_fmt(m.get(p + '_start_delay_p50_ms'), 1)} / "
                    f"{_fmt(m.get(p + '_start_delay_p95_ms'), 1)} |")
        out.append("")
    for name in ("churn_plain", "churn_vacuum"):
        if f"{name}_jobs" in m:
            if not any(line.startswith("| churn") for line in out):
                out += ["| churn | jobs | seconds | live / dead tuples | autovacuums | table MB"
                        " | indexes MB | claim p95 first / last batch ms |",
                        "|---|---|---|---|---|---|---|---|"]
            label = "`pgsched vacuum` after each batch" if name == "churn_vacuum" else "no vacuum"
            out.append(
                f"| {label} | {_fmt(m[name + '_jobs'])} | {_fmt(m[name + '_seconds'], 0)} | "
                f"{_fmt(m[name + '_live_tuples'])} / {_fmt(m[name + '_dead_tuples'])} | "
                f"{_fmt(m[name + '_autovacuums'])} | {_fmt(m[name + '_table_mb'])} | "
                f"{_fmt(m[name + '_indexes_mb'])} | {_fmt(m[name + '_start_claim_p95_ms'], 2)}"
                f" / {_fmt(m[name + '_end_claim_p95_ms'], 2)} |")
    if any(k.startswith("churn_") for k in m):
        naptime = next(m[k] for k in m if k.endswith("_autovacuum_naptime"))
        out += ["", f"(server default autovacuum_naptime = {naptime}; `pgsched vacuum` runs "
                "VACUUM (ANALYZE) after deleting 10,000 jobs or more)", ""]
    if "retention_rows" in m:
        out += ["| retention | figure |", "|---|---|",
                f"| finished jobs deleted by `pgsched vacuum` | {_fmt(m['retention_rows'])} in "
                f"{_fmt(m['retention_vacuum_seconds'])} s: "
                f"{_fmt(m['retention_delete_rows_per_s'], 0)} rows/s |",
                f"| claim p50 / p95, stream of {_fmt(m['retention_stream_jobs_per_s'], 0)}"
                f" jobs/s, no vacuum | {_fmt(m['retention_quiet_claim_p50_ms'], 2)} / "
                f"{_fmt(m['retention_quiet_claim_p95_ms'], 2)} ms |",
                f"| the same while vacuum runs | {_fmt(m['retention_busy_claim_p50_ms'], 2)} / "
                f"{_fmt(m['retention_busy_claim_p95_ms'], 2)} ms |",
                f"| then VACUUM ANALYZE of the table | "
                f"{_fmt(m['retention_reclaim_seconds'])} s |",
                f"| PostgreSQL CPU per deleted row (stream included) | "
                f"{_fmt(m['retention_server_cpu_us_per_row'], 0)} us |",
                f"| jobs/day retention sustains at 7 days (delete rate x 86,400) | "
                f"{_fmt(m['retention_sustained_jobs_per_day'], 0)} |", ""]
    return "\n".join(out)
