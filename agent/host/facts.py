"""Host facts (CPU, memory, disk, OS, kernel) read through psutil and /etc/os-release."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class HostFacts:
    """What the host is, in units the broker can compare."""

    hostname: str
    os: str
    kernel: str
    arch: str
    cpu_model: str
    cpu_logical: int
    cpu_physical: int | None
    memory_total_mib: int
    memory_available_mib: int
    model_root_free_mib: int
    model_root_total_mib: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return asdict(self)


def read_host_facts(model_root: Path) -> HostFacts:
    """Read the facts now; disk figures are for the filesystem that holds (or will hold) model_root."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(existing_ancestor(model_root)))
    return HostFacts(
        hostname=socket.gethostname(),
        os=_os_pretty_name(),
        kernel=platform.release(),
        arch=platform.machine(),
        cpu_model=_cpu_model(),
        cpu_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_physical=psutil.cpu_count(logical=False),
        memory_total_mib=memory.total // MIB,
        memory_available_mib=memory.available // MIB,
        model_root_free_mib=disk.free // MIB,
        model_root_total_mib=disk.total // MIB,
    )


def read_host_readings(model_root: Path) -> tuple[int, int]:
    """What moves: available memory and free space under the model root, in MiB (cheap: for every heartbeat)."""
    disk = psutil.disk_usage(str(existing_ancestor(model_root)))
    return psutil.virtual_memory().available // MIB, disk.free // MIB


def existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest parent that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _os_pretty_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
