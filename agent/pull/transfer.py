"""Moving one model's bytes into its partial file: probe, single stream or parallel ranges, resume, retries, and a
sha256 computed while the bytes arrive."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from agent.errors import ModelPullError
from agent.host.download import RemoteChanged, TransientPullError, Transport, http_error
from agent.pull.partial import Partial, Validator
from agent.pull.ranges import split
from agent.pull.source import Source

HASH_CHUNK = 4 * 1024 * 1024
#: The hasher flushes the part file to disk every this many bytes, off the receiving thread.
SYNC_STEP = 256 * 1024 * 1024
#: The longest Retry-After honoured.
RETRY_AFTER_CAP_S = 300.0
#: Received bytes are recorded (resume point, progress, hasher wake-up) once per this many bytes.
RECORD_STEP = 1024 * 1024
#: ... or at least this often while bytes trickle in.
RECORD_INTERVAL_S = 0.5
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
#: Bodies with this type are web pages (a login or error page), never model files. (JSON is not refused:
#: tokenizer.json and config.json are served as application/json.)
_NOT_A_MODEL = ("text/html",)


class PullCancelled(ModelPullError):
    """The agent is shutting down."""


class DiskFull(ModelPullError):
    """The model root's filesystem ran out of space while writing."""


@dataclass(frozen=True)
class TransferConfig:
    """How one transfer behaves (from settings)."""

    connections: int = 8
    chunk_bytes: int = 32 * 1024 * 1024
    ranged_min_bytes: int = 64 * 1024 * 1024
    attempts: int = 8
    retry_wait_s: float = 1.0
    deadline_s: float = 6 * 3600.0
    parallel_below_bps: float = 200e6
    warmup_s: float = 0.5


@dataclass(frozen=True)
class Remote:
    """What a probe learned: the final URL (after redirects), the size, the validator, and Range support."""

    url: str
    validator: Validator
    ranges: bool

    @property
    def size(self) -> int:
        """Bytes in the remote file."""
        return self.validator.size


class ConnectionLimits:
    """Connection slots shared by every transfer: a total and a per-host cap."""

    def __init__(self, total: int, per_host: int) -> None:
        self._total = threading.BoundedSemaphore(total)
        self._per_host = per_host
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, url: str) -> Iterator[None]:
        """Hold one connection slot for `url`'s host."""
        host = urlsplit(url).netloc
        with self._lock:
            semaphore = self._hosts.setdefault(host, threading.BoundedSemaphore(self._per_host))
        with semaphore, self._total:
            yield


def probe(transport: Transport, source: Source, limits: ConnectionLimits, expected: int | None) -> Remote:
    """`GET` with `Range: bytes=0-0` (never HEAD: presigned URLs are signed for GET): size, validator, ranges."""
    with limits.slot(source.url), transport.get(source.url, {"Range": "bytes=0-0"}, source.credential) as reply:
        content_type = (reply.header("content-type") or "").split(";")[0].strip().lower()
        encoding = (reply.header("content-encoding") or "identity").strip().lower()
        if reply.status in (200, 206) and encoding != "identity":
            raise ModelPullError(
                f"{source.shown}: the server compresses the body (Content-Encoding: {encoding}) although we asked "
                "for identity; the bytes would not be the file"
            )
        if reply.status in (200, 206) and content_type in _NOT_A_MODEL:
            raise ModelPullError(
                f"{source.shown}: the server answered with {content_type}, not a model file "
                "(a login or error page? check the URL and the token)"
            )
        if reply.status == 206:
            content_range = reply.content_range()
            if content_range is None or content_range[2] is None:
                raise ModelPullError(f"{source.shown}: malformed Content-Range {reply.header('content-range')!r}")
            size, ranges = content_range[2], True
        elif reply.status == 416 and (reply.header("content-range") or "").strip() == "bytes */0":
            size, ranges = 0, False  # an empty object: no byte 0 to give
        elif reply.status == 200:
            length = reply.header("content-length")
            if length is None or not length.isdigit():
                if expected is None:
                    raise ModelPullError(f"{source.shown}: the server does not say the size; set `size` in the profile")
                length = str(expected)
            size, ranges = int(length), False
        else:
            raise http_error(reply)
        etag = reply.header("etag")
        strong = etag if etag and not etag.startswith("W/") else None
        validator = Validator(size, strong, None if strong else reply.header("last-modified"))
        final = reply.url
    if expected is not None and size != expected:
        raise ModelPullError(f"{source.shown}: the server offers {size} bytes, the profile expects {expected}")
    return Remote(final, validator, ranges)


class _Waits:
    """The waits between tries of one item: exponential with jitter, at least what the server asked for in
    Retry-After (capped at 5 minutes), cut short by the agent stopping."""

    def __init__(self, config: TransferConfig, cancel: threading.Event, shown: str) -> None:
        self._backoff = wait_exponential_jitter(multiplier=config.retry_wait_s, max=30, jitter=config.retry_wait_s)
        self._cancel = cancel
        self._shown = shown

    def wait(self, state: RetryCallState) -> float:
        """Seconds before the next try."""
        wait = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after_s", None)
        return max(wait, min(float(asked), RETRY_AFTER_CAP_S)) if asked is not None else wait

    def sleep(self, seconds: float) -> None:
        """Tenacity's sleep, interrupted by cancellation."""
        if self._cancel.wait(seconds):
            self.raise_cancelled()

    def check(self) -> None:
        """Raise PullCancelled when the agent is stopping."""
        if self._cancel.is_set():
            self.raise_cancelled()

    def raise_cancelled(self) -> None:
        raise PullCancelled(f"{self._shown}: cancelled (the agent is stopping)")


def probe_with_retries(
    transport: Transport, source: Source, limits: ConnectionLimits, config: TransferConfig, cancel: threading.Event
) -> Remote:
    """`probe` under the transfer's retry rules (503, 429 with Retry-After, resets), for the plan's size lookups."""
    waits = _Waits(config, cancel, source.shown)
    retrying = Retrying(
        stop=stop_after_attempt(config.attempts),
        wait=waits.wait,
        retry=retry_if_exception_type(TransientPullError),
        sleep=waits.sleep,
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            return probe(transport, source, limits, None)
    raise AssertionError("unreachable")


class _Follower:
    """A daemon thread that follows a partial file while bytes arrive, for the length of a `with` block."""

    thread_name = "emp-pull-follow"

    def __init__(self, partial: Partial) -> None:
        self._partial = partial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=self.thread_name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _follow(self) -> None:
        raise NotImplementedError


class Hasher(_Follower):
    """sha256 of the partial file's contiguous prefix, computed in a thread as the prefix grows (hashlib releases
    the GIL, so it overlaps with the network on a second core); starts over when the partial is discarded."""

    thread_name = "emp-pull-hash"

    def __init__(self, partial: Partial) -> None:
        super().__init__(partial)
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._generation = partial.generation
        self._buffer = bytearray(HASH_CHUNK)

    def _follow(self) -> None:
        while not self._stop.is_set():
            prefix = self._partial.wait_for_prefix(self._hashed, timeout=0.2)
            self._advance(prefix)

    def _advance(self, upto: int) -> None:
        if self._partial.generation != self._generation:
            self._digest, self._hashed, self._generation = hashlib.sha256(), 0, self._partial.generation
        view = memoryview(self._buffer)
        while self._hashed < upto:
            n = os.preadv(self._partial.fd, [view[: min(HASH_CHUNK, upto - self._hashed)]], self._hashed)
            if n <= 0:
                break
            self._digest.update(view[:n])
            self._hashed += n

    def finish(self, size: int) -> str:
        """Stop following and hash what is left; the hex digest of the first `size` bytes."""
        self._halt()
        self._advance(size)
        return self._digest.hexdigest()


class Flusher(_Follower):
    """Writes the part file back to disk while bytes still arrive (fdatasync every SYNC_STEP bytes, in its own
    thread), so the fsync before publication has only the tail left and the page cache never holds gigabytes of
    dirty data."""

    thread_name = "emp-pull-flush"

    def _follow(self) -> None:
        synced = self._partial.covered()
        while not self._stop.is_set():
            covered = self._partial.wait_for_covered(synced + SYNC_STEP, timeout=0.2)
            if covered >= synced + SYNC_STEP:
                with contextlib.suppress(OSError):
                    os.fdatasync(self._partial.fd)
                synced = covered


class Transfer:
    """Fills one Partial from one Source, retrying while progress is made; returns the sha256 of the result."""

    def __init__(
        self,
        transport: Transport,
        source: Source,
        partial: Partial,
        limits: ConnectionLimits,
        config: TransferConfig,
        expected_size: int | None,
        cancel: threading.Event,
        on_bytes: Callable[[int], None],
        on_retry: Callable[[str, int], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._source = source
        self._partial = partial
        self._limits = limits
        self._config = config
        self._expected = expected_size
        self._cancel = cancel
        self._on_bytes = on_bytes
        self._on_retry = on_retry
        self._monotonic = monotonic
        self._started = monotonic()
        self._waits = _Waits(config, cancel, source.shown)
        self._failures = 0
        self._covered_at_failure = -1
        self.resumed_bytes = 0
        self.size = 0

    def run(self) -> str:
        """Download (or copy) until the partial is complete; the sha256 of its bytes."""
        with Hasher(self._partial) as hasher, Flusher(self._partial):
            retrying = Retrying(
                stop=self._should_stop,
                wait=self._waits.wait,
                retry=retry_if_exception_type(TransientPullError),
                sleep=self._waits.sleep,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            for attempt in retrying:
                with attempt:
                    self._attempt()
            return hasher.finish(self.size)

    def _attempt(self) -> None:
        self._check_cancel()
        try:
            if self._source.is_file:
                self._copy_local()
                return
            remote = probe(self._transport, self._source, self._limits, self._expected)
            self.size = remote.size
            kept = self._partial.adopt(remote.validator)
            if self.resumed_bytes == 0 and kept:
                self.resumed_bytes = kept
            if self._partial.covered() >= remote.size:
                return  # everything is on disk already (killed between the last byte and ingest): verify it
            if remote.ranges and remote.size >= self._config.ranged_min_bytes:
                self._ranged(remote)
            else:
                self._single(remote)
        except RemoteChanged:
            self._partial.discard()
            raise
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise DiskFull(
                    f"{self._source.shown}: disk full after {self._partial.covered()} of {self.size} bytes; "
                    "the partial download is kept and resumes once space is freed"
                ) from None
            raise
        finally:
            self._partial.save(force=True)

    def _single(self, remote: Remote) -> None:
        start = self._partial.prefix() if remote.ranges else 0
        headers = {}
        if start and remote.validator.if_range:
            headers = {"Range": f"bytes={start}-", "If-Range": remote.validator.if_range}
        else:
            start = 0
        if remote.size >= self._config.ranged_min_bytes and os.fstat(self._partial.fd).st_size < remote.size:
            os.posix_fallocate(self._partial.fd, 0, remote.size)
        with self._limits.slot(remote.url), self._transport.get(remote.url, headers, self._source.credential) as reply:
            if reply.status == 200:
                start = 0  # no range support, or If-Range saw a new version: the whole file, from byte 0
                if self._partial.covered():
                    self._partial.discard()
            elif reply.status == 416:
                raise RemoteChanged(f"{self._source.shown}: HTTP 416 on a resume; starting over")
            elif reply.status == 206:
                if reply.content_range() != (start, remote.size - 1, remote.size):
                    raise TransientPullError(
                        f"{self._source.shown}: wrong Content-Range {reply.header('content-range')}"
                    )
                self._check_etag(reply.header("etag"), remote)
            else:
                raise http_error(reply)
            self._receive(reply.chunks(), start, remote.size, None)

    def _ranged(self, remote: Remote) -> None:
        """Fetch the gaps as ranges: one connection first; when it moves less than `parallel_below_bps` after
        `warmup_s`, the other connections join (a fast link is not made slower by parallelism, a shaped or
        far one gets every connection)."""
        if os.fstat(self._partial.fd).st_size < remote.size:
            os.posix_fallocate(self._partial.fd, 0, remote.size)  # reserves the space: no ENOSPC mid-way
        pieces = deque(split(self._partial.missing(remote.size), self._config.chunk_bytes))
        stop = threading.Event()
        errors: list[BaseException] = []

        def worker() -> None:
            while not stop.is_set():
                try:
                    first, end = pieces.popleft()
                except IndexError:
                    return
                try:
                    self._fetch_range(remote, first, end, stop)
                except BaseException as exc:
                    errors.append(exc)
                    stop.set()

        workers = [threading.Thread(target=worker, name="emp-pull-range", daemon=True)]
        workers[0].start()
        started, base = self._monotonic(), self._partial.covered()
        ramped = self._config.connections <= 1
        while any(thread.is_alive() for thread in workers):
            if self._cancel.wait(0.05):
                stop.set()
            elapsed = self._monotonic() - started
            if not ramped and pieces and not stop.is_set() and elapsed >= self._config.warmup_s:
                ramped = True
                rate = (self._partial.covered() - base) / elapsed if elapsed > 0 else 0.0
                if rate < self._config.parallel_below_bps:
                    extra = min(self._config.connections - 1, len(pieces))
                    workers += [
                        threading.Thread(target=worker, name="emp-pull-range", daemon=True) for _ in range(extra)
                    ]
                    for thread in workers[1:]:
                        thread.start()
        for thread in workers:
            thread.join()
        self._check_cancel()
        if errors:
            fatal = [e for e in errors if not isinstance(e, TransientPullError)]
            raise (fatal or errors)[0]

    def _fetch_range(self, remote: Remote, first: int, end: int, stop: threading.Event) -> None:
        headers = {"Range": f"bytes={first}-{end - 1}"}
        if remote.validator.if_range:
            headers["If-Range"] = remote.validator.if_range
        with self._limits.slot(remote.url), self._transport.get(remote.url, headers, self._source.credential) as reply:
            if reply.status == 200:
                raise RemoteChanged(f"{self._source.shown}: the remote file changed (If-Range sent the whole file)")
            if reply.status == 416:
                raise RemoteChanged(f"{self._source.shown}: HTTP 416 for a range; starting over")
            if reply.status != 206:
                raise http_error(reply)
            if reply.content_range() != (first, end - 1, remote.size):
                raise TransientPullError(f"{self._source.shown}: wrong Content-Range {reply.header('content-range')}")
            self._check_etag(reply.header("etag"), remote)
            self._receive(reply.chunks(), first, end, stop)

    def _receive(self, chunks: Iterator[bytes], offset: int, end: int, stop: threading.Event | None) -> None:
        """Write chunks from `offset` on; bookkeeping (ranges, progress, cancel and deadline checks) once per
        RECORD_STEP bytes, which keeps the per-chunk path to one pwrite (and the GIL free for the hasher)."""
        recorded, recorded_at = offset, self._monotonic()
        try:
            for chunk in chunks:
                if offset + len(chunk) > end:
                    raise RemoteChanged(f"{self._source.shown}: the server sent more bytes than announced")
                offset += self._partial.write(offset, chunk)
                now = self._monotonic()  # a trickle still meets its deadline and its cancel
                if offset - recorded >= RECORD_STEP or now - recorded_at >= RECORD_INTERVAL_S:
                    self._record(recorded, offset)
                    recorded, recorded_at = offset, now
                    if stop is not None and stop.is_set():
                        return
        finally:
            self._record(recorded, offset)
        if offset < end:
            raise TransientPullError(f"{self._source.shown}: connection closed at byte {offset} of {end}")

    def _record(self, start: int, end: int) -> None:
        if end > start:
            self._partial.record(start, end)
            self._on_bytes(end - start)
        self._check_cancel()
        if self._monotonic() - self._started > self._config.deadline_s:
            raise ModelPullError(f"{self._source.shown}: not done within {self._config.deadline_s:.0f} s")

    def _check_etag(self, etag: str | None, remote: Remote) -> None:
        if remote.validator.etag and etag and etag != remote.validator.etag:
            raise RemoteChanged(f"{self._source.shown}: the remote file changed (ETag {etag})")

    def _copy_local(self) -> None:
        path = self._source.local_path
        try:
            stat = path.stat()
            with path.open("rb", buffering=0) as handle:
                self.size = stat.st_size
                if self._expected is not None and stat.st_size != self._expected:
                    raise ModelPullError(f"{path}: {stat.st_size} bytes, the profile expects {self._expected}")
                self._partial.adopt(Validator(stat.st_size, None, None))
                self._receive(iter(lambda: handle.read(HASH_CHUNK), b""), 0, stat.st_size, None)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise
            raise ModelPullError(f"{path}: {exc.strerror or exc}") from None

    def _check_cancel(self) -> None:
        self._waits.check()

    def _should_stop(self, state: RetryCallState) -> bool:
        """Give up after `attempts` failures in a row without new bytes, or past the item's deadline."""
        covered = self._partial.covered()
        self._failures = 1 if covered > self._covered_at_failure else self._failures + 1
        self._covered_at_failure = covered
        return self._failures >= self._config.attempts or self._monotonic() - self._started > self._config.deadline_s

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        self._on_retry(str(exc), state.attempt_number)
