"""Prometheus metrics and the /healthz check of one worker process.

Owns: the worker's counters and histogram (`WorkerMetrics`, fed by the daemon through a
few hook calls), the gauges read when scraped (this worker's slots; every queue's due,
scheduled and running jobs, lag and paused flag from one cheap query), and the small
HTTP server that serves them with `/healthz` on `[metrics] listen` (`MetricsServer`).

Invariants:
- Every Worker has its own CollectorRegistry, so several workers in one process (tests,
  an app running a worker in-process) never clash on metric names.
- The server runs on the worker's event loop, not in a thread: if the loop is wedged,
  /healthz stops answering, which is what a health check should report. It answers one
  request per connection (HTTP/1.0 style, `Connection: close`), GET and HEAD only, and
  drops clients that do not send their request, or read the answer, within
  REQUEST_TIMEOUT_SECONDS.
- At most MAX_CONNECTIONS connections are open at once; one beyond is closed as soon as
  it is accepted (and counted). Idle or flooding clients hold a bounded number of file
  descriptors, so they can never starve the worker's database connections.
- Label values come from job rows, which anyone with the runtime role's rights can
  write: each worker keeps at most MAX_LABEL_VALUES distinct task names and queue names
  as labels; rows beyond that count under OTHER_LABEL, so memory stays bounded. The
  series key (the bounded labels) of each (event, task, queue) the per-job hooks get is
  looked up once and kept (at most MAX_CACHED_SERIES, names of at most
  MAX_CACHED_NAME_CHARS). The per-job series are plain numbers, built into families
  when scraped (_JobSeries).
- The queue query runs at most once per QUEUE_STATS_TTL_SECONDS however many scrapers
  there are; when it fails the last values are served and the failure is counted.

Failure: a listen address that cannot be bound raises PgschedError when the worker
starts (before it claims anything). A broken client connection is dropped silently.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from ..config import parse_listen
from ..errors import PgschedError
from ..logs import get_logger
from ..version import __version__

if TYPE_CHECKING:
    from ..store import Store

log = get_logger("pgsched.metrics")

QUEUE_STATS_TTL_SECONDS = 5.0
QUEUE_STATS_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 5.0
MAX_CONNECTIONS = 64  # a few scrapers and health checks need a handful
# From a few milliseconds to an hour: jobs range from API calls to report builds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                    300, 600, 1800, 3600)
MAX_LABEL_VALUES = 200  # distinct task (and queue) names; far beyond real applications
MAX_CACHED_SERIES = 4 * MAX_LABEL_VALUES  # (event, task, queue) keys the per-job hooks keep
# Only names this short are cache keys: a row can hold a name of 100,000 characters, and
# MAX_CACHED_SERIES such keys would hold hundreds of MB (longer ones are bounded each time).
MAX_CACHED_NAME_CHARS = 200
OTHER_LABEL = "other"
JOB_EVENTS = {
    "started": "Jobs claimed and started by this worker.",
    "completed": "Jobs this worker ran to success (recorded).",
    "failed": "Jobs whose last allowed attempt failed on this worker (dead-lettered).",
    "retried": "Failed attempts on this worker that were scheduled for a retry.",
    "cancelled": "Running jobs this worker stopped because `pgsched cancel` asked it to.",
    "expired": "Jobs this worker found past their misfire grace and expired unrun.",
}


class WorkerMetrics:
    """Counters and the duration histogram; the daemon calls the methods below.

    The per-job series (pgsched_jobs_* and pgsched_job_duration_seconds) are plain
    numbers kept here and turned into metric families when the registry is collected
    (_JobSeries): prometheus_client's Counter.inc() and Histogram.observe(), each behind
    a lock, cost 0.5 and 0.8 us, three calls a job. The exposition is the same: names,
    help, labels, buckets, _total, _count, _sum and _created samples.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # (event, task label, queue label): jobs counted; the same key: when first counted
        self._counts: dict[tuple[str, str, str], int] = {}
        self._counts_created: dict[tuple[str, str, str], float] = {}
        # (task label, queue label, outcome): [runs per bucket (not cumulative, +Inf
        # last), sum of seconds, when first observed]
        self._durations: dict[tuple[str, str, str], list[Any]] = {}
        self.registry.register(_JobSeries(self))
        labels = ("task", "queue")
        self._recovered = Counter(
            "pgsched_jobs_recovered", "Orphaned jobs (lease expired) this worker recovered, "
            "by the status they got: pending (run again), failed (poison pill), cancelled.",
            (*labels, "status"), registry=self.registry)
        self._renewals = Counter("pgsched_lease_renewals", "Job leases renewed.",
                                 registry=self.registry)
        self._losses = Counter("pgsched_lease_losses", "Jobs whose lease this worker lost "
                               "(recovered or replaced elsewhere); their outcome is dropped.",
                               registry=self.registry)
        self._db_errors = Counter("pgsched_db_errors", "Database operations that failed "
                                  "with a connection error, by operation.", ("operation",),
                                  registry=self.registry)
        self._reconnects = Counter("pgsched_db_reconnects", "Times the LISTEN connection was "
                                   "re-established after it was lost.", registry=self.registry)
        self._tasks: set[str] = set()
        self._queues: set[str] = set()
        # (event or outcome, task, queue) as the hooks get them: the key of their series
        # in _counts, or their entry in _durations
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[tuple[str, str, str], Any] = {}

    def job(self, event: str, task: str, queue: str) -> None:
        key = (event, task, queue)
        series = self._counted.get(key)
        if series is None:
            if event not in JOB_EVENTS:
                raise ValueError(f"unknown job event {event!r}")
            series = _kept(self._counted, key, (event, *self._labels(task, queue)))
            self._counts_created.setdefault(series, time.time())
        self._counts[series] = self._counts.get(series, 0) + 1

    def job_ran(self, task: str, queue: str, outcome: str, seconds: float) -> None:
        key = (outcome, task, queue)
        entry = self._timed.get(key)
        if entry is None:
            labels = (*self._labels(task, queue), outcome)
            entry = self._durations.get(labels)
            if entry is None:
                entry = self._durations[labels] = [[0] * len(_BOUNDS), 0.0, time.time()]
            _kept(self._timed, key, entry)
        entry[0][bisect.bisect_left(_BOUNDS, seconds)] += 1  # the first bound >= seconds
        entry[1] += seconds

    def job_recovered(self, task: str, queue: str, status: str) -> None:
        self._recovered.labels(*self._labels(task, queue), status).inc()

    def _labels(self, task: str, queue: str) -> tuple[str, str]:
        return _bounded(self._tasks, task), _bounded(self._queues, queue)

    def leases_renewed(self, count: int) -> None:
        self._renewals.inc(count)

    def lease_lost(self) -> None:
        self._losses.inc()

    def db_error(self, operation: str) -> None:
        self._db_errors.labels(operation).inc()

    def db_reconnected(self) -> None:
        self._reconnects.inc()


# The duration histogram's bucket bounds, +Inf last (Histogram adds it the same way).
_BOUNDS = (*DURATION_BUCKETS, float("inf"))
DURATION_HELP = ("Time from start to outcome of each attempt run on this worker, by "
                 "outcome: completed, failed, cancelled.")


class _JobSeries(Collector):
    """The per-job counters and histogram of a WorkerMetrics, as prometheus_client's
    Counter and Histogram would expose them (a _created sample unless prometheus_client's
    created series are disabled)."""

    def __init__(self, metrics: WorkerMetrics):
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        """The families, without samples: the registry learns their names, as it does a
        Counter's, so a scrape asking for names (?name[]=, restricted_registry) gets them."""
        for event, doc in JOB_EVENTS.items():
            yield CounterMetricFamily(f"pgsched_jobs_{event}", doc, labels=("task", "queue"))
        yield HistogramMetricFamily("pgsched_job_duration_seconds", DURATION_HELP,
                                    labels=("task", "queue", "outcome"))

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        created = getattr(prometheus_metrics, "_use_created", True)
        counts = list(m._counts.items())  # the loop may add series meanwhile (a thread)
        for event, doc in JOB_EVENTS.items():
            family = CounterMetricFamily(f"pgsched_jobs_{event}", doc, labels=("task", "queue"))
            for key, value in counts:
                if key[0] == event:  # float: the value a Counter gives
                    family.add_metric(key[1:], float(value),
                                      created=m._counts_created[key] if created else None)
            yield family
        name = "pgsched_job_duration_seconds"
        histogram = HistogramMetricFamily(name, DURATION_HELP,
                                          labels=("task", "queue", "outcome"))
        for labels, (runs, total, since) in list(m._durations.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip(_BOUNDS, list(runs), strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            histogram.add_metric(labels, buckets, total)
            if created:
                histogram.samples.append(Sample(f"{name}_created",
                                             dict(zip(("task", "queue", "outcome"), labels,
                                                      strict=True)), since))
        yield histogram


def _kept(cache: dict[tuple[str, str, str], Any], key: tuple[str, str, str],
          series: Any) -> Any:
    """`series`, kept in `cache` under `key` while the cache has room and the key's names
    are short."""
    if (len(cache) < MAX_CACHED_SERIES
            and len(key[1]) + len(key[2]) <= MAX_CACHED_NAME_CHARS):
        cache[key] = series
    return series


class Observed(Protocol):
    """What the scrape and /healthz read of a worker (its context, or the Worker): this
    module imports neither, so that the context can hold a WorkerMetrics."""

    @property
    def id(self) -> str: ...
    @property
    def store(self) -> Store: ...
    @property
    def metrics(self) -> WorkerMetrics: ...
    @property
    def ready(self) -> asyncio.Event: ...
    @property
    def listening(self) -> bool: ...
    @property
    def last_db_ok(self) -> float | None: ...
    @property
    def options(self) -> Any: ...  # context.WorkerOptions
    @property
    def stopping(self) -> bool: ...
    @property
    def running_jobs(self) -> int: ...
    @property
    def hung_threads(self) -> int: ...
    @property
    def threads_over_cap(self) -> bool: ...


def _bounded(seen: set[str], value: str) -> str:
    """`value`, or OTHER_LABEL once MAX_LABEL_VALUES others have been seen."""
    if value in seen:
        return value
    if len(seen) < MAX_LABEL_VALUES:
        seen.add(value)
        return value
    return OTHER_LABEL


def health(worker: Observed) -> tuple[bool, dict[str, bool]]:
    """(healthy, checks): connected, serving, and talking to the database recently.

    "database" fails once nothing reached the database for a whole lease: by then this
    worker's leases are gone and other workers recover its jobs. "threads" fails once more
    sync tasks hang in abandoned threads than the worker replaces (its concurrency): they
    then take slots from new jobs, and the process needs a restart.
    """
    loop = asyncio.get_running_loop()
    checks = {
        "started": worker.ready.is_set(),
        "not_stopping": not worker.stopping,
        "listener_connected": worker.listening,
        "database": worker.last_db_ok is not None
        and loop.time() - worker.last_db_ok < worker.options.lease_seconds,
        "threads": not worker.threads_over_cap,
    }
    return all(checks.values()), checks


class _ScrapeCollector(Collector):
    """Gauges computed when scraped: this worker's slots and the queues' backlog."""

    def __init__(self, worker: Observed):
        self.worker = worker
        self.queue_rows: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        info = InfoMetricFamily("pgsched_worker", "This worker process.")
        info.add_metric([], {"worker_id": w.id, "version": __version__,
                             "queues": ",".join(w.options.queues or ()) or "*"})
        yield info
        yield GaugeMetricFamily("pgsched_worker_running_jobs", "Jobs running in this worker.",
                                value=w.running_jobs)
        yield GaugeMetricFamily("pgsched_worker_concurrency", "Job slots of this worker.",
                                value=w.options.concurrency)
        yield GaugeMetricFamily("pgsched_worker_abandoned_threads", "Threads still running a "
                                "sync task whose job timed out or was cancelled.",
                                value=w.hung_threads)
        gauges = {
            "due": GaugeMetricFamily("pgsched_queue_due_jobs", "Pending jobs that are due "
                                     "now, per queue (every worker reports the same value).",
                                     labels=["queue"]),
            "scheduled": GaugeMetricFamily("pgsched_queue_scheduled_jobs", "Pending jobs due "
                                           "in the future, per queue.", labels=["queue"]),
            "running": GaugeMetricFamily("pgsched_queue_running_jobs", "Running jobs per queue, "
                                         "on all workers.", labels=["queue"]),
            "lag_seconds": GaugeMetricFamily("pgsched_queue_lag_seconds", "How late the oldest "
                                             "due job of the queue is (0 when none is due).",
                                             labels=["queue"]),
            "paused": GaugeMetricFamily("pgsched_queue_paused", "1 if the queue is paused.",
                                        labels=["queue"]),
        }
        for row in self.queue_rows:
            for key, gauge in gauges.items():
                gauge.add_metric([row["queue"]], float(row[key]))
        yield from gauges.values()


class MetricsServer:
    """GET /metrics (Prometheus text or OpenMetrics) and GET /healthz (JSON, 200 or 503)."""

    def __init__(self, worker: Observed, listen: str):
        self.worker = worker
        self.listen = listen
        self._scrape = _ScrapeCollector(worker)
        worker.metrics.registry.register(self._scrape)
        self._stats_at: float | None = None
        self._stats_lock = asyncio.Lock()
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()  # strong references while serving
        self._connections = 0
        self._refused = Counter(
            "pgsched_metrics_connections_refused", "Connections to this endpoint closed "
            f"unanswered because {MAX_CONNECTIONS} were already open.",
            registry=worker.metrics.registry)
        self._queue_stat_errors = Counter(
            "pgsched_queue_stats_errors", "Scrapes whose queue query failed (the previous "
            "values were served).", registry=worker.metrics.registry)

    async def start(self) -> str:
        """Bind and serve; returns the address bound (the real port when 0 was asked)."""
        host, port = parse_listen(self.listen)
        loop = asyncio.get_running_loop()
        try:
            # The first address the host resolves to: the one reported is the one served.
            family, _, _, _, address = (await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
            sock = socket.create_server(address[:2], family=family, backlog=MAX_CONNECTIONS)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise PgschedError(
                f"cannot serve metrics on {self.listen}: {reason}; change "
                "[metrics] listen or stop what uses that port") from None
        sock.setblocking(False)
        self._socket = sock
        self._accepting = asyncio.create_task(self._accept(sock), name="metrics-accept")
        sockname = sock.getsockname()
        bound_host = f"[{sockname[0]}]" if family == socket.AF_INET6 else sockname[0]
        address_text = f"{bound_host}:{sockname[1]}"
        log.info("metrics_listening", address=address_text, paths="/metrics /healthz")
        return address_text

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(BaseException):
                await self._accepting
        if self._socket is not None:
            self._socket.close()

    async def _accept(self, sock: socket.socket) -> None:
        # Our own accept loop rather than asyncio's server: asyncio accepts a whole batch
        # and builds a transport and a task for each before any handler can refuse one, so
        # a flood held several batches of file descriptors at once. Here a connection
        # beyond the limit is closed the moment it is accepted.
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError:  # out of file descriptors, or the client reset: try again soon
                await asyncio.sleep(0.1)
                continue
            if self._connections >= MAX_CONNECTIONS:
                self._refused.inc()
                conn.close()
                continue
            self._connections += 1
            task = asyncio.create_task(self._serve(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _refresh_queue_stats(self) -> None:
        async with self._stats_lock:
            now = time.monotonic()
            if self._stats_at is not None and now - self._stats_at < QUEUE_STATS_TTL_SECONDS:
                return
            try:
                rows = await asyncio.wait_for(self.worker.store.queue_stats(exact=True),
                                              QUEUE_STATS_TIMEOUT_SECONDS)
            except Exception as exc:  # a scrape must never take the worker down
                self._queue_stat_errors.inc()
                log.debug("queue_stats_failed", error=str(exc).strip()[:200])
                return
            self._scrape.queue_rows = rows
            self._stats_at = now

    async def _serve(self, conn: socket.socket) -> None:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = await self._respond(head)
            header = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            method = head.split(b" ", 1)[0]
            writer.write(header.encode("latin-1") + (b"" if method == b"HEAD" else body))
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):  # a client that never reads
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                OSError):
            if writer is not None:
                writer.transport.abort()
        finally:
            self._connections -= 1
            if writer is None:
                conn.close()
            else:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"use GET\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            await self._refresh_queue_stats()
            accept = next((line.split(":", 1)[1].strip() for line in lines[1:]
                           if line.lower().startswith("accept:")), "")
            encoder, content_type = choose_encoder(accept)
            return "200 OK", content_type, encoder(self.worker.metrics.registry)
        if path == "/healthz":
            ok, checks = health(self.worker)
            body = json.dumps({"status": "ok" if ok else "unavailable", "checks": checks,
                               "worker_id": self.worker.id,
                               "abandoned_threads": self.worker.hung_threads}).encode() + b"\n"
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        if path == "/":
            return "200 OK", "text/plain", b"pgsched worker: /metrics /healthz\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics or /healthz\n"
