"""Spawning service processes in their own session, signalling their group and killing their whole tree."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from agent.errors import SpawnError


class Child(Protocol):
    """A started process we own."""

    @property
    def pid(self) -> int: ...

    async def wait(self) -> int:
        """Return code; negative means killed by that signal."""
        ...

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the child's whole process group."""
        ...

    def kill_tree(self) -> None:
        """SIGKILL the process group and every descendant we can find."""
        ...

    def group_alive(self) -> bool:
        """True while any process of the child's group or tree is still alive."""
        ...


class Launcher(Protocol):
    """Starts processes."""

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, log_path: Path) -> Child: ...


class _OsChild:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._known: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> int:
        return await self._process.wait()

    def _remember_tree(self) -> None:
        # Descendants that left our process group (setsid, double fork) are still found by parentage,
        # as long as we look while their parents live; remember them for the final kill.
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for proc in root.children(recursive=True):
                self._known.setdefault(proc.pid, proc)

    def signal_group(self, sig: int) -> None:
        self._remember_tree()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill_tree(self) -> None:
        self._remember_tree()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in list(self._known.values()):
            with contextlib.suppress(psutil.Error):
                proc.kill()  # psutil checks the create time, so a recycled pid is never hit

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            pass
        except PermissionError:
            return True
        else:
            return _group_has_live_member(self.pid)
        return any(_alive(proc) for proc in self._known.values())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_has_live_member(pgid: int) -> bool:
    # killpg(…, 0) succeeds while an unreaped zombie leader remains; look for a member that still runs.
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


class ProcessLauncher:
    """Spawns each child in a new session, stdin from /dev/null, stdout+stderr appended to its log file."""

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, log_path: Path) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise SpawnError(f"cannot open log file {log_path}: {exc.strerror}") from None
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            missing = cwd if cwd and exc.filename == cwd else argv[0]
            what = "working directory" if missing == cwd else "command"
            raise SpawnError(f"can't find {what} {missing!r}") from None
        except PermissionError:
            raise SpawnError(f"permission denied executing {argv[0]!r}") from None
        except OSError as exc:
            raise SpawnError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            os.close(log_fd)
        return _OsChild(process)
