"""`pgsched cancel`, `pause`/`resume --queue`, `queues`, `add --queue` and
`worker --queues` as real processes against a real PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from conftest import run_cli, wait_until, write_config

LATER = datetime.now(UTC) + timedelta(hours=1)


@pytest.fixture
def config(tmp_path, pg_dsn, schema, sched):
    return write_config(tmp_path, pg_dsn, schema)


async def status(sched, job_id: str) -> str:
    return str((await sched.get_job(job_id))["status"])


async def test_cancel_a_job_running_in_a_worker_process(sched, config, workers):
    worker = workers(config)
    job_id = await sched.schedule("sleep", args=(60,), max_retries=2)
    await wait_until(lambda: _is(sched, job_id, "running"), what="job running")
    result = run_cli("cancel", job_id, "--wait", "20s", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [job_id]
    assert await status(sched, job_id) == "cancelled"
    await worker.wait_for_log('"event": "job_cancelled"')


async def _is(sched, job_id: str, wanted: str) -> bool:
    return await status(sched, job_id) == wanted


async def test_cancel_reports_each_id_it_could_not_cancel(sched, config):
    pending = await sched.schedule("noop", execution_time=LATER)
    finished = await sched.schedule("noop", execution_time=LATER)
    await sched.store.request_cancel(ids=[finished])
    result = run_cli("cancel", pending, finished, "missing", config=config)
    assert result.returncode == 1
    assert result.stdout.split() == [pending]
    assert result.stderr.splitlines() == [
        f"error: job {finished}: already cancelled",
        "error: job missing: not found",
    ]


async def test_cancel_waiting_on_a_running_job_nobody_runs_fails_after_the_wait(sched, config):
    job_id = await sched.schedule("noop")
    await sched.store.claim_jobs(worker_id="ghost", limit=1, lease_seconds=600)
    result = run_cli("cancel", job_id, "--wait", "0.5s", config=config)
    assert result.returncode == 1
    assert result.stdout.split() == [job_id]
    assert "still running after 0.5s" in result.stderr
    assert (await sched.get_job(job_id))["cancel_requested_at"] is not None


async def test_bulk_cancel_by_queue(sched, config):
    in_queue = [await sched.schedule("noop", queue="emails", execution_time=LATER)
                for _ in range(3)]
    other = await sched.schedule("noop", queue="reports", execution_time=LATER)
    result = run_cli("cancel", "--queue", "emails", config=config)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(in_queue)
    assert result.stderr.strip() == "cancelled 3 pending jobs; asked workers to stop 0 running jobs"
    assert await status(sched, other) == "pending"


@pytest.mark.parametrize(("args", "message"), [
    ((), "nothing to cancel: give job ids, --task NAME or --queue NAME"),
    (("some-id", "--task", "noop"), "give job ids, or --task/--queue, not both"),
    (("--queue", "bad name"), "invalid queue name 'bad name'"),
    (("--task", "no spaces"), "invalid task name"),
    (("some-id", "--wait", "soon"), "--wait: "),
])
def test_cancel_bad_input_exits_2_without_connecting(tmp_path, args, message):
    # An unreachable database: reaching it would exit 1 with "database unreachable".
    config = write_config(tmp_path, "postgresql://nobody@127.0.0.1:1/none", "s")
    result = run_cli("cancel", *args, config=config)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert result.stdout == ""


async def test_pause_resume_and_the_queues_table(sched, config):
    await sched.schedule("noop", queue="emails", execution_time=datetime.now(UTC))
    result = run_cli("pause", "--queue", "emails", "--reason", "smtp [down]", config=config)
    assert (result.returncode, result.stdout.split()) == (0, ["emails"]), result.stderr
    again = run_cli("pause", "--queue", "emails", config=config)
    assert again.returncode == 0 and again.stderr.strip() == "queue emails: was already paused"
    listed = run_cli("queues", "--json", config=config)
    [row] = json.loads(listed.stdout)
    assert row["queue"] == "emails" and row["paused"] and row["due"] == 1
    assert row["reason"] == "smtp [down]" and "@" in row["paused_by"]
    table = run_cli("queues", config=config)
    assert "paused" in table.stdout and "smtp [down]" in table.stdout
    resumed = run_cli("resume", "--queue", "emails", "--queue", "other", config=config)
    assert resumed.returncode == 0 and resumed.stdout.split() == ["emails", "other"]
    assert resumed.stderr.strip() == "queue other: was not paused"
    assert not json.loads(run_cli("queues", "--json", config=config).stdout)[0]["paused"]


async def test_add_queue_and_a_worker_serving_only_that_queue(sched, config, workers):
    bad = run_cli("add", "noop", "--queue", "no good", config=config)
    assert bad.returncode == 2 and "invalid queue name" in bad.stderr
    added = run_cli("add", "noop", "--queue", "emails", config=config)
    assert added.returncode == 0, added.stderr
    emails = added.stdout.strip()
    other = await sched.schedule("noop")
    worker = workers(config, "--burst", "--queues", "emails")
    assert await worker.wait() == 0
    assert (await sched.get_job(emails))["queue"] == "emails"
    assert await status(sched, emails) == "completed"
    assert await status(sched, other) == "pending"
    assert '"queues": ["emails"]' in worker.log()


def test_worker_rejects_a_bad_queue_list(config):
    result = run_cli("worker", "--queues", "a,,b c", config=config)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --queues: invalid queue name 'b c': use at most 100 letters, digits, '_', '.', "
        "':' or '-', starting with a letter, digit or underscore")
