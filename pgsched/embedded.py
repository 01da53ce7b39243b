"""The embedded development PostgreSQL, used when no DSN is configured anywhere.

Owns: starting (or joining) a real PostgreSQL server kept in a data directory, through
the `pgserver` package (an optional extra: `pip install 'pgsched[embedded]'`). Several
pgsched processes pointed at the same directory share one server: pgserver keeps a
list of the processes using it under a file lock, and the last one to exit stops it.
The embedded server trusts every connection that reaches it (pgserver initialises it
with trust authentication): it is for development only. What keeps other local users
out is where it listens: on a Unix socket only, never on TCP, in a directory only its
owner can enter. That is the data directory (0700), or, when the data path is too long
for a socket path, a directory pgserver makes under the runtime directory and opens to
everyone (0777); `_private_socket` closes it again (0700, owned by the server's user)
and refuses a server that listens on TCP or whose socket directory belongs to someone
else.
A process that died without leaving the list (SIGKILL, a crash) would keep the server
up for ever, so every process drops the pids of dead processes from it when it joins
and again when it exits.

Failure: without the extra, when the server cannot start, or when its socket cannot be
made private, DatabaseUnavailable says what to install or configure, in one line.
"""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from pathlib import Path

from .errors import DatabaseUnavailable


def running_embedded_dsn(data_dir: Path) -> str | None:
    """The DSN of an embedded server already running in `data_dir`, or None; starts and
    creates nothing (commands other than `worker` and `web` only join a server)."""
    try:
        lines = (data_dir.expanduser() / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), lines[3].strip(), lines[4].strip()
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    if not socket_dir:
        return None
    return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"


def embedded_dsn(data_dir: Path) -> str:
    """Start or join the embedded server in `data_dir`; returns its DSN."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (services, containers);
            # pgserver then uses /tmp, which is fine for a development server.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise DatabaseUnavailable(
            "no database configured and the embedded PostgreSQL is not installed: run "
            "pip install 'pgsched[embedded]', or set [database] dsn, PGSCHED_DSN or --dsn"
        ) from None
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _forget_dead_users(data_dir)
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        # atexit runs last-registered first: this runs before pgserver's own exit
        # handler decides whether this process is the server's last user.
        atexit.register(_forget_dead_users, data_dir)
        uri = server.get_uri()
        _private_socket(data_dir)
        return uri
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        raise DatabaseUnavailable(
            f"cannot start the embedded PostgreSQL in {data_dir}: {exc}; see {data_dir}/log, "
            "or configure a server with [database] dsn"
        ) from exc


# postmaster.pid lines, counted from 0: the socket directory, and the first TCP listen
# address (empty when the server listens on no TCP address).
_PID_SOCKET_DIR, _PID_LISTEN_ADDRESS = 4, 5


def _private_socket(data_dir: Path) -> None:
    """Make sure the running server is reachable through its owner's socket only."""
    if os.name == "nt":
        return  # no Unix sockets: pgserver listens on 127.0.0.1 there
    lines = (data_dir / "postmaster.pid").read_text().splitlines()
    if len(lines) <= _PID_LISTEN_ADDRESS or lines[_PID_LISTEN_ADDRESS].strip():
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL in {data_dir} listens on TCP, which it never should "
            "(it trusts every connection): stop it (pg_ctl stop -D DATA_DIR) and start again")
    socket_dir = Path(lines[_PID_SOCKET_DIR].strip())
    owner = data_dir.stat()  # the server's user: us, or pgserver's own user under root
    info = socket_dir.stat()
    if info.st_uid not in (owner.st_uid, os.geteuid()):
        raise DatabaseUnavailable(
            f"the embedded PostgreSQL's socket directory {socket_dir} belongs to another "
            f"user (uid {info.st_uid}); remove it, or choose a shorter [database] data_dir")
    if info.st_uid != owner.st_uid:
        os.chown(socket_dir, owner.st_uid, owner.st_gid)  # root: the server must still write
    if info.st_mode & 0o077:
        os.chmod(socket_dir, 0o700)


def _forget_dead_users(data_dir: Path) -> None:
    """Drop the pids of processes that no longer exist from pgserver's list of the
    server's users (`.handle_pids.json`), under pgserver's own lock."""
    import psutil
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    users = data_dir / ".handle_pids.json"
    if not users.exists():
        return
    with PostgresServer._lock:
        handles = DiskList(users)
        pids = handles.get()
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            handles.put(alive)
