"""Reading a service's log file: its last lines, and following it across rotations and truncations (stdlib only:
`emp-agent logs` must start fast)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

BLOCK = 64 * 1024


def last_lines(path: Path, count: int) -> list[bytes]:
    """The last `count` lines of the file (each with its newline), read backwards in blocks."""
    if count <= 0:
        return []
    with path.open("rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= count:
            step = min(BLOCK, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    return data.splitlines(keepends=True)[-count:]


def follow(
    path: Path,
    stop: Callable[[], bool] = lambda: False,
    interval_s: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """New data appended to `path` from its current end on; when the file is rotated (renamed away, a new one
    created) the rest of the old one is read first, then the new one from its start; a truncated file is read
    again from its start."""
    handle: BinaryIO | None = _open(path)
    if handle is not None:
        handle.seek(0, os.SEEK_END)
    while not stop():
        if handle is None:
            handle = _open(path)
            if handle is None:
                sleep(interval_s)
                continue
        chunk = handle.read(BLOCK)
        if chunk:
            yield chunk
            continue
        try:
            current = path.stat()
        except FileNotFoundError:
            sleep(interval_s)
            continue
        opened = os.fstat(handle.fileno())
        if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            while rest := handle.read(BLOCK):  # rotated: what reached the old file before the rename comes first
                yield rest
            handle.close()
            handle = _open(path)
            continue
        if current.st_size < handle.tell():
            handle.seek(0)  # truncated in place (copytruncate)
            continue
        sleep(interval_s)
    if handle is not None:
        handle.close()


def _open(path: Path) -> BinaryIO | None:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return None


def write_out(data: bytes) -> None:
    """Bytes to stdout as they are (log lines are whatever the service printed)."""
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
