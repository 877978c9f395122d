"""A throw-away systemd as PID 1 for host-integration tests: no image, no nspawn, no VM.

`Container(state).boot()` creates a cgroup2 directory on the host, starts a launcher in it that execs
`unshare --mount --uts --ipc --pid --cgroup [--net] --fork --kill-child`, and runs ct_init.sh as PID 1 of the new
namespaces: a tmpfs overlay of `lower` (the host root by default: it is only read, every write lands in RAM), the
API filesystems, a cgroup2 mount whose root is that directory, the bind mounts, the `prepare` hook, pivot_root,
then `exec /lib/systemd/systemd`. `run()` is `nsenter -t PID -a ...` with a clean environment. `stop()` powers the
container off (the kernel tears its namespaces and mounts down when PID 1 exits), kills what is left through the
cgroup and removes the cgroup directory: nothing stays on the host.

The same recipe by hand, for debugging: `CT=$(bash ct_boot.sh STATE [LOWER])`, `nsenter -t $CT -a systemctl ...`,
`bash ct_stop.sh STATE`.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

HERE = Path(__file__).resolve().parent
INIT = HERE / "ct_init.sh"
#: What a command run in the container sees, whatever the caller's shell holds (pip settings, proxies, EMP_AGENT_*).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
HOST_TOOLS = ("unshare", "nsenter", "mount", "umount", "chroot", "pivot_root", "mknod", "hostname")
#: cgroup directories this module creates: emp-ct-py-<creator pid>-<n> (ct_boot.sh uses emp-ct-sh-<pid>).
CGROUP_NAME = re.compile(r"^emp-ct-py-(\d+)-\d+$")
_serial = itertools.count()
_PR_SET_PDEATHSIG = 1


class ContainerError(RuntimeError):
    """The container did not boot, or a command in it failed (the message carries its output)."""


class CommandFailed(subprocess.CalledProcessError):
    """A `Container.run` command exited non-zero; str() shows its stdout and stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def cgroup2_mount() -> Path | None:
    """The host's cgroup2 mount point ($CG2 wins): /sys/fs/cgroup on a unified host, .../unified on a hybrid one."""
    if os.environ.get("CG2"):
        return Path(os.environ["CG2"])
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def host_ready() -> str | None:
    """None when this host can run containers; otherwise why not (tests skip on "not root" only, else fail)."""
    if os.geteuid() != 0:
        return "not root: host-integration tests need root (namespaces, mounts, cgroups)"
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing host tools: {', '.join(missing)} (util-linux, coreutils)"
    cg2 = cgroup2_mount()
    if cg2 is None or not (cg2 / "cgroup.procs").exists():
        return "no cgroup2 mount in /proc/self/mounts (mount one, or set CG2=<mount point>)"
    if not os.access(cg2, os.W_OK):
        return f"cannot create cgroups under {cg2}"
    if not Path("/lib/systemd/systemd").exists():
        return "no /lib/systemd/systemd (apt-get install systemd)"
    with open("/proc/filesystems") as filesystems:
        if not any(line.split()[-1:] == ["overlay"] for line in filesystems):
            return "no overlay filesystem in /proc/filesystems (modprobe overlay)"
    return None


def require_host() -> None:
    """For fixtures: skip when not root (a developer's laptop), fail loudly for any other gap (CI must run these)."""
    import pytest

    reason = host_ready()
    if reason is None:
        return
    if os.geteuid() != 0:
        pytest.skip(reason)
    pytest.fail(f"this host cannot run the host-integration containers: {reason}")


def _die_with_parent() -> None:  # runs in the launcher between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _remove_cgroup(path: Path, deadline: float) -> bool:
    """rmdir the cgroup tree bottom-up until it is gone or the deadline passes."""
    while True:
        if not path.exists():
            return True
        for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _cgroup_pids(path: Path) -> list[int]:
    pids = []
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _kill_cgroup(path: Path) -> None:
    """SIGKILL everything in the cgroup tree (cgroup.kill where the kernel has it)."""
    if not path.exists():
        return
    kill = path / "cgroup.kill"
    if kill.exists():
        try:
            kill.write_text("1")
            return
        except OSError:
            pass
    for pid in _cgroup_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _sweep_stale_cgroups(cg2: Path) -> None:
    """Remove the empty cgroup directories left by a test session that died (its launcher was killed with it)."""
    for entry in cg2.glob("emp-ct-py-*"):
        match = CGROUP_NAME.match(entry.name)
        if not match or Path(f"/proc/{match.group(1)}").exists() or _cgroup_pids(entry):
            continue
        _remove_cgroup(entry, time.monotonic())


class Container:
    """systemd as PID 1 in fresh namespaces on a tmpfs overlay of `lower`.

    state: an empty directory for this container (root mount point, console.log, binds, prepare.sh).
    binds: (host path, container path) pairs, bind-mounted read-write before `prepare` runs.
    prepare: a /bin/sh script (run with -e, chrooted in the new root, before systemd starts): mask units, write files.
    net: True gives a private network namespace (loopback only); False shares the host's network.
    """

    def __init__(
        self,
        state: Path,
        lower: Path = Path("/"),
        binds: Sequence[tuple[Path, str]] = (),
        prepare: str | None = None,
        net: bool = True,
    ) -> None:
        self.state = Path(state)
        self.lower = Path(lower)
        self.binds = [(Path(src), dst) for src, dst in binds]
        self.prepare = prepare
        self.net = net
        self.pid: int | None = None
        self.cgroup: Path | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    @property
    def console_log(self) -> Path:
        """What ct_init.sh and systemd wrote before and while booting (systemd logs to the journal after)."""
        return self.state / "console.log"

    def boot(self, timeout: float = 60) -> None:
        """Start the container; returns once systemd listens on /run/systemd/private (systemctl works)."""
        if self._launcher is not None:
            raise ContainerError("already booted")
        reason = host_ready()
        if reason:
            raise ContainerError(reason)
        cg2 = cgroup2_mount()
        assert cg2 is not None
        _sweep_stale_cgroups(cg2)
        self.state.mkdir(parents=True, exist_ok=True)
        lines = []
        for src, dst in self.binds:
            if not src.exists() or not dst.startswith("/") or "\t" in f"{src}{dst}" or "\n" in f"{src}{dst}":
                raise ContainerError(f"bad bind mount {src} -> {dst}")
            lines.append(f"{src.resolve()}\t{dst}\n")
        (self.state / "binds").write_text("".join(lines))
        prepare = self.state / "prepare.sh"
        if self.prepare is not None:
            prepare.write_text(self.prepare)
        elif prepare.exists():
            prepare.unlink()
        self.cgroup = cg2 / f"emp-ct-py-{os.getpid()}-{next(_serial)}"
        self.cgroup.mkdir()
        # the launcher joins the cgroup, then becomes unshare: the cgroup namespace's root is that directory
        launcher = ["bash", "-c", 'echo $$ > "$1" && shift && exec "$@"', "launcher", str(self.cgroup / "cgroup.procs")]
        unshare = ["unshare", "--mount", "--uts", "--ipc", "--pid", "--cgroup", "--fork", "--kill-child"]
        unshare += ["--propagation", "private", *(["--net"] if self.net else [])]
        init = ["bash", str(INIT), str(self.state.resolve()), str(self.lower)]
        self._console = open(self.console_log, "wb")  # noqa: SIM115 (closed by stop)
        deadline = time.monotonic() + timeout
        try:
            self._launcher = subprocess.Popen(
                [*launcher, *unshare, *init],
                stdin=subprocess.DEVNULL,
                stdout=self._console,
                stderr=subprocess.STDOUT,
                env={"PATH": BASE_ENV["PATH"], "LANG": "C.UTF-8"},
                start_new_session=True,
                preexec_fn=_die_with_parent,  # a killed test session takes its containers with it
            )
            self.pid = self._find_init(deadline)
            self._wait_systemd(deadline)
        except BaseException:
            self.stop()
            raise

    def _boot_failed(self, what: str) -> ContainerError:
        log = self.console_log.read_text(errors="replace")[-4000:] if self.console_log.exists() else ""
        return ContainerError(f"{what}; console.log:\n{log}")

    def _find_init(self, deadline: float) -> int:
        """The container's PID 1: the launcher's child whose NSpid ends in 1."""
        assert self._launcher is not None
        launcher = self._launcher.pid
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise self._boot_failed(f"the launcher exited with {self._launcher.returncode}")
            try:
                children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
            except OSError:
                children = []
            for child in children:
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                except OSError:
                    continue
                if re.search(r"^NSpid:\s+\d+\s+1$", status, re.M):
                    return int(child)
            time.sleep(0.02)
        raise self._boot_failed("the container's PID 1 did not appear")

    def _wait_systemd(self, deadline: float) -> None:
        """Until PID 1 is systemd (pivot_root done) and listens on its private socket: signals sent earlier are
        lost and systemctl fails."""
        assert self._launcher is not None
        assert self.pid is not None
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise self._boot_failed(f"the container exited with {self._launcher.returncode}")
            try:
                is_systemd = Path(f"/proc/{self.pid}/comm").read_text().strip() == "systemd"
                sock = os.stat(f"/proc/{self.pid}/root/run/systemd/private") if is_systemd else None
            except OSError:
                sock = None
            if sock is not None and stat.S_ISSOCK(sock.st_mode):
                return
            time.sleep(0.02)
        raise self._boot_failed("systemd did not open /run/systemd/private in time")

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`nsenter -t PID -a argv` (text mode, output captured) with BASE_ENV plus `env`; raises CommandFailed on a
        non-zero exit when `check`."""
        if self.pid is None:
            raise ContainerError("not booted")
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**BASE_ENV, **(env or {})},
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def wait_running(self, timeout: float = 120) -> str:
        """`systemctl is-system-running --wait`: the state once the boot finished, running or degraded (any other
        state raises ContainerError, with the failed units)."""
        proc = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
        state = proc.stdout.strip()
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            raise ContainerError(f"system state {state!r} ({proc.stderr.strip()}); failed units:\n{failed}")
        return state

    def stop(self) -> None:
        """Power off (the kernel removes the namespaces and mounts when PID 1 exits); fall back to killing the
        cgroup; remove the cgroup directory. Safe to call twice, or after a failed boot."""
        launcher, self._launcher = self._launcher, None
        try:
            if launcher is not None and launcher.poll() is None:
                if self.pid is not None:
                    subprocess.run(
                        ["nsenter", "-t", str(self.pid), "-a", "systemctl", "poweroff", "--no-block"],
                        env=BASE_ENV,
                        capture_output=True,
                        timeout=15,
                        check=False,
                    )
                try:
                    launcher.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    if self.cgroup is not None:
                        _kill_cgroup(self.cgroup)
                    launcher.kill()  # unshare --kill-child: its child, PID 1, dies and the namespace with it
                    launcher.wait(timeout=30)
        finally:
            self.pid = None
            if self._console is not None:
                self._console.close()
                self._console = None
            if self.cgroup is not None:
                if not _remove_cgroup(self.cgroup, time.monotonic() + 10):
                    _kill_cgroup(self.cgroup)
                    if not _remove_cgroup(self.cgroup, time.monotonic() + 10):
                        raise ContainerError(f"cgroup {self.cgroup} still busy: {_cgroup_pids(self.cgroup)}")
                self.cgroup = None

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
