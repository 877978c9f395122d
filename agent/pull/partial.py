"""A partial download on disk: the part file, the ranges written so far and the remote validators, in a sidecar."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.pull.ranges import RangeSet
from agent.statefile import read_json, write_json_atomic

#: The sidecar is rewritten at most this often while bytes arrive (and always at the end of an attempt).
SAVE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Validator:
    """What identifies one version of the remote file: a strong ETag, else Last-Modified, plus its size."""

    size: int
    etag: str | None = None
    last_modified: str | None = None

    @property
    def usable(self) -> bool:
        """True when a resume can be pinned to this version (If-Range needs a strong ETag or a date)."""
        return bool(self.etag or self.last_modified)

    @property
    def if_range(self) -> str | None:
        """The If-Range header value."""
        return self.etag or self.last_modified

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"size": self.size, "etag": self.etag, "last_modified": self.last_modified}


class Partial:
    """`<key>.part` plus `<key>.json`; thread-safe. The data is trusted only as far as the sidecar says."""

    def __init__(self, directory: Path, key: str, source: str, monotonic: Callable[[], float] = time.monotonic):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{key}.part"
        self._sidecar = directory / f"{key}.json"
        self._source = source
        self._monotonic = monotonic
        self._lock = threading.Condition()
        self._saved_at = 0.0
        self.generation = 0
        self.validator: Validator | None = None
        self.done = RangeSet()
        saved = read_json(self._sidecar)
        if isinstance(saved, dict) and self.path.exists():
            with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError):
                v = saved["validator"]
                self.validator = Validator(int(v["size"]), v.get("etag"), v.get("last_modified"))
                self.done = RangeSet((int(lo), int(hi)) for lo, hi in saved["done"])
                if self.done.covered() > os.path.getsize(self.path):
                    self.validator, self.done = None, RangeSet()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        """Save the sidecar and close the part file."""
        self.save(force=True)
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def adopt(self, validator: Validator) -> int:
        """Keep what is on disk when it belongs to the same remote version, else start over; returns the bytes
        kept."""
        with self._lock:
            if self.validator != validator or not validator.usable:
                self._reset_locked()
            self.validator = validator
            kept = self.done.covered()
        self.save(force=True)
        return kept

    def discard(self) -> None:
        """Throw away every byte (the remote changed, or the data failed verification)."""
        with self._lock:
            self._reset_locked()
        self.save(force=True)

    def _reset_locked(self) -> None:
        os.ftruncate(self.fd, 0)
        self.done = RangeSet()
        self.generation += 1
        self._lock.notify_all()

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write at `offset` (not yet recorded: call `record` for what must count on resume); returns the length."""
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)
        return written

    def record(self, start: int, end: int) -> None:
        """Count [start, end) as on disk (only after its writes returned); wakes the hasher."""
        with self._lock:
            self.done.add(start, end)
            self._lock.notify_all()
        if self._monotonic() - self._saved_at >= SAVE_INTERVAL_S:
            self.save()

    def prefix(self) -> int:
        """Bytes present from offset 0 without a gap."""
        with self._lock:
            return self.done.prefix()

    def covered(self) -> int:
        """Bytes present in all."""
        with self._lock:
            return self.done.covered()

    def missing(self, total: int) -> list[tuple[int, int]]:
        """The gaps still to fetch."""
        with self._lock:
            return self.done.missing(total)

    def wait_for_prefix(self, beyond: int, timeout: float) -> int:
        """Block until the prefix grows past `beyond` (or the timeout); returns the prefix."""
        with self._lock:
            self._lock.wait_for(lambda: self.done.prefix() > beyond, timeout)
            return self.done.prefix()

    def wait_for_covered(self, at_least: int, timeout: float) -> int:
        """Block until `at_least` bytes are recorded (or the timeout); returns the bytes recorded."""
        with self._lock:
            self._lock.wait_for(lambda: self.done.covered() >= at_least, timeout)
            return self.done.covered()

    def save(self, force: bool = False) -> None:
        """Rewrite the sidecar (best effort, not fsynced: after a power loss the final sha256 check catches stale
        data)."""
        with self._lock:
            now = self._monotonic()
            if not force and now - self._saved_at < SAVE_INTERVAL_S:
                return
            self._saved_at = now
            data = {
                "source": self._source,
                "validator": self.validator.to_dict() if self.validator else None,
                "done": self.done.to_list(),
            }
            try:
                write_json_atomic(self._sidecar, data, durable=False)
            except OSError:  # a full disk: overwrite the old sidecar in place (its blocks are already allocated)
                with contextlib.suppress(OSError):
                    self._sidecar.with_name(f".{self._sidecar.name}.tmp-{os.getpid()}").unlink()
                self._overwrite_in_place(json.dumps(data).encode())

    def _overwrite_in_place(self, payload: bytes) -> None:
        """Best effort when no new block can be allocated; a torn sidecar only costs a restart from byte 0."""
        with contextlib.suppress(OSError):
            fd = os.open(self._sidecar, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.pwrite(fd, payload, 0)
                os.ftruncate(fd, len(payload))
            finally:
                os.close(fd)

    def remove(self) -> None:
        """Delete the part file and its sidecar (after ingest or a verification failure)."""
        for path in (self.path, self._sidecar):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
