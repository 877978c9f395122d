"""TCP port checks and allocation for service instances."""

from __future__ import annotations

import errno
import socket

PORT_SEARCH_SPAN = 1000


def port_is_free(port: int) -> bool:
    """True when nothing listens on the port on any IPv4 address (a bind test, SO_REUSEADDR set)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def allocate_port(wanted: int, taken: set[int]) -> int:
    """The first free port at or above `wanted` that is not already `taken` by another instance."""
    for port in range(wanted, min(wanted + PORT_SEARCH_SPAN, 65536)):
        if port not in taken and port_is_free(port):
            return port
    raise OSError(errno.EADDRINUSE, f"no free port in {wanted}..{wanted + PORT_SEARCH_SPAN - 1}")
