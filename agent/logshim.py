"""The log writer of one service instance: reads the instance's output pipe, timestamps every line, writes a
size-rotated file with a bounded number of backups, keeps a tail, and never blocks the writer.

Run by the launcher as `python -I -S .../agent/logshim.py`, one per instance, in its own session, so it outlives
neither more nor less than the output pipe: it exits when every process holding the pipe's write end is gone. A
write failure (disk full, read-only file system) drops the line, counts it, and is retried at most once a second;
the counters, the last error and the tail are published in a small JSON state file next to the log.

There is one of these per instance for as long as the instance runs, so it imports as little as it can: no site
packages, no argparse, pathlib or typing (9.8 MB resident instead of 12.5 with them).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import deque

TYPE_CHECKING = False  # typing is read by the type checker only
if TYPE_CHECKING:
    from typing import BinaryIO

CHUNK = 64 * 1024
#: Longer lines are split: a service printing without newlines cannot make us buffer without bound.
MAX_LINE = 64 * 1024
TAIL_LINES = 50
STATE_EVERY_S = 1.0
REOPEN_EVERY_S = 1.0


def utc_stamp(now: float) -> bytes:
    """ISO 8601 UTC with milliseconds, e.g. 2026-12-03T13:55:33.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return f"{seconds}.{int(now * 1000) % 1000:03d}Z ".encode()


class RotatingWriter:
    """Appends to `path`; past `max_bytes` renames path -> path.1 -> … -> path.N (oldest dropped)."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: BinaryIO | None = None
        self._size = 0
        self._next_open = 0.0
        self.last_error: str | None = None
        self.dropped_lines = 0
        self.lines = 0

    def reopen(self) -> None:
        """Close and reopen on the next write (external logrotate moved the file)."""
        self._close()
        self._next_open = 0.0

    def write(self, line: bytes, now: float) -> None:
        """Write one full line (timestamp included); on failure drop it and remember why."""
        try:
            handle = self._handle(now)
            if handle is None:
                self.dropped_lines += 1
                return
            if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
                handle = self._handle(now)
                if handle is None:
                    self.dropped_lines += 1
                    return
            handle.write(line)
            handle.flush()
            self._size += len(line)
            self.lines += 1
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            self.dropped_lines += 1
            self._close()
            self._next_open = now + REOPEN_EVERY_S

    def _handle(self, now: float) -> BinaryIO | None:
        if self._file is not None:
            return self._file
        if now < self._next_open:
            return None
        try:
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open between writes)
            self._size = self._file.seek(0, os.SEEK_END)
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            self._next_open = now + REOPEN_EVERY_S
            return None
        return self._file

    def _rotate(self) -> None:
        self._close()
        if self.backups <= 0:
            open(self.path, "wb").close()
            return
        for index in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{self.path}.{index}"):
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


def publish(state: str, writer: RotatingWriter, tail: deque[str]) -> None:
    """Write the state file atomically (no fsync: it only describes the running instance)."""
    data = {
        "lines": writer.lines,
        "dropped_lines": writer.dropped_lines,
        "last_error": writer.last_error,
        "tail": list(tail),
    }
    head, name = os.path.split(state)
    tmp = os.path.join(head, f".{name}.tmp")
    with contextlib.suppress(OSError):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data))
        os.replace(tmp, state)


def pump(source: int, writer: RotatingWriter, state: str) -> None:
    """Copy lines from `source` until EOF."""
    reopen = False

    def on_hup(signum: int, frame: object) -> None:
        nonlocal reopen
        reopen = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # we end at EOF, after the last line of the service
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    pending = b""
    published = 0.0
    while True:
        try:
            chunk = os.read(source, CHUNK)
        except InterruptedError:
            continue
        now = time.time()
        if reopen:
            writer.reopen()
            reopen = False
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE:
            lines.append(pending)
            pending = b""
        stamp = utc_stamp(now)
        for line in lines:
            writer.write(stamp + line + b"\n", now)
            tail.append(line.decode(errors="replace"))
        if now - published >= STATE_EVERY_S:
            publish(state, writer, tail)
            published = now
    if pending:
        writer.write(utc_stamp(time.time()) + pending + b"\n", time.time())
        tail.append(pending.decode(errors="replace"))
    publish(state, writer, tail)


USAGE = "usage: logshim.py --log PATH --state PATH [--max-bytes N] [--backups N] < pipe"


def parse_args(argv: list[str]) -> dict[str, str]:
    """`--name value` pairs (the launcher is the only caller); raises ValueError naming what is wrong."""
    if len(argv) % 2:
        raise ValueError(f"{argv[-1]} needs a value")
    options = {"--max-bytes": str(50 * 1024 * 1024), "--backups": "5"}
    for name, value in zip(argv[::2], argv[1::2], strict=True):
        if name not in ("--log", "--state", "--max-bytes", "--backups"):
            raise ValueError(f"unknown option {name}")
        options[name] = value
    for name in ("--log", "--state"):
        if name not in options:
            raise ValueError(f"{name} is required")
    for name in ("--max-bytes", "--backups"):
        if not options[name].isdigit():
            raise ValueError(f"{name} must be a whole number, not {options[name]!r}")
    return options


def main(argv: list[str] | None = None) -> int:
    """Entry point: reads standard input until every writer of the pipe is gone."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        print(f"{USAGE}\nlogshim.py: error: {exc}", file=sys.stderr)
        return 2
    writer = RotatingWriter(options["--log"], int(options["--max-bytes"]), int(options["--backups"]))
    pump(0, writer, options["--state"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
