"""The embedded development PostgreSQL, used when no DSN is configured anywhere.

Owns: starting (or joining) a real PostgreSQL server kept in a data directory, through
the `pgserver` package (an optional extra: `pip install 'pgsched[embedded]'`). Several
pgsched processes pointed at the same directory share one server: pgserver keeps a
list of the processes using it under a file lock, and the last one to exit stops it.
The server listens on a Unix socket inside the data directory only, never on TCP.

Failure: without the extra, or when the server cannot start, DatabaseUnavailable says
what to install or configure, in one line.
"""

from __future__ import annotations

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
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        return server.get_uri()
    except Exception as exc:
        raise DatabaseUnavailable(
            f"cannot start the embedded PostgreSQL in {data_dir}: {exc}; see {data_dir}/log, "
            "or configure a server with [database] dsn"
        ) from exc
