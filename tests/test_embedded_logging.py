"""A worker started inside an application with Scheduler.start() logs like `pgsched
worker` (one JSON line per job on stderr, nothing on stdout) unless the application has
configured structlog itself, whose set-up is then left alone. Each case runs in its own
Python process: structlog's configuration is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import cli_env

TESTS = Path(__file__).resolve().parent

APP = """
import asyncio, sys
sys.path.insert(0, {tests!r})
import structlog
import worker_tasks  # registers "noop"
from pgsched import Scheduler, WorkerOptions

{setup}

async def main():
    options = WorkerOptions(concurrency=4, burst=True, poll_seconds=0.2, vacuum_enabled=False)
    async with Scheduler({dsn!r}, schema={schema!r}, options=options) as sched:
        await sched.migrate()
        ids = [await sched.schedule("noop") for _ in range(3)]
        await sched.start()
        await asyncio.wait_for(sched.wait(), 30)
        print("done", *sorted(ids))

asyncio.run(main())
"""


def run_app(pg_dsn: str, schema: str, setup: str = "") -> subprocess.CompletedProcess:
    code = APP.format(tests=str(TESTS), setup=textwrap.dedent(setup), dsn=pg_dsn, schema=schema)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=cli_env())


def test_embedded_worker_logs_one_json_line_per_job_on_stderr_by_default(pg_dsn, schema):
    done = run_app(pg_dsn, schema)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert len(out) == 1 and out[0].startswith("done ")  # structlog's defaults print here
    events = [json.loads(line) for line in done.stderr.splitlines()]
    completed = [e for e in events if e["event"] == "job_completed"]
    assert sorted(e["job_id"] for e in completed) == out[0].split()[1:]
    assert all(e["level"] == "info" and e["worker_id"]
               and e["timestamp"].endswith("Z") for e in completed)
    # Every job's line carries what the README promises, and a time that parses.
    assert all(e["task"] == "noop" and e["attempt"] == 1 and isinstance(e["duration_s"], float)
               for e in completed)
    times = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in completed]
    assert all(abs(datetime.now(UTC) - t) < timedelta(minutes=5) for t in times)


@pytest.mark.parametrize("setup", ["""
structlog.configure(processors=[lambda _l, _m, event: "APP " + event["event"]],
                    logger_factory=structlog.PrintLoggerFactory(sys.stdout))
"""])
def test_embedded_worker_keeps_the_applications_structlog_setup(pg_dsn, schema, setup):
    done = run_app(pg_dsn, schema, setup)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("APP job_completed") == 3
    assert "job_completed" not in done.stderr
