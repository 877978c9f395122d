"""A real HTTP(S) file server on loopback for download tests: Range, ETag and If-Range like a CDN, plus
misbehaviours switched on per file (drop the connection, ignore Range, redirect, pause, trickle)."""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    """One request as the server saw it."""

    name: str
    headers: dict[str, str]
    status: int = 0
    first: int = 0
    at: float = field(default_factory=time.monotonic)
    sent: int = 0

    @property
    def range(self) -> str | None:
        """The Range header, if any."""
        return self.headers.get("Range")


@dataclass
class FileServer:
    """Serves `files[name]` (bytes in memory) with an ETag derived from the content.

    Misbehaviours, per file name: `drop_at[name] = n` closes the connection once the body reaches absolute offset
    n (once per entry in the list); `ignore_range` answers every request with 200 and the whole body; `redirect[name]
    = url` answers 302; `status[name]` forces a code; `status_once[name]` is a list of (code, headers) answered first, once each; `content_type` / `content_disposition` add headers;
    `pause_at[name] = (offset, event)` stops sending at that offset until the event is set; `rate[name]` trickles
    the body at that many bytes per second; `hold[name] = (n, reached, release)` makes the n-th data request
    (0-based, probes not counted) set `reached` and wait for `release` before it looks at the file.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[Served] = field(default_factory=list)
    drop_at: dict[str, list[int]] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)
    redirect: dict[str, str] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    status_once: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    content_type: dict[str, str] = field(default_factory=dict)
    content_disposition: dict[str, str] = field(default_factory=dict)
    extra_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    pause_at: dict[str, tuple[int, threading.Event]] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)
    hold: dict[str, tuple[int, threading.Event, threading.Event]] = field(default_factory=dict)
    url: str = ""
    active: int = 0
    max_active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def etag(self, name: str) -> str:
        """A strong ETag that changes with the content."""
        return '"' + hashlib.sha256(self.files[name]).hexdigest()[:16] + '"'

    def data_requests(self, name: str) -> list[Served]:
        """Requests for `name` that moved more than the one-byte probe."""
        return [r for r in self.requests if r.name == name and r.range != "bytes=0-0"]

    def bytes_sent(self, name: str) -> int:
        """Body bytes sent for `name`, all requests together."""
        return sum(r.sent for r in self.requests if r.name == name)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = self.path.split("?", 1)[0].lstrip("/")
                served = Served(name, dict(self.headers))
                server.requests.append(served)
                if name in server.redirect:
                    self._head(302, 0, {"Location": server.redirect[name]}, served)
                    return
                if name in server.status:
                    self._head(server.status[name], 0, {}, served)
                    return
                if server.status_once.get(name):
                    code, extra = server.status_once[name].pop(0)
                    self._head(code, 0, extra, served)
                    return
                held = server.hold.get(name)
                if held is not None and len(server.data_requests(name)) == held[0] + 1 and served.range != "bytes=0-0":
                    held[1].set()
                    held[2].wait()
                if name not in server.files:
                    self._head(404, 0, {}, served)
                    return
                data = server.files[name]
                etag = server.etag(name)
                headers = {"ETag": etag, "Accept-Ranges": "bytes"}
                if name in server.content_type:
                    headers["Content-Type"] = server.content_type[name]
                if name in server.content_disposition:
                    headers["Content-Disposition"] = server.content_disposition[name]
                headers.update(server.extra_headers.get(name, {}))
                first, last = 0, len(data) - 1
                match = _RANGE.match(self.headers.get("Range", ""))
                if_range = self.headers.get("If-Range")
                partial = match is not None and name not in server.ignore_range and if_range in (None, etag)
                if partial and match is not None and int(match.group(1)) >= len(data):
                    self._head(416, 0, {"Content-Range": f"bytes */{len(data)}"}, served)
                    return
                if partial and match is not None:
                    first = int(match.group(1))
                    last = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
                    headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                self._head(206 if partial else 200, last - first + 1, headers, served)
                served.first = first
                with server._lock:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self._body(name, data, first, last + 1, served)
                finally:
                    with server._lock:
                        server.active -= 1

            def _head(self, code: int, length: int, headers: dict[str, str], served: Served) -> None:
                served.status = code
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _body(self, name: str, data: bytes, offset: int, end: int, served: Served) -> None:
                drops = server.drop_at.get(name, [])
                drop = next((d for d in drops if offset < d < end), None)
                pause = server.pause_at.get(name)
                rate = server.rate.get(name)
                piece = int(min(64 * 1024, max(512, rate / 20))) if rate else 64 * 1024
                started = time.monotonic()
                while offset < end:
                    stop = min(end, offset + piece)
                    if drop is not None:
                        stop = min(stop, drop)
                    if pause is not None and offset < pause[0] <= stop:
                        stop = pause[0]
                    try:
                        self.wfile.write(data[offset:stop])
                    except OSError:
                        break
                    served.sent += stop - offset
                    offset = stop
                    if drop is not None and offset == drop:
                        drops.remove(drop)
                        self.close_connection = True
                        return
                    if pause is not None and offset == pause[0]:
                        self.wfile.flush()
                        pause[1].wait()
                    if rate:
                        ahead = served.sent / rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)  # the trickle itself, not a synchronisation

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@contextmanager
def serve_files(files: dict[str, bytes] | None = None, tls: ssl.SSLContext | None = None) -> Iterator[FileServer]:
    """Run a FileServer on 127.0.0.1 on a free port in a thread."""
    server = FileServer(files=dict(files or {}))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    httpd.daemon_threads = True
    scheme = "http"
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    server.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        for _, event in server.pause_at.values():
            event.set()
        for _, _, release in server.hold.values():
            release.set()
        httpd.shutdown()
        httpd.server_close()
