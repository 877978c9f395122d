"""The registry's URL forms (one server, Sentinel, Cluster) and TLS files: parsed without importing redis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMES = {"redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"}


@dataclass(frozen=True)
class TlsFiles:
    """Private CA and client certificate for rediss:// (each optional)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def kwargs(self) -> dict[str, Any]:
        """redis-py's TLS arguments."""
        args: dict[str, Any] = {}
        if self.ca_file:
            args["ssl_ca_certs"] = str(self.ca_file)
        if self.cert_file:
            args["ssl_certfile"] = str(self.cert_file)
        if self.key_file:
            args["ssl_keyfile"] = str(self.key_file)
        return args


def hosts_of(netloc: str) -> list[tuple[str, int]]:
    """`h1:p1,h2:p2` (after any `user:pass@`) as (host, port) pairs; raises ValueError naming a bad entry."""
    pairs = []
    for entry in netloc.rsplit("@", 1)[-1].split(","):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{entry!r} is not host:port")
        pairs.append((host.strip("[]"), int(port)))
    return pairs
