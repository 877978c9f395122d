"""Model pull v1 against real HTTP and HTTPS servers on loopback: verify, publish atomically, skip when present."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from agent.errors import ModelPullError
from agent.host.download import UrlFetcher
from agent.modelstore import ModelStore
from agent.profile import ModelSpec
from tests.fileserver import FileServer, serve_files

DATA = os.urandom(3 * 1024 * 1024 + 17)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.safetensors").write_bytes(DATA)
    with serve_files(root) as server:
        yield server


def store_for(tmp_path: Path, ca: Path | None = None) -> tuple[ModelStore, UrlFetcher]:
    fetcher = UrlFetcher(ca_bundle=ca, read_timeout_s=10)
    return ModelStore(tmp_path / "models", tmp_path / "state" / "models.json", fetcher, attempts=2), fetcher


def ensure(store: ModelStore, fetcher: UrlFetcher, spec: ModelSpec) -> str:
    async def go() -> str:
        try:
            return (await store.ensure("m", spec)).state
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def test_download_is_verified_and_then_skipped(tmp_path: Path, files: FileServer) -> None:
    """First boot downloads and verifies; the next boot finds the file verified without fetching or re-hashing."""
    spec = ModelSpec(url=f"{files.url}/model.safetensors", dest="checkpoints/m.safetensors", sha256=SHA, size=len(DATA))

    assert "pulled" == ensure(*store_for(tmp_path), spec)
    assert "verified" == ensure(*store_for(tmp_path), spec)
    assert DATA == (tmp_path / "models" / "checkpoints" / "m.safetensors").read_bytes()
    assert 1 == len(files.requests)
    assert [] == list((tmp_path / "models" / "checkpoints").glob(".*part*"))


def test_sha_mismatch_publishes_nothing(tmp_path: Path, files: FileServer) -> None:
    """A file whose hash differs never appears at the destination and no temp file is left."""
    spec = ModelSpec(url=f"{files.url}/model.safetensors", dest="m.bin", sha256="0" * 64)
    store, fetcher = store_for(tmp_path)

    with pytest.raises(ModelPullError, match="sha256 mismatch"):
        ensure(store, fetcher, spec)

    assert [] == list((tmp_path / "models").iterdir())


def test_truncated_body_is_retried_then_reported(tmp_path: Path, files: FileServer) -> None:
    """A server that cuts the stream short is retried; a file that stays short is never published."""
    files.truncate["model.safetensors"] = 1000
    spec = ModelSpec(url=f"{files.url}/model.safetensors", dest="m.bin", sha256=SHA, size=len(DATA))
    store, fetcher = store_for(tmp_path)

    with pytest.raises(ModelPullError):
        ensure(store, fetcher, spec)

    assert 2 == len(files.requests)
    assert not (tmp_path / "models" / "m.bin").exists()


def test_http_error_is_reported_without_the_query_string(tmp_path: Path, files: FileServer) -> None:
    """A 403 on a presigned URL is reported; its signature is not."""
    files.status["model.safetensors"] = 403
    spec = ModelSpec(url=f"{files.url}/model.safetensors?X-Amz-Signature=supersecret", dest="m.bin", sha256=SHA)
    store, fetcher = store_for(tmp_path)

    with pytest.raises(ModelPullError) as caught:
        ensure(store, fetcher, spec)

    assert f"{files.url}/model.safetensors?***: HTTP 403" == str(caught.value)


def test_not_enough_disk_space_downloads_nothing(tmp_path: Path, files: FileServer) -> None:
    """A plan larger than the free space fails before any byte moves."""
    spec = ModelSpec(url=f"{files.url}/model.safetensors", dest="m.bin", sha256=SHA, size=2**60)
    store, _ = store_for(tmp_path)

    with pytest.raises(ModelPullError, match="not enough disk space"):
        store.plan({"m": spec})

    assert [] == files.requests


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    """TLS is verified: an untrusted certificate fails, the same server with its CA configured works."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.safetensors").write_bytes(DATA)
    with serve_files(root, tls=context) as server:
        spec = ModelSpec(url=f"{server.url}/model.safetensors", dest="m.bin", sha256=SHA, size=len(DATA))
        with pytest.raises(ModelPullError, match="certificate"):
            ensure(*store_for(tmp_path / "untrusted"), spec)
        assert "pulled" == ensure(*store_for(tmp_path / "trusted", ca_file), spec)
