"""A throwaway PostgreSQL cluster that a test owns and may stop, start and break.

The session's shared server (conftest.pg_dsn) must never be restarted under other tests,
so tests that take the database away start this one instead: initdb into a temporary
directory, listening on a Unix socket there (superuser, trust) and on a free loopback
port (password authentication, for a realistic DSN with a secret in it).

PostgreSQL refuses to run as root; as root the server runs as the unprivileged user that
the `pgserver` package creates for its own bundled server (or `postgres`). Binaries come
from pgserver (a dev dependency) or a Debian install under /usr/lib/postgresql.

Failure: `ClusterUnavailable` with the reason when no binaries or no unprivileged user
can be found; tests turn that into a skip naming the reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

import psycopg

APP_ROLE = "pgsched_app"


class ClusterUnavailable(Exception):
    """No PostgreSQL binaries, or no unprivileged user to run them as."""


def _bundled_bin() -> Path | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    return POSTGRES_BIN_PATH


def find_binaries() -> Path:
    candidates = [_bundled_bin(), *sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                                          reverse=True)]
    for path in candidates:
        if path is not None and (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise ClusterUnavailable("no PostgreSQL binaries: install pgserver (pip install -e "
                             "'.[dev]') or the postgresql package")


def _unprivileged_user(bin_dir: Path) -> str | None:
    """The user to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("pgserver", "postgres"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            break
    else:
        try:
            from pgserver.utils import ensure_user_exists
            ensure_user_exists("pgserver")
            name = "pgserver"
        except Exception as exc:
            raise ClusterUnavailable(f"running as root and cannot create an unprivileged "
                                     f"user for PostgreSQL: {exc}") from exc
    if bin_dir == _bundled_bin():
        # Like pgserver itself: make the bundled binaries reachable for that user.
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, 0o055)
        ensure_folder_permissions(bin_dir.parent / "lib", 0o044)
    return name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_or_skip(bin_dir: Path | None = None) -> Cluster:
    """A new Cluster (of `bin_dir`'s binaries, or find_binaries'), or the calling test
    skipped, saying why none can start."""
    import pytest

    try:
        return Cluster(bin_dir)
    except ClusterUnavailable as exc:
        pytest.skip(f"cannot start a throwaway PostgreSQL: {exc}")


class Cluster:
    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin = bin_dir or find_binaries()
        self.user = _unprivileged_user(self.bin)
        self.root = Path(tempfile.mkdtemp(prefix="pgsched-cluster-"))
        self.root.chmod(0o755)
        if self.user is not None:
            shutil.chown(self.root, self.user, self.user)
        self.data = self.root / "data"
        self.port = free_port()
        self.app_password = f"Pw-{secrets.token_hex(8)}"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "utf8",
                  "--auth-local=trust", "--auth-host=scram-sha-256")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                # fsync off only risks data on an OS crash, which no test causes. Commits
                # stay synchronous: pgsched relies on an acknowledged commit surviving a
                # server crash, and the crash tests check exactly that.
                "fsync = off\nfull_page_writes = off\n"
                "max_connections = 200\n")
        self.start()
        with psycopg.connect(self.superuser_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{self.app_password}'")
            conn.execute(f"GRANT CREATE ON DATABASE postgres TO {APP_ROLE}")

    @property
    def superuser_dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.root}&port={self.port}"

    def app_dsn(self, **params: str) -> str:
        """The application role over TCP, password in the DSN."""
        query = "".join(f"&{k}={v}" for k, v in params.items()).lstrip("&")
        return (f"postgresql://{APP_ROLE}:{self.app_password}@127.0.0.1:{self.port}/postgres"
                + (f"?{query}" if query else ""))

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([str(self.bin / program), *args], check=True, user=self.user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        if not self.is_running():
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                      "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """fast: disconnect every client and shut down cleanly; immediate: like a crash."""
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
