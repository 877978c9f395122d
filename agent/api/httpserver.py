"""The HTTP/1.1 server the control API answers on: connections, framing (h11), WebSocket upgrades (wsproto),
limits and timeouts. What a request means is the API's business; this module never looks at paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import h11
import structlog
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Pong, RejectConnection, TextMessage

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
#: A WebSocket is pinged this often; one that has not answered the previous ping is closed.
PING_INTERVAL_S = 30.0
#: A session whose client has left gets this long to end by itself before it is cancelled.
SESSION_GRACE_S = 1.0
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


class WebSocket:
    """An upgraded connection as the session sees it: accept, send text, notice the peer going away."""

    def __init__(self, protocol: WSConnection, writer: asyncio.StreamWriter) -> None:
        self._protocol = protocol
        self._writer = writer
        self.accepted = False
        self.closed = asyncio.Event()

    async def accept(self) -> None:
        """Answer the upgrade (101); until then the client waits."""
        await self._send(AcceptConnection())
        self.accepted = True

    async def send_text(self, text: str) -> None:
        """One text message; ConnectionError once the socket is closing or gone."""
        if self.closed.is_set() or self._protocol.state is not ConnectionState.OPEN:
            raise ConnectionResetError("the WebSocket is closed")
        await self._send(Message(data=text))

    async def until_closed(self, awaitable: Awaitable[T]) -> T | None:
        """The result of `awaitable`, or None when the socket closes first (the awaitable is then cancelled)."""
        work = asyncio.ensure_future(awaitable)
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not work.done():
                work.cancel()
        return work.result() if work.done() and not work.cancelled() else None

    async def _send(self, event: Any) -> None:
        self._writer.write(self._protocol.send(event))
        await self._writer.drain()


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
        protocol = WSConnection(ConnectionType.SERVER)
        protocol.initiate_upgrade_connection(
            [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()],
            _target(request),
        )
        socket = WebSocket(protocol, self.writer)
        trailing, _ = self.h11.trailing_data
        talk = asyncio.ensure_future(session.run(socket))
        listen = asyncio.ensure_future(self._listen(protocol, socket, bytes(trailing)))
        try:
            await asyncio.wait({talk, listen}, return_when=asyncio.FIRST_COMPLETED)
            if listen.done() and not talk.done():  # the client left: the session has seen `closed`, let it end
                await asyncio.wait({talk}, timeout=SESSION_GRACE_S)
        finally:
            for task in (talk, listen):
                task.cancel()
            await asyncio.gather(talk, listen, return_exceptions=True)
        if not socket.accepted:
            self.writer.write(protocol.send(RejectConnection(status_code=500)))
        elif protocol.state is ConnectionState.OPEN:
            self.writer.write(protocol.send(CloseConnection(code=1000)))
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _listen(self, protocol: WSConnection, socket: WebSocket, trailing: bytes) -> None:
        """Answer pings and closes, ping the client, and set `socket.closed` when it leaves."""
        answered = True
        data = trailing
        try:
            while True:
                if data:
                    protocol.receive_data(data)
                for event in protocol.events():
                    if isinstance(event, Ping):
                        self.writer.write(protocol.send(event.response()))
                    elif isinstance(event, Pong):
                        answered = True
                    elif isinstance(event, CloseConnection):
                        if protocol.state is ConnectionState.REMOTE_CLOSING:
                            self.writer.write(protocol.send(event.response()))
                        return
                    elif isinstance(event, TextMessage):
                        pass  # the event stream is one-way; what the client says is ignored
                if socket.accepted:
                    await self.writer.drain()
                try:
                    async with asyncio.timeout(PING_INTERVAL_S):
                        data = await self.reader.read(READ_BYTES)
                except TimeoutError:
                    if not answered or not socket.accepted:
                        return
                    answered = False
                    self.writer.write(protocol.send(Ping()))
                    data = b""
                    continue
                if not data:
                    protocol.receive_data(None)
                    return
        finally:
            socket.closed.set()


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
