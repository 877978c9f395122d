"""One HTTP GET over asyncio streams (h11 framing): the status code a readiness probe asks a service for."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit

import h11

READ_BYTES = 64 * 1024
USER_AGENT = "emp-agent-readiness"


async def get_status(url: str) -> int:
    """The status code `url` answers a GET with (the body is not read). http and https; a certificate is
    verified against the host's trust store. Raises OSError (ConnectionError for an answer that is not HTTP) and
    ValueError for a URL that is not http(s); the caller bounds the time."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname,
        port,
        ssl=ssl.create_default_context() if secure else None,
        server_hostname=parts.hostname if secure else None,
    )
    try:
        connection = h11.Connection(h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        headers = [("host", host), ("user-agent", USER_AGENT), ("connection", "close")]
        try:
            writer.write(connection.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await reader.read(READ_BYTES))
                elif isinstance(event, h11.Response):
                    return int(event.status_code)
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionResetError("closed before answering")
        except h11.ProtocolError as exc:
            raise ConnectionError(f"not an HTTP answer: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
