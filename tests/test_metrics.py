"""Prometheus metrics and /healthz, scraped with urllib from a real worker process."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import WorkerProcess, wait_until, write_config
from prometheus_client.parser import text_string_to_metric_families

from pgsched.scheduler import JobSpec
from pgsched.worker.metrics import WorkerMetrics


def metrics_config(tmp_path: Path, dsn: str, schema: str, **worker) -> Path:
    path = write_config(tmp_path, dsn, schema, **worker)
    path.write_text(path.read_text() + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
                    "\n[queues.slow]\nconcurrency = 1\n")
    return path


async def address_of(worker: WorkerProcess) -> str:
    await worker.wait_for_log('"event": "metrics_listening"')
    for line in worker.log().splitlines():
        if '"metrics_listening"' in line:
            return json.loads(line)["address"]
    raise AssertionError("no metrics_listening line")


def get(address: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) with a real HTTP client; errors are answers too."""
    request = urllib.request.Request(f"http://{address}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse the exposition with prometheus_client's own parser (it must be valid)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


@pytest.fixture
async def metered(tmp_path, pg_dsn, schema, sched, workers):
    await sched.store.pause_queues(["held"])
    await sched.schedule("noop", queue="held")
    worker = workers(metrics_config(tmp_path, pg_dsn, schema))
    return worker, await address_of(worker)


async def test_scrape_counts_jobs_and_reports_queues(sched, metered):
    worker, address = metered
    await sched.schedule("add", args=(1, 2), queue="q1")
    await sched.schedule("fail", max_retries=1)
    await sched.schedule("noop", queue="q1", execution_time=datetime.now(UTC) + timedelta(hours=1))

    def scraped() -> dict | None:
        parsed = samples(get(address, "/metrics")[2])
        done = value(parsed, "pgsched_jobs_failed_total", task="fail", queue="default")
        return parsed if done == 1 else None

    parsed = await wait_until(scraped, what="failed job counted")
    assert value(parsed, "pgsched_jobs_started_total", task="add", queue="q1") == 1
    assert value(parsed, "pgsched_jobs_completed_total", task="add", queue="q1") == 1
    assert value(parsed, "pgsched_jobs_started_total", task="fail", queue="default") == 2
    assert value(parsed, "pgsched_jobs_retried_total", task="fail", queue="default") == 1
    assert value(parsed, "pgsched_job_duration_seconds_count",
                 task="add", queue="q1", outcome="completed") == 1
    assert value(parsed, "pgsched_job_duration_seconds_count",
                 task="fail", queue="default", outcome="failed") == 2
    assert value(parsed, "pgsched_lease_losses_total") == 0
    assert value(parsed, "pgsched_worker_concurrency") == 8
    # Queue gauges, from the database: the paused queue keeps its due job.
    assert value(parsed, "pgsched_queue_paused", queue="held") == 1
    assert value(parsed, "pgsched_queue_due_jobs", queue="held") == 1
    assert value(parsed, "pgsched_queue_lag_seconds", queue="held") >= 0
    assert value(parsed, "pgsched_queue_scheduled_jobs", queue="q1") == 1
    info = [k for k in parsed if k[0] == "pgsched_worker_info"]
    assert len(info) == 1 and ("queues", "*") in info[0][1]
    status, content_type, _ = get(address, "/metrics",
                                  {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert worker.proc.poll() is None


async def test_healthz_is_200_while_serving_and_503_once_stopping(sched, metered):
    worker, address = metered
    # The server is up before the worker has registered and claimed: 503 until then.
    _, content_type, body = await wait_until(
        lambda: (answer := get(address, "/healthz"))[0] == 200 and answer, what="healthy")
    assert content_type == "application/json"
    health = json.loads(body)
    assert health["status"] == "ok" and all(health["checks"].values())
    assert get(address, "/nope")[0] == 404
    # A client speaking nonsense gets a 400 and the server carries on.
    with socket.create_connection(tuple_of(address), timeout=5) as raw:
        raw.sendall(b"garbage\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    job_id = await sched.schedule("sleep", args=(60,))
    await wait_until(lambda: _running(sched, job_id), what="job running")
    worker.signal(signal.SIGTERM)  # grace is 5 s: the worker drains, still listening

    def unavailable() -> dict | None:
        status, _, body = get(address, "/healthz")
        return json.loads(body) if status == 503 else None

    health = await wait_until(unavailable, what="503 while draining")
    assert health["status"] == "unavailable" and health["checks"]["not_stopping"] is False
    assert await worker.wait() == 0


def tuple_of(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def _running(sched, job_id: str) -> bool:
    return str((await sched.get_job(job_id))["status"]) == "running"


async def test_metrics_port_in_use_is_one_clear_line(tmp_path, pg_dsn, schema, sched):
    from conftest import run_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, pg_dsn, schema)
        config.write_text(config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = run_cli("worker", config=config, timeout=30)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in "
                      "use; change [metrics] listen or stop what uses that port"]
    assert "Traceback" not in result.stderr


async def test_lease_losses_count_only_leases_really_lost(tmp_path, pg_dsn, schema, sched, workers):
    """A heartbeat in flight while a finished attempt's outcome commits does not renew
    that attempt (its row is no longer running): that is not a lost lease. Counted as one,
    the metric alerted on healthy workers (CI saw 1 in the scrape test)."""
    config = metrics_config(tmp_path, pg_dsn, schema, heartbeat_seconds=0.02)
    worker = workers(config)
    address = await address_of(worker)
    await sched.schedule_bulk([JobSpec("sleep", args=(0.01,)) for _ in range(600)])

    def scraped() -> dict | None:
        parsed = samples(get(address, "/metrics")[2])
        done = value(parsed, "pgsched_jobs_completed_total", task="sleep", queue="default")
        return parsed if done == 600 else None

    parsed = await wait_until(scraped, what="600 jobs completed", timeout=120)
    assert value(parsed, "pgsched_lease_renewals_total") > 0  # the heartbeat did run
    assert value(parsed, "pgsched_lease_losses_total") == 0
    assert '"lease_lost"' not in worker.log()


def test_hostile_long_task_names_are_not_kept_by_the_per_job_series_cache():
    """Task and queue names come from job rows (a poisoned row can hold a name of 100,000
    characters): the per-job hooks' series cache must not keep such names, or 800 of them
    per cache would hold hundreds of MB. Counting still works (beyond MAX_LABEL_VALUES
    names, under OTHER_LABEL)."""
    metrics = WorkerMetrics()
    for n in range(2_000):
        name = f"{n:05d}" + "t" * 10_000
        metrics.job("started", name, "default")
        metrics.job_ran(name, "default", "completed", 0.01)
    kept = sum(len(task) + len(queue) for cache in (metrics._counted, metrics._timed)
               for _, task, queue in cache)
    assert kept <= 1_000_000, f"{kept:,} characters of names kept"
    total = sum(sample.value for family in metrics.registry.collect()
                if family.name == "pgsched_jobs_started" for sample in family.samples
                if sample.name.endswith("_total"))
    assert total == 2_000


def test_per_job_series_are_exposed_as_prometheus_counters_and_a_histogram_would_be():
    """WorkerMetrics keeps the per-job counts and durations as plain numbers (cheaper per
    job) and builds their families when scraped: the samples (names, labels, values, le
    buckets, _count, _sum, _created) and each family's help and type are what
    prometheus_client's Counter and Histogram give for the same calls."""
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.exposition import generate_latest

    from pgsched.worker.metrics import DURATION_BUCKETS, DURATION_HELP, JOB_EVENTS

    registry = CollectorRegistry()
    counters = {event: Counter(f"pgsched_jobs_{event}", doc, ("task", "queue"),
                               registry=registry) for event, doc in JOB_EVENTS.items()}
    histogram = Histogram("pgsched_job_duration_seconds", DURATION_HELP,
                          ("task", "queue", "outcome"), buckets=DURATION_BUCKETS,
                          registry=registry)
    metrics = WorkerMetrics()
    calls = [("started", "a", "q"), ("started", "a", "q"), ("completed", "a", "q"),
             ("failed", "b", "default"), ("expired", "b", "q")]
    runs = [("a", "q", "completed", 0.005), ("a", "q", "completed", 0.0051),
            ("a", "q", "completed", 0.0), ("b", "default", "failed", 3599.0),
            ("b", "default", "failed", 7200.0), ("a", "q", "cancelled", 2.5)]
    for event, task, queue in calls:
        metrics.job(event, task, queue)
        counters[event].labels(task, queue).inc()
    for task, queue, outcome, seconds in runs:
        metrics.job_ran(task, queue, outcome, seconds)
        histogram.labels(task, queue, outcome).observe(seconds)

    def exposed(reg) -> tuple[dict, set]:
        text = generate_latest(reg).decode()
        heads = {line for line in text.splitlines() if line.startswith("#")
                 and ("pgsched_jobs_" in line or "pgsched_job_duration" in line)
                 and "recovered" not in line}
        values = {k: v for k, v in samples(text).items()
                  if k[0].startswith(("pgsched_jobs_", "pgsched_job_duration"))
                  and "recovered" not in k[0]}
        created = {k for k in values if k[0].endswith("_created")}
        return {k: v for k, v in values.items() if k not in created}, (heads, created)

    ours, theirs = exposed(metrics.registry), exposed(registry)
    assert ours == theirs
    assert ours[0][("pgsched_job_duration_seconds_bucket",
                    frozenset({"task": "a", "queue": "q", "outcome": "completed",
                               "le": "0.005"}.items()))] == 2


def test_per_job_series_are_found_by_name_as_prometheus_counters_and_a_histogram_are():
    """The registry serves the per-job series to a scrape that asks for them by name
    (prometheus_client's own HTTP handlers take ?name[]=, an application serving
    worker.metrics.registry with them) and to get_sample_value, as the Counter and
    Histogram objects they replaced did: values included (floats, as theirs)."""
    from prometheus_client.exposition import generate_latest

    metrics = WorkerMetrics()
    metrics.job("completed", "a", "q")
    metrics.job_ran("a", "q", "completed", 0.1)
    names = ["pgsched_jobs_completed_total", "pgsched_job_duration_seconds_count",
             "pgsched_job_duration_seconds_bucket"]
    text = generate_latest(metrics.registry.restricted_registry(names)).decode()
    assert 'pgsched_jobs_completed_total{queue="q",task="a"} 1.0' in text
    assert 'pgsched_job_duration_seconds_count{outcome="completed",queue="q",task="a"} 1.0' \
        in text
    assert 'pgsched_job_duration_seconds_bucket{le="0.1",outcome="completed",queue="q",' \
        'task="a"} 1.0' in text
    value = metrics.registry.get_sample_value("pgsched_jobs_completed_total",
                                              {"task": "a", "queue": "q"})
    assert repr(value) == "1.0"
