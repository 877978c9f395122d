"""Fetching bytes from http(s) and file URLs; httpx errors become ModelPullError here and nowhere else."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import certifi
import httpx

from agent.errors import ModelPullError
from agent.redact import redact_source

CHUNK = 1024 * 1024
Sink = Callable[[bytes], None]


class TransientPullError(ModelPullError):
    """A failure worth retrying (connection reset, timeout, 5xx, 429)."""


class Fetcher(Protocol):
    """Streams a URL's body into a sink."""

    async def fetch(self, url: str, sink: Sink) -> None: ...


class UrlFetcher:
    """http/https through one httpx client (TLS always verified), file:// from the local filesystem."""

    def __init__(self, ca_bundle: Path | None = None, connect_timeout_s: float = 15.0, read_timeout_s: float = 60.0):
        context = ssl.create_default_context(cafile=certifi.where())
        if ca_bundle is not None:
            context.load_verify_locations(cafile=str(ca_bundle))
        self._client = httpx.AsyncClient(
            verify=context,
            follow_redirects=True,
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            trust_env=False,
            headers={"User-Agent": "emp-agent"},
        )

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._client.aclose()

    async def fetch(self, url: str, sink: Sink) -> None:
        """Stream the body into `sink`; raises ModelPullError (TransientPullError when a retry may help)."""
        scheme = urlsplit(url).scheme
        if scheme == "file":
            await asyncio.to_thread(_copy_file, Path(unquote(urlsplit(url).path)), sink)
            return
        shown = redact_source(url)
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    error = (
                        TransientPullError
                        if response.status_code in (408, 429) or response.status_code >= 500
                        else ModelPullError
                    )
                    raise error(f"{shown}: HTTP {response.status_code}")
                async for chunk in response.aiter_bytes(CHUNK):
                    sink(chunk)
        except httpx.TimeoutException as exc:
            raise TransientPullError(f"{shown}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.ConnectError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ModelPullError(f"{shown}: TLS certificate not trusted") from None
            raise TransientPullError(f"{shown}: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise ModelPullError(f"{shown}: {type(exc).__name__}") from None


def _copy_file(path: Path, sink: Sink) -> None:
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                sink(chunk)
    except OSError as exc:
        raise ModelPullError(f"file://{path}: {exc.strerror or exc}") from None
