"""A PgBouncer in transaction mode in front of a test's throwaway cluster (cluster.py).

Started on a free loopback port as the cluster's unprivileged user (PgBouncer refuses to
run as root), with `auth_type = trust` and a userlist holding the application role's
password, which PgBouncer uses to log in to PostgreSQL. `ignore_startup_parameters`
lists `options`, which pgsched sends (its lock_timeout) and PgBouncer before 1.20 would
otherwise refuse: behind such a pooler the timeout must be set on the role instead
(docs/pgbouncer.md).

Failure: `PgBouncerUnavailable` naming the reason when the binary is absent (install
Debian's `pgbouncer` package; .ci/run does) or it does not start.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .cluster import APP_ROLE, Cluster, free_port

BINARY_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


class PgBouncerUnavailable(Exception):
    """No pgbouncer binary, or it would not start."""


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in BINARY_PATHS if Path(p).exists()), None)
    if found is None:
        raise PgBouncerUnavailable("no pgbouncer binary: apt-get install -y pgbouncer")
    return found


class PgBouncer:
    def __init__(self, cluster: Cluster, pool_size: int = 10) -> None:
        binary = find_pgbouncer()
        self.cluster = cluster
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="pgsched-pgbouncer-"))
        (self.root / "userlist.txt").write_text(f'"{APP_ROLE}" "{cluster.app_password}"\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"postgres = host=127.0.0.1 port={cluster.port} dbname=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'userlist.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
            "max_client_conn = 200\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n")
        if cluster.user is not None:
            shutil.chown(self.root, cluster.user, cluster.user)
            for path in self.root.iterdir():
                shutil.chown(path, cluster.user, cluster.user)
        self.proc = subprocess.Popen([binary, str(self.root / "pgbouncer.ini")],
                                     user=cluster.user, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                reason = self.proc.stderr.read().decode(errors="replace").strip() if \
                    self.proc.stderr else ""
                self.destroy()
                raise PgBouncerUnavailable(f"pgbouncer exited: {reason[-300:]}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        self.destroy()
        raise PgBouncerUnavailable(f"pgbouncer did not listen on port {self.port}")

    def dsn(self) -> str:
        """The application role through PgBouncer (the password is not checked: trust)."""
        return (f"postgresql://{APP_ROLE}:{self.cluster.app_password}@127.0.0.1:{self.port}"
                "/postgres")

    @property
    def log(self) -> str:
        path = self.root / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def destroy(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
