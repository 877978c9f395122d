"""Writing log events to journald with native fields (systemd's journal protocol), so operators can filter with
`journalctl -u emp-agent EMP_SERVICE=comfyui-0`. Uses systemd-python when installed, the same protocol without."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import socket
import struct
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "emp-agent"
PRIORITIES = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}
#: Event keys that become the documented fields (the rest become EMP_<KEY>).
NAMED = {"instance": "EMP_SERVICE", "stage": "EMP_STAGE", "machine_id": "EMP_MACHINE_ID"}
MAX_VALUE = 48 * 1024


def under_journald(environ: Mapping[str, str], stream_fd: int) -> bool:
    """True when `stream_fd` is the journal stream systemd gave us (JOURNAL_STREAM=<dev>:<inode>)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        stat = os.fstat(stream_fd)
    except (ValueError, OSError):
        return False
    return stat.st_dev == dev and stat.st_ino == ino


def fields_of(event: Mapping[str, Any]) -> dict[str, str]:
    """The journal fields of one structlog event: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, EMP_*."""
    level = str(event.get("level", "info"))
    extra = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp")}
    message = str(event.get("event", ""))
    if extra:
        message += " " + " ".join(f"{k}={_text(v)}" for k, v in extra.items())
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
    }
    for key, value in extra.items():
        name = NAMED.get(key) or "EMP_" + re.sub(r"[^A-Z0-9_]", "_", key.upper())
        fields[name] = _text(value)[:MAX_VALUE]
    return fields


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def encode(fields: Mapping[str, str]) -> bytes:
    """The native datagram: `KEY=value` lines, or KEY, a 64-bit little-endian length and the bytes for a value
    with a newline."""
    out = bytearray()
    for key, value in fields.items():
        raw = value.encode(errors="replace")
        if b"\n" in raw:
            out += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"
    return bytes(out)


class JournaldRenderer:
    """The last structlog processor under systemd: sends the event to journald and drops it; if the journal
    cannot take it, renders JSON for stderr instead (journald still captures that stream)."""

    def __init__(self, address: str = SOCKET) -> None:
        self._address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._send: Any = None
        with contextlib.suppress(ImportError, AttributeError):
            if address == SOCKET:
                self._send = importlib.import_module("systemd.journal").send

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        fields = fields_of(event)
        try:
            if self._send is not None:
                message = fields.pop("MESSAGE")
                self._send(message, **fields)
            else:
                self._socket.sendto(encode(fields), self._address)
        except OSError:
            return json.dumps(event, default=str)
        raise structlog.DropEvent
