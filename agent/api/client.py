"""The CLI's client for the control socket: one JSON request per connection, with nothing but the socket module,
so `emp-agent status` starts fast (http.client alone costs it 24 ms of imports, mostly the email package)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from agent.errors import AgentError, AgentNotRunning

TYPE_CHECKING = False  # typing costs `emp-agent status` 5 ms of imports; mypy reads this name as usual
if TYPE_CHECKING:
    from typing import Any

DEFAULT_RUNTIME_DIR = "/run/emp-agent"
DEFAULT_CONFIG = "/etc/emp-agent/agent.toml"
SOCKET_NAME = "agent.sock"


def locate_socket(environ: Mapping[str, str] | None = None, config_path: str | None = None) -> Path:
    """The control socket, found like Settings would (env, then the TOML file, then the default) without
    importing pydantic."""
    env = os.environ if environ is None else environ
    runtime = env.get("EMP_AGENT_RUNTIME_DIR")
    if runtime is None:
        path = Path(config_path or env.get("EMP_AGENT_CONFIG", DEFAULT_CONFIG))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        if "runtime_dir" in text:  # tomllib only when the file may say something
            import tomllib

            try:
                runtime = tomllib.loads(text).get("runtime_dir")
            except tomllib.TOMLDecodeError:
                runtime = None
    return Path(runtime or DEFAULT_RUNTIME_DIR) / SOCKET_NAME


def request_json(socket_path: Path, method: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    """One request; returns (HTTP status, decoded JSON). AgentNotRunning when nothing answers."""
    try:
        return _exchange(str(socket_path), method, path, timeout)
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
    except (OSError, ValueError) as exc:
        raise AgentNotRunning(f"nothing usable answers on {socket_path}: {exc}") from None


def _exchange(socket_path: str, method: str, path: str, timeout: float) -> tuple[int, Any]:
    """Send the request with `Connection: close`, read the answer to the end, take the status line and the
    Content-Length body (the agent's server sends JSON answers whole, never chunked). ValueError for anything
    else."""
    request = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request.encode("ascii"))
        received = []
        while data := sock.recv(256 * 1024):
            received.append(data)
    head, separator, body = b"".join(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not separator or not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    if "content-length" not in headers:
        raise ValueError("the answer has no Content-Length")
    length = int(headers["content-length"])
    if len(body) < length:
        raise ValueError(f"the answer was cut short ({len(body)} of {length} bytes)")
    return int(rest[:3]), json.loads(body[:length] or b"null")
