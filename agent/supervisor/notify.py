"""The sd_notify socket a child reports `READY=1` (and `STATUS=…`) on, as under systemd's Type=notify."""

from __future__ import annotations

import contextlib
import socket
import uuid

MAX_DATAGRAM = 4096


class NotifyListener:
    """A datagram socket in the abstract namespace (no path, no length or permission trouble); the child
    finds it through NOTIFY_SOCKET, which every sd_notify implementation understands."""

    def __init__(self) -> None:
        self._name = f"emp-notify-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self._name)
        self._sock.setblocking(False)
        self.ready = False
        self.status: str | None = None

    @property
    def env_value(self) -> str:
        """What to put in the child's NOTIFY_SOCKET."""
        return "@" + self._name

    def poll(self) -> bool:
        """Read every pending message; True once READY=1 has been seen."""
        while True:
            try:
                data = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return self.ready
            for line in data.decode(errors="replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    self.ready = True
                elif key == "STATUS":
                    self.status = value

    def close(self) -> None:
        """Release the socket."""
        with contextlib.suppress(OSError):
            self._sock.close()
