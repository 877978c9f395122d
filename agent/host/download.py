"""HTTP(S) transfers for model pulls: one pooled httpx client, redirects followed by hand so a token only ever
reaches the hosts allowed to see it; httpx errors become ModelPullError here and nowhere else."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import certifi
import httpcore
import httpx

from agent import __version__
from agent.errors import ModelPullError
from agent.redact import redact_source

MAX_REDIRECTS = 5
#: Bytes per recv on a body (httpcore's default is 64 KiB).
READ_BYTES = 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class TransientPullError(ModelPullError):
    """A failure worth retrying (connection reset, stall, 5xx, 429, 408); `retry_after_s` from the server."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RemoteChanged(TransientPullError):
    """The remote file is no longer the version the partial data came from."""


@dataclass(frozen=True)
class Credential:
    """A bearer token and the hosts (`host` or `host:port`) allowed to receive it. `repr` never shows the token."""

    token: str
    hosts: frozenset[str]

    def __repr__(self) -> str:
        return f"Credential(hosts={sorted(self.hosts)!r})"

    def allows(self, url: str) -> bool:
        """True when `url`'s host is on the list bare (any port), or with its port (explicit or the scheme's)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        return host in self.hosts or f"{host}:{effective_port(url)}" in self.hosts


def effective_port(url: str) -> int:
    """The port a URL connects to: explicit, else the scheme's default."""
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


class Reply:
    """A response whose headers have arrived; the body is read with `chunks()`."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self.url = url
        self.status = response.status_code

    def header(self, name: str) -> str | None:
        """A response header, or None."""
        value: str | None = self._response.headers.get(name)
        return value

    def content_range(self) -> tuple[int, int, int | None] | None:
        """(first, last, total) from Content-Range, or None when absent or malformed."""
        match = _CONTENT_RANGE.match(self.header("content-range") or "")
        if not match:
            return None
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), int(match.group(2)), total

    def chunks(self) -> Iterator[bytes]:
        """The raw body as it arrives (no re-chunking, no decoding: we ask for identity)."""
        shown = redact_source(self.url)
        try:
            yield from self._response.iter_raw()
        except httpx.TimeoutException:
            raise TransientPullError(f"{shown}: stalled (no data within the read timeout)") from None
        except httpx.TransportError as exc:
            raise TransientPullError(f"{shown}: connection lost: {type(exc).__name__}") from None


class Transport(Protocol):
    """Opens a GET and hands back its reply; a fake can serve bytes from memory."""

    def get(
        self, url: str, headers: dict[str, str] | None = None, credential: Credential | None = None
    ) -> AbstractContextManager[Reply]: ...


def _larger_reads() -> None:
    """httpcore reads HTTP/1.1 bodies 64 KiB per recv; model files move at about twice the rate with 1 MiB reads
    (fewer passes through h11 per byte, measured in docs/benchmarks.md). A class attribute, not public API: set only
    where it exists, and a test fails when an httpcore upgrade removes it."""
    connection = getattr(getattr(httpcore, "_sync", None), "http11", None)
    if connection is not None and hasattr(connection.HTTP11Connection, "READ_NUM_BYTES"):
        connection.HTTP11Connection.READ_NUM_BYTES = READ_BYTES


class HttpTransport:
    """One httpx client (HTTP/1.1: each range gets its own TCP window) with verified TLS and proxies from the
    environment."""

    def __init__(
        self,
        ca_bundle: Path | None = None,
        connect_timeout_s: float = 10.0,
        stall_timeout_s: float = 60.0,
        max_connections: int = 16,
    ) -> None:
        _larger_reads()
        context = ssl.create_default_context()  # the host's trust store (lazy, and it has the site's own CAs)
        defaults = ssl.get_default_verify_paths()
        if not any(p and Path(p).exists() for p in (defaults.cafile, defaults.capath)):
            context.load_verify_locations(cafile=certifi.where())  # no system store: Mozilla's roots
        if ca_bundle is not None:
            context.load_verify_locations(cafile=str(ca_bundle))
        self._client = httpx.Client(
            verify=context,
            follow_redirects=False,
            timeout=httpx.Timeout(stall_timeout_s, connect=connect_timeout_s, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=True,
            headers={"User-Agent": f"emp-agent/{__version__}", "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()

    @contextmanager
    def get(
        self, url: str, headers: dict[str, str] | None = None, credential: Credential | None = None
    ) -> Iterator[Reply]:
        """GET `url`, following at most 5 redirects (never from https to http). The token goes only to allowed
        hosts; a server-provided file name is never looked at."""
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers or {})
            if credential is not None and credential.allows(current):
                sent["Authorization"] = f"Bearer {credential.token}"
            response = self._send(current, sent)
            if not response.is_redirect:
                try:
                    yield Reply(response, current)
                finally:
                    response.close()
                return
            location = response.headers.get("location", "")
            response.close()
            if not location:
                raise ModelPullError(f"{redact_source(url)}: HTTP {response.status_code} redirect without a Location")
            target = urljoin(current, location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise ModelPullError(f"{redact_source(url)}: refused a redirect to {urlsplit(target).scheme}:")
            if urlsplit(current).scheme == "https" and urlsplit(target).scheme != "https":
                raise ModelPullError(f"{redact_source(url)}: refused a redirect from https to {redact_source(target)}")
            current = target
        raise ModelPullError(f"{redact_source(url)}: more than {MAX_REDIRECTS} redirects")

    def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        shown = redact_source(url)
        try:
            return self._client.send(self._client.build_request("GET", url, headers=headers), stream=True)
        except httpx.TimeoutException as exc:
            raise TransientPullError(f"{shown}: timed out ({type(exc).__name__})") from None
        except httpx.LocalProtocolError as exc:  # its text can quote a header, token included: never shown
            raise ModelPullError(f"{shown}: the request could not be sent ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ModelPullError(f"{shown}: TLS certificate not trusted (set ca_bundle for a private CA)") from None
            raise TransientPullError(f"{shown}: {type(exc).__name__}: {_first_line(exc)}") from None
        except httpx.HTTPError as exc:
            raise ModelPullError(f"{shown}: {type(exc).__name__}") from None


def http_error(reply: Reply) -> ModelPullError:
    """The error for an unexpected status: retryable for 408, 425, 429 and 5xx (honouring Retry-After)."""
    status = reply.status
    hint = {401: " (missing or wrong token?)", 403: " (forbidden: token, gated model or expired link?)"}.get(status, "")
    message = f"{redact_source(reply.url)}: HTTP {status}{hint}"
    if status in (408, 425, 429) or status >= 500:
        return TransientPullError(message, retry_after_s=retry_after_seconds(reply.header("retry-after")))
    return ModelPullError(message)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds, or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text else ""
