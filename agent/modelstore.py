"""The model store on disk: skip what is present and verified, fetch to a temp file, verify, publish atomically."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from agent.errors import ModelPullError
from agent.host.download import Fetcher, TransientPullError
from agent.host.facts import existing_ancestor
from agent.profile import ModelSpec
from agent.redact import redact_source
from agent.statefile import fsync_dir, read_json, write_json_atomic

log = structlog.get_logger(__name__)
MIB = 1024 * 1024
#: Free space kept beyond the plan, so a pull never fills the disk to the last byte.
DISK_MARGIN_BYTES = 256 * MIB
HASH_CHUNK = 4 * MIB


@dataclass
class ModelStatus:
    """What happened to one model in this boot."""

    name: str
    dest: str
    sha256: str
    size: int | None
    state: str  # "verified" (was already there), "pulled", "failed"
    source: str
    duration_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return asdict(self)


class ModelStore:
    """Places models under `root`; remembers verified files in `index_path` so unchanged files are not re-hashed."""

    def __init__(self, root: Path, index_path: Path, fetcher: Fetcher, attempts: int = 3) -> None:
        self.root = root
        self._index_path = index_path
        self._fetcher = fetcher
        self._attempts = attempts
        loaded = read_json(index_path)
        self._index: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}

    def plan(self, models: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        """The models that must be fetched, after checking free disk space for all of them. Temp files left by
        an agent that was killed mid-download are removed first (the caller holds the state-dir lock)."""
        for spec in models.values():
            dest = self.root / spec.dest
            for stale in dest.parent.glob(f".{dest.name}.part-*") if dest.parent.is_dir() else []:
                with contextlib.suppress(OSError):
                    stale.unlink()
                    log.info("removed a partial download left by a killed agent", path=str(stale))
        needed = {name: spec for name, spec in models.items() if not self.is_verified(spec)}
        required = sum(spec.size or 0 for spec in needed.values())
        if required:
            free = shutil.disk_usage(existing_ancestor(self.root)).free
            if required + DISK_MARGIN_BYTES > free:
                raise ModelPullError(
                    f"not enough disk space under {self.root}: the plan needs {required // MIB} MiB "
                    f"(+{DISK_MARGIN_BYTES // MIB} MiB margin), {free // MIB} MiB free; nothing was downloaded"
                )
        return needed

    def is_verified(self, spec: ModelSpec) -> bool:
        """True when the destination holds exactly this file (by the index, or by hashing it once)."""
        dest = self.root / spec.dest
        try:
            stat = dest.stat()
        except FileNotFoundError:
            return False
        if spec.size is not None and stat.st_size != spec.size:
            return False
        known = self._index.get(spec.dest)
        if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            return bool(known.get("sha256") == spec.sha256)
        digest = _hash_file(dest)
        self._remember(spec.dest, dest, digest)
        return digest == spec.sha256

    async def ensure(self, name: str, spec: ModelSpec) -> ModelStatus:
        """Make the destination hold the verified file; raises ModelPullError after the retries."""
        status = ModelStatus(name, spec.dest, spec.sha256, spec.size, "verified", redact_source(spec.url))
        started = time.monotonic()
        if await asyncio.to_thread(self.is_verified, spec):
            return status
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential(multiplier=1, max=20),
            retry=retry_if_exception_type(TransientPullError),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._download(spec)
        status.state = "pulled"
        status.duration_s = round(time.monotonic() - started, 3)
        log.info("model pulled", model=name, dest=spec.dest, source=status.source, duration_s=status.duration_s)
        return status

    async def _download(self, spec: ModelSpec) -> None:
        dest = self.root / spec.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        digest = hashlib.sha256()
        received = 0
        try:
            with tmp.open("wb") as handle:

                def sink(chunk: bytes) -> None:
                    nonlocal received
                    received += len(chunk)
                    if spec.size is not None and received > spec.size:
                        raise ModelPullError(f"{spec.dest}: server sent more than the expected {spec.size} bytes")
                    digest.update(chunk)
                    handle.write(chunk)

                await self._fetcher.fetch(spec.url, sink)
                handle.flush()
                os.fsync(handle.fileno())
            if spec.size is not None and received != spec.size:
                raise TransientPullError(f"{spec.dest}: got {received} bytes, expected {spec.size} (truncated)")
            if digest.hexdigest() != spec.sha256:
                raise ModelPullError(
                    f"{spec.dest}: sha256 mismatch: expected {spec.sha256}, got {digest.hexdigest()} "
                    f"({received} bytes from {redact_source(spec.url)})"
                )
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._remember(spec.dest, dest, digest.hexdigest())

    def _remember(self, key: str, path: Path, digest: str) -> None:
        stat = path.stat()
        self._index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        write_json_atomic(self._index_path, self._index)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
