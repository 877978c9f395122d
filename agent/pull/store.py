"""The model store on disk: a content-addressed cache under the model root, an index of verified files, per-file
locks, and atomic publication of verified objects at their destinations."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.errors import ModelPullError
from agent.profile import CACHE_DIR
from agent.statefile import fsync_dir, read_json, write_json_atomic

HASH_CHUNK = 4 * 1024 * 1024
#: How often a pull waiting for another one's lock checks again.
LOCK_POLL_S = 0.05
#: os.link fails with these when a hard link is impossible (another filesystem, no permission, too many links).
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES}


class ModelStore:
    """`<root>/.emp-cache/objects/sha256/<aa>/<sha256>` holds each verified file once, read-only; destinations
    are hard links to it (copies across filesystems). `index_path` remembers verified destinations by size, mtime
    and inode, so an unchanged file is not re-hashed at every boot."""

    def __init__(self, root: Path, index_path: Path) -> None:
        self.root = root
        self.cache = root / CACHE_DIR
        self._index_path = index_path

    def object_path(self, sha256: str) -> Path:
        """Where the verified object with this hash lives."""
        return self.cache / "objects" / "sha256" / sha256[:2] / sha256

    @property
    def partial_dir(self) -> Path:
        """Where partial downloads live (same filesystem as the objects, so ingest is a rename)."""
        return self._safe_dir("partial")

    def _safe_dir(self, *parts: str) -> Path:
        """A directory inside the cache, created as needed; a symlink anywhere on the way is refused (the agent
        runs as root: a planted link must not make it write elsewhere)."""
        path = self.cache
        for part in ("", *parts):
            path = path / part if part else path
            path.mkdir(parents=not part, exist_ok=True)
            if path.is_symlink():
                raise ModelPullError(f"{path} is a symlink; the model cache must be a plain directory")
        return path

    def destination(self, dest: str) -> Path:
        """The absolute destination; refuses one that escapes the root through a symlinked directory."""
        path = self.root / dest
        root = self.root.resolve()
        parent = path.parent.resolve()
        if parent != root and root not in parent.parents:
            raise ModelPullError(f"{dest}: resolves outside the model root {self.root} (symlinked directory?)")
        return path

    def has_object(self, sha256: str, size: int | None) -> bool:
        """True when the cache holds this object intact: unchanged since it was verified (size, mtime and inode
        as the index recorded them), or hashing right once. A corrupted object is removed."""
        path = self.object_path(sha256)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if size is not None and stat.st_size != size:
            path.unlink(missing_ok=True)
            return False
        if self._unchanged(_object_key(sha256), stat) == sha256:
            return True
        digest = hash_file(path)
        if digest != sha256:
            path.unlink(missing_ok=True)  # someone wrote into the cache (or the disk lost data): fetch again
            return False
        self.remember_path(_object_key(sha256), path, sha256)
        return True

    def is_placed(self, dest: str, sha256: str, size: int | None) -> bool:
        """True when the destination holds exactly this file: unchanged since it was verified (size, mtime and
        inode as the index recorded them), or hashing right once. Sharing the object's inode proves nothing by
        itself: writing into either changes both."""
        path = self.root / dest
        try:
            stat = path.lstat()
        except FileNotFoundError:
            return False
        if not path.is_file() or path.is_symlink() or (size is not None and stat.st_size != size):
            return False
        known = self._unchanged(dest, stat)
        if known is not None:
            return known == sha256
        digest = hash_file(path)
        self.remember(dest, digest)
        return digest == sha256

    def _unchanged(self, key: str, stat: os.stat_result) -> str | None:
        """The sha256 the index recorded for `key` when the file still looks exactly as it did then."""
        known = self._read_index().get(key)
        if isinstance(known, dict) and [known.get(k) for k in ("size", "mtime_ns", "ino")] == [
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ino,
        ]:
            digest = known.get("sha256")
            return digest if isinstance(digest, str) else None
        return None

    @contextlib.contextmanager
    def lock(self, sha256: str, wait: Callable[[float], bool] | None = None) -> Iterator[None]:
        """Hold the per-object lock: two agents (or two profiles) that want the same file download it once.
        `wait(seconds)` pauses between tries and returns True to give up (the agent is stopping)."""
        directory = self._safe_dir("locks")
        fd = os.open(directory / f"{sha256}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if wait is not None and wait(LOCK_POLL_S):
                        raise ModelPullError(f"cancelled while another pull holds {sha256[:12]}") from None
                    if wait is None:
                        time.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)

    def ingest(self, part: Path, sha256: str) -> Path:
        """Make a verified part file the cache object: fsync, read-only, rename, fsync the directory."""
        target = self._safe_dir("objects", "sha256", sha256[:2]) / sha256
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(part, 0o444)
        os.replace(part, target)
        fsync_dir(target.parent)
        self.remember_path(_object_key(sha256), target, sha256)
        return target

    def publish(self, sha256: str, dest: str) -> None:
        """Place the object at `dest` atomically: a temp hard link (or copy) next to it, renamed over it. A
        symlink planted at `dest` is replaced, never followed."""
        path = self.destination(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = self.object_path(sha256)
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            try:
                os.link(obj, tmp)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                _copy_exclusive(obj, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise ModelPullError(f"{dest}: could not place the file: {exc.strerror or exc}") from None
        fsync_dir(path.parent)
        self.remember(dest, sha256)

    def remember(self, dest: str, sha256: str) -> None:
        """Record that `dest` (as it is now on disk) holds `sha256`."""
        self.remember_path(dest, self.root / dest, sha256)

    def remember_path(self, key: str, path: Path, sha256: str) -> None:
        """Record size, mtime and inode of `path` under `key`; merged under a lock with other writers."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        self._index_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._index_path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index = self._read_index()
            index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ino": stat.st_ino, "sha256": sha256}
            write_json_atomic(self._index_path, index)
        finally:
            os.close(fd)

    def clean_temp_links(self, dest: str) -> None:
        """Remove temp links that a killed agent left next to a destination."""
        path = self.root / dest
        if path.parent.is_dir():
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def _read_index(self) -> dict[str, Any]:
        loaded = read_json(self._index_path)
        return loaded if isinstance(loaded, dict) else {}


def hash_file(path: Path) -> str:
    """sha256 of a file (hashlib: OpenSSL with SHA-NI, several times faster than coreutils' sha256sum)."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _copy_exclusive(source: Path, target: Path) -> None:
    with source.open("rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, HASH_CHUNK)
            dst.flush()
            os.fsync(dst.fileno())


def _object_key(sha256: str) -> str:
    """The index key of a cache object (destinations are keyed by their relative path, which never starts so)."""
    return f"{CACHE_DIR}/objects/{sha256}"
