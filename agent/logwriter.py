"""The log writer: one process that drains the output pipe of every service instance of an agent, timestamps each
line, writes size-rotated files with a bounded number of backups, keeps each instance's tail, and never blocks a
service.

Run by the agent (`agent/host/logpipes.py`) as `python -I -S .../agent/logwriter.py`, in a session of its own, with
a unix SEQPACKET socket as standard input. Over it the agent hands each instance's pipe (SCM_RIGHTS) with a JSON
header naming the log file, the state file and the rotation; the writer reports each pipe's counts (`state`, at
most once a second) and answers `closed` once a pipe has no writer left and its last line is on disk. When the
agent goes away (a crash, an upgrade) the writer keeps draining the pipes it holds, so adopted services keep their
logs, and exits after the last one ends.

A write failure (disk full, read-only file system) drops the line, counts it, and is retried at most once a second;
the counters, the last error and the tail are published in a small JSON state file next to each log, at most once
a second while lines arrive and once more when they stop. SIGHUP reopens every file (external logrotate).

It imports as little as it can: no site packages, no argparse, pathlib, typing or socket.py (the C `_socket`
module does all it needs without loading selectors, enum and functools).
"""

from __future__ import annotations

import _socket
import contextlib
import json
import os
import select
import signal
import sys
import time
from collections import deque

TYPE_CHECKING = False  # typing is read by the type checker only
if TYPE_CHECKING:
    from typing import Any, BinaryIO

CHUNK = 64 * 1024
#: Longer lines are split: a service printing without newlines cannot make us buffer without bound.
MAX_LINE = 64 * 1024
TAIL_LINES = 50
#: Lines kept in the tail are cut here: the tail is held for every instance in this one process.
TAIL_LINE_MAX = 2048
#: Files the writer creates (a rotation's new file) get the mode the agent gives the first one.
FILE_MODE = 0o640
STATE_EVERY_S = 1.0
REOPEN_EVERY_S = 1.0
#: The largest control message: a JSON header with two paths.
MAX_MESSAGE = 64 * 1024


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
        #: The last write stopped inside a line (disk full): the next line starts on a line of its own.
        self._torn = False

    def reopen(self) -> None:
        """Close and reopen on the next write (external logrotate moved the file)."""
        self.close()
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
            if self._torn:
                line = b"\n" + line
            self._torn = False
            view = memoryview(line)
            while view:  # a full disk can take part of a line without an error; the rest then fails
                written = handle.write(view) or 0
                self._size += written
                view = view[written:]
                self._torn = bool(view)
            self.lines += 1
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            self.dropped_lines += 1
            self.close()
            self._next_open = now + REOPEN_EVERY_S

    def _handle(self, now: float) -> BinaryIO | None:
        if self._file is not None:
            return self._file
        if now < self._next_open:
            return None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            self._file = open(fd, "ab", buffering=0)  # noqa: SIM115 (kept open between writes)
            self._size = self._file.seek(0, os.SEEK_END)
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            self._next_open = now + REOPEN_EVERY_S
            return None
        return self._file

    def _rotate(self) -> None:
        self.close()
        self._torn = False
        if self.backups <= 0:
            os.truncate(self.path, 0)
            return
        for index in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{self.path}.{index}"):
                os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
        os.replace(self.path, f"{self.path}.1")

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class Stream:
    """One instance's pipe: the partial line, the file it goes to, its tail and its published state."""

    def __init__(self, fd: int, header: dict[str, Any]) -> None:
        self.fd = fd
        self.key = header["id"]
        self.state = header["state"]
        log, max_bytes, backups = header["log"], header["max_bytes"], header["backups"]
        if not (isinstance(self.key, int) and isinstance(self.state, str) and isinstance(log, str)):
            raise TypeError("id must be a number, log and state paths")
        if not (isinstance(max_bytes, int) and isinstance(backups, int)):
            raise TypeError("max_bytes and backups must be whole numbers")
        self.writer = RotatingWriter(log, max_bytes, backups)
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.pending = b""
        self.published = 0.0
        self.dirty = False
        if header.get("resume"):  # a writer restarted by the agent: carry on from what the last one published
            self._resume()

    def _resume(self) -> None:
        try:
            with open(self.state, encoding="utf-8") as handle:
                previous = json.load(handle)
            self.writer.lines = int(previous["lines"])
            self.writer.dropped_lines = int(previous["dropped_lines"])
            self.writer.last_error = previous["last_error"]
            self.tail.extend(str(line) for line in previous["tail"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def feed(self, chunk: bytes, now: float) -> None:
        """Write every full line of `chunk` (and a partial one past MAX_LINE) with one timestamp."""
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        if len(self.pending) > MAX_LINE:
            lines.append(self.pending)
            self.pending = b""
        stamp = utc_stamp(now)
        for line in lines:
            self.writer.write(stamp + line + b"\n", now)
            self.tail.append(line[:TAIL_LINE_MAX].decode(errors="replace"))
        self.dirty = True

    def finish(self, now: float) -> None:
        """The pipe ended: write the unterminated last line, publish, close the file and the pipe."""
        if self.pending:
            self.writer.write(utc_stamp(now) + self.pending + b"\n", now)
            self.tail.append(self.pending[:TAIL_LINE_MAX].decode(errors="replace"))
            self.pending = b""
        self.publish(now)
        self.writer.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def counts(self) -> dict[str, Any]:
        """Lines written and dropped, and the last write error."""
        return {
            "lines": self.writer.lines,
            "dropped_lines": self.writer.dropped_lines,
            "last_error": self.writer.last_error,
        }

    def publish(self, now: float) -> None:
        """Write the state file atomically (no fsync: it only describes the running instance). It lives next to
        the log, so it fails when the log does: the agent gets the counts over the control socket as well."""
        head, name = os.path.split(self.state)
        tmp = os.path.join(head, f".{name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps({**self.counts(), "tail": list(self.tail)}))
            os.replace(tmp, self.state)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.published = now
        self.dirty = False


class LogWriter:
    """The loop: control messages from the agent and the output of every pipe, until the agent has gone and every
    pipe has ended."""

    def __init__(self, control_fd: int) -> None:
        self.control: _socket.socket | None = _socket.socket(fileno=control_fd)
        self.control.setblocking(False)
        self.streams: dict[int, Stream] = {}  # by pipe fd
        self.poll = select.epoll()
        self.poll.register(control_fd, select.EPOLLIN)
        self.reopen_all = False

    def run(self) -> None:
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # we end after the last line of the last service
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while self.control is not None or self.streams:
            events = self.poll.poll(self._wait_s(time.time()))
            now = time.time()
            if self.reopen_all:
                self.reopen_all = False
                for stream in self.streams.values():
                    stream.writer.reopen()
            for fd, _mask in events:
                if self.control is not None and fd == self.control.fileno():
                    self._on_control()
                elif fd in self.streams:
                    self._on_output(self.streams[fd], now)
            for stream in list(self.streams.values()):
                if stream.dirty and now - stream.published >= STATE_EVERY_S:
                    stream.publish(now)
                    self._reply({"op": "state", "id": stream.key, **stream.counts()})

    def _on_hup(self, signum: int, frame: object) -> None:
        self.reopen_all = True

    def _wait_s(self, now: float) -> float:
        """Until the next state file is due (-1: nothing to publish, wait for input)."""
        due = [stream.published + STATE_EVERY_S for stream in self.streams.values() if stream.dirty]
        return max(0.0, min(due) - now) if due else -1.0

    def _on_output(self, stream: Stream, now: float) -> None:
        try:
            chunk = os.read(stream.fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            stream.feed(chunk, now)
        else:
            self._end(stream, now)

    def _end(self, stream: Stream, now: float) -> None:
        self.poll.unregister(stream.fd)
        del self.streams[stream.fd]
        stream.finish(now)
        self._reply({"op": "closed", "id": stream.key, **stream.counts()})

    def _on_control(self) -> None:
        assert self.control is not None
        while True:
            try:
                data, ancillary, _flags, _address = self.control.recvmsg(
                    MAX_MESSAGE, _socket.CMSG_SPACE(4 * 4), _socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:
                data, ancillary = b"", []
            fds = [
                int.from_bytes(payload[offset : offset + 4], sys.byteorder)
                for level, kind, payload in ancillary
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
                for offset in range(0, len(payload) - len(payload) % 4, 4)
            ]
            if not data and not fds:  # the agent has gone: drain what we hold, then exit
                self.poll.unregister(self.control.fileno())
                self.control.close()
                self.control = None
                return
            self._on_message(data, fds)

    def _on_message(self, data: bytes, fds: list[int]) -> None:
        try:
            message = json.loads(data)
            op = message["op"]
        except (ValueError, KeyError, TypeError):
            op, message = None, {}
        if op == "open" and len(fds) == 1:
            try:
                stream = Stream(fds[0], message)
                self.poll.register(stream.fd, select.EPOLLIN)  # refuses what is not a pipe or socket
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not something the agent sends: the descriptor is closed below
            else:
                self.streams[fds.pop()] = stream
        elif op in ("reopen", "drop"):
            for stream in list(self.streams.values()):
                if stream.key == message.get("id"):
                    if op == "reopen":
                        stream.writer.reopen()
                    else:  # the agent gave up waiting for the pipe's last writer (an escaped process holds it)
                        self._end(stream, time.time())
        for fd in fds:  # anything else sent with a message we could not use
            with contextlib.suppress(OSError):
                os.close(fd)

    def _reply(self, message: dict[str, Any]) -> None:
        if self.control is None:
            return
        with contextlib.suppress(OSError):  # a stuck or gone agent: it times out and asks again if it cares
            self.control.send(json.dumps(message).encode())


def main() -> int:
    """Entry point: standard input must be the agent's end of a unix SEQPACKET socket."""
    try:
        writer = LogWriter(0)
    except OSError as exc:
        reason = exc.strerror or exc
        print(f"logwriter.py: standard input must be the agent's control socket ({reason})", file=sys.stderr)
        return 2
    writer.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
