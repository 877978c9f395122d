"""The control API's HTTP/1.1 server on a real unix socket, spoken to byte by byte: keep-alive, limits, broken
clients, streams and WebSockets that end when their client leaves or the server stops."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from agent.api import httpserver, websocket
from agent.api.httpserver import (
    Answer,
    HttpServer,
    Request,
    StreamResponse,
    WebSocketSession,
    json_response,
)
from agent.api.websocket import WebSocket
from tests.helpers import await_until


def echo_handler(log: list[Request]) -> httpserver.Handler:
    async def handle(request: Request) -> Answer:
        log.append(request)
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return json_response({"path": request.path, "query": dict(request.query), "body": request.body.decode()})

    return handle


async def exchange(path: Path, raw: bytes, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10) if read_until_close else await reader.read(65536)
    writer.close()
    return data


def served(sock: Path, handler: httpserver.Handler, *raws: bytes) -> list[bytes]:
    """Serve `handler` on `sock`, send each raw request on a connection of its own in turn, return the answers."""

    async def scenario() -> list[bytes]:
        server = HttpServer(handler)
        await server.listen_unix(str(sock))
        try:
            return [await exchange(sock, raw) for raw in raws]
        finally:
            await server.close()

    return asyncio.run(scenario())


def statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def test_keep_alive_answers_requests_in_order_and_http10_closes(short_tmp: Path) -> None:
    """Two requests on one connection get two answers in order (then the client's close ends it); an HTTP/1.0
    request is answered and the connection closed by the server."""
    sock = short_tmp / "s.sock"
    seen: list[Request] = []

    both = (
        b"GET /a?x=1&y=%20z HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /services/web%2D0/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    )
    one, old = served(sock, echo_handler(seen), both, b"GET /old HTTP/1.0\r\n\r\n")

    assert [200, 200] == statuses(one)
    assert one.endswith(b'{"path": "/services/web-0/stop", "query": {}, "body": "hi"}')
    assert b'"query": {"x": "1", "y": " z"}' in one
    assert old.startswith(b"HTTP/1.1 200 ")
    assert old.endswith(b'"body": ""}')
    assert ["GET", "POST", "GET"] == [r.method for r in seen]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 * 1024), 431),  # and still not finished
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n" + b"b" * 70000, 413),
    ],
    ids=["garbage", "huge-head", "huge-body"],
)
def test_broken_or_oversized_requests_get_their_4xx_and_the_server_goes_on(
    short_tmp: Path, raw: bytes, code: int
) -> None:
    """Each is answered with its status and a JSON reason, the connection closed, and the next client served."""
    sock = short_tmp / "s.sock"
    seen: list[Request] = []

    bad, good = served(sock, echo_handler(seen), raw, b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert [code] == statuses(bad)
    assert b'{"error": ' in bad
    assert [200] == statuses(good)
    assert ["/next"] == [r.path for r in seen]


def test_a_failing_handler_is_a_500_and_the_connection_lives_on(short_tmp: Path) -> None:
    """An exception in the handler answers 500 without its text, and the same connection serves the next
    request."""
    (data,) = served(
        short_tmp / "s.sock",
        echo_handler([]),
        b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )

    assert [500, 200] == statuses(data)
    assert b"handler bug" not in data


def test_a_stream_ends_when_its_client_leaves_even_with_nothing_to_send(short_tmp: Path) -> None:
    """A client that disconnects from a quiet stream is noticed at once: the stream's iterator is closed (its
    `finally` runs) without waiting for a next chunk that may never come."""
    sock = short_tmp / "s.sock"
    closed = asyncio.Event()

    async def quiet() -> AsyncIterator[bytes]:
        try:
            yield b": hello\n\n"
            await asyncio.Event().wait()  # nothing more, ever
            yield b"never"
        finally:
            closed.set()

    async def handle(request: Request) -> Answer:
        return StreamResponse(quiet(), "text/event-stream")

    async def scenario() -> bytes:
        server = HttpServer(handle)
        await server.listen_unix(str(sock))
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b": hello\n\n")
            writer.close()
            await asyncio.wait_for(closed.wait(), 10)
            return head
        finally:
            await server.close()

    head = asyncio.run(scenario())

    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()


def test_websocket_messages_flow_and_a_client_that_stops_answering_pings_is_dropped(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An independent client (aiohttp) upgrades and receives the session's messages; the server pings, a client
    that answers keeps the socket, one that does not is closed after the next interval."""
    monkeypatch.setattr(websocket, "PING_INTERVAL_S", 0.2)
    ended: list[str] = []

    async def session(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(json.dumps({"hello": 1}))
        await websocket.until_closed(asyncio.Event().wait())
        ended.append("closed")

    async def handle(request: Request) -> Answer:
        return WebSocketSession(session)

    async def scenario() -> tuple[object, object, list[str]]:
        server = HttpServer(handle)
        port = await server.listen_tcp("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as client:
                async with client.ws_connect(f"http://127.0.0.1:{port}/events", autoping=True) as polite:
                    first = await polite.receive_json(timeout=10)
                    with pytest.raises(TimeoutError):  # aiohttp answers pings inside receive(): five intervals
                        await asyncio.wait_for(polite.receive(), 1.0)
                    assert not polite.closed
                    assert [] == ended
                async with client.ws_connect(f"http://127.0.0.1:{port}/events", autoping=False) as mute:
                    await mute.receive_json(timeout=10)
                    while (message := await mute.receive(timeout=10)).type is aiohttp.WSMsgType.PING:
                        pass  # never answered
                    final = message.type
            await await_until(lambda: len(ended) == 2, what=f"both sessions ended {ended}")
            return first, final, list(ended)
        finally:
            await server.close()

    first, final, sessions = asyncio.run(scenario())

    assert {"hello": 1} == first
    assert final in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert ["closed", "closed"] == sessions


def test_close_ends_open_streams_and_websockets(short_tmp: Path) -> None:
    """Stopping the server ends a waiting stream and a waiting WebSocket; their clients see the end."""
    sock = short_tmp / "s.sock"

    async def forever() -> AsyncIterator[bytes]:
        yield b": open\n\n"
        await asyncio.Event().wait()
        yield b""

    async def session(websocket: WebSocket) -> None:
        await websocket.accept()
        await asyncio.Event().wait()

    async def handle(request: Request) -> Answer:
        return WebSocketSession(session) if request.wants_websocket else StreamResponse(forever(), "text/plain")

    async def scenario() -> tuple[bytes, object]:
        server = HttpServer(handle)
        await server.listen_unix(str(sock))
        port = await server.listen_tcp("127.0.0.1", 0)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b": open\n\n\r\n")  # the whole first chunk
        async with aiohttp.ClientSession() as client, client.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
            await asyncio.wait_for(server.close(), 10)
            rest = await asyncio.wait_for(reader.read(), 10)
            message = await ws.receive(timeout=10)
        writer.close()
        return rest, message.type

    rest, kind = asyncio.run(scenario())

    assert b"" == rest  # the connection closed (cut off: no final chunk), within the deadline
    assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


def test_a_plain_request_to_a_websocket_endpoint_is_a_400(short_tmp: Path) -> None:
    """A session answer to a request that did not ask to upgrade is refused with a reason."""

    async def handle(request: Request) -> Answer:
        return WebSocketSession(lambda ws: ws.accept())

    (data,) = served(short_tmp / "s.sock", handle, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert [400] == statuses(data)
    assert b"WebSocket upgrade" in data
