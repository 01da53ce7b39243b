"""The operator commands (show, retry, status, top, workers, init, config, add --from,
ls --since, vacuum progress, completion) against a real PostgreSQL.

Most commands run in-process through typer's CliRunner, in a thread so the test's event
loop stays free (the CLI runs its own asyncio.run). Workers that must run while a
command runs are real `pgsched worker` processes: an in-process worker would log into the
CliRunner's captured stdout. `top` is also driven in a pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import structlog
import worker_tasks  # noqa: F401  (registers the tasks in-process workers run)
from conftest import ROOT, cli_env, fast_options, wait_until, write_config
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from pgsched import InvalidInput, JobSpec, Scheduler, Worker
from pgsched import ops as ops_module
from pgsched.cli import app
from pgsched.cli.views import dashboard_view
from pgsched.config import WorkerSettings, load_settings
from pgsched.ops import (
    LINE_KEYS,
    attempt_history,
    gather,
    human_seconds,
    parse_job_line,
    retry_jobs,
    retry_matching,
    starter_config,
)
from pgsched.store import FINISHED_STATUSES
from pgsched.worker.maintenance import vacuum

runner = CliRunner(env={"PGSCHED_DSN": None, "PGSCHED_CONFIG": None, "PGSCHED_DEBUG": None})
EXAMPLE = ROOT / "pgsched.toml.example"


def invoke(*args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
    # The CLI points structlog at the runner's (now closed) stderr; later in-process
    # workers must log somewhere that still exists.
    structlog.reset_defaults()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


async def cli(config: Path, *args: str, input: str | None = None):
    return await asyncio.to_thread(invoke, "--config", str(config), *args, input=input)


@pytest.fixture
def config(tmp_path, pg_dsn, schema, sched) -> Path:
    """A config for in-process commands. The task module is named as a dotted module,
    which the tests have already imported, so loading it registers nothing twice. The
    lease here only decides when a command calls a worker stale (workers have their own)."""
    return write_config(tmp_path, pg_dsn, schema, tasks="worker_tasks", lease_seconds=30,
                        heartbeat_seconds=5)


async def settle(sched: Scheduler, *ids: str) -> None:
    """Run an in-process worker until every given job has finished (retries included)."""
    worker = Worker(sched.store, sched._dsn, fast_options())
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _all_finished(sched, list(ids)), what="jobs finished")
    finally:
        worker.stop()
        await running


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# -- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0.25, "0.25s"), (3, "3s"), (9.999, "10s"), (42.7, "42s"), (312, "5m12s"),
    (3 * 3600 + 301, "3h05m"), (2 * 86400 + 4 * 3600 + 59, "2d04h"), (-5, "5s"),
])
def test_human_seconds(seconds, text):
    assert human_seconds(seconds) == text


def test_attempt_history_reconstructs_every_attempt():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    at = [t0 + timedelta(seconds=s) for s in range(0, 100, 10)]
    job = {
        "status": "completed", "attempts": 4, "worker_id": "w3", "started_at": at[6],
        "finished_at": at[7],
        "errors": [
            {"attempt": 1, "worker_id": "w1", "started_at": at[0].isoformat(),
             "at": at[1].isoformat(), "outcome": "failed", "error": "E: one", "traceback": "tb"},
            {"attempt": 2, "worker_id": "w2", "started_at": at[2].isoformat(),
             "at": at[4].isoformat(), "outcome": "lease_expired", "error": "lease expired"},
            # attempt 3 has no record: its worker shut down and released it
        ],
    }
    history = attempt_history(job, now=at[9])
    assert [(a["attempt"], a["outcome"], a["worker_id"], a["duration_seconds"])
            for a in history] == [
        (1, "failed", "w1", 10.0), (2, "lease_expired", "w2", 20.0),
        (3, "interrupted", None, None), (4, "completed", "w3", 10.0)]
    assert history[0]["traceback"] == "tb" and history[3]["error"] is None

    running = {**job, "status": "running", "finished_at": None, "errors": []}
    assert attempt_history(running, now=at[9])[-1]["duration_seconds"] == 30.0
    # An entry written before entries had started_at or an outcome (older versions).
    old = {**job, "status": "failed", "attempts": 1,
           "errors": [{"attempt": 1, "worker_id": "w", "at": at[1].isoformat(), "error": "E"}]}
    assert attempt_history(old, now=at[9]) == [{
        "attempt": 1, "worker_id": "w", "started_at": None, "ended_at": at[1],
        "outcome": "failed", "error": "E", "traceback": None, "duration_seconds": None}]


NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def test_parse_job_line_reads_every_key():
    spec = parse_job_line(json.dumps({
        "task": "add", "args": [1, 2], "kwargs": {"k": 1}, "in": "1h30m", "id": "j1",
        "priority": "critical", "retries": 2, "timeout": "90s", "misfire_grace": "none",
        "queue": "q"}), tz="UTC", now=NOW)
    assert spec == JobSpec("add", NOW + timedelta(minutes=90), [1, 2], {"k": 1}, 1, 2, "j1",
                           90.0, None, "q")
    local = parse_job_line('{"task": "x", "at": "2026-07-01 09:00"}', tz="Europe/Berlin",
                           now=NOW)
    assert local.execution_time == datetime(2026, 7, 1, 7, tzinfo=UTC)
    assert parse_job_line('{"task": "x", "in": 90}', tz="UTC", now=NOW).execution_time \
        == NOW + timedelta(seconds=90)


@pytest.mark.parametrize(("line", "message"), [
    ("[1]", "JSON object"), ("{", "not valid JSON"), ('{"task": "x", "args": [NaN]}', "NaN"),
    ('{"args": []}', '"task" is missing'), ('{"task": 3}', '"task" must be a string'),
    ('{"task": "x", "prio": 1}', "unknown key 'prio'"), ('{"task": "bad name"}', "task name"),
    ('{"task": "x", "at": "2030-01-01", "in": "5m"}', "either"),
    ('{"task": "x", "at": 5}', '"at" must be'), ('{"task": "x", "in": 1e300}', "100 years"),
    ('{"task": "x", "in": -1}', "100 years"), ('{"task": "x", "in": null}', "cannot be null"),
    ('{"task": "x", "retries": true}', "whole number"), ('{"task": "x", "id": ""}', "non-empty"),
    ('{"task": "x", "priority": "urgent"}', "priority"), ('{"task": "x", "in": "soon"}', "soon"),
])
def test_parse_job_line_rejects_with_the_reason(line, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        parse_job_line(line, tz="UTC", now=NOW)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*LINE_KEYS, "other"]), json_values, max_size=6))
def test_any_json_line_becomes_a_job_or_one_clear_error(data):
    checker = Scheduler("postgresql://validation-only")
    try:
        spec = parse_job_line(json.dumps(data), tz="UTC", now=NOW)
        checker.validate(spec)
    except InvalidInput as exc:
        assert str(exc) and "\n" not in str(exc)


# -- init and config ---------------------------------------------------------------------


def test_init_writes_the_commented_example_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("init")
    assert result.exit_code == 0 and result.stdout.strip() == "pgsched.toml"
    path = tmp_path / "pgsched.toml"
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert text == EXAMPLE.read_text().replace('tasks = "examples.tasks"',
                                               '# tasks = "myapp.tasks"')
    settings_ = load_settings(path, env={})
    assert settings_.worker == WorkerSettings() and settings_.database.dsn is None

    path.write_text("# mine\n")
    again = invoke("init")
    assert again.exit_code == 1 and path.read_text() == "# mine\n"
    assert error_lines(again) == ["error: pgsched.toml already exists: remove it or choose "
                                  "another path"]
    missing = invoke("init", str(tmp_path / "nope" / "x.toml"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    bad = invoke("init", "other.toml", "--tasks", "not a module")
    assert bad.exit_code == 2 and "dotted module name" in bad.stderr
    assert not (tmp_path / "other.toml").exists()


def test_init_fills_in_tasks_and_dsn_and_config_masks_the_password(tmp_path):
    dsn = 'postgresql://app:s3"cret@db.internal/jobs'
    result = invoke("--dsn", dsn, "init", str(tmp_path), "--tasks", "myapp.tasks")
    assert result.exit_code == 0
    path = tmp_path / "pgsched.toml"
    loaded = load_settings(path, env={})
    assert (loaded.database.dsn, loaded.worker.tasks) == (dsn, "myapp.tasks")
    shown = invoke("--config", str(path), "config")
    assert shown.exit_code == 0 and "s3" not in shown.stdout
    assert 'dsn = "postgresql://app:***@db.internal/jobs"' in shown.stdout
    assert 'tasks = "myapp.tasks"' in shown.stdout


def test_starter_config_renders_values_with_tomli_w():
    text = starter_config(tasks='weird "name"', dsn="host=x password='a b'")
    assert 'tasks = "weird \\"name\\""' in text and "dsn = \"host=x password='a b'\"" in text


# -- show and retry ----------------------------------------------------------------------


async def test_show_prints_every_attempt_with_its_traceback(config, sched):
    job_id = await sched.schedule("fail", kwargs={"message": "nope"}, max_retries=1)
    await settle(sched, job_id)
    result = await cli(config, "show", job_id, "--json")
    assert result.exit_code == 0
    job = json.loads(result.stdout)
    assert (job["id"], job["status"], job["attempts"], job["failures"]) == (job_id, "failed", 2, 2)
    assert [a["attempt"] for a in job["history"]] == [1, 2]
    for attempt in job["history"]:
        assert attempt["outcome"] == "failed" and attempt["error"] == "RuntimeError: nope"
        assert "raise RuntimeError(message)" in attempt["traceback"]
        assert attempt["worker_id"] and attempt["duration_seconds"] >= 0

    text = (await cli(config, "show", job_id)).stdout
    assert "Traceback of attempt 2" in text and re.search(r"^\s+2\s.*failed", text, re.M)
    missing = await cli(config, "show", "no-such-job")
    assert missing.exit_code == 1 and error_lines(missing) == ["error: job no-such-job: not found"]


async def test_show_marks_an_attempt_interrupted_by_shutdown(config, sched):
    job_id = await sched.schedule("sleep", args=[30])
    worker = Worker(sched.store, sched._dsn, fast_options(shutdown_grace_seconds=0))
    running = asyncio.create_task(worker.run())
    await wait_until(lambda: worker.running_jobs == 1, what="job running")
    worker.stop()
    await running
    job = json.loads((await cli(config, "show", job_id, "--json")).stdout)
    assert job["status"] == "pending"
    assert [(a["attempt"], a["outcome"]) for a in job["history"]] == [(1, "interrupted")]


async def test_recovered_attempt_is_recorded_with_its_start(sched):
    job_id = await sched.schedule("noop")
    claimed, _, _ = await sched.store.claim_jobs(worker_id="gone", limit=1, lease_seconds=0.05)
    assert [j["id"] for j in claimed] == [job_id]
    await wait_until(lambda: sched.store.recover_orphans(max_recoveries=3), what="recovery")
    job = await sched.get_job(job_id)
    [attempt] = attempt_history(job, now=datetime.now(UTC))
    assert (attempt["outcome"], attempt["worker_id"]) == ("lease_expired", "gone")
    assert attempt["started_at"] is not None and attempt["duration_seconds"] >= 0.05


async def test_retry_by_id_keeps_history_and_restores_the_retry_budget(config, sched):
    failed = await sched.schedule("fail", max_retries=1)
    expired = await sched.schedule("noop", execution_time=datetime.now(UTC) - timedelta(hours=1),
                                   misfire_grace_time=1)
    cancelled = await sched.schedule("noop", execution_time=datetime.now(UTC) + timedelta(1))
    assert await sched.cancel_job(cancelled)
    done = await sched.schedule("noop")
    await settle(sched, failed, expired, done)
    assert [(await sched.get_job(j))["status"] for j in (failed, expired, done)] \
        == ["failed", "expired", "completed"]

    result = await cli(config, "retry", failed, expired, cancelled)
    assert result.exit_code == 0
    assert result.stdout.split() == [failed, expired, cancelled]
    for job_id in (failed, expired, cancelled):
        job = await sched.get_job(job_id)
        assert (job["status"], job["failures"], job["finished_at"]) == ("pending", 0, None)
        assert job["execution_time"] > datetime.now(UTC) - timedelta(minutes=1)
    job = await sched.get_job(failed)
    assert job["attempts"] == 2 and [e["outcome"] for e in job["errors"]] == [
        "failed", "failed", "retried"]

    again = await cli(config, "retry", failed, done, "ghost")
    assert again.exit_code == 1 and again.stdout == ""
    assert error_lines(again) == [
        f"error: job {failed}: is pending; only failed, expired or cancelled jobs can be retried",
        f"error: job {done}: is completed; only failed, expired or cancelled jobs can be retried",
        "error: job ghost: not found"]

    await settle(sched, failed, expired, cancelled)
    job = json.loads((await cli(config, "show", failed, "--json")).stdout)
    # A fresh budget: max_retries=1 allows two more attempts, numbered on from the first.
    assert [(a["attempt"], a["outcome"]) for a in job["history"]] \
        == [(1, "failed"), (2, "failed"), (3, "failed"), (4, "failed")]
    assert [(await sched.get_job(j))["status"] for j in (expired, cancelled)] \
        == ["completed", "completed"]


async def test_retry_by_status_with_task_and_queue_filters(config, sched):
    ids = {}
    for name, task, queue in [("f1", "fail", "q1"), ("f2", "fail", "q1"), ("f3", "fail", "q2"),
                              ("g1", "raises_nul", "q1")]:
        ids[name] = await sched.schedule(task, queue=queue, job_id=name)
    await settle(sched, *ids)
    result = await cli(config, "retry", "--status", "failed", "--task", "fail", "--queue", "q1")
    assert result.exit_code == 0 and sorted(result.stdout.split()) == ["f1", "f2"]
    assert result.stderr.strip() == "retried 2 jobs"
    statuses = {k: str((await sched.get_job(k))["status"]) for k in ids}
    assert statuses == {"f1": "pending", "f2": "pending", "f3": "failed", "g1": "failed"}
    rest = await cli(config, "retry", "-s", "failed", "-s", "expired")
    assert sorted(rest.stdout.split()) == ["f3", "g1"]

    for args, message in [((), "give job ids"), (("f1", "--status", "failed"), "not both"),
                          (("f1", "--task", "fail"), "filter --status")]:
        bad = await cli(config, "retry", *args)
        assert bad.exit_code == 2 and message in bad.stderr
    wrong = await cli(config, "retry", "--status", "completed")
    assert wrong.exit_code == 2 and "'completed' is not one of" in wrong.stderr


async def test_bulk_retry_runs_in_batches_and_skips_jobs_that_ended_after_it_began(
        sched, monkeypatch):
    monkeypatch.setattr(ops_module, "RETRY_BATCH", 2)
    for i in range(5):
        await sched.schedule("fail", job_id=f"j{i}")
    await settle(sched, *(f"j{i}" for i in range(5)))
    batches: list[int] = []
    retried = await retry_matching(sched.store, statuses=["failed"], task=None, queue=None,
                                   on_batch=batches.append)
    assert sorted(retried) == [f"j{i}" for i in range(5)] and batches == [2, 2, 1]

    await settle(sched, *retried)  # they fail again, after `cutoff` below
    cutoff = datetime.now(UTC) - timedelta(hours=1)
    assert await sched.store.retry_jobs(statuses=["failed"], cutoff=cutoff, limit=10) == []


async def test_retry_wakes_an_idle_worker(sched):
    job_id = await sched.schedule("noop", execution_time=datetime.now(UTC) + timedelta(1))
    assert await sched.cancel_job(job_id)
    worker = Worker(sched.store, sched._dsn, fast_options(poll_seconds=30))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: worker.ready.is_set(), what="worker ready")
        await asyncio.sleep(0.2)  # let the listener subscribe
        assert await retry_jobs(sched.store, [job_id]) == [job_id]
        # The poll is 30 s: only the NOTIFY sent by the retry can make this pass in time.
        await wait_until(lambda: _status_is(sched, job_id, "completed"), timeout=5,
                         what="retried job done")
    finally:
        worker.stop()
        await running


async def _status_is(sched: Scheduler, job_id: str, status: str) -> bool:
    return str((await sched.get_job(job_id))["status"]) == status


# -- status, workers, top with real workers ----------------------------------------------


async def test_status_and_queues_mark_capped_and_estimated_counts(config, sched, pg_dsn,
                                                                  schema, monkeypatch):
    """On a big table (here: made to look big) pending counts stop at the limit and say
    so with "+", and status estimates finished jobs ("~") unless --exact."""
    from pgsched import ops, store

    monkeypatch.setattr(store, "COUNT_LIMIT", 3)
    monkeypatch.setattr(ops, "EXACT_COUNT_ROWS", 0)
    for _ in range(5):
        await sched.schedule("noop", queue="bulk")
    for _ in range(4):
        job_id = await sched.schedule("noop", queue="bulk")
        await sched.store.request_cancel(ids=[job_id])
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f'ANALYZE "{schema}".jobs')

    text = (await cli(config, "status")).stdout
    assert re.search(r"^bulk\s+3\+\s+3\+\s+0\s+\S+$", text, re.M), text
    assert "~4 cancelled" in text and "(3+ due now)" in text
    data = json.loads((await cli(config, "status", "--json")).stdout)
    assert data["queues"]["bulk"]["capped"] and data["queues"]["bulk"]["cancelled"] is None
    assert data["finished_estimated"]["cancelled"] == 4
    exact = (await cli(config, "status", "--exact")).stdout
    assert re.search(r"^bulk\s+5\s+5\s+0\s+0\s+0\s+4\s+0\s", exact, re.M), exact
    [row] = json.loads((await cli(config, "queues", "--json")).stdout)
    assert (row["due"], row["capped"]) == (3, True)
    assert re.search(r"^bulk\s+active\s+3\+\s+0\+", (await cli(config, "queues")).stdout,
                     re.M)


async def test_status_workers_and_top_show_a_running_system(
        tmp_path, pg_dsn, schema, sched, config, workers):
    (tmp_path / "w").mkdir()
    worker_config = write_config(tmp_path / "w", pg_dsn, schema, concurrency=1)
    done = [await sched.schedule("noop", queue="beta") for _ in range(3)]
    failed = await sched.schedule("fail", queue="beta", kwargs={"message": "card declined"})
    procs = [workers(worker_config) for _ in range(2)]
    await wait_until(lambda: _all_finished(sched, [*done, failed]), what="first jobs done")
    sleepers = [await sched.schedule("sleep", args=[60], queue="alpha") for _ in range(2)]
    await wait_until(lambda: _all_running(sched, sleepers), what="both workers busy")
    waiting = await sched.schedule("noop", queue="alpha", job_id="waiting")
    later = await sched.schedule("noop", queue="alpha", job_id="later",
                                 execution_time=datetime.now(UTC) + timedelta(hours=2))

    data = json.loads((await cli(config, "status", "--json")).stdout)
    alpha, beta = data["queues"]["alpha"], data["queues"]["beta"]
    assert (alpha["pending"], alpha["due"], alpha["running"]) == (2, 1, 2)
    assert (beta["completed"], beta["failed"], beta["pending"]) == (3, 1, 0)
    assert data["totals"]["running"] == 2 and data["totals"]["lag_seconds"] >= 0
    assert data["throughput"]["last_minute"] == {"completed": 3, "failed": 1, "expired": 0}
    assert data["throughput"]["last_hour"]["completed"] == 3
    assert sorted(w["pid"] for w in data["workers"]) == sorted(p.pid for p in procs)
    assert all(w["live"] and w["running"] == 1 and w["concurrency"] == 1
               for w in data["workers"])

    text = (await cli(config, "status")).stdout
    assert "Workers: 2 live" in text and "Oldest due job: waiting" in text
    assert re.search(r"^alpha\s+2\s+1\s+2\s+0\s+0\s+0\s+0\s", text, re.M)

    registry = json.loads((await cli(config, "workers", "--json")).stdout)
    assert {w["id"] for w in registry} == {w["id"] for w in data["workers"]}
    table = (await cli(config, "workers")).stdout
    assert all(w["id"] in table for w in registry) and table.count("1/1") == 2

    # Piped (CliRunner's stdout is not a terminal): one plain snapshot.
    top = await cli(config, "top")
    assert top.exit_code == 0 and "\x1b" not in top.stdout
    assert "Running: 2" in top.stdout and all(j in top.stdout for j in sleepers)
    upcoming = top.stdout.split("Next due")[1]
    assert upcoming.index(waiting) < upcoming.index(later) and "late" in upcoming
    failures = top.stdout.split("Recent failures")[1]
    assert failed in failures and "RuntimeError: card declined" in failures

    # A short terminal: the frame still fits, the job lists give way.
    snapshot = await gather(sched.store, stale_after=60, dashboard=True)
    console = Console(record=True, width=120, height=24, force_terminal=True)
    console.print(dashboard_view(snapshot, title="t", height=24))
    frame = console.export_text()
    assert len(frame.splitlines()) <= 24 and "Running: 2 (longest 1 shown)" in frame
    assert any(j in frame for j in sleepers) and "Recent failures" in frame


async def _statuses(sched: Scheduler, ids: list[str]) -> list[str]:
    return [str((await sched.get_job(j))["status"]) for j in ids]


async def _all_finished(sched: Scheduler, ids: list[str]) -> bool:
    return all(s in FINISHED_STATUSES for s in await _statuses(sched, ids))


async def _all_running(sched: Scheduler, ids: list[str]) -> bool:
    return all(s == "running" for s in await _statuses(sched, ids))


async def test_job_data_is_printed_as_is_never_as_markup(config, sched):
    job_id = "odd [/] id [bold]x"
    # Queue and task names are validated, so hostile text can only come through ids and
    # error messages.
    await sched.schedule("fail", job_id=job_id, kwargs={"message": "[red]boom[/] :smile:"})
    await settle(sched, job_id)
    for args in (["show", job_id], ["ls"], ["top"]):
        result = await cli(config, *args)
        assert result.exit_code == 0, (args, result.stderr)
        assert job_id in result.stdout
        assert "[red]boom[/] :smile:" in result.stdout


class Terminal:
    """`pgsched top` in a pseudo-terminal of 120x40, its screen output collected."""

    def __init__(self, config: Path):
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgsched", "--config", str(config), "top"],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=ROOT,
            env=cli_env(TERM="xterm-256color"), start_new_session=True)
        self.output = b""

    def read(self) -> bytes:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        return self.output

    def lflag(self) -> int:
        return termios.tcgetattr(self.slave)[3]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize("how", ["q", "SIGINT"])
async def test_top_in_a_terminal_refreshes_and_quits_cleanly(config, sched, how):
    await sched.schedule("noop", job_id="visible-job", execution_time=datetime.now(UTC)
                         + timedelta(hours=1))
    term = Terminal(config)
    try:
        before = term.lflag()
        assert before & termios.ICANON
        # Two frames drawn: the dashboard refreshes on its own.
        await wait_until(lambda: term.read().count(b"Next due") >= 2, what="two frames")
        assert b"visible-job" in term.output and b"\x1b[?1049h" in term.output
        # cbreak: keys arrive one by one, unechoed, and Ctrl-C still raises SIGINT.
        mode = term.lflag()
        assert not mode & termios.ICANON and not mode & termios.ECHO and mode & termios.ISIG
        if how == "q":
            os.write(term.master, b"q")
        else:
            term.proc.send_signal(signal.SIGINT)
        await wait_until(lambda: term.proc.poll() is not None, what="top exit")
        assert term.proc.returncode == 0
        output = term.read()
        assert output.rstrip().endswith(b"\x1b[?1049l")  # back on the main screen
        assert b"Traceback" not in output
        assert term.lflag() == before  # the terminal mode is restored
    finally:
        term.close()


# -- add --from, ls --since, vacuum progress ---------------------------------------------

JOB_FILE = "\n".join([
    '{"task": "noop", "id": "a1", "queue": "q1", "priority": "critical", "in": "1h"}',
    '{"task": "add", "args": [1, 2], "id": "a2", "at": "2030-01-02T03:04:05Z", "retries": 3,'
    ' "timeout": "90s", "misfire_grace": "none"}',
    "",
    '{"task": "noop", "id": "existing"}',
    '{"task": "noop", "id": "a1"}',
    "not json",
    '{"task": "noop", "pri": 1}',
    '{"task": "no_such_task"}',
    '{"task": "noop", "args": {"x": 1}}',
    '{"task": "noop", "at": "2030-01-01", "in": "5m"}',
    '{"task": "noop", "args": [1e400]}',
]) + "\n"


async def test_add_from_file_adds_valid_lines_and_reports_the_others(config, sched, tmp_path):
    await sched.schedule("noop", job_id="existing", args=["original"],
                         execution_time=datetime.now(UTC) + timedelta(1))
    path = tmp_path / "jobs.jsonl"
    path.write_text(JOB_FILE)

    strict = await cli(config, "add", "--from", str(path), "--strict")
    assert strict.exit_code == 2 and strict.stdout == ""
    assert await sched.get_job("a1") is None

    result = await cli(config, "add", "--from", str(path))
    assert result.exit_code == 2
    assert result.stdout.split() == ["a1", "a2"]
    lines = result.stderr.splitlines()
    assert lines[0] == "added 2, 2 ignored as duplicates, rejected 6"
    assert [int(re.match(r"error: line (\d+):", line)[1]) for line in lines[1:]] \
        == [6, 7, 8, 9, 10, 11]
    for text in ("not valid JSON", "unknown key 'pri'", "unknown task 'no_such_task'",
                 "args must be a list", "either", "NaN"):
        assert text in result.stderr
    a1, a2 = await sched.get_job("a1"), await sched.get_job("a2")
    assert (a1["queue"], a1["priority"]) == ("q1", 1)
    assert timedelta(minutes=59) < a1["execution_time"] - datetime.now(UTC) < timedelta(hours=1)
    assert a2["execution_time"] == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (a2["args"], a2["max_retries"], a2["timeout_seconds"], a2["misfire_grace_seconds"]) \
        == ([1, 2], 3, 90.0, None)
    assert (await sched.get_job("existing"))["args"] == ["original"]

    replace = await cli(config, "add", "--from", "-", "--on-conflict", "replace",
                        input='{"task": "record", "id": "existing", "args": ["new"]}\n')
    assert replace.exit_code == 0 and replace.stdout.split() == ["existing"]
    assert (await sched.get_job("existing"))["args"] == ["new"]

    for args, message in [(["noop", "--from", str(path)], "TASK describes one job"),
                          (["--from", str(path), "--in", "5m"], "--in describes one job"),
                          (["--from", str(tmp_path / "missing.jsonl")], "cannot read"),
                          ([], "give a TASK")]:
        bad = await cli(config, "add", *args)
        assert bad.exit_code == 2 and error_lines(bad) == [bad.stderr.strip()], bad.stderr
        assert message in bad.stderr


async def test_add_from_file_with_raise_writes_all_or_nothing(config, sched, tmp_path):
    await sched.schedule("noop", job_id="taken", execution_time=datetime.now(UTC) + timedelta(1))
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"task": "noop", "id": "new"}\n{"task": "noop", "id": "taken"}\n')
    result = await cli(config, "add", "--from", str(path), "--on-conflict", "raise")
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert await sched.get_job("new") is None


async def test_ls_since_and_limit(config, sched, pg_dsn, schema):
    ids = [await sched.schedule("noop", job_id=f"j{i}",
                                execution_time=datetime.now(UTC) + timedelta(1)) for i in range(3)]
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f'UPDATE "{schema}".jobs SET created_at = now() - interval \'3 days\''
                           " WHERE id = 'j0'")

    async def listed(*args: str) -> list[str]:
        result = await cli(config, "ls", "--json", *args)
        assert result.exit_code == 0, result.stderr
        return [row["id"] for row in json.loads(result.stdout)]

    assert await listed() == ["j2", "j1", "j0"]
    assert await listed("--since", "1d") == ["j2", "j1"]
    assert await listed("--since", (datetime.now(UTC) - timedelta(days=4)).isoformat()) == ids[::-1]
    assert await listed("--since", "2999-01-01") == []
    limited = await cli(config, "ls", "--limit", "1")
    assert "j2" in limited.stdout and "j1" not in limited.stdout
    assert "showing the newest 1" in limited.stderr
    bad = await cli(config, "ls", "--since", "last tuesday")
    assert bad.exit_code == 2 and "invalid --since 'last tuesday'" in bad.stderr


async def test_vacuum_reports_each_batch(sched, pg_dsn, schema):
    for i in range(5):
        await sched.schedule("noop", job_id=f"v{i}")
    await settle(sched, *(f"v{i}" for i in range(5)))
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute(f"UPDATE \"{schema}\".jobs SET finished_at = now() - interval '2 days'")
    batches: list[tuple[str, int]] = []
    deleted = await vacuum(sched.store, retention_seconds={"completed": 86400, "failed": 86400},
                           batch_size=2, on_batch=lambda s, n: batches.append((s, n)))
    assert deleted == {"completed": 5, "failed": 0}
    assert batches == [("completed", 2), ("completed", 2), ("completed", 1), ("failed", 0)]


# -- shell completion --------------------------------------------------------------------


def test_shell_completion_knows_the_operator_commands_and_their_choices():
    script = Path(sys.executable).parent / "pgsched"
    env = cli_env(_PGSCHED_COMPLETE="complete_bash", COMP_WORDS="pgsched st", COMP_CWORD="1")
    words = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert words.stdout.split() == ["status"]
    env.update(COMP_WORDS="pgsched retry --status ", COMP_CWORD="3")
    choices = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert choices.stdout.split() == ["failed", "expired", "cancelled"]
    # --show-completion is a flag: typer names the shell it finds among the process's
    # ancestors (shellingham), so it runs from bash as a user's would; pytest itself may
    # have no shell above it (started detached).
    shown = subprocess.run(["bash", "-c", f'"{script}" --show-completion; exit $?'],
                           env=cli_env(), capture_output=True, text=True, timeout=30)
    assert "_PGSCHED_COMPLETE=complete_bash" in shown.stdout


def test_example_is_what_the_package_ships():
    # pgsched/starter.toml is a symlink to the example, so `init` can never drift from it.
    shipped = Path(ops_module.__file__).parent / "starter.toml"
    assert shipped.read_text() == EXAMPLE.read_text()
