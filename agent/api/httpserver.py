"""The HTTP/1.1 server the control API answers on: connections, framing (h11), limits and timeouts; WebSocket
upgrades are handed to agent.api.websocket. What a request means is the API's business; this module never looks
at paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import h11
import structlog

if TYPE_CHECKING:
    from agent.api.websocket import WebSocket

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: A request's line and headers larger than this are refused (431).
MAX_HEAD_BYTES = 16 * 1024
#: A request body larger than this is refused (413): the API's POSTs carry no body.
MAX_BODY_BYTES = 64 * 1024
#: A client must send a whole request within this many seconds once it has started one.
REQUEST_TIMEOUT_S = 10.0
#: An idle keep-alive connection is closed after this many seconds.
KEEPALIVE_TIMEOUT_S = 75.0
READ_BYTES = 64 * 1024
SERVER = "emp-agent"


@dataclass(frozen=True)
class Request:
    """One parsed request. Header names are lower-case; a repeated query parameter keeps its last value."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def wants_websocket(self) -> bool:
        """The client asked to upgrade this request to a WebSocket."""
        connection = {token.strip().lower() for token in self.headers.get("connection", "").split(",")}
        return "upgrade" in connection and self.headers.get("upgrade", "").lower() == "websocket"


@dataclass(frozen=True)
class Response:
    """A whole response."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(data: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """`data` as a JSON response."""
    return Response(status, json.dumps(data).encode(), "application/json; charset=utf-8", headers)


@dataclass(frozen=True)
class StreamResponse:
    """A response sent as its chunks come (chunked encoding). The head goes out with the first chunk, so work the
    iterator does before its first `yield` (subscribing to something) happens before the client hears back."""

    chunks: AsyncIterator[bytes]
    content_type: str
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("cache-control", "no-cache"),)


@dataclass(frozen=True)
class WebSocketSession:
    """The answer to an upgrade request: `run` is given the socket, calls `accept`, and talks until it returns or
    the client leaves."""

    run: Callable[[WebSocket], Awaitable[None]]


Answer = Response | StreamResponse | WebSocketSession
Handler = Callable[[Request], Awaitable[Answer]]


class _Closed(Exception):
    """The client went away or broke the protocol; the connection ends without an answer."""


@dataclass
class HttpServer:
    """Serves `handler` on any number of unix and TCP listeners until `close`."""

    handler: Handler
    _servers: list[asyncio.Server] = field(default_factory=list)
    _connections: set[asyncio.Task[None]] = field(default_factory=set)

    async def listen_unix(self, path: str) -> None:
        """Listen on a unix socket at `path` (which must not exist)."""
        self._servers.append(await asyncio.start_unix_server(self._accept, path, limit=READ_BYTES))

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on host:port; returns the port bound (useful with port 0). Raises OSError."""
        server = await asyncio.start_server(self._accept, host, port, limit=READ_BYTES)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every open connection (streams and WebSockets included)."""
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(reader, writer, self.handler).serve()
        except (_Closed, ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("control API connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    """One client connection: requests in turn (keep-alive), until either side closes or it upgrades."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def serve(self) -> None:
        while True:
            try:
                request = await self._read_request()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc.error_status_hint, str(exc))
                return
            if request is None:
                return
            answer = await self._answer(request)
            if isinstance(answer, WebSocketSession) and request.wants_websocket:
                await self._websocket(request, answer)
                return
            if isinstance(answer, WebSocketSession):
                answer = json_response({"error": "this endpoint needs a WebSocket upgrade"}, 400)
            if isinstance(answer, StreamResponse):
                await self._stream(answer, head_only=request.method == "HEAD")
            else:
                await self._respond(answer, head_only=request.method == "HEAD")
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return  # MUST_CLOSE, or the client switched protocol: this connection is finished
            self.h11.start_next_cycle()

    async def _answer(self, request: Request) -> Answer:
        try:
            return await self.handler(request)
        except Exception:
            log.exception("control API request failed", method=request.method, path=request.path)
            return json_response({"error": "internal error (see the agent's log)"}, 500)

    async def _read_request(self) -> Request | None:
        """The next whole request, or None when the client closed between requests."""
        event = await self._next_event(KEEPALIVE_TIMEOUT_S)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise _Closed
        target = urlsplit(event.target.decode("latin-1"))
        body = bytearray()
        while True:
            part = await self._next_event(REQUEST_TIMEOUT_S)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise _Closed
        return Request(
            method=event.method.decode("ascii").upper(),
            path=unquote(target.path) or "/",
            query=dict(parse_qsl(target.query, keep_blank_values=True)),
            headers={name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers},
            body=bytes(body),
        )

    async def _next_event(self, within_s: float) -> Any:
        async with asyncio.timeout(within_s):
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                if self.h11.they_are_waiting_for_100_continue:
                    self._send(h11.InformationalResponse(status_code=100, headers=[]))
                self.h11.receive_data(await self.reader.read(READ_BYTES))

    def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)

    def _head(self, status: int, content_type: str, headers: tuple[tuple[str, str], ...], length: int | None) -> None:
        fields = [("server", SERVER), ("content-type", content_type), *headers]
        if length is not None:
            fields.append(("content-length", str(length)))
        self._send(h11.Response(status_code=status, headers=fields))

    async def _respond(self, response: Response, head_only: bool = False) -> None:
        self._head(response.status, response.content_type, response.headers, len(response.body))
        if response.body and not head_only:
            self._send(h11.Data(data=response.body))
        self._send(h11.EndOfMessage())
        await self.writer.drain()

    async def _stream(self, response: StreamResponse, head_only: bool) -> None:
        """Send chunks as they come; a client that closes (or sends anything) while it waits ends the stream, and
        with it the connection, at once rather than at the next chunk."""
        chunks = response.chunks
        left = asyncio.ensure_future(self.reader.read(1))
        try:
            first = await _unless(left, anext(chunks, b""))
            self._head(response.status, response.content_type, (*response.headers, ("connection", "close")), None)
            if not head_only:
                chunk: bytes | None = first
                while chunk is not None:
                    if chunk:
                        self._send(h11.Data(data=chunk))
                        await self.writer.drain()
                    chunk = await _unless(left, anext(chunks, None))
            self._send(h11.EndOfMessage())
            await self.writer.drain()
        finally:
            left.cancel()
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]

    async def _refuse(self, status: int, reason: str) -> None:
        """Answer a request we could not parse, if the protocol still allows an answer."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": reason}).encode()
        with contextlib.suppress(h11.LocalProtocolError):  # h11 lets a server answer 4xx from IDLE
            self._head(status, "application/json; charset=utf-8", (("connection", "close"),), len(body))
            self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
            await self.writer.drain()

    async def _websocket(self, request: Request, session: WebSocketSession) -> None:
        from agent.api import websocket  # wsproto is loaded by the first upgrade, not by every agent (0.9 MB)

        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()]
        trailing, _ = self.h11.trailing_data
        await websocket.serve(headers, _target(request), bytes(trailing), self.reader, self.writer, session.run)


async def _unless(stop: asyncio.Future[Any], awaitable: Awaitable[T]) -> T:
    """The result of `awaitable`; _Closed (and `awaitable` cancelled) if `stop` completes first."""
    work = asyncio.ensure_future(awaitable)
    await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not work.done():
        work.cancel()
        raise _Closed
    return work.result()


def _target(request: Request) -> str:
    return quote(request.path)
