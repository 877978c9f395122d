"""Telling a service manager how we are doing: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING).

Uses systemd-python when it is installed and speaks the same datagram protocol itself otherwise. Without
NOTIFY_SOCKET (not started by systemd with Type=notify) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends `KEY=value` lines to $NOTIFY_SOCKET; `watchdog_interval_s` is half of $WATCHDOG_USEC (or None)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self._address is not None

    def notify(self, **fields: str) -> bool:
        """Send the fields in one datagram; False when nobody listens or the send failed (never raises)."""
        if self._address is None or not fields:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        with contextlib.suppress(ImportError, AttributeError):
            daemon = importlib.import_module("systemd.daemon")  # optional: systemd-python, when installed
            return bool(daemon.notify(message))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError:
            return False
        return True
