"""The CLI's client for the control socket: stdlib only, so `emp-agent status` starts fast."""

from __future__ import annotations

import http.client
import json
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import AgentError, AgentNotRunning

DEFAULT_RUNTIME_DIR = "/run/emp-agent"
DEFAULT_CONFIG = "/etc/emp-agent/agent.toml"
SOCKET_NAME = "agent.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def locate_socket(environ: Mapping[str, str] | None = None, config_path: str | None = None) -> Path:
    """The control socket, found like Settings would (env, then the TOML file, then the default) without
    importing pydantic."""
    env = os.environ if environ is None else environ
    runtime = env.get("EMP_AGENT_RUNTIME_DIR")
    if runtime is None:
        path = Path(config_path or env.get("EMP_AGENT_CONFIG", DEFAULT_CONFIG))
        try:
            runtime = tomllib.loads(path.read_text(encoding="utf-8")).get("runtime_dir")
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            runtime = None
    return Path(runtime or DEFAULT_RUNTIME_DIR) / SOCKET_NAME


def request_json(socket_path: Path, method: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    """One request; returns (HTTP status, decoded JSON). AgentNotRunning when nothing answers."""
    conn = _UnixConnection(str(socket_path), timeout)
    try:
        conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise AgentNotRunning(f"emp-agent is not running (nothing answers on {socket_path}: {exc.strerror})") from None
    except PermissionError:
        raise AgentError(
            f"permission denied on {socket_path}: run as root or a member of the emp-agent group"
        ) from None
    except TimeoutError:
        raise AgentError(
            f"the agent on {socket_path} did not answer within {timeout:g}s (stopped or overloaded?)"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise AgentNotRunning(f"nothing usable answers on {socket_path}: {exc}") from None
    finally:
        conn.close()
