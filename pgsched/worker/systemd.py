"""systemd's notify protocol (sd_notify) for `Type=notify` units, without libsystemd.

Owns: reading NOTIFY_SOCKET and WATCHDOG_USEC once, and sending the datagrams the worker
uses: READY=1 once it is connected, migrated and has claimed once; STOPPING=1 when a
shutdown begins; WATCHDOG=1 from the heartbeat loop; STATUS= lines for
`systemctl status`.

Invariants:
- The variables are removed from the environment when read, so subprocesses that tasks
  start cannot speak to systemd on the worker's behalf (sd_notify's unset_environment).
- The watchdog is used only when WATCHDOG_PID is unset or names this process.
- Sending never blocks and never raises: systemd being gone must not stop the worker.
  The first failure is logged (`systemd_notify_failed`), later ones are not.

Addresses: a filesystem path, or an abstract socket written with a leading '@'.
Without NOTIFY_SOCKET (not under systemd, or `Type=simple`) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

from ..logs import get_logger

log = get_logger("pgsched.systemd")


class SystemdNotifier:
    def __init__(self, address: str | None = None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_seconds = watchdog_usec / 1e6 if watchdog_usec else None
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] = os.environ
    ) -> SystemdNotifier:
        address = environ.pop("NOTIFY_SOCKET", None) or None
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        watchdog = None
        if usec and usec.isdigit() and int(usec) > 0 and (pid is None or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; True if systemd got it."""
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # not inherited
                sock.setblocking(False)
                sock.connect(address)
                sock.send("\n".join(fields).encode())
            return True
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd_notify_failed", socket=self.address, error=str(exc),
                            hint="check NOTIFY_SOCKET; the worker keeps running without it")
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.watchdog_seconds is not None and self.notify("WATCHDOG=1")

    def check_watchdog(self, heartbeat_seconds: float) -> None:
        """Warn when pings (one per heartbeat) cannot keep up with WatchdogSec."""
        if self.watchdog_seconds is not None and self.watchdog_seconds < 2 * heartbeat_seconds:
            log.warning("systemd_watchdog_too_short", watchdog_seconds=self.watchdog_seconds,
                        heartbeat_seconds=heartbeat_seconds,
                        hint="set WatchdogSec to at least twice [worker] heartbeat_seconds, "
                             "plus the time a database outage may stall a heartbeat")
