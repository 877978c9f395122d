"""A real HTTP(S) file server on loopback for download tests, with request counting and misbehaviours."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    """Serves files from `root`; `truncate[name] = n` sends only n bytes of that file; `status[name]` forces a code."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.truncate: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.url = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = self.path.split("?", 1)[0].lstrip("/")
                server.requests.append((name, dict(self.headers)))
                if name in server.status:
                    self.send_response(server.status[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / name
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: server.truncate.get(name, len(data))])
                if name in server.truncate:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@contextmanager
def serve_files(root: Path, tls: ssl.SSLContext | None = None) -> Iterator[FileServer]:
    """Run a FileServer on 127.0.0.1 on a free port in a thread."""
    files = FileServer(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), files.handler())
    httpd.daemon_threads = True
    scheme = "http"
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    files.url = f"{scheme}://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield files
    finally:
        httpd.shutdown()
        httpd.server_close()
