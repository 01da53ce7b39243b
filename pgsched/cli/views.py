"""Rendering the operator views with rich: not a command module, shared by them.

Owns: how a Snapshot, a job or the worker registry looks on a terminal or in a pipe
(plain tables without boxes, so `grep` and `awk` work on them).

Invariants: the render functions are pure (data in, renderable out), so tests render them
on a recording console; cells are data, never rich markup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..jobjson import priority_name
from ..ops import Snapshot, human_seconds, worker_is_live
from .app import safe

ERROR_WIDTH = 70


class DataTable(Table):
    """A table whose cells are data, never rich markup: a job id or an error message
    like "bad [/] tag" prints as it is instead of being styled or raising MarkupError, and
    control characters in it are shown escaped (app.safe)."""

    def add_row(self, *cells: Any, **options: Any) -> None:
        super().add_row(*(Text(safe(c)) if isinstance(c, str) else c for c in cells),
                        **options)


def _table(*columns: str, right: tuple[str, ...] = (), ids: Sequence[str] = ()) -> Table:
    """A borderless table, one line per row: cells are cut with an ellipsis, except ids,
    which other cells give way to (up to UUID size) and which fold rather than lose
    characters."""
    table = DataTable(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left",
                         overflow="fold" if column == "id" else "ellipsis",
                         no_wrap=column != "id")
        if column == "id":
            table.columns[-1].min_width = min(36, max(map(cell_len, ids), default=2))
    return table


def _heading(text: str) -> Text:
    return Text(text, style="bold cyan")


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{human_seconds(seconds)} ago"


def _since(then: datetime | None, now: datetime) -> str:
    return "-" if then is None else _ago((now - then).total_seconds())


def one_line(text: str | None, width: int = ERROR_WIDTH) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _lag(snap: Snapshot, oldest_due: datetime | None) -> str:
    lag = snap.lag(oldest_due)
    return "-" if lag is None else human_seconds(lag)


def queues_table(snap: Snapshot, *, statuses: tuple[str, ...]) -> Table:
    columns = ("queue", *statuses[:1], "due", *statuses[1:], "lag")
    table = _table(*columns, right=columns[1:])
    rows = [*sorted(snap.queues.items())]
    if len(rows) != 1:
        rows.append(("(all)", snap.totals))
    for name, counts in rows:
        more = "+" if counts["capped"] else ""  # counted up to Store.COUNT_LIMIT
        table.add_row(name, f"{counts[statuses[0]]}{more}", f"{counts['due']}{more}",
                      *(str(counts[s]) for s in statuses[1:]), _lag(snap, counts["oldest_due"]))
    return table


def throughput_table(snap: Snapshot) -> Table:
    t = snap.throughput
    table = _table("finished", "completed", "failed", "expired",
                   right=("completed", "failed", "expired"))
    for label, suffix in (("last minute", "1m"), ("last hour", "1h")):
        table.add_row(label, *(str(t[f"{s}_{suffix}"])
                               for s in ("completed", "failed", "expired")))
    return table


def workers_table(workers: list[dict[str, Any]], *, now: datetime,
                  stale_after: float) -> Table:
    """The registry: `running` is jobs running / concurrency; `stale` means no heartbeat
    for longer than stale_after (a lease), so the worker is probably gone."""
    table = _table("id", "host", "pid", "version", "queues", "running", "started", "heartbeat",
                   "state", right=("pid", "running"), ids=[w["id"] for w in workers])
    for w in workers:
        queues = ",".join(w["queues"]) if w["queues"] else "all"
        table.add_row(w["id"], w["host"], str(w["pid"]), w["version"], queues,
                      f"{w['running']}/{w['concurrency']}", _since(w["started_at"], now),
                      _ago(w["heartbeat_age"]),
                      "live" if worker_is_live(w, stale_after) else "stale")
    return table


def _workers(snap: Snapshot) -> list[RenderableType]:
    live = sum(1 for w in snap.workers if worker_is_live(w, snap.stale_after))
    stale = len(snap.workers) - live
    heading = _heading(f"Workers: {live} live" + (f", {stale} stale" if stale else ""))
    if not snap.workers:
        return [heading, Text("(no worker registered)")]
    return [heading, workers_table(snap.workers, now=snap.db_now, stale_after=snap.stale_after)]


def status_view(snap: Snapshot) -> RenderableType:
    """`pgsched status`: counts per queue and status, lag, throughput, workers."""
    totals = snap.totals
    lag = snap.lag(totals["oldest_due"])
    lag_line = ("Oldest due job: none waiting" if lag is None
                else f"Oldest due job: waiting {human_seconds(lag)} ({totals['due']}"
                      f"{'+' if totals['capped'] else ''} due now)")
    counted = ("completed", "failed", "cancelled", "expired") if snap.estimated is None else ()
    parts: list[RenderableType] = [
        _heading("Jobs"),
        queues_table(snap, statuses=("pending", "running", *counted)),
        Text(lag_line),
    ]
    if snap.estimated is not None:
        parts.append(Text("Finished (estimated, `status --exact` counts them per queue): "
                          + ", ".join(f"~{n} {s}" for s, n in snap.estimated.items())))
    parts += [
        Text(""),
        throughput_table(snap), Text(""),
        *_workers(snap),
    ]
    return Group(*parts)


def dashboard_view(snap: Snapshot, *, title: str, height: int | None = None) -> RenderableType:
    """One frame of `pgsched top`. With a terminal height, the three job lists share the
    lines the rest of the frame leaves, so the frame fits the screen."""
    t = snap.throughput
    rows = max(len(snap.running), len(snap.upcoming), len(snap.failures))
    if height is not None:
        fixed = 17 + len(snap.queues) + (len(snap.queues) != 1) + max(1, len(snap.workers))
        rows = max(1, (height - fixed) // 3)
    header = Text(f"{title}  {snap.db_now:%Y-%m-%d %H:%M:%S %Z}", style="bold")
    if snap.error:
        header.append(f"  ! {safe(snap.error)} (retrying)", style="bold red")
    rate = (f"last minute: {t['completed_1m']} completed ({t['completed_1m'] / 60:.1f}/s), "
            f"{t['failed_1m']} failed, {t['expired_1m']} expired   last hour: "
            f"{t['completed_1h']} completed, {t['failed_1h']} failed, {t['expired_1h']} expired")
    running = _table("id", "task", "queue", "worker", "attempt", "elapsed",
                     right=("attempt", "elapsed"), ids=[j["id"] for j in snap.running[:rows]])
    for job in snap.running[:rows]:
        running.add_row(job["id"], job["task"], job["queue"], job["worker_id"] or "-",
                        str(job["attempts"]), human_seconds(job["elapsed"]))
    upcoming = _table("id", "task", "queue", "priority", "due", right=("due",),
                      ids=[j["id"] for j in snap.upcoming[:rows]])
    for job in snap.upcoming[:rows]:
        due = job["due_in"]
        upcoming.add_row(job["id"], job["task"], job["queue"], str(priority_name(job["priority"])),
                         f"in {human_seconds(due)}" if due > 0 else f"late {human_seconds(due)}")
    failures = _table("id", "task", "attempts", "failed", "last error", right=("attempts",),
                      ids=[j["id"] for j in snap.failures[:rows]])
    for job in snap.failures[:rows]:
        failures.add_row(job["id"], job["task"], str(job["attempts"]), _ago(job["age"]),
                         one_line(job["last_error"]))
    running_count = snap.totals["running"]
    return Group(
        header, Text(rate), Text(""),
        queues_table(snap, statuses=("pending", "running")), Text(""),
        *_workers(snap), Text(""),
        _heading(f"Running: {running_count}" + (
            f" (longest {min(rows, len(snap.running))} shown)"
            if running_count > min(rows, len(snap.running)) else "")),
        running if snap.running else Text("(none)"), Text(""),
        _heading("Next due"), upcoming if snap.upcoming else Text("(none pending)"), Text(""),
        _heading("Recent failures"), failures if snap.failures else Text("(none)"),
    )


def _dependency_rows(job: dict[str, Any]) -> dict[str, str]:
    """`show`'s lines on dependencies: what the job depends on, and while it waits, for
    which and when it is due then (instead of the never-due execution time)."""
    rows = {}
    if job.get("depends_on"):
        rows["depends on"] = ", ".join(f"{d['id']} ({d['status'] or 'gone'})"
                                       for d in job["depends_on"])
    if job.get("waiting_for") is not None:
        rows["execution_time"] = (f"when {', '.join(job['waiting_for'])} completed, not "
                                  f"before {job['due_after_dependencies']}")
        rows["waits for"] = ", ".join(job["waiting_for"])
    return rows


def job_view(job: dict[str, Any]) -> RenderableType:
    """`pgsched show`: the job's fields, then its attempts, then their tracebacks."""
    fields = DataTable(box=None, pad_edge=False, show_header=False)
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    failed = sum(1 for a in job["history"] if a["outcome"] == "failed")
    attempts = (f"{job['attempts']} ({failed} failed, {job['recoveries']} recovered after a "
                "lost lease)")
    # failures counts toward max_retries and starts again at `pgsched retry`; the history
    # keeps every attempt, so the two can differ.
    budget = f"{job['failures']} of {job['max_retries'] + 1} allowed"
    if job["failures"] != failed:
        budget += " (counted since the last retry)"
    shown = {
        **{k: job[k] for k in ("id", "task", "queue", "status", "priority")},
        "args": _json(job["args"]), "kwargs": _json(job["kwargs"]),
        **{k: job[k] for k in ("execution_time", "created_at", "started_at", "finished_at")},
        **_dependency_rows(job),
        "attempts": attempts, "failures": budget,
        "timeout": _seconds_or(job["timeout_seconds"], "none"),
        "misfire grace": _seconds_or(job["misfire_grace_seconds"], "none (never expires)"),
        "worker": job["worker_id"], "lease until": job["lease_until"],
        "result": _json(job["result"]) if job["status"] == "completed" else None,
        "last error": job["last_error"],
        # A job of a crash shared with other jobs (migration 0019): it runs alone next.
        "suspect": "yes: runs alone" if job.get("suspect") and job["status"] == "pending"
                   else None,
        # A busy worker's hold on a due suspect (migration 0022): it runs there once that
        # worker is alone, or at once on any worker alone. Past, it has lapsed.
        "reserved until": job.get("reserved_until") if job.get("suspect")
                          and job["status"] == "pending" else None,
    }
    for key, value in shown.items():
        if value is not None:
            fields.add_row(key, str(value))
    parts: list[RenderableType] = [fields]
    history = job["history"]
    if history:
        attempt_rows = _table("attempt", "worker", "started", "duration", "outcome", "error",
                              right=("attempt", "duration"))
        for a in history:
            duration = a["duration_seconds"]
            attempt_rows.add_row(
                str(a["attempt"]), a["worker_id"] or "-", a["started_at"] or "-",
                "-" if duration is None else human_seconds(duration), a["outcome"],
                one_line(a["error"], 200) or "-")
        parts += [Text(""), _heading("Attempts"), attempt_rows]
    for a in history:
        if a["traceback"]:
            parts += [Text(""), _heading(f"Traceback of attempt {a['attempt']}"),
                      Text(safe(a["traceback"].rstrip(), multiline=True))]
    return Group(*parts)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _seconds_or(value: float | None, otherwise: str) -> str:
    return otherwise if value is None else f"{value:g}s"
