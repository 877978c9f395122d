"""Machine identity: a stable machine id (setting, persisted, or derived from /etc/machine-id), boot, instance."""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from pathlib import Path

MACHINE_ID_FILE = "machine-id"
ETC_MACHINE_ID = Path("/etc/machine-id")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def machine_id(configured: str | None, state_dir: Path, etc_machine_id: Path = ETC_MACHINE_ID) -> str:
    """The configured id, else the one persisted in the state dir, else a new one derived and persisted.

    Derived ids hash /etc/machine-id (never published raw) so the same host keeps its id across reinstalls.
    """
    if configured:
        return configured
    stored = state_dir / MACHINE_ID_FILE
    try:
        value = stored.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
            return value
    except OSError:
        pass
    try:
        seed = etc_machine_id.read_text(encoding="utf-8").strip()
    except OSError:
        seed = ""
    if not seed:
        seed = f"{socket.gethostname()}-{uuid.uuid4()}"
    derived = "emp-" + hashlib.sha256(f"emp-agent:{seed}".encode()).hexdigest()[:16]
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(derived + "\n", encoding="utf-8")
    return derived


def boot_id() -> str:
    """The kernel's id of this boot."""
    try:
        return BOOT_ID.read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


def instance_id() -> str:
    """A new id for this agent process."""
    return uuid.uuid4().hex[:12]
