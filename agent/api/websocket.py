"""WebSocket connections over wsproto: the upgrade, the socket a session talks through, pings and closes. Loaded
by the HTTP server at the first upgrade request, so an agent nobody watches live never holds wsproto."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Pong, RejectConnection, TextMessage

from agent.api.httpserver import READ_BYTES

T = TypeVar("T")

#: A WebSocket is pinged this often; one that has not answered the previous ping is closed.
PING_INTERVAL_S = 30.0
#: A session whose client has left gets this long to end by itself before it is cancelled.
SESSION_GRACE_S = 1.0


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


async def serve(
    headers: list[tuple[bytes, bytes]],
    target: str,
    trailing: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    run: Callable[[WebSocket], Awaitable[None]],
) -> None:
    """Upgrade the connection, run the session with its socket until either side ends, then close (or refuse,
    when the session never accepted)."""
    protocol = WSConnection(ConnectionType.SERVER)
    protocol.initiate_upgrade_connection(headers, target)
    socket = WebSocket(protocol, writer)
    talk = asyncio.ensure_future(run(socket))
    listen = asyncio.ensure_future(_listen(protocol, socket, trailing, reader, writer))
    try:
        await asyncio.wait({talk, listen}, return_when=asyncio.FIRST_COMPLETED)
        if listen.done() and not talk.done():  # the client left: the session has seen `closed`, let it end
            await asyncio.wait({talk}, timeout=SESSION_GRACE_S)
    finally:
        for task in (talk, listen):
            task.cancel()
        await asyncio.gather(talk, listen, return_exceptions=True)
    if not socket.accepted:
        writer.write(protocol.send(RejectConnection(status_code=500)))
    elif protocol.state is ConnectionState.OPEN:
        writer.write(protocol.send(CloseConnection(code=1000)))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _listen(
    protocol: WSConnection,
    socket: WebSocket,
    trailing: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Answer pings and closes, ping the client, and set `socket.closed` when it leaves."""
    answered = True
    data = trailing
    try:
        while True:
            if data:
                protocol.receive_data(data)
            for event in protocol.events():
                if isinstance(event, Ping):
                    writer.write(protocol.send(event.response()))
                elif isinstance(event, Pong):
                    answered = True
                elif isinstance(event, CloseConnection):
                    if protocol.state is ConnectionState.REMOTE_CLOSING:
                        writer.write(protocol.send(event.response()))
                    return
                elif isinstance(event, TextMessage):
                    pass  # the event stream is one-way; what the client says is ignored
            if socket.accepted:
                await writer.drain()
            try:
                async with asyncio.timeout(PING_INTERVAL_S):
                    data = await reader.read(READ_BYTES)
            except TimeoutError:
                if not answered or not socket.accepted:
                    return
                answered = False
                writer.write(protocol.send(Ping()))
                data = b""
                continue
            if not data:
                protocol.receive_data(None)
                return
    finally:
        socket.closed.set()
