"""The control API on a real unix socket, read by the CLI's stdlib client."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.api.client import request_json
from agent.api.server import ControlApi
from agent.errors import AgentError, AgentNotRunning


def status() -> dict[str, Any]:
    return {"phase": "degraded", "reasons": ["service web-0: BACKOFF"], "machine_id": "m1"}


def test_status_healthz_and_readyz_over_the_socket(short_tmp: Path) -> None:
    """/status is the document, /healthz is 200 while alive, /readyz is 503 unless ready; socket mode 0660."""
    sock = short_tmp / "agent.sock"

    async def scenario() -> list[Any]:
        api = ControlApi(sock, status)
        await api.start()
        try:
            mode = stat.S_IMODE(sock.stat().st_mode)
            results = await asyncio.gather(
                *(asyncio.to_thread(request_json, sock, "GET", p) for p in ("/status", "/healthz", "/readyz"))
            )
            return [mode, *results]
        finally:
            await api.stop()

    mode, got_status, health, ready = asyncio.run(scenario())

    assert 0o660 == mode
    assert (200, status()) == got_status
    assert (200, {"status": "ok"}) == health
    assert (503, {"phase": "degraded", "reasons": ["service web-0: BACKOFF"]}) == ready
    assert not sock.exists()


def test_client_says_the_agent_is_not_running(short_tmp: Path) -> None:
    """No socket: AgentNotRunning with the path in the message."""
    with pytest.raises(AgentNotRunning, match="emp-agent is not running"):
        request_json(short_tmp / "agent.sock", "GET", "/status")


def test_a_second_agent_is_refused_and_a_stale_socket_is_replaced(short_tmp: Path) -> None:
    """A live socket is never stolen; one left by a dead agent is cleaned up."""
    sock = short_tmp / "agent.sock"

    async def scenario() -> None:
        first = ControlApi(sock, status)
        await first.start()
        with pytest.raises(AgentError, match="already serving"):
            await ControlApi(sock, status).start()
        await first.stop()

    asyncio.run(scenario())

    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()

    async def restart() -> int:
        api = ControlApi(sock, status)
        await api.start()
        code, _ = await asyncio.to_thread(request_json, sock, "GET", "/healthz")
        await api.stop()
        return code

    assert 200 == asyncio.run(restart())


def test_a_regular_file_at_the_socket_path_is_not_deleted(short_tmp: Path) -> None:
    """Something that is not a socket at the control socket path is an error, and is left alone."""
    path = short_tmp / "agent.sock"
    path.write_text("precious")

    with pytest.raises(AgentError, match="is not a socket"):
        asyncio.run(ControlApi(path, status).start())

    assert "precious" == path.read_text()
