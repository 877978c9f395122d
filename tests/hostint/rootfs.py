"""A clean Debian 12 tree for host-integration tests: the lower layer of `Container` when a test needs what the host
lacks (cloud-init, sshd, a stock Debian with nothing of ours installed).

`mmdebstrap --variant=minbase` with systemd, dbus, python3, python3-venv, cloud-init, openssh-server and
redis-server (~35 s on 2 cores, ~330 MB), built once per test session into a temp dir and removed at its end.
Containers boot it under a tmpfs overlay, so it stays pristine and every test starts from the same tree.
Test-only changes to the tree: cloud-init reads the NoCloud datasource only (a seed at
/var/lib/cloud/seed/nocloud; no network probing for cloud metadata) with locale C.UTF-8 (minbase has no
en_US locale, and cc_locale would fail), and the redis-server service is not started at boot (the agent runs its
own embedded server from the binary).

`EMP_HOSTINT_ROOTFS=/path/to/tree` reuses a tree made before by `build_rootfs(Path(...))` instead of building
one (and leaves it in place): quicker when running these tests again and again.

Use it from a test module with `from tests.hostint.rootfs import rootfs_fixture  # noqa: F401`, then take
`rootfs` as an argument. The tree is built once even when several modules import the fixture. `tree_wheelhouse`
(import tree_wheelhouse_fixture) is the session's wheelhouse completed for the tree's Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.hostint.container import Container

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "ca-certificates",
    "cloud-init",
    "openssh-server",
    "redis-server",
)
#: Documentation, man pages and translations are not needed in a test tree: less to unpack.
DPKG_EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*")
TEST_CLOUD_CFG = """\
# Test tree only: the NoCloud seed (/var/lib/cloud/seed/nocloud) is the only datasource, and the locale is one
# minbase has (cc_locale fails on en_US.UTF-8, which is not generated there).
datasource_list: [ NoCloud, None ]
locale: C.UTF-8
"""
TEST_CFG_PATH = "etc/cloud/cloud.cfg.d/90-emp-test.cfg"
BUILD_TIMEOUT_S = 600
REUSE_VARIABLE = "EMP_HOSTINT_ROOTFS"


def build_rootfs(dest: Path) -> None:
    """Build the tree into `dest` (an empty directory) and apply the test-only configuration."""
    argv = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        '--aptopt=Acquire::Languages "none"',
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES),
        SUITE,
        str(dest),
        MIRROR,
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (dest / TEST_CFG_PATH).write_text(TEST_CLOUD_CFG)
    (dest / "etc/systemd/system/multi-user.target.wants/redis-server.service").unlink(missing_ok=True)
    (dest / ".emp-build-seconds").write_text(f"{time.monotonic() - started:.1f}\n")


class _Shared:
    """A session resource made once however many test modules import its fixture (each import makes its own
    FixtureDef, so pytest's session cache alone would build it once per module), removed after its last user."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.path: Path | None = None
        self.users = 0
        self.owned = False

    def acquire(self, make: Callable[[], tuple[Path, bool]]) -> Path:
        with self.lock:
            if self.path is None:
                self.path, self.owned = make()
            self.users += 1
            return self.path

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.path is not None:
                if self.owned:
                    shutil.rmtree(self.path, ignore_errors=True)
                self.path = None


_tree = _Shared()
_tree_wheelhouse = _Shared()


def _make_tree() -> tuple[Path, bool]:
    if os.geteuid() != 0:
        pytest.skip("not root: building the Debian tree needs root (mmdebstrap, chroot)")
    given = os.environ.get(REUSE_VARIABLE)
    if given:
        if not (Path(given) / TEST_CFG_PATH).is_file():
            pytest.fail(f"{REUSE_VARIABLE}={given} is not a tree made by build_rootfs (no {TEST_CFG_PATH})")
        return Path(given), False
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is missing: apt-get install mmdebstrap (scripts/test installs it)")
    tree = Path(tempfile.mkdtemp(prefix="emp-rootfs-"))
    try:
        build_rootfs(tree)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise
    return tree, True


#: Host settings passed on to pip in the tree when it must reach an index (mirrors, proxies).
PIP_PASSTHROUGH = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT")
PROXY_PASSTHROUGH = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def _pip_in_tree(tree: Path, wheelhouse: Path, pip_args: str, online: bool) -> subprocess.CompletedProcess[str]:
    """Run the tree's own pip (the wheel python3-venv ships, run from the zip: no venv to create) with the tree's
    python3, chrooted in a private mount namespace: the wheelhouse at /mnt, a tmpfs /tmp (nothing is written into
    the tree). Online, pip gets the host's CA bundle (TLS-inspecting proxies), index and proxy settings."""
    (pip_wheel,) = (tree / "usr/share/python-wheels").glob("pip-*.whl")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    copy_ca = ""
    if online:
        env.update({name: os.environ[name] for name in PIP_PASSTHROUGH + PROXY_PASSTHROUGH if name in os.environ})
        candidates = [os.environ.get(n) for n in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")]
        ca = next((c for c in [*candidates, "/etc/ssl/certs/ca-certificates.crt"] if c and Path(c).is_file()), None)
        if ca:
            copy_ca = f'cp "{ca}" "$1/tmp/host-ca.crt" && '
            env["PIP_CERT"] = "/tmp/host-ca.crt"
    else:
        env["PIP_NO_INDEX"] = "1"
    script = (
        'mount -t proc proc "$1/proc" && mount -t tmpfs tmpfs "$1/tmp" && mount --bind "$2" "$1/mnt" && '
        f'{copy_ca}exec chroot "$1" sh -c "python3 /usr/share/python-wheels/{pip_wheel.name}/pip $3"'
    )
    return subprocess.run(
        [
            *("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(tree), str(wheelhouse)),
            f"-q --disable-pip-version-check --no-input {pip_args}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def wheelhouse_misses(tree: Path, wheelhouse: Path) -> str | None:
    """None when the tree's Python can install emp-agent from `wheelhouse` alone (a pip dry run with no index);
    otherwise pip's complaint. Markers differ between patch releases: Debian 12's python3 is 3.11.2, where redis
    needs async-timeout, which a wheelhouse resolved by a Python 3.11.7 lacks."""
    proc = _pip_in_tree(
        tree,
        wheelhouse,
        "install --dry-run --ignore-installed --break-system-packages --find-links /mnt /mnt/emp_agent-*.whl",
        online=False,
    )
    return None if proc.returncode == 0 else proc.stdout + proc.stderr


def complete_wheelhouse(tree: Path, wheelhouse: Path) -> None:
    """Add to `wheelhouse` the dependency wheels the tree's Python needs for the emp-agent wheel in it, resolved
    by that Python (from the index)."""
    proc = _pip_in_tree(tree, wheelhouse, "wheel -w /mnt --find-links /mnt /mnt/emp_agent-*.whl", online=True)
    if proc.returncode != 0:
        raise RuntimeError(f"resolving the wheelhouse for the tree's Python failed:\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session", name="rootfs")
def rootfs_fixture() -> Iterator[Path]:
    """The Debian 12 tree (read it, boot it with `Container(lower=rootfs)`, never write into it)."""
    tree = _tree.acquire(_make_tree)
    try:
        yield tree
    finally:
        _tree.release()


@pytest.fixture(scope="session", name="tree_wheelhouse")
def tree_wheelhouse_fixture(rootfs: Path, wheelhouse: Path) -> Iterator[Path]:
    """What `install.sh --wheelhouse` installs from in a container booted from `rootfs`: the session's
    `wheelhouse` (conftest.py: resolved for the host root's Python) when the tree's Python finds everything in it,
    else a copy completed by the tree's Python."""

    def make() -> tuple[Path, bool]:
        if wheelhouse_misses(rootfs, wheelhouse) is None:
            return wheelhouse, False
        out = Path(tempfile.mkdtemp(prefix="emp-tree-wheelhouse-"))
        try:
            for wheel in wheelhouse.glob("*.whl"):
                try:
                    os.link(wheel, out / wheel.name)
                except OSError:
                    shutil.copy2(wheel, out / wheel.name)
            complete_wheelhouse(rootfs, out)
            missing = wheelhouse_misses(rootfs, out)
            if missing:
                raise RuntimeError(f"the completed wheelhouse still lacks wheels for the tree's Python:\n{missing}")
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        return out, True

    path = _tree_wheelhouse.acquire(make)
    try:
        yield path
    finally:
        _tree_wheelhouse.release()


def agent_status(ct: Container) -> dict[str, object] | None:
    """`emp-agent status --json` inside the container, or None while the agent does not answer."""
    proc = ct.run("emp-agent", "status", "--json", check=False, timeout=30)
    try:
        status = json.loads(proc.stdout)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def wait_ready(ct: Container, timeout: float = 90) -> dict[str, object]:
    """The agent's status once its phase is ready; at the deadline, fail with its last status and journal."""
    try:
        return wait_until(
            lambda: (s := agent_status(ct)) is not None and s.get("phase") == "ready" and s,
            timeout=timeout,
            interval=0.5,
            what="emp-agent status --json to say phase ready",
        )
    except AssertionError as exc:
        journal = ct.run("journalctl", "-u", "emp-agent", "--no-pager", "-n", "80", check=False).stdout
        raise AssertionError(
            f"{exc}\nlast status: {json.dumps(agent_status(ct))[:3000]}\njournal:\n{journal}"
        ) from None
