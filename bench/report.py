"""Turning a run's metrics into the printed table and the list of targets met or missed.

Owns: the targets of issue 4 (each a ratio to the raw ceiling of the same run, or an
absolute bound) and the Markdown tables the benchmark prints, which are also the tables
pasted into the README. Values are medians over the rounds; ratios are medians of the
per-round ratios, with their range in brackets. A row whose metric a partial run (--only)
did not produce is left out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


def ratios(m: Metrics, key: str, ref: str, rounds: Sequence[Metrics] = ()) -> list[float]:
    """key / ref for each round (each pair measured minutes apart at most, so load from
    elsewhere on the machine mostly cancels out), else the ratio of the medians."""
    paired = [r[key] / r[ref] for r in rounds if key in r and r.get(ref)]
    if not paired and key in m and m.get(ref):
        paired = [m[key] / m[ref]]
    return paired


ROWS = [
    Row("enqueue-loop: 10k schedule() calls", "enqueue_loop_jobs_per_s", "jobs/s",
        "raw_insert_loop_rows_per_s", ">= 80% of raw insert loop", at_least=0.8),
    Row("enqueue-bulk: 100k via schedule_bulk()", "enqueue_bulk_jobs_per_s", "jobs/s",
        "raw_copy_rows_per_s", ">= 80% of raw COPY", at_least=0.8),
    Row("drain-1: 20k no-op jobs, 1 worker (concurrency 100)", "drain_1_jobs_per_s",
        "jobs/s", "raw_claim_jobs_per_s", ">= 60% of raw claim-100", at_least=0.6),
    Row("drain-2: 20k no-op jobs, 2 workers (concurrency 100)", "drain_2_jobs_per_s",
        "jobs/s", "raw_claim_jobs_per_s", "> drain-1",
        met=lambda m: m["drain_2_jobs_per_s"] > m["drain_1_jobs_per_s"]),
    Row("drain-1 at the default concurrency (25)", "drain_1_default_jobs_per_s", "jobs/s",
        "raw_claim_jobs_per_s"),
    Row("drain-1 with [log] level = warning", "drain_1_quiet_jobs_per_s", "jobs/s",
        "raw_claim_jobs_per_s"),
    Row("backlog: drain-1 beside 1M done + 200k future", "backlog_jobs_per_s", "jobs/s",
        "drain_1_jobs_per_s", ">= 80% of drain-1", at_least=0.8),
    Row("due-latency: 200 jobs at distinct instants", "due_latency", "ms", None,
        "p50 <= 5, p95 <= 20",
        met=lambda m: m["due_latency_p50_ms"] <= 5 and m["due_latency_p95_ms"] <= 20),
    Row("enqueue-latency: commit to start", "enqueue_latency", "ms", None, "p50 <= 5",
        met=lambda m: m["enqueue_latency_p50_ms"] <= 5),
    Row("idle worker: CPU", "idle_cpu_percent", "% of a core", None, "< 1%",
        met=lambda m: m["idle_cpu_percent"] < 1),
    Row("idle worker: statements", "idle_statements_per_min", "per minute", None, "<= ~30",
        met=lambda m: m["idle_statements_per_min"] <= 30),
    Row("worker peak RSS while draining (drain-1)", "drain_1_worker_peak_rss_mb", "MB", None,
        "< 100 MB", met=lambda m: m["drain_1_worker_peak_rss_mb"] < 100),
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
    Row("raw: COPY 100k rows", "raw_copy_rows_per_s", "rows/s"),
    Row("raw: single-row INSERT loop", "raw_insert_loop_rows_per_s", "rows/s"),
    Row("raw: claim 100 SKIP LOCKED + complete", "raw_claim_jobs_per_s", "jobs/s"),
]


def _value(row: Row, m: Metrics) -> str | None:
    if row.unit == "ms":
        keys = [f"{row.key}_{p}_ms" for p in ("p50", "p95", "max")]
        if not all(k in m for k in keys):
            return None
        return " / ".join(f"{m[k]:.1f}" for k in keys) + " ms (p50/p95/max)"
    if row.key not in m:
        return None
    value = m[row.key]
    if row.unit in ("jobs/s", "rows/s"):
        return f"{value:,.0f} {row.unit}"
    return f"{value:.2f} {row.unit}" if row.unit != "per minute" else f"{value:.1f} /min"


def evaluate(m: Metrics, rounds: Sequence[Metrics] = ()) -> list[dict[str, Any]]:
    """One entry per row: its value, ratio to its reference and whether its target is met
    (None when the run did not produce what the target needs)."""
    results = []
    for row in ROWS:
        paired = ratios(m, row.key, row.reference, rounds) if row.reference else []
        share = statistics.median(paired) if paired else None
        met = None
        if row.at_least is not None:
            met = None if share is None else share >= row.at_least
        elif row.met is not None:
            try:
                met = bool(row.met(m))
            except (KeyError, TypeError):
                met = None
        results.append({"label": row.label, "value": _value(row, m), "reference": row.reference,
                        "ratio": share, "ratio_range": [min(paired), max(paired)] if paired
                        else None, "target": row.target or None, "met": met})
    return results


def table(m: Metrics, rounds: Sequence[Metrics] = ()) -> str:
    lines = ["| scenario | result | ratio | target | met |", "|---|---|---|---|---|"]
    for r in evaluate(m, rounds):
        if r["value"] is None:
            continue
        shown = ""
        if r["ratio"] is not None:
            low, high = r["ratio_range"]
            spread = f" ({low:.0%}-{high:.0%})" if high > low else ""
            shown = f"{r['ratio']:.0%}{spread} of {_short(r['reference'])}"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['label']} | {r['value']} | {shown} | {r['target'] or ''} | {met} |")
    return "\n".join(lines)


CPU_ROWS = [
    ("raw claim-100 loop", "raw_claim_client_cpu_us_per_job", "raw_claim_server_cpu_us_per_job"),
    ("drain-1", "drain_1_worker_cpu_us_per_job", "drain_1_server_cpu_us_per_job"),
    ("drain-2", "drain_2_worker_cpu_us_per_job", "drain_2_server_cpu_us_per_job"),
    ("drain-1 at concurrency 25", "drain_1_default_worker_cpu_us_per_job",
     "drain_1_default_server_cpu_us_per_job"),
    ("drain-1, log level warning", "drain_1_quiet_worker_cpu_us_per_job",
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
    for label, key in (("raw COPY (client only)", "raw_copy_client_cpu_us_per_row"),
                       ("enqueue-bulk (client only)", "enqueue_bulk_client_cpu_us_per_job")):
        if key in m:
            lines.append(f"| {label} | {m[key]:.1f} us | |")
    return "\n".join(lines)


def _short(reference: str | None) -> str:
    return {
        "raw_insert_loop_rows_per_s": "raw insert",
        "raw_copy_rows_per_s": "raw COPY",
        "raw_claim_jobs_per_s": "raw claim",
        "drain_1_jobs_per_s": "drain-1",
    }.get(reference or "", reference or "")


def machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['nproc']} x {machine['cpu_model']}, {machine['ram_gb']} GB RAM, "
            f"PostgreSQL {machine['postgresql']} ({machine['server']}), "
            f"Python {machine['python']}, pgsched {machine['pgsched']}"
            + (f" @ {machine['commit']}" if machine.get("commit") else ""))
