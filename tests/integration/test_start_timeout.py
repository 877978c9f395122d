"""Under Type=notify the agent pushes systemd's start timeout ahead while the bootstrap makes progress, and stops
pushing when it stalls (a real agent in this process, a datagram socket standing in for systemd)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from pathlib import Path

import pytest

import agent.daemon as daemon
from agent.bootstrap.context import BootstrapContext
from agent.daemon import Agent
from agent.profile import Profile
from tests.conftest import RedisServer, agent_settings
from tests.helpers import await_until


class Step:
    """A bootstrap stage that takes its time; `gate` holds it (a stall) until the test opens it."""

    fatal = True
    always_run = False

    def __init__(self, name: str, gate: asyncio.Event | None = None) -> None:
        self.name = name
        self.gate = gate

    async def run(self, ctx: BootstrapContext) -> str:
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0.3)
        return "done"


def test_start_timeout_is_extended_on_progress_and_not_on_a_stall(
    short_tmp: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages moving on send EXTEND_TIMEOUT_USEC; while a stage is stuck none is sent (systemd's timeout then
    ends the start); READY=1 comes when the bootstrap is over."""
    monkeypatch.setattr(daemon, "EXTEND_EVERY_S", 0.1)
    name = f"emp-test-extend-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.setblocking(False)
    seen: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                seen.extend(listener.recv(4096).decode().splitlines())
            except BlockingIOError:
                return seen

    def extends() -> int:
        return sum(line.startswith("EXTEND_TIMEOUT_USEC=") for line in drain())

    settings = agent_settings(short_tmp, redis_server.url, "m-extend")
    gate = asyncio.Event()
    stages = [Step("one"), Step("two"), Step("stuck", gate), Step("last")]
    environ = {"PATH": os.environ["PATH"], "NOTIFY_SOCKET": f"@{name}"}
    agent = Agent(settings, Profile(name="p", source="p.toml"), stages=stages, environ=environ)

    async def scenario() -> None:
        run = asyncio.create_task(agent.run())
        try:
            await await_until(lambda: agent.pipeline and agent.pipeline.records[2].state.value == "running", 30)
            await await_until(lambda: extends() >= 1, 10, "an extension while stages move on")
            settled = extends()
            await asyncio.sleep(1.0)  # ten check intervals with the stage stuck
            assert settled + 1 >= extends(), "extensions kept coming during a stall"
            assert "READY=1" not in drain()
            gate.set()
            await await_until(lambda: "READY=1" in drain(), 10, "READY=1")
        finally:
            agent.handle_exit(signal.SIGTERM)
            await run
            listener.close()

    asyncio.run(scenario())
