"""Machine identity: a stable machine id (setting, persisted, or derived from the host's own id), boot, instance.
A state dir copied to another host (a golden image baked with an identity) is detected and re-keyed."""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from enum import StrEnum
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MACHINE_ID_FILE = "machine-id"
ETC_MACHINE_ID = Path("/etc/machine-id")
#: Written by cloud-init on every instance: changes when the VM is replaced, even from the same image.
CLOUD_INSTANCE_ID = Path("/var/lib/cloud/data/instance-id")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class IdSource(StrEnum):
    """What the machine id is derived from."""

    MACHINE_ID = "machine-id"  # /etc/machine-id (systemd regenerates it when an image ships it empty)
    CLOUD_INIT = "cloud-init"  # cloud-init's instance id, falling back to /etc/machine-id


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _seed(source: IdSource, etc_machine_id: Path, cloud_instance_id: Path) -> str:
    if source is IdSource.CLOUD_INIT:
        found = _read(cloud_instance_id)
        if found:
            return f"cloud:{found}"
    return _read(etc_machine_id)


def _fingerprint(seed: str) -> str:
    return hashlib.sha256(f"emp-agent:seed:{seed}".encode()).hexdigest()[:16]


def machine_id(
    configured: str | None,
    state_dir: Path,
    etc_machine_id: Path = ETC_MACHINE_ID,
    cloud_instance_id: Path = CLOUD_INSTANCE_ID,
    source: IdSource = IdSource.MACHINE_ID,
) -> str:
    """The configured id; else the one persisted in the state dir, unless the host it was derived from is not
    this one (the state was copied: a new id is derived); else a new one derived and persisted.

    Derived ids hash the host's id (never published raw), so the same host keeps its id across reinstalls.
    """
    if configured:
        return configured
    stored = state_dir / MACHINE_ID_FILE
    seed = _seed(source, etc_machine_id, cloud_instance_id)
    lines = _read(stored).splitlines()
    if lines and VALID_ID.fullmatch(lines[0]):
        marker = lines[1].removeprefix("derived-from ") if len(lines) > 1 else None
        if marker is None or not seed or marker == _fingerprint(seed):
            return lines[0]
        log.warning(
            "this state was made on another host (a cloned image?): this host gets its own machine id",
            previous=lines[0],
        )
    if seed:
        derived = "emp-" + hashlib.sha256(f"emp-agent:{seed}".encode()).hexdigest()[:16]
        content = f"{derived}\nderived-from {_fingerprint(seed)}\n"
    else:  # no host id yet (an image prepared for cloning): a random one, replaced once the host has its own
        derived = "emp-" + hashlib.sha256(f"emp-agent:{socket.gethostname()}-{uuid.uuid4()}".encode()).hexdigest()[:16]
        content = f"{derived}\nderived-from none\n"
    stored.parent.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_suffix(".tmp")
    tmp.write_text(content, encoding="utf-8")
    tmp.replace(stored)
    return derived


def boot_id() -> str:
    """The kernel's id of this boot."""
    return _read(BOOT_ID) or "unknown"


def instance_id() -> str:
    """A new id for this agent process."""
    return uuid.uuid4().hex[:12]
