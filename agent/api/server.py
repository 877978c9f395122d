"""The control API on the unix socket in the runtime dir (mode 0660), and optionally on a TCP address: its
endpoints, who may call which, and what each answers."""

from __future__ import annotations

import contextlib
import grp
import hmac
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.api.events import EventHub
from agent.api.httpserver import (
    Answer,
    HttpServer,
    Request,
    Response,
    StreamResponse,
    WebSocketSession,
    json_response,
)
from agent.errors import AgentError, UnknownService

if TYPE_CHECKING:
    from agent.api.websocket import WebSocket

SOCKET_MODE = 0o660
SOCKET_GROUP = "emp-agent"
CONTROL_PATH = re.compile(r"/services/(?P<name>[^/]+)/(?P<action>start|stop|restart|signal|reopen-logs)")

StatusSource = Callable[[], dict[str, Any]]
#: (action, name, signal number or None) -> one result per instance; raises UnknownService.
ControlSource = Callable[[str, str, int | None], Awaitable[list[dict[str, Any]]]]
#: instance -> (RSS bytes, CPU seconds) of its process tree.
UsageSource = Callable[[], Awaitable[dict[str, tuple[int, float]]]]
#: grace seconds -> what the drain did.
DrainSource = Callable[[float], Awaitable[dict[str, Any]]]
Endpoint = Callable[[Request], Awaitable[Answer]]


class ControlApi:
    """GET /healthz (process alive), /readyz (phase ready), /status (the full status document), /metrics
    (Prometheus), /events; POST control (services, drain) on the unix socket. The optional TCP listener serves
    the GET endpoints, and control only when a bearer token is configured: every POST must carry it (compared in
    constant time), else 401 and nothing happens."""

    def __init__(
        self,
        socket_path: Path,
        status: StatusSource,
        control: ControlSource | None = None,
        usage: UsageSource | None = None,
        tcp: tuple[str, int] | None = None,
        drain: DrainSource | None = None,
        tcp_token: str | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._status = status
        self._control = control
        self._usage = usage
        self._drain = drain
        self._tcp = tcp
        self._tcp_token = tcp_token
        self._servers: list[HttpServer] = []
        self.tcp_port: int | None = None
        self.events = EventHub()
        self._reads: dict[str, Endpoint] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/status": self._status_handler,
            "/metrics": self._metrics,
            "/events": self._events,
        }

    async def start(self) -> None:
        """Listen; refuses to take over a socket another live agent answers on."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(self.socket_path)
        local = HttpServer(lambda request: self._route(request, control=True))
        self._servers.append(local)
        await local.listen_unix(str(self.socket_path))
        os.chmod(self.socket_path, SOCKET_MODE)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(self.socket_path, -1, grp.getgrnam(SOCKET_GROUP).gr_gid)
        if self._tcp is not None:
            token = self._tcp_token
            remote = HttpServer(lambda request: self._route(request, control=token is not None, token=token))
            self._servers.append(remote)
            try:
                self.tcp_port = await remote.listen_tcp(self._tcp[0], self._tcp[1])
            except OSError as exc:
                await self.stop()
                raise AgentError(
                    f"cannot listen on {self._tcp[0]}:{self._tcp[1]} (http_listen): {exc.strerror}"
                ) from None

    async def stop(self) -> None:
        """End the event streams, stop serving and remove the socket."""
        self.events.close()
        for server in self._servers:
            await server.close()
        self._servers = []
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _route(self, request: Request, control: bool, token: str | None = None) -> Answer:
        """Reads for everyone who can connect; control only where `control`, and with the token where one is set
        (checked before anything else, so an unauthenticated POST learns nothing)."""
        if request.method in ("GET", "HEAD"):
            endpoint = self._reads.get(request.path)
            if endpoint is not None:
                return await endpoint(request)
            return _not_found(request)
        if token is not None and not _authorised(request, token):
            return json_response(
                {"error": "control on TCP needs Authorization: Bearer <token>"},
                401,
                (("www-authenticate", 'Bearer realm="emp-agent"'),),
            )
        if request.method == "POST" and control:
            if request.path == "/drain" and self._drain is not None:
                return await self._drain_handler(request)
            match = CONTROL_PATH.fullmatch(request.path)
            if match is not None and self._control is not None:
                return await self._control_handler(request, match["name"], match["action"])
        if request.path in self._reads:
            return json_response({"error": f"{request.method} is not allowed here"}, 405, (("allow", "GET, HEAD"),))
        return _not_found(request)

    async def _events(self, request: Request) -> Answer:
        """GET /events: a WebSocket when the client asks to upgrade, else server-sent events. One JSON object per
        event, from now on (the recent past is in /status)."""
        if request.wants_websocket:
            return WebSocketSession(self._event_socket)
        return StreamResponse(self._event_stream(), "text/event-stream")

    async def _event_socket(self, websocket: WebSocket) -> None:
        async with self.events.subscribe() as subscription:
            await websocket.accept()
            while (event := await websocket.until_closed(subscription.queue.get())) is not None:
                await websocket.send_text(json.dumps(event))

    async def _event_stream(self) -> AsyncIterator[bytes]:
        async with self.events.subscribe() as subscription:
            yield b": emp-agent events\n\n"
            while (event := await subscription.queue.get()) is not None:
                yield f"event: {event.get('type', 'event')}\ndata: {json.dumps(event)}\n\n".encode()

    async def _drain_handler(self, request: Request) -> Response:
        """POST /drain[?timeout=S]: answers when the services are stopped and the record is gone."""
        assert self._drain is not None
        try:
            grace = float(request.query.get("timeout", "0"))
            if not 0 <= grace <= 86400:
                raise ValueError
        except ValueError:
            return json_response({"error": "timeout must be seconds between 0 and 86400"}, 400)
        try:
            return json_response(await self._drain(grace))
        except AgentError as exc:
            return json_response({"error": str(exc)}, 409)

    async def _metrics(self, request: Request) -> Response:
        from agent.api.metrics import CONTENT_TYPE, render

        usage = await self._usage() if self._usage is not None else {}
        return Response(200, render(self._status(), usage, datetime.now(UTC)), CONTENT_TYPE)

    async def _healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        status = self._status()
        body = {"phase": status["phase"], "reasons": status["reasons"]}
        return json_response(body, 200 if status["phase"] == "ready" else 503)

    async def _status_handler(self, request: Request) -> Response:
        return json_response(self._status())

    async def _control_handler(self, request: Request, name: str, action: str) -> Response:
        """POST /services/{name}/{action}[?signal=HUP]: name is an instance, a service, or `all`."""
        assert self._control is not None
        sig = None
        if action == "signal":
            raw = request.query.get("signal", "").upper()
            raw = raw if raw.startswith("SIG") else f"SIG{raw}"
            if raw not in signal.Signals.__members__:
                return json_response({"error": f"unknown signal {request.query.get('signal')!r}"}, 400)
            sig = int(signal.Signals[raw])
        try:
            results = await self._control(action, name, sig)
        except UnknownService:
            return json_response({"results": [{"name": name, "ok": False, "error": "no such service"}]}, 404)
        return json_response({"results": results})


def _authorised(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "").encode()
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def _not_found(request: Request) -> Response:
    return json_response({"error": f"no such endpoint: {request.method} {request.path}"}, 404)


def _clear_stale_socket(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise AgentError(f"{path} exists and is not a socket; remove it or choose another EMP_AGENT_RUNTIME_DIR")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # left behind by an agent that died
            return
    raise AgentError(f"another emp-agent is already serving on {path}")
