"""systemd's notify protocol: the notifier on its own, and a real worker process talking
to a unix datagram socket this test listens on (as systemd would)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import cli_env, write_config

from pgsched.store import migrations
from pgsched.worker.systemd import SystemdNotifier


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"@pgsched-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.setblocking(False)
    yield name, sock
    sock.close()


def test_path_socket_and_environment_are_consumed(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()),
               "OTHER": "x"}
        notifier = SystemdNotifier.from_environment(env)
        assert env == {"OTHER": "x"}  # task subprocesses cannot speak for the worker
        assert notifier.watchdog_seconds == 3.0
        assert notifier.ready("up") and notifier.watchdog()
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
        assert sock.recv(100) == b"WATCHDOG=1"


def test_abstract_socket(abstract_socket):
    name, sock = abstract_socket
    assert SystemdNotifier(name).stopping("bye")
    assert sock.recv(100) == b"STOPPING=1\nSTATUS=bye"


def test_watchdog_of_another_process_or_no_socket_does_nothing(tmp_path):
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_seconds is None and not notifier.watchdog()
    silent = SystemdNotifier.from_environment({})
    assert not silent.enabled and not silent.ready("up")


def test_a_missing_socket_never_raises(tmp_path):
    notifier = SystemdNotifier(str(tmp_path / "gone"))
    assert notifier.ready("up") is False
    assert notifier.ready("up") is False  # logged once, never raised


async def receive(sock: socket.socket, timeout: float = 20) -> list[str]:
    """The fields of the next datagram."""
    loop = asyncio.get_running_loop()
    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    return data.decode().split("\n")


async def test_worker_process_notifies_ready_watchdog_and_stopping(
        tmp_path: Path, pg_dsn, schema, abstract_socket, workers):
    name, sock = abstract_socket
    # A schema nobody migrated: READY=1 must wait until the worker has done it.
    config = write_config(tmp_path, pg_dsn, schema, heartbeat_seconds=0.5)
    # 0.6 s is shorter than two heartbeats: the worker warns, and pings all the same.
    worker = workers(config, env=cli_env(NOTIFY_SOCKET=name, WATCHDOG_USEC="600000"))
    fields = await receive(sock)
    while fields == ["WATCHDOG=1"]:  # a ping may come before READY
        fields = await receive(sock)
    assert fields == ["READY=1", "STATUS=claiming from every queue"]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        version = conn.execute(
            f'SELECT max(version) FROM "{schema}".schema_migrations').fetchone()[0]
    assert version == max(number for number, _, _ in migrations())
    for _ in range(3):
        assert await receive(sock) == ["WATCHDOG=1"]
    worker.signal(signal.SIGTERM)
    fields = await receive(sock)
    while fields == ["WATCHDOG=1"]:
        fields = await receive(sock)
    assert fields[0] == "STOPPING=1" and fields[1].startswith("STATUS=stopping")
    assert await worker.wait() == 0
    assert '"event": "systemd_watchdog_too_short"' in worker.log()


def test_the_units_layout_imports_tasks_from_the_working_directory(tmp_path, pg_dsn, schema):
    # contrib/systemd: the config in /etc/pgsched, tasks = "myapp.tasks" living in
    # WorkingDirectory=/srv/app, ExecStart the console script (which puts its own bin/
    # directory on sys.path, not the working directory). Re-rooted under tmp_path.
    unit = (Path(__file__).resolve().parent.parent / "contrib" / "systemd"
            / "pgsched-worker.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if line.startswith(("WorkingDirectory=", "Environment=PGSCHED_CONFIG")))
    workdir = tmp_path / settings["WorkingDirectory"].lstrip("/")
    config = tmp_path / settings["Environment"].split("=", 1)[1].lstrip("/")
    (workdir / "myapp").mkdir(parents=True)
    (workdir / "myapp" / "__init__.py").write_text("")
    (workdir / "myapp" / "tasks.py").write_text(
        "from pgsched import task\n\n\n@task\ndef hello(name):\n    return f'hello {name}'\n")
    config.parent.mkdir(parents=True)
    write_config(config.parent, pg_dsn, schema, tasks="myapp.tasks")
    script = Path(sys.executable).parent / "pgsched"
    env = cli_env(PGSCHED_CONFIG=str(config))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=60)

    migrated = run("migrate")
    assert migrated.returncode == 0, migrated.stderr
    added = run("add", "hello", "--args", '["unit"]')
    assert added.returncode == 0, added.stderr
    worked = run("worker", "--burst")
    assert worked.returncode == 0, worked.stderr[-2000:]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        status, result = conn.execute(
            f'SELECT status::text, result FROM "{schema}".jobs').fetchone()
    assert (status, result) == ("completed", "hello unit")
