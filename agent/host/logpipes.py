"""Service output pipes and the one log-writer process (`agent/logwriter.py`) that drains them all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import logwriter
from agent.errors import SpawnError

log = structlog.get_logger(__name__)

#: The writer runs as a script in an isolated interpreter without site packages.
LOGWRITER_ARGV = (sys.executable, "-I", "-S", str(Path(logwriter.__file__).resolve()))
#: How long the writer may take to drain a pipe once the instance's last process is gone, and to exit after the
#: last pipe.
DRAIN_TIMEOUT_S = 5.0
#: A writer that dies is started again (with the pipes it held), but not more often than this.
RESTART_DELAY_S = 1.0
#: Writes up to this size to a pipe are atomic (never interleaved with a child's output).
PIPE_BUF = 4096


@dataclass(frozen=True)
class LogSpec:
    """Where an instance's output goes: the file and its rotation."""

    path: Path
    max_bytes: int = 50 * 1024 * 1024
    backups: int = 5

    @property
    def state_path(self) -> Path:
        """The log writer's counters, last error and tail (JSON)."""
        return self.path.with_name(f".{self.path.name}.state.json")


class LogPipe:
    """An instance's output pipe. It lives across restarts of the instance, so a restart spawns only the service;
    the agent holds the write end until the instance is stopped for good."""

    def __init__(self, spec: LogSpec, write_fd: int, writer: LogWriter, key: int) -> None:
        self.spec = spec
        self.write_fd = write_fd  # -1 for an adopted instance's pipe: only its processes write to it
        self._writer = writer
        self._key = key
        # A second, non-blocking open of the same pipe for the agent's own header lines: O_NONBLOCK on the
        # shared descriptor would also make the children's writes non-blocking.
        self._header_fd = (
            os.open(f"/proc/self/fd/{write_fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC) if write_fd >= 0 else -1
        )
        self._counts: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        """False once closed, or for an adopted instance's pipe (a new pipe is opened at the next start)."""
        return self.write_fd >= 0

    def write_line(self, text: str) -> None:
        """Put one line of our own into the log (dropped rather than block when the pipe is full)."""
        with contextlib.suppress(OSError):
            os.write(self._header_fd, text.encode()[: PIPE_BUF - 1] + b"\n")

    def reopen(self) -> None:
        """Ask the writer to reopen the file (after an external logrotate moved it)."""
        self._writer.reopen(self._key)

    @property
    def counts(self) -> dict[str, Any] | None:
        """What the writer last reported (lines, dropped_lines, last_error), kept after the close; None before its
        first report."""
        self._counts = self._writer.counts(self._key) or self._counts
        return self._counts

    async def close(self) -> None:
        """Close our ends; returns once the writer has drained the rest (the instance's processes are gone)."""
        for fd in (self._header_fd, self.write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._header_fd = self.write_fd = -1
        self._counts = await self._writer.release(self._key) or self._counts


@dataclass
class _Held:
    """A pipe handed to the writer: the agent keeps a read end too, so a writer that dies never leaves the services
    writing into a pipe without a reader (SIGPIPE); a restarted writer gets it again."""

    spec: LogSpec
    read_fd: int
    drained: asyncio.Future[None]
    sent: bool = False
    sent_before: bool = False
    #: The writer's last report: lines written and dropped, the last write error (None before the first).
    counts: dict[str, Any] | None = None
    #: A pidfd of the previous agent's writer while it still drains this (adopted) pipe: not sent to ours until
    #: it exits, so two readers never split a line. The task waiting for that exit owns (and closes) the pidfd.
    parked: int | None = None
    taker: asyncio.Task[None] | None = None


class _WriterGone(Exception):
    """The writer's control socket is broken: it has exited or is exiting."""


class LogWriter:
    """The agent's log-writer process and the pipes it drains. Started at the first pipe and told to exit after the
    last; if it dies while pipes are open it is started again with them (their lines waited in the pipes).

    After the agent itself dies, the writer goes on draining the pipes of the services left running (an agent
    restarted under systemd adopts them) and exits once they end; the new agent starts its own writer for what
    it starts."""

    def __init__(self, argv: Sequence[str] = LOGWRITER_ARGV) -> None:
        self._argv = tuple(argv)
        self._process: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._held: dict[int, _Held] = {}
        self._next_key = 0
        self._lock = asyncio.Lock()
        self._watchers: set[asyncio.Task[None]] = set()
        self._started_at = -RESTART_DELAY_S

    @property
    def pid(self) -> int | None:
        """The running writer's pid (None when no pipe is open)."""
        return self._process.pid if self._process is not None else None

    async def open(self, spec: LogSpec) -> LogPipe:
        """Check the log file can be written, then hand a new pipe to the writer (started if need be)."""
        try:
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(spec.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
        except OSError as exc:
            raise SpawnError(f"cannot open log file {spec.path}: {exc.strerror}") from None
        read_end, write_end = os.pipe()
        key, self._next_key = self._next_key, self._next_key + 1
        self._held[key] = _Held(spec, read_end, asyncio.get_running_loop().create_future())
        try:
            async with self._lock:
                await self._deliver()
        except SpawnError:
            self._forget(key)
            os.close(write_end)
            raise
        return LogPipe(spec, write_end, self, key)

    def counts(self, key: int) -> dict[str, Any] | None:
        """The writer's last report on a pipe (lines, dropped_lines, last_error); None before its first."""
        held = self._held.get(key)
        return held.counts if held is not None else None

    def send(self, message: dict[str, Any]) -> bool:
        """A control message without descriptors, if the writer can take it now (False otherwise)."""
        if self._control is None:
            return False
        try:
            self._control.send(json.dumps(message).encode())
        except OSError:
            return False  # gone (its watcher starts a new one) or not reading (a hung disk)
        return True

    def reopen(self, key: int) -> None:
        """Make the writer draining pipe `key` reopen its file (the previous agent's writer, for an adopted pipe it
        still drains: SIGHUP makes it reopen all of its files)."""
        held = self._held.get(key)
        if held is not None and held.parked is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(held.parked, signal.SIGHUP)
        else:
            self.send({"op": "reopen", "id": key})

    async def adopt(self, spec: LogSpec, pid: int) -> LogPipe | None:
        """Take a share in the output pipe of `pid`, a process a previous agent started and this one adopts: a read
        end of our own (from /proc/PID/fd/1), so the service never gets SIGPIPE while this agent lives, even if the
        previous agent's writer dies. That writer goes on draining the pipe; once it has exited, ours takes over
        (counters resumed from the state file). None when the pipe cannot be opened (nothing changes then)."""
        try:
            read_fd = os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        info = os.fstat(read_fd)
        if not stat.S_ISFIFO(info.st_mode):
            os.close(read_fd)
            return None
        key, self._next_key = self._next_key, self._next_key + 1
        held = _Held(spec, read_fd, asyncio.get_running_loop().create_future(), sent_before=True)
        self._held[key] = held
        for reader in await asyncio.to_thread(_pipe_readers, info.st_ino, {os.getpid(), pid}):
            with contextlib.suppress(OSError):
                held.parked = os.pidfd_open(reader)
                break
        if held.parked is None:  # no writer drains it any more: ours does
            async with self._lock:
                with contextlib.suppress(SpawnError):  # kept: the next delivery sends it; the service is not failed
                    await self._deliver()
        else:
            held.taker = asyncio.create_task(self._take_over(held, held.parked))
        return LogPipe(spec, -1, self, key)

    async def _take_over(self, held: _Held, pidfd: int) -> None:
        """Hand an adopted pipe to our writer once the previous agent's writer has exited."""
        try:
            await fd_ready(pidfd)  # a pidfd reads ready when its process has exited
        finally:
            held.parked = held.taker = None
            os.close(pidfd)
        log.info("the previous agent's log writer has exited; ours drains the adopted pipe", log=str(held.spec.path))
        async with self._lock:
            with contextlib.suppress(SpawnError):
                await self._deliver()

    async def release(self, key: int) -> dict[str, Any] | None:
        """Wait until the writer has drained the pipe (every writer of it closed); stop the writer after the last.
        Returns the writer's final counts for the pipe."""
        held = self._held.get(key)
        if held is None:
            return None
        if held.parked is not None:  # the previous agent's writer drains it to the end
            self._forget(key)
            return None
        try:
            await asyncio.wait_for(asyncio.shield(held.drained), DRAIN_TIMEOUT_S)
        except TimeoutError:  # a process we could not find still holds the pipe: stop logging it
            self.send({"op": "drop", "id": key})
            self._forget(key)
        if not self._held:
            async with self._lock:
                if not self._held:
                    await self._stop()
        return held.counts

    async def _deliver(self) -> None:
        """Hand every pipe not yet sent to the writer, starting one (or a new one, if it has just died) as needed.
        Called with the lock held."""
        for _attempt in range(2):
            if self._process is None:
                await self._start()
            try:
                for key, held in list(self._held.items()):
                    if not held.sent and held.parked is None:
                        await self._send_open(key, held)
                return
            except _WriterGone:  # died before its watcher noticed: replace it now, the pipes are still ours
                self._discard_writer()
        raise SpawnError("the log writer exits as soon as it starts")

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                stdin=theirs.fileno(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=None,  # a crash's traceback goes where the agent's own output goes (the journal)
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise SpawnError(f"cannot start the log writer: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self._process, self._control = process, ours
        self._started_at = asyncio.get_running_loop().time()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_reply, ours)
        watcher = asyncio.create_task(self._watch(process))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _send_open(self, key: int, held: _Held) -> None:
        """Send one pipe, waiting (bounded) while the writer's socket is full: a new writer is sent every open pipe
        at once, before it reads any."""
        header = {
            "op": "open",
            "id": key,
            "log": str(held.spec.path),
            "state": str(held.spec.state_path),
            "max_bytes": held.spec.max_bytes,
            "backups": held.spec.backups,
            "resume": held.sent_before,
        }
        data = [json.dumps(header).encode()]
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes([held.read_fd]))]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        while True:
            control = self._control
            if control is None:
                raise _WriterGone
            try:
                control.sendmsg(data, fds)
                break
            except BlockingIOError:
                if loop.time() > deadline:
                    raise SpawnError("the log writer is not taking new pipes (not reading)") from None
                await fd_ready(control.fileno(), writable=True, within_s=deadline - loop.time())
            except OSError:
                raise _WriterGone from None
        held.sent = held.sent_before = True

    def _on_reply(self, control: socket.socket) -> None:
        while True:
            try:
                data = control.recv(logwriter.MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the writer exited: its watcher decides what follows
                asyncio.get_running_loop().remove_reader(control.fileno())
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = json.loads(data)
                held = self._held.get(int(message["id"]))
                if held is None:
                    continue
                held.counts = {name: message.get(name) for name in ("lines", "dropped_lines", "last_error")}
                if message["op"] == "closed":
                    self._forget(int(message["id"]))
                    if not held.drained.done():
                        held.drained.set_result(None)

    def _forget(self, key: int) -> _Held | None:
        held = self._held.pop(key, None)
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held.read_fd)
            if held.taker is not None:
                held.taker.cancel()  # it closes the pidfd
        return held

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Start the writer again if it dies while it still has pipes to drain (at most once a second)."""
        code = await process.wait()
        if self._process is not process:
            return  # told to exit, or already replaced
        self._discard_writer()
        if not self._held:
            return
        log.warning("the log writer exited; starting it again with its pipes", code=code, pipes=len(self._held))
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._started_at + RESTART_DELAY_S - loop.time()))
        async with self._lock:
            if self._process is not None or not self._held:
                return
            try:
                await self._deliver()
            except SpawnError as exc:
                log.error("the log writer cannot be started again", error=str(exc))

    def _discard_writer(self) -> None:
        """Forget a writer that has died: every pipe it held is to be sent to the next one."""
        self._drop_control()
        self._process = None
        for held in self._held.values():
            held.sent = False

    async def _stop(self) -> None:
        """No pipe left: close the control socket; the writer exits (killed if it does not within the timeout)."""
        process = self._process
        self._drop_control()
        self._process = None
        if process is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), DRAIN_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
            await process.wait()

    def _drop_control(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()


async def fd_ready(fd: int, writable: bool = False, within_s: float | None = None) -> None:
    """Wait until `fd` can be read (or written), or `within_s` seconds pass."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def callback() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, callback)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, None if within_s is None else max(0.0, within_s))
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


def _fd_bytes(fds: Sequence[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


#: The scripts that drain a previous agent's pipes: this release's writer, and the per-instance writer of
#: releases before it (an upgrade adopts what they started).
WRITER_SCRIPTS = (b"/agent/logwriter.py", b"/agent/logshim.py")


def _pipe_readers(inode: int, skip: set[int], proc: str = "/proc") -> list[int]:
    """The log writers (of any agent, from any install path) holding the pipe with this inode: the previous agent's
    writer of an adopted instance. Reads the descriptors of log-writer processes only."""
    target = f"pipe:[{inode}]"
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"{proc}/{entry}/cmdline", "rb") as handle:
                if not any(arg.endswith(WRITER_SCRIPTS) for arg in handle.read().split(b"\0")):
                    continue
            if any(os.readlink(f"{proc}/{entry}/fd/{fd}") == target for fd in os.listdir(f"{proc}/{entry}/fd")):
                found.append(int(entry))
        except OSError:
            continue
    return found
