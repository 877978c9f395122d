"""The control API server (aiohttp) on the unix socket in the runtime dir, mode 0660."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hmac
import json
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.api.events import EventHub
from agent.errors import AgentError, UnknownService

SOCKET_MODE = 0o660
SOCKET_GROUP = "emp-agent"

StatusSource = Callable[[], dict[str, Any]]
#: (action, name, signal number or None) -> one result per instance; raises UnknownService.
ControlSource = Callable[[str, str, int | None], Awaitable[list[dict[str, Any]]]]
#: instance -> (RSS bytes, CPU seconds) of its process tree.
UsageSource = Callable[[], Awaitable[dict[str, tuple[int, float]]]]
#: grace seconds -> what the drain did.
DrainSource = Callable[[float], Awaitable[dict[str, Any]]]


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
        self._runners: list[web.AppRunner] = []
        self.tcp_port: int | None = None
        self.events = EventHub()

    def _app(self, control: bool, token: str | None = None) -> web.Application:
        app = web.Application(middlewares=[_bearer(token)] if token else [])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status_handler)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/events", self._events)
        if control and self._drain is not None:
            app.router.add_post("/drain", self._drain_handler)
        if control and self._control is not None:
            app.router.add_post(
                "/services/{name}/{action:start|stop|restart|signal|reopen-logs}", self._control_handler
            )
        return app

    async def start(self) -> None:
        """Listen; refuses to take over a socket another live agent answers on."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_socket(self.socket_path)
        runner = web.AppRunner(self._app(control=True), access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        await web.UnixSite(runner, str(self.socket_path)).start()
        os.chmod(self.socket_path, SOCKET_MODE)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(self.socket_path, -1, grp.getgrnam(SOCKET_GROUP).gr_gid)
        if self._tcp is not None:
            app = self._app(control=self._tcp_token is not None, token=self._tcp_token)
            tcp = web.AppRunner(app, access_log=None, handle_signals=False)
            await tcp.setup()
            self._runners.append(tcp)
            site = web.TCPSite(tcp, self._tcp[0], self._tcp[1])
            try:
                await site.start()
            except OSError as exc:
                await self.stop()
                raise AgentError(
                    f"cannot listen on {self._tcp[0]}:{self._tcp[1]} (http_listen): {exc.strerror}"
                ) from None
            self.tcp_port = int(tcp.addresses[0][1]) if tcp.addresses else self._tcp[1]

    async def stop(self) -> None:
        """End the event streams, stop serving and remove the socket."""
        self.events.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """GET /events: a WebSocket when the client asks to upgrade, else server-sent events. One JSON object per
        event, from now on (the recent past is in /status)."""
        async with self.events.subscribe() as subscription:
            websocket = web.WebSocketResponse(heartbeat=30)
            if websocket.can_prepare(request).ok:
                await websocket.prepare(request)
                reader = asyncio.create_task(websocket.receive())  # ends when the client closes
                try:
                    while not reader.done():
                        getter = asyncio.create_task(subscription.queue.get())
                        await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                        if not getter.done():
                            getter.cancel()
                            break
                        event = getter.result()
                        if event is None:
                            break
                        await websocket.send_json(event)
                finally:
                    reader.cancel()
                    await websocket.close()
                return websocket
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await stream.prepare(request)
            await stream.write(b": emp-agent events\n\n")
            while (event := await subscription.queue.get()) is not None:
                try:
                    await stream.write(f"event: {event.get('type', 'event')}\ndata: {json.dumps(event)}\n\n".encode())
                except ConnectionResetError:
                    break
            return stream

    async def _drain_handler(self, request: web.Request) -> web.Response:
        """POST /drain[?timeout=S]: answers when the services are stopped and the record is gone."""
        assert self._drain is not None
        try:
            grace = float(request.query.get("timeout", "0"))
            if not 0 <= grace <= 86400:
                raise ValueError
        except ValueError:
            return web.json_response({"error": "timeout must be seconds between 0 and 86400"}, status=400)
        try:
            return web.json_response(await self._drain(grace))
        except AgentError as exc:
            return web.json_response({"error": str(exc)}, status=409)

    async def _metrics(self, request: web.Request) -> web.Response:
        from agent.api.metrics import CONTENT_TYPE, render

        usage = await self._usage() if self._usage is not None else {}
        body = render(self._status(), usage, datetime.now(UTC))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        status = self._status()
        body = {"phase": status["phase"], "reasons": status["reasons"]}
        return web.json_response(body, status=200 if status["phase"] == "ready" else 503)

    async def _status_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def _control_handler(self, request: web.Request) -> web.Response:
        """POST /services/{name}/{action}[?signal=HUP]: name is an instance, a service, or `all`."""
        assert self._control is not None
        name, action = request.match_info["name"], request.match_info["action"]
        sig = None
        if action == "signal":
            raw = request.query.get("signal", "").upper()
            raw = raw if raw.startswith("SIG") else f"SIG{raw}"
            if raw not in signal.Signals.__members__:
                return web.json_response({"error": f"unknown signal {request.query.get('signal')!r}"}, status=400)
            sig = int(signal.Signals[raw])
        try:
            results = await self._control(action, name, sig)
        except UnknownService:
            return web.json_response({"results": [{"name": name, "ok": False, "error": "no such service"}]}, status=404)
        return web.json_response({"results": results})


def _bearer(token: str) -> Any:
    """Middleware: a POST without `Authorization: Bearer <token>` is 401 before any handler runs."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "GET":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "control on TCP needs Authorization: Bearer <token>"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="emp-agent"'},
                )
        response: web.StreamResponse = await handler(request)
        return response

    return check


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
