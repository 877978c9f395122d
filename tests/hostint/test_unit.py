"""Offline checks of what install.sh puts on a host: the unit passes `systemd-analyze verify` without a word, its
hardening stays under a recorded exposure score, the sysusers entry parses into the account the installer makes,
and install.sh is valid bash. No systemd needs to run; only `systemd-sysusers` needs root (it writes a scratch
root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.hostint]

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "emp-agent.service"
SYSUSERS = REPO / "systemd" / "emp-agent.sysusers"
INSTALL_SH = REPO / "bootstrap" / "install.sh"
#: `systemd-analyze security --offline=yes` exposure of the unit times ten; the check fails above it. The unit
#: scored 4.5 ("OK") with systemd 252 when this was recorded: lower it when the hardening improves.
SECURITY_THRESHOLD = 50
SYSTEMD_UNITS = Path("/usr/lib/systemd/system")


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (apt-get install systemd): the host-integration checks need it")
    return found


def _fake_root(root: Path) -> Path:
    """A root for `systemd-analyze verify --root`: the distribution's unit tree (sysinit.target and friends),
    a stub for every absolute Exec*= command of the unit, and the unit itself, unchanged."""
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEMD_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    for line in UNIT.read_text().splitlines():
        match = re.match(r"^Exec\w+=[-@:+!]*(/\S+)", line)
        if match:
            stub = root / match.group(1).lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


def test_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    """`systemd-analyze verify` of the unit as shipped (in a scratch root with its commands stubbed) exits 0 and
    prints nothing: most unit mistakes (a misspelt key, a bad value) exit 0 and only print on stderr."""
    root = _fake_root(tmp_path / "root")
    proc = subprocess.run(
        [_tool("systemd-analyze"), "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""},
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_unit_verify_catches_a_misspelt_key(tmp_path: Path) -> None:
    """The check above can fail: the same verify of the unit with `WatchdogSec` misspelt prints the mistake."""
    root = _fake_root(tmp_path / "root")
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    proc = subprocess.run(
        [_tool("systemd-analyze"), "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Unknown key 'WatchdogSecs'" in proc.stderr


def test_unit_hardening_score(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` keeps the unit's exposure at or below 5.0 (threshold 50). Recorded
    score: 4.5 OK (systemd 252, Debian 12)."""
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    proc = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=yes", f"--threshold={SECURITY_THRESHOLD}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    print(f"\nhostint: systemd-analyze security: {match.group(1)} {match.group(2)} (threshold {SECURITY_THRESHOLD})")
    assert proc.returncode == 0, f"exposure {match.group(1)} above {SECURITY_THRESHOLD / 10}:\n{proc.stdout}"
    assert float(match.group(1)) * 10 <= SECURITY_THRESHOLD


def test_sysusers_entry_makes_the_installers_account(tmp_path: Path) -> None:
    """systemd-sysusers applies the sysusers entry without a warning, and it gives the account install.sh makes
    with useradd: system user and group emp-agent, home /var/lib/emp-agent, nologin shell, member of video."""
    if os.geteuid() != 0:
        pytest.skip("not root: systemd-sysusers --root writes files owned by root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = subprocess.run(
        [_tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith("Creating ")] == []
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user = users["emp-agent"]
    assert user[3] == groups["emp-agent"][2]  # primary group emp-agent
    assert (user[5], user[6]) == ("/var/lib/emp-agent", "/usr/sbin/nologin")
    assert int(user[2]) < 1000  # a system account
    assert "emp-agent" in groups["video"][3].split(",")
    install = INSTALL_SH.read_text()
    assert "--home-dir /var/lib/emp-agent" in install
    assert "--shell /usr/sbin/nologin" in install


def test_install_sh_is_valid_bash() -> None:
    """bootstrap/install.sh parses (`bash -n`)."""
    proc = subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, timeout=30, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
