"""Readiness probes: one attempt of an HTTP, TCP, unix-socket or command check."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.host.httpget import get_status
from agent.profile import ProbeKind

ATTEMPT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Probe:
    """A readiness check with its placeholders already filled for one instance."""

    kind: ProbeKind
    url: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    socket: str | None = None
    command: tuple[str, ...] = ()
    expect_status: tuple[int, ...] = (200,)
    pattern: str | None = None

    def describe(self) -> str:
        """Short human form for logs and errors."""
        target = (
            self.url
            or self.socket
            or (f"/{self.pattern}/" if self.pattern else None)
            or (f"{self.host}:{self.port}" if self.port else " ".join(self.command))
        )
        return f"{self.kind.value} {target}".strip()


async def attempt(
    probe: Probe, env: Mapping[str, str] | None = None, log: Path | None = None, log_offset: int = 0
) -> bool:
    """Run the probe once; True when it passes. Never raises for a failing target. A log probe looks at what
    was written to `log` after `log_offset` (the output of this start only)."""
    try:
        async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
            if probe.kind is ProbeKind.LOG and probe.pattern and log is not None:
                return await asyncio.to_thread(_log_matches, log, log_offset, probe.pattern)
            return await _attempt(probe, env)
    except (TimeoutError, OSError, ValueError):
        return False


#: The log writer's per-line timestamp, removed before a log pattern is matched.
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", re.MULTILINE)


def _log_matches(log: Path, offset: int, pattern: str) -> bool:
    with log.open("rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(offset if offset <= size else 0)  # rotated since the start: the new file is all ours
        text = STAMP.sub("", handle.read().decode(errors="replace"))
    return re.search(pattern, text, re.MULTILINE) is not None


async def _attempt(probe: Probe, env: Mapping[str, str] | None) -> bool:
    if probe.kind is ProbeKind.HTTP and probe.url:
        return await get_status(probe.url) in probe.expect_status
    if probe.kind is ProbeKind.TCP and probe.port:
        _, writer = await asyncio.open_connection(probe.host, probe.port)
        await _close(writer)
        return True
    if probe.kind is ProbeKind.UNIX and probe.socket:
        _, writer = await asyncio.open_unix_connection(probe.socket)
        await _close(writer)
        return True
    if probe.kind is ProbeKind.COMMAND and probe.command:
        proc = await asyncio.create_subprocess_exec(
            *probe.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
        try:
            return await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return True


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
