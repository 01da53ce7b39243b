"""Turning a run's metrics into the printed table and the list of targets met or missed.

Owns: the targets of issues 11 and 14 (each a ratio to the raw ceiling of the same run, a
multiple of a peer measured in the same run, or an absolute bound) and the Markdown report
the benchmark prints and writes, whose tables are also the ones pasted into the docs.
Values are medians over the rounds; ratios are medians of the per-round ratios, with their
range in brackets. pgsched / peer is a throughput ratio (above 1: pgsched is faster) or,
for latencies, p50 over p50 (below 1: pgsched starts jobs sooner). A row whose metric a
partial run (--only) did not produce is left out; a target's peer part is judged only
when the peer was measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .ops_at_size import table as ops_table
from .scale import tables as scale_tables

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Row:
    label: str
    key: str  # the metric shown (for latencies, the prefix of p50/p95/max)
    unit: str
    reference: str | None = None  # metric the value is divided by
    target: str = ""
    at_least: float | None = None  # target: this fraction of the reference
    met: Callable[[Metrics], bool] | None = None  # any other target, on the medians
    peer: str | None = None  # the peer's metric beside it (latencies: its prefix)
    peer_at_least: float | None = None  # target: this multiple of the peer (if measured)


def ratios(m: Metrics, key: str, ref: str, rounds: Sequence[Metrics] = ()) -> list[float]:
    """key / ref for each round (each pair measured minutes apart at most, so load from
    elsewhere on the machine mostly cancels out), else the ratio of the medians."""
    paired = [r[key] / r[ref] for r in rounds if key in r and r.get(ref)]
    if not paired and key in m and m.get(ref):
        paired = [m[key] / m[ref]]
    return paired


def _at_most(key: str, bound: float) -> Callable[[Metrics], bool]:
    return lambda m: m[key] <= bound


ROWS = [
    Row("enqueue-loop: 10k schedule() calls", "enqueue_loop_jobs_per_s", "jobs/s",
        "raw_insert_loop_rows_per_s", ">= 90% of raw insert loop", at_least=0.9),
    Row("enqueue-loop against the raw insert loop with a NOTIFY each",
        "enqueue_loop_jobs_per_s", "jobs/s", "raw_notify_loop_rows_per_s", ""),
    Row("enqueue-loop interleaved with the raw insert loop (batches of 250, same table)",
        "enqueue_loop_interleaved_jobs_per_s", "jobs/s", "raw_interleaved_insert_rows_per_s",
        ""),
    Row("enqueue-loop interleaved with the raw insert + NOTIFY loop",
        "enqueue_loop_interleaved_jobs_per_s", "jobs/s", "raw_interleaved_notify_rows_per_s",
        ""),
    Row("enqueue-bulk: 10k via schedule_bulk()", "enqueue_bulk_10k_jobs_per_s", "jobs/s",
        "raw_copy_10k_rows_per_s", ">= 80% of raw COPY, >= 3x peer", at_least=0.8,
        peer="pgqueuer_enqueue_bulk_10k_jobs_per_s", peer_at_least=3.0),
    Row("enqueue-bulk: 100k via schedule_bulk()", "enqueue_bulk_jobs_per_s", "jobs/s",
        "raw_copy_rows_per_s", ">= 80% of raw COPY", at_least=0.8),
    Row("drain-1: 10k no-op jobs, 1 worker, default configuration",
        "drain_1_default_jobs_per_s", "jobs/s", "raw_claim_jobs_per_s",
        ">= 60% of raw claim-100, >= 1.5x peer", at_least=0.6,
        peer="pgqueuer_drain_1_jobs_per_s", peer_at_least=1.5),
    Row("drain-1: worker CPU per job, default configuration",
        "drain_1_default_worker_cpu_us_per_job", "us/job", None, "<= 25 us",
        met=_at_most("drain_1_default_worker_cpu_us_per_job", 25)),
    Row("drain-2: 10k no-op jobs, 2 workers, default configuration", "drain_2_jobs_per_s",
        "jobs/s", "raw_claim_jobs_per_s", ">= 60% of raw claim-100, >= 1.5x peer",
        at_least=0.6, peer="pgqueuer_drain_2_jobs_per_s", peer_at_least=1.5),
    Row("drain-2: worker CPU per job (both workers)", "drain_2_worker_cpu_us_per_job",
        "us/job", None, "<= 25 us", met=_at_most("drain_2_worker_cpu_us_per_job", 25)),
    Row("drain-1 at concurrency 100", "drain_1_jobs_per_s", "jobs/s", "raw_claim_jobs_per_s"),
    Row("drain-1 default configuration against concurrency 100", "drain_1_default_jobs_per_s",
        "jobs/s", "drain_1_jobs_per_s", ">= 90% of concurrency 100", at_least=0.9),
    Row("drain-1 at concurrency 100, [log] level = warning", "drain_1_quiet_jobs_per_s",
        "jobs/s", "raw_claim_jobs_per_s"),
    Row("backlog: drain-1 (concurrency 100) beside 1M done + 200k future",
        "backlog_jobs_per_s", "jobs/s", "drain_1_jobs_per_s", ">= 80% of drain-1 at 100",
        at_least=0.8),
    Row("due-latency: idle worker, 200 jobs at distinct instants", "due_latency", "ms", None,
        "p50 <= 2, p95 <= 10",
        met=lambda m: m["due_latency_p50_ms"] <= 2 and m["due_latency_p95_ms"] <= 10,
        peer="pgqueuer_due_latency"),
    Row("due-latency under load: the worker drains a stream at half its drain-1 rate",
        "due_latency_load", "ms", None, "p95 <= 50",
        met=_at_most("due_latency_load_p95_ms", 50)),
    Row("due-latency under load, stream at half the rate the worker reaches while fed",
        "due_latency_fed", "ms", None, "p95 <= 50", met=_at_most("due_latency_fed_p95_ms", 50)),
    Row("due-latency-fed: the worker's rate while fed (half of it is the stream)",
        "due_latency_fed_peak_jobs_per_s", "jobs/s", "drain_1_default_jobs_per_s"),
    Row("enqueue-latency: commit to start", "enqueue_latency", "ms", None, "p50 <= 2",
        met=_at_most("enqueue_latency_p50_ms", 2)),
    Row("raw latency floor: due-latency's jobs, a plain psycopg loop (timer, spin, claim)",
        "raw_due_latency", "ms"),
    Row("raw latency floor: enqueue-latency's jobs, a plain psycopg loop (NOTIFY, claim)",
        "raw_enqueue_latency", "ms"),
    Row("recurring: 10k schedules every minute, 3 workers, window to start",
        "recurring_window_to_start", "ms", None, "p95 <= 1000",
        met=_at_most("recurring_window_to_start_p95_ms", 1000)),
    Row("recurring: (schedule, window) pairs lost / doubled", "recurring_windows_lost",
        "windows", None, "0 / 0",
        met=lambda m: m["recurring_windows_lost"] == 0 and m["recurring_windows_doubled"] == 0),
    Row("idle worker: CPU", "idle_cpu_percent", "% of a core", None, "< 1%",
        met=lambda m: m["idle_cpu_percent"] < 1),
    Row("idle worker: statements", "idle_statements_per_min", "per minute", None, "<= ~30",
        met=_at_most("idle_statements_per_min", 30)),
    Row("worker peak RSS while draining (drain-1 at 100)", "drain_1_worker_peak_rss_mb", "MB",
        None, "< 100 MB", met=lambda m: m["drain_1_worker_peak_rss_mb"] < 100),
    Row("CLI start-up: pgsched --version (wall)", "cli_version", "ms", None, "p50 <= 150",
        met=lambda m: m["cli_version_p50_ms"] <= 150),
    Row("CLI start-up: pgsched --help (wall)", "cli_help", "ms", None, "p50 <= 150",
        met=lambda m: m["cli_help_p50_ms"] <= 150),
    Row("CLI start-up: pgsched ls, 50 jobs (wall)", "cli_ls", "ms", None, "p50 <= 150",
        met=lambda m: m["cli_ls_p50_ms"] <= 150),
    Row("CLI start-up: pgsched add (wall)", "cli_add", "ms", None),
    *(Row(f"CLI start-up: pgsched {name} (CPU, median)", f"cli_{key}_cpu_p50_ms", "ms cpu")
      for name, key in (("--version", "version"), ("--help", "help"), ("ls", "ls"),
                        ("add", "add"))),
    Row("web: GET /api/jobs?limit=50 beside 1M done + 200k pending", "web_jobs", "ms", None,
        "p95 <= 20", met=lambda m: m["web_jobs_p95_ms"] <= 20),
    Row("web: GET /api/status, same table", "web_status", "ms"),
    Row("web: GET /api/status?active=true (the dashboard's)", "web_status_active", "ms"),
    Row("web: job completion to its SSE event", "web_sse_latency", "ms", None, "p95 <= 200",
        met=lambda m: m["web_sse_latency_p95_ms"] <= 200),
    Row("web: 200 SSE clients on one process, CPU", "web_sse_clients_cpu_percent",
        "% of a core"),
    Row("web: 200 SSE clients on one process, RSS", "web_sse_clients_rss_mb", "MB"),
    Row("web: share of job events every SSE client got", "web_sse_clients_min_delivered",
        "of 1"),
    # Issue 14's figures (the opt-in scenarios scale, churn and retention: bench/scale.py).
    *(Row(f"scale: empty claims per job, {n} worker{'s' * (n > 1)}, steady 200 jobs/s, direct",
          f"scale_direct_{n}_steady_empty_claims_per_job", "per job", None, "<= 1",
          met=_at_most(f"scale_direct_{n}_steady_empty_claims_per_job", 1.0))
      for n in (1, 10, 50)),
    Row("scale: server connections, 50 workers through PgBouncer",
        "scale_pgbouncer_50_steady_connections_peak", "connections", None,
        "<= 97 (max_connections 100)",
        met=_at_most("scale_pgbouncer_50_steady_connections_peak", 97)),
    Row("churn: claim p95 in the last of 1M jobs, vacuum after each batch",
        "churn_vacuum_end_claim_p95_ms", "ms p95", "churn_vacuum_start_claim_p95_ms",
        "<= 2x the first batch's", met=lambda m: m["churn_vacuum_end_claim_p95_ms"]
        <= 2 * m["churn_vacuum_start_claim_p95_ms"]),
    Row("retention: jobs/day `pgsched vacuum` sustains at 7 days",
        "retention_sustained_jobs_per_day", "jobs/day", None, ">= 10M",
        met=lambda m: m["retention_sustained_jobs_per_day"] >= 10_000_000),
    Row("retention: claim p95 while vacuum deletes", "retention_busy_claim_p95_ms", "ms p95",
        "retention_quiet_claim_p95_ms", "<= 2x without it",
        met=lambda m: m["retention_busy_claim_p95_ms"]
        <= 2 * m["retention_quiet_claim_p95_ms"]),
    *(Row(f"queues: claim of 10, worker of every queue, {n:,} queue{'s' * (n > 1)} with jobs due",
          f"queues_{n}_all", "ms") for n in (1, 10, 100, 1000)),
    Row("queues: worker of every queue, 1,000 queues against 1 (claim p50)",
        "queues_1000_all_p50_ms", "x 1 queue", None, "<= 2x (flat)",
        met=lambda m: m["queues_1000_all_p50_ms"] <= 2 * m["queues_1_all_p50_ms"]),
    *(Row(f"queues: claim of 10, all {n:,} queue{'s' * (n > 1)} listed by name",
          f"queues_{n}_listed", "ms") for n in (1, 10, 100, 1000)),
    Row("raw: COPY 100k rows", "raw_copy_rows_per_s", "rows/s"),
    Row("raw: COPY 10k rows", "raw_copy_10k_rows_per_s", "rows/s"),
    Row("raw: single-row INSERT loop", "raw_insert_loop_rows_per_s", "rows/s"),
    Row("raw: single-row INSERT + NOTIFY loop", "raw_notify_loop_rows_per_s", "rows/s"),
    Row("raw: claim 100 SKIP LOCKED + complete", "raw_claim_jobs_per_s", "jobs/s"),
]


def _value(key: str, unit: str, m: Metrics) -> str | None:
    if unit == "ms":
        keys = [f"{key}_{p}_ms" for p in ("p50", "p95", "max")]
        if not all(k in m for k in keys):
            return None
        shown = " / ".join(f"{m[k]:.1f}" for k in keys) + " ms (p50/p95/max)"
        stream = m.get(f"{key}_stream_jobs_per_s")
        return shown + (f", stream {stream:,.0f} jobs/s" if stream else "")
    if key not in m:
        return None
    value = m[key]
    if unit == "x 1 queue":
        return f"{value / m['queues_1_all_p50_ms']:.2f}x ({value:.2f} ms)"
    if unit == "ms cpu":
        return f"{value:.0f} ms"
    if unit == "windows":
        return (f"{value} / {m['recurring_windows_doubled']} of "
                f"{m['recurring_windows_expected']:,}")
    if unit in ("jobs/s", "rows/s", "jobs/day", "connections"):
        return f"{value:,.0f} {unit}"
    if unit == "us/job":
        return f"{value:.0f} us"
    return f"{value:.2f} {unit}" if unit != "per minute" else f"{value:.1f} /min"


def _peer_ratios(row: Row, m: Metrics, rounds: Sequence[Metrics]) -> list[float]:
    """pgsched / peer: throughput paired by round; latencies p50 over p50 (lower is better)."""
    if row.peer is None:
        return []
    if row.unit == "ms":
        return ratios(m, f"{row.key}_p50_ms", f"{row.peer}_p50_ms")
    return ratios(m, row.key, row.peer, rounds)


def evaluate(m: Metrics, rounds: Sequence[Metrics] = ()) -> list[dict[str, Any]]:
    """One entry per row: its value, ratios to its reference and its peer, and whether its
    target is met (None when the run did not produce what the target needs; a peer part
    counts only when the peer was measured)."""
    results = []
    for row in ROWS:
        paired = ratios(m, row.key, row.reference, rounds) if row.reference else []
        share = statistics.median(paired) if paired else None
        to_peer = _peer_ratios(row, m, rounds)
        versus = statistics.median(to_peer) if to_peer else None
        checks: list[bool | None] = []
        if row.at_least is not None:
            checks.append(None if share is None else share >= row.at_least)
        if row.peer_at_least is not None and versus is not None:
            checks.append(versus >= row.peer_at_least)
        if row.met is not None:
            try:
                checks.append(bool(row.met(m)))
            except (KeyError, TypeError):
                checks.append(None)
        met = None if not checks or None in checks else all(checks)
        results.append({
            "label": row.label, "value": _value(row.key, row.unit, m),
            "reference": row.reference, "ratio": share,
            "ratio_range": [min(paired), max(paired)] if paired else None,
            "peer": _value(row.peer, row.unit, m) if row.peer else None,
            "peer_ratio": versus,
            "peer_ratio_range": [min(to_peer), max(to_peer)] if to_peer else None,
            "target": row.target or None, "met": met,
        })
    return results


def _ratio(value: float | None, spread: list[float] | None, percent: bool) -> str:
    if value is None:
        return ""
    shown = (lambda x: f"{x:.0%}") if percent else (lambda x: f"{x:.2f}x")
    low, high = spread or (value, value)
    return shown(value) + (f" ({shown(low)}-{shown(high)})" if high > low else "")


def table(m: Metrics, rounds: Sequence[Metrics] = ()) -> str:
    """The targets table; with a peer measured, its figure and pgsched / peer beside."""
    results = [r for r in evaluate(m, rounds) if r["value"] is not None]
    with_peer = any(r["peer"] for r in results)
    head = ["scenario", "pgsched", "ratio", "target", "met"]
    if with_peer:
        head[3:3] = ["PgQueuer", "pgsched / PgQueuer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ratio = _ratio(r["ratio"], r["ratio_range"], True)
        cells = [r["label"], r["value"], ratio and f"{ratio} of {_short(r['reference'])}",
                 r["target"] or "", {True: "yes", False: "**no**", None: ""}[r["met"]]]
        if with_peer:
            cells[3:3] = [r["peer"] or "", _ratio(r["peer_ratio"], r["peer_ratio_range"], False)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CPU_ROWS = [
    ("raw claim-100 loop", "raw_claim_client_cpu_us_per_job", "raw_claim_server_cpu_us_per_job"),
    ("drain-1, default configuration", "drain_1_default_worker_cpu_us_per_job",
     "drain_1_default_server_cpu_us_per_job"),
    ("drain-2, default configuration", "drain_2_worker_cpu_us_per_job",
     "drain_2_server_cpu_us_per_job"),
    ("drain-1 at concurrency 100", "drain_1_worker_cpu_us_per_job",
     "drain_1_server_cpu_us_per_job"),
    ("drain-1 at 100, log level warning", "drain_1_quiet_worker_cpu_us_per_job",
     "drain_1_quiet_server_cpu_us_per_job"),
    ("backlog", "backlog_worker_cpu_us_per_job", "backlog_server_cpu_us_per_job"),
]


def cpu_table(m: Metrics) -> str:
    """Where a job's CPU goes: the Python side (the raw loop's own process, the worker
    processes, or the enqueuing process) and the server (every PostgreSQL process)."""
    lines = ["| CPU per job | Python side | PostgreSQL |", "|---|---|---|"]
    for label, client, server in CPU_ROWS:
        if client in m:
            shown = f"{m[server]:.0f} us" if server in m else "n/a"
            lines.append(f"| {label} | {m[client]:.0f} us | {shown} |")
    for label, key in (("enqueue-loop schedule() (client only)",
                        "enqueue_loop_client_cpu_us_per_job"),
                       ("enqueue-loop interleaved: schedule() (client only)",
                        "enqueue_loop_interleaved_client_cpu_us_per_job"),
                       ("enqueue-loop interleaved: raw insert + NOTIFY (client only)",
                        "raw_interleaved_notify_client_cpu_us_per_row"),
                       ("raw COPY (client only)", "raw_copy_client_cpu_us_per_row"),
                       ("enqueue-bulk 100k (client only)", "enqueue_bulk_client_cpu_us_per_job"),
                       ("enqueue-bulk 10k (client only)",
                        "enqueue_bulk_10k_client_cpu_us_per_job")):
        if key in m:
            lines.append(f"| {label} | {m[key]:.1f} us | |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole report: when, on what, under what load, the targets table and the CPU split."""
    load = " / ".join
    return "\n".join([
        f"pgsched benchmark, {result['date']} ({result['rounds']} round(s), medians"
        + (", --quick: measures nothing" if result["quick"] else "") + ")",
        "",
        f"machine: {machine_line(result['machine'])}",
        "load average (1/5/15 min): at start "
        + load(f"{x:.2f}" for x in result["load_average_at_start"]) + ", at end "
        + load(f"{x:.2f}" for x in result["load_average_at_end"]),
        f"peers: {', '.join(result['peers']) or 'none (--peers pgqueuer to add one)'}",
        "",
        table(result["metrics"], result["rounds_metrics"]),
        "",
        cpu_table(result["metrics"]),
        "",
        scale_tables(result["metrics"]),
        ops_table(result["metrics"]),
    ])


def _short(reference: str | None) -> str:
    return {
        "raw_insert_loop_rows_per_s": "raw insert",
        "raw_notify_loop_rows_per_s": "raw insert + NOTIFY",
        "raw_interleaved_insert_rows_per_s": "raw insert, interleaved",
        "raw_interleaved_notify_rows_per_s": "raw insert + NOTIFY, interleaved",
        "raw_copy_rows_per_s": "raw COPY",
        "raw_copy_10k_rows_per_s": "raw COPY",
        "raw_claim_jobs_per_s": "raw claim",
        "drain_1_jobs_per_s": "drain-1 at 100",
        "churn_vacuum_start_claim_p95_ms": "the first batch",
        "retention_quiet_claim_p95_ms": "without vacuum",
    }.get(reference or "", reference or "")


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['nproc']} x {machine['cpu_model']}, {machine['ram_gb']} GB RAM, "
            f"PostgreSQL {machine['postgresql']} ({machine['server']}), "
            f"Python {machine['python']}, pgsched {machine['pgsched']}"
            + (f" @ {machine['commit']}" if machine.get("commit") else ""))
