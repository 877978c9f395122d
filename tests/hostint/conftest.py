"""Host-integration fixtures: the offline wheelhouse the containers install emp-agent from.

Every test under tests/hostint is marked `slow` and `hostint` (also when a module forgets its pytestmark)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.hostint.container import BASE_ENV

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.hostint)


def _run(argv: Sequence[str | Path], what: str, timeout: float = 600) -> None:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        pytest.fail(f"building the wheelhouse: {what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _version(python: str | Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import sys; print('.'.join(map(str, sys.version_info[:3])))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


def target_python() -> str:
    """The interpreter install.sh picks in a container booted from the host root (its own search, same PATH)."""
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        found = shutil.which(name, path=BASE_ENV["PATH"])
        if found and tuple(int(x) for x in _version(found).split(".")[:2]) >= (3, 11):
            return found
    pytest.fail("no Python 3.11 or newer on the host: install.sh could not run in a container of the host root")


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the containers install from with no network (`install.sh --wheelhouse`): the emp-agent wheel
    built from this checkout and a `pip wheel`-built systemd-python (both by the project's .venv python), the
    wheels of every dependency, and install.sh. Dependencies are resolved by the interpreter install.sh will
    use, because markers differ between patch releases (redis needs async-timeout below Python 3.11.3)."""
    out = tmp_path_factory.mktemp("wheelhouse")
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    pip: list[str | Path] = [python, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    _run([*pip, "install", "wheel"], "pip install wheel")  # bdist_wheel for systemd-python's setup.py
    _run([*pip, "wheel", "--no-deps", "-w", out, REPO], "pip wheel emp-agent")
    _run([*pip, "wheel", "--no-deps", "-w", out, "systemd-python"], "pip wheel systemd-python (needs libsystemd-dev)")
    (agent_wheel,) = out.glob("emp_agent-*.whl")
    target = target_python()
    resolver = python
    if _version(target) != _version(python):
        venv = tmp_path_factory.mktemp("target-venv")
        _run([target, "-m", "venv", venv], f"{target} -m venv (needs python3-venv)")
        resolver = venv / "bin" / "python"
    _run(
        [resolver, *pip[1:], "wheel", "-w", out, "--find-links", out, agent_wheel],
        f"pip wheel of emp-agent's dependencies for {target}",
    )
    shutil.copy(REPO / "bootstrap" / "install.sh", out / "install.sh")
    return out
