"""The embedded development PostgreSQL, used when no DSN is configured anywhere.

Owns: starting (or joining) a real PostgreSQL server kept in a data directory, through
the `pgserver` package (an optional extra: `pip install 'pgsched[embedded]'`). Several
pgsched processes pointed at the same directory share one server: pgserver keeps a
list of the processes using it under a file lock, and the last one to exit stops it.
A process that died without leaving the list (SIGKILL, a crash) would keep the server
up for ever, so every process drops the pids of dead processes from it when it joins
and again when it exits.
The server listens on a Unix socket inside the data directory only, never on TCP.

Failure: without the extra, or when the server cannot start, DatabaseUnavailable says
what to install or configure, in one line.
"""

from __future__ import annotations

import atexit
import logging
import warnings
from pathlib import Path

from .errors import DatabaseUnavailable


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
        return server.get_uri()
    except Exception as exc:
        raise DatabaseUnavailable(
            f"cannot start the embedded PostgreSQL in {data_dir}: {exc}; see {data_dir}/log, "
            "or configure a server with [database] dsn"
        ) from exc


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
