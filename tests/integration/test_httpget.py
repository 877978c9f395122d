"""The readiness GET against real servers on loopback: status codes, TLS verification, and answers that are not
HTTP."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from agent.host.httpget import get_status
from tests.fileserver import serve_files


def test_the_status_code_of_the_answer_is_returned() -> None:
    """A 200 and a forced 503 come back as they were sent; a missing path is the server's 404."""
    with serve_files({"ok": b"fine"}) as server:
        server.status["busy"] = 503
        server.files["busy"] = b""
        codes = [asyncio.run(get_status(f"{server.url}/{name}?x=1")) for name in ("ok", "busy", "missing")]
    assert [200, 503, 404] == codes


def test_https_is_verified_against_the_trust_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An untrusted certificate fails the probe; trusted through SSL_CERT_FILE, the same server answers."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with serve_files({"ok": b"fine"}, tls=context) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(get_status(f"{server.url}/ok"))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        assert 200 == asyncio.run(get_status(f"{server.url}/ok"))


@pytest.fixture
def raw_server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on loopback that answers each connection with the next canned reply, then closes."""
    replies: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                if replies:
                    conn.sendall(replies.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], replies
    listener.close()


def test_an_answer_that_is_not_http_is_a_connection_error(raw_server: tuple[int, list[bytes]]) -> None:
    """Garbage and a close without an answer are ConnectionErrors (the probe fails), never a crash."""
    port, replies = raw_server
    replies += [b"SSH-2.0-OpenSSH_9.2\r\n", b""]
    for _ in range(2):
        with pytest.raises(ConnectionError):
            asyncio.run(get_status(f"http://127.0.0.1:{port}/"))


def test_a_url_that_is_not_http_is_refused() -> None:
    """Only http and https are probed."""
    with pytest.raises(ValueError, match="not an http"):
        asyncio.run(get_status("ftp://127.0.0.1/x"))
