"""Service output pipes and the one log-writer process (`agent/logwriter.py`) that drains them all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
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
        self.write_fd = write_fd
        self._writer = writer
        self._key = key
        # A second, non-blocking open of the same pipe for the agent's own header lines: O_NONBLOCK on the
        # shared descriptor would also make the children's writes non-blocking.
        self._header_fd = os.open(f"/proc/self/fd/{write_fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def alive(self) -> bool:
        """False once closed (a new pipe is opened at the next start)."""
        return self.write_fd >= 0

    def write_line(self, text: str) -> None:
        """Put one line of our own into the log (dropped rather than block when the pipe is full)."""
        with contextlib.suppress(OSError):
            os.write(self._header_fd, text.encode()[: PIPE_BUF - 1] + b"\n")

    def reopen(self) -> None:
        """Ask the writer to reopen the file (after an external logrotate moved it)."""
        self._writer.send({"op": "reopen", "id": self._key})

    async def close(self) -> None:
        """Close our ends; returns once the writer has drained the rest (the instance's processes are gone)."""
        for fd in (self._header_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._header_fd = self.write_fd = -1
        await self._writer.release(self._key)


@dataclass
class _Held:
    """A pipe handed to the writer: the agent keeps a read end too, so a writer that dies never leaves the services
    writing into a pipe without a reader (SIGPIPE); a restarted writer gets it again."""

    spec: LogSpec
    read_fd: int
    drained: asyncio.Future[None]
    sent: bool = False
    sent_before: bool = False


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
        self._started_at = 0.0
        self.restarts = 0

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
                if self._process is None:
                    await self._start()  # sends every pipe not yet sent, this one included
                elif not self._held[key].sent:
                    self._send_open(key)
        except SpawnError:
            self._forget(key)
            os.close(write_end)
            raise
        return LogPipe(spec, write_end, self, key)

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> bool:
        """One control message to the writer; False when it cannot take it now."""
        if self._control is None:
            return False
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))] if fds else []
        try:
            self._control.sendmsg([json.dumps(message).encode()], ancillary)
        except OSError:
            return False  # gone (the watcher restarts it) or not reading (a hung disk)
        return True

    async def release(self, key: int) -> None:
        """Wait until the writer has drained the pipe (every writer of it closed); stop the writer after the last."""
        held = self._held.get(key)
        if held is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(held.drained), DRAIN_TIMEOUT_S)
        except TimeoutError:  # a process we could not find still holds the pipe: stop logging it
            self.send({"op": "drop", "id": key})
            self._forget(key)
        if not self._held:
            await self._stop()

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
        watcher = asyncio.create_task(self._watch(process, ours))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        for key, held in list(self._held.items()):
            if not held.sent:
                self._send_open(key)

    def _send_open(self, key: int) -> None:
        held = self._held[key]
        header = {
            "op": "open",
            "id": key,
            "log": str(held.spec.path),
            "state": str(held.spec.state_path),
            "max_bytes": held.spec.max_bytes,
            "backups": held.spec.backups,
            "resume": held.sent_before,
        }
        if not self.send(header, [held.read_fd]):
            raise SpawnError("the log writer is not taking new pipes (not running or not reading)")
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
                if message["op"] == "closed":
                    held = self._forget(int(message["id"]))
                    if held is not None and not held.drained.done():
                        held.drained.set_result(None)

    def _forget(self, key: int) -> _Held | None:
        held = self._held.pop(key, None)
        if held is not None:
            with contextlib.suppress(OSError):
                os.close(held.read_fd)
        return held

    async def _watch(self, process: asyncio.subprocess.Process, control: socket.socket) -> None:
        """Start the writer again if it dies while it still has pipes to drain."""
        code = await process.wait()
        if self._control is not control:
            return  # told to exit
        self._drop_control()
        self._process = None
        if not self._held:
            return
        self.restarts += 1
        log.warning("the log writer exited; starting it again with its pipes", code=code, pipes=len(self._held))
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._started_at + RESTART_DELAY_S - loop.time()))
        async with self._lock:
            if self._process is not None or not self._held:
                return
            for held in self._held.values():
                held.sent = False
            try:
                await self._start()
            except SpawnError as exc:
                log.error("the log writer cannot be started again", error=str(exc))

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


def _fd_bytes(fds: Sequence[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
