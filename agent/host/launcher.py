"""Spawning service processes in their own session, signalling their group and killing their whole tree."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import psutil

from agent.errors import SpawnError
from agent.host.logpipes import LogPipe, LogSpec, LogWriter, fd_ready

#: Set in every child's environment; inherited by its descendants, so escaped ones can still be found.
TAG_VARIABLE = "EMP_SPAWN_TAG"
#: What wait() returns for an adopted process: its exit status went to its real parent, not to us.
UNKNOWN_EXIT = -256
#: psutil create times of one process read at different moments agree to within this (seconds).
CREATE_TIME_SLACK_S = 0.05


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

    def group_empty(self) -> bool:
        """Cheap check: no process (not even a zombie) is left in the child's process group."""
        ...

    @property
    def tag(self) -> str:
        """The spawn tag in the environment of the child and all its descendants."""
        ...

    def tree_rss_mib(self) -> int:
        """Resident memory of every live process of the instance, in MiB."""
        ...

    def usage(self, sampling: bool = False) -> tuple[int, float]:
        """(RSS bytes, CPU seconds) summed over every live process of the instance. `sampling` (the periodic
        status sample) reads only the instance's own tree instead of walking all of /proc."""
        ...

    def pids(self) -> set[int]:
        """Every live process of the instance (walks /proc: call it off the event loop)."""
        ...


class Launcher(Protocol):
    """Starts processes and the log writers their output goes to."""

    async def open_log(self, spec: LogSpec) -> LogPipe: ...

    async def adopt_log(self, spec: LogSpec, pid: int) -> LogPipe | None:
        """A share in the output pipe of `pid`, adopted from a previous agent (None when it cannot be opened)."""
        ...

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, log: LogPipe) -> Child: ...


def watch_children_by_pidfd() -> None:
    """Make asyncio see child exits through pidfds in the event loop instead of one waiting thread per child
    (Python 3.11's default): no thread per service or log writer. Python 3.12 does this by itself."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # kernel older than 5.3, or seccomp forbids it: keep the threaded watcher
        return
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


class _Tree:
    """The processes of one instance: a session leader, its group, its descendants and tagged escapees."""

    def __init__(self, pid: int, tag: str, created: float | None) -> None:
        self._pid = pid
        self.tag = tag
        self._created = created
        self._known: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int:
        return self._pid

    def _remember_tree(self) -> None:
        # Descendants that left our process group (setsid, double fork) are found by parentage while their
        # parents live, and by the spawn tag in their environment after that.
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            for proc in root.children(recursive=True):
                self._known.setdefault(proc.pid, proc)

    def members(self) -> list[psutil.Process]:
        """Every live process of this instance: its group, its remembered descendants, and tagged escapees."""
        self._remember_tree()
        return members_of(self.pid, self.tag, self._known.values(), since=self._created)

    def signal_group(self, sig: int) -> None:
        self._remember_tree()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill_tree(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in self.members():
            with contextlib.suppress(psutil.Error):
                proc.kill()  # psutil checks the create time, so a recycled pid is never hit

    def _tree_members(self) -> list[psutil.Process]:
        """The instance's main process, its descendants (through the kernel's children lists) and the processes
        seen before that still live: no walk of all of /proc and no environment read, for usage sampling. A
        stop still uses `members`, which also finds tagged escapees. Falls back to `members` on a kernel without
        children lists."""
        pids = descendants(self.pid)
        if pids is None:
            return self.members()
        for pid in pids:
            if pid not in self._known:
                with contextlib.suppress(psutil.Error):
                    self._known[pid] = psutil.Process(pid)
        for pid, process in list(self._known.items()):
            if pid not in pids and not _alive(process):
                del self._known[pid]  # an instance that keeps spawning short-lived helpers must not grow this
        return list(self._known.values())

    def group_alive(self) -> bool:
        return bool(self.members())

    def group_empty(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def tree_rss_mib(self) -> int:
        return self.usage()[0] // (1024 * 1024)

    def pids(self) -> set[int]:
        return {proc.pid for proc in self.members()}

    def usage(self, sampling: bool = False) -> tuple[int, float]:
        rss, cpu = 0, 0.0
        for proc in self._tree_members() if sampling else self.members():
            with contextlib.suppress(psutil.Error), proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu += times.user + times.system
        return rss, cpu


class _OsChild(_Tree):
    """A process we spawned: its exit status comes from waitpid."""

    def __init__(self, process: asyncio.subprocess.Process, tag: str) -> None:
        try:
            created: float | None = psutil.Process(process.pid).create_time()
        except psutil.Error:
            created = None
        super().__init__(process.pid, tag, created)
        self._process = process

    async def wait(self) -> int:
        return await self._process.wait()


class AdoptedChild(_Tree):
    """A process a previous agent spawned and this one adopted. Not our child: its exit is seen through a pidfd,
    and its exit status is unknown (wait() returns UNKNOWN_EXIT)."""

    async def wait(self) -> int:
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return UNKNOWN_EXIT
        try:
            await fd_ready(pidfd)  # a pidfd reads ready when its process has exited
        finally:
            os.close(pidfd)
        return UNKNOWN_EXIT


def descendants(root: int, proc: str = "/proc") -> set[int] | None:
    """`root` and its descendants, read from the kernel's per-thread children lists: only the tree's own /proc
    entries are read, however many processes the host runs. None where the kernel keeps no children lists
    (CONFIG_PROC_CHILDREN unset); the caller then walks all of /proc."""
    found: set[int] = set()
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        tasks = f"{proc}/{pid}/task"
        try:
            threads = os.listdir(tasks)
        except OSError:
            continue  # gone
        found.add(pid)
        for tid in threads:
            try:
                with open(f"{tasks}/{tid}/children", "rb") as handle:
                    todo.extend(int(child) for child in handle.read().split())
            except FileNotFoundError:
                if os.path.isdir(f"{tasks}/{tid}"):
                    return None  # the thread is there and its children list is not: unsupported
            except OSError:
                continue
    return found


def members_of(
    pgid: int, tag: str | None, known: Iterable[psutil.Process] = (), since: float | None = None
) -> list[psutil.Process]:
    """Live (non-zombie) processes in process group `pgid`, carrying `tag`, or among `known`.

    `since` is the create time of the instance's first process: nothing older can belong to it, so only newer
    processes have their group and environment read (this runs on every exit, before the restart).
    """
    found: dict[int, psutil.Process] = {}
    for proc in known:
        if _alive(proc):
            found[proc.pid] = proc
    for proc in psutil.process_iter(["create_time"]):
        if proc.pid in found or proc.pid == os.getpid():
            continue
        if since is not None and (proc.info["create_time"] or 0) < since - CREATE_TIME_SLACK_S:
            continue
        try:
            in_group = os.getpgid(proc.pid) == pgid
            tagged = tag is not None and not in_group and proc.environ().get(TAG_VARIABLE) == tag
        except (ProcessLookupError, psutil.Error, OSError):
            continue
        if (in_group or tagged) and _alive(proc):
            found[proc.pid] = proc
    return list(found.values())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessLauncher:
    """Spawns each child in a new session, stdin from /dev/null, stdout+stderr into a pipe drained by the agent's
    log writer (`agent/logwriter.py`), which timestamps, rotates and never blocks the child."""

    def __init__(self, log_writer: LogWriter | None = None) -> None:
        self.log_writer = log_writer or LogWriter()

    async def open_log(self, spec: LogSpec) -> LogPipe:
        """Check the log file can be written and hand a new pipe to the agent's log writer."""
        return await self.log_writer.open(spec)

    async def adopt_log(self, spec: LogSpec, pid: int) -> LogPipe | None:
        """A share in the output pipe of an adopted process; the previous agent's writer drains it while it lives."""
        return await self.log_writer.adopt(spec, pid)

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, log: LogPipe) -> Child:
        tag = uuid.uuid4().hex
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log.write_fd,
                stderr=asyncio.subprocess.STDOUT,
                env={**env, TAG_VARIABLE: tag},
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
        return _OsChild(process, tag)
