"""The embedded default: no DSN anywhere starts a PostgreSQL in data_dir, shared by every
pgsched process pointed at it; without the extra, a one-line error says what to do."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from conftest import ROOT, WORKER_TASKS, WorkerProcess, cli_env, run_cli, wait_until


def embedded_config(tmp_path):
    path = tmp_path / "pgsched.toml"
    path.write_text(f'[database]\ndata_dir = "pg"\n\n[worker]\ntasks = "{WORKER_TASKS}"\n'
                    'heartbeat_seconds = 1\n\n[log]\nformat = "json"\n')
    return path


async def test_worker_and_cli_share_one_embedded_server(tmp_path):
    config = embedded_config(tmp_path)
    worker = WorkerProcess(config)
    try:
        await worker.wait_for_log('"worker_starting"', timeout=60)
        assert '"embedded_database"' in worker.log()
        added = run_cli("add", "add", "--args", "[20, 22]", config=config)
        assert added.returncode == 0, added.stderr
        job_id = added.stdout.strip()

        def finished():
            rows = json.loads(run_cli("ls", "--json", config=config).stdout)
            return [r for r in rows if r["id"] == job_id and r["status"] == "completed"]

        [job] = await wait_until(finished, timeout=30, interval=0.3, what="job completed")
        assert job["result"] == 42
        assert (tmp_path / "pg" / "PG_VERSION").exists()
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        worker.kill()


def test_missing_extra_says_what_to_install(tmp_path):
    config = embedded_config(tmp_path)
    code = ("import sys; sys.modules['pgserver'] = None; from pgsched.cli import main; "
            f"sys.argv = ['pgsched', '--config', {str(config)!r}, 'worker', '--burst']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=cli_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert "pip install 'pgsched[embedded]'" in result.stderr
    assert "PGSCHED_DSN" in result.stderr and "Traceback" not in result.stderr


def postmaster_pid(data_dir) -> int | None:
    pid_file = data_dir / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


async def test_last_live_user_stops_the_server_despite_a_killed_user(tmp_path):
    config = embedded_config(tmp_path)
    data_dir = tmp_path / "pg"
    worker = WorkerProcess(config)
    try:
        await worker.wait_for_log('"worker_starting"', timeout=60)
        assert postmaster_pid(data_dir) is not None
        worker.kill()  # SIGKILL: its pid stays in the server's list of users
        assert str(worker.pid) in (data_dir / ".handle_pids.json").read_text()
        # A second worker joins (its pid added to the list) and stops with SIGTERM: the
        # last live user, it must stop the server despite the killed one's stale pid.
        last = WorkerProcess(config)
        await last.wait_for_log('"worker_starting"', timeout=60)
        last.signal(signal.SIGTERM)
        assert await last.wait(timeout=30) == 0
        await wait_until(lambda: postmaster_pid(data_dir) is None, timeout=30,
                         what="the server stopped by its last live user")
    finally:
        worker.kill()
        pid = postmaster_pid(data_dir)
        if pid is not None:  # the server this test started, left running by the old code
            import os
            os.kill(pid, signal.SIGTERM)


def test_read_commands_never_create_an_embedded_database(tmp_path):
    # Rough edge 1: `pgsched ls` in an empty folder made a 38 MB .pgsched/ there. Only
    # `worker` (and `web`) start the embedded server; the others join one or say what to do.
    for args in (["ls"], ["status"], ["add", "noop"], ["migrate"], ["queues"]):
        result = subprocess.run([sys.executable, "-m", "pgsched", *args], capture_output=True,
                                text=True, env=cli_env(), cwd=tmp_path, timeout=60)
        assert result.returncode == 1, (args, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("error: no database configured") and "--dsn" in line
        assert list(tmp_path.iterdir()) == [], f"{args} created {list(tmp_path.iterdir())}"
