"""cloud-init: the shipped user-data examples pass cloud-init's own schema check, and a real NoCloud first boot of a
stock Debian 12 tree (systemd as PID 1 in a container, cloud-init's real stages) installs emp-agent from a
wheelhouse and leaves it running and ready; a failing install makes cloud-init report an error instead of leaving
a half-installed agent behind."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.hostint.container import Container
from tests.hostint.rootfs import rootfs_fixture, tree_wheelhouse_fixture, wait_ready  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO / "bootstrap" / "cloud-init"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
INSTALL_SH = REPO / "bootstrap" / "install.sh"

pytestmark = [pytest.mark.slow, pytest.mark.hostint, pytest.mark.timeout(300)]

SOURCE_BEGIN = re.compile(r"^( *)# ---- agent source \(PLACEHOLDER\).*\n", re.M)
SOURCE_END = re.compile(r"^ *# ---- end of agent source -*\n", re.M)
#: What the test puts in place of the example's download: the bundle bind-mounted read-only from the host, copied
#: into a temp dir as if it had just been unpacked there.
TEST_SOURCE = (
    "# ---- agent source (test): the bundle bind-mounted at /opt/emp-bundle, copied as if unpacked there\n"
    'bundle="$(mktemp -d)"\n'
    'cp -R /opt/emp-bundle/. "$bundle/"\n'
)


def schema_check(rootfs: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """`cloud-init schema --config-file` with the tree's cloud-init (chroot), the file bind-mounted in a private
    mount namespace: nothing is written into the tree."""
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$1" "$2/mnt" && exec chroot "$2" cloud-init schema --config-file "/mnt/$3"',
            "sh",
            str(config.parent),
            str(rootfs),
            config.name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def runnable_user_data(example: str, profile: str = "demo") -> str:
    """The example made runnable in the offline test container: `profile`, the embedded registry instead of the
    placeholder Redis URL, and the bundle from /opt/emp-bundle instead of the download. Everything else (the
    write_files, the `set -e` block, install.sh, `systemctl enable --now`) is the example's own."""
    text, count = re.subn(r'^( *)profile = "[a-z0-9-]+"$', rf'\1profile = "{profile}"', example, flags=re.M)
    assert count == 1, "the example sets the profile once in agent.toml"
    text, count = re.subn(r"^ *EMP_AGENT_REDIS_URL=.*\n", "", text, flags=re.M)
    assert count == 1, "the example sets the Redis URL once in /etc/emp-agent/env"
    begin, end = SOURCE_BEGIN.search(text), SOURCE_END.search(text)
    assert begin, "the example marks the start of its agent source block"
    assert end, "the example marks the end of its agent source block"
    assert begin.end() < end.start()
    indent = begin.group(1)
    replacement = "".join(indent + line + "\n" for line in TEST_SOURCE.splitlines())
    return text[: begin.start()] + replacement + text[end.end() :]


def make_seed(directory: Path, user_data: str, instance_id: str, hostname: str) -> Path:
    """A NoCloud seed (meta-data, user-data) in `directory`."""
    directory.mkdir(parents=True)
    (directory / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
    (directory / "user-data").write_text(user_data)
    return directory


def make_bundle(directory: Path) -> Path:
    """What an operator publishes next to the user-data: install.sh (wheelhouse/ is bind-mounted under it)."""
    (directory / "wheelhouse").mkdir(parents=True)
    shutil.copy2(INSTALL_SH, directory / "install.sh")
    return directory


def diagnostics(ct: Container) -> str:
    """What explains a failed first boot: cloud-init's output, the agent's journal, failed units."""
    parts = []
    for argv in (
        ("tail", "-n", "40", "/var/log/cloud-init-output.log"),
        ("journalctl", "-u", "emp-agent", "--no-pager", "-n", "60"),
        ("systemctl", "--failed", "--no-legend"),
    ):
        proc = ct.run(*argv, check=False, timeout=30)
        parts.append(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
    return "\n".join(parts)


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_passes_the_cloud_init_schema(rootfs: Path, example: Path) -> None:
    """Each shipped user-data example is valid cloud-config for cloud-init's own schema (Debian 12's cloud-init)."""
    proc = schema_check(rootfs, example)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Valid cloud-config" in proc.stdout


def test_examples_exist_for_both_host_kinds() -> None:
    """The folder holds the GPU-host and API-host examples, each with its profile, its secrets file at 0600 and a
    `set -e` runcmd block that enables and starts the agent, then fails the boot if the machine failed."""
    assert {path.name for path in EXAMPLES} >= {"gpu-host.yaml", "api-host.yaml"}
    for name, profile in (("gpu-host.yaml", "comfyui"), ("api-host.yaml", "api")):
        text = (EXAMPLES_DIR / name).read_text()
        assert text.startswith("#cloud-config\n")
        assert f'profile = "{profile}"' in text
        assert re.search(r'- path: /etc/emp-agent/env\n(?:    .*\n)*?    permissions: "0600"\n', text), name
        assert re.search(r"runcmd:\n(?:  #.*\n)*  - \|\n    set -eu\n", text), name
        assert "    systemctl enable --now emp-agent\n" in text, name
        assert text.rstrip().endswith('[ "$rc" = 0 ] || [ "$rc" = 4 ]'), name


def test_schema_check_rejects_a_broken_copy(rootfs: Path, short_tmp: Path) -> None:
    """The schema check is not a rubber stamp: a copy of the GPU example with an unquoted (integer) file mode and a
    runcmd given as a string fails with rc 1 and names both faults; broken YAML fails too."""
    example = (EXAMPLES_DIR / "gpu-host.yaml").read_text()
    broken, count = re.subn(r'permissions: "0600"', "permissions: 0600", example)
    assert count == 1
    broken = broken.replace("runcmd:\n", "runcmd: echo not a list\nnot_runcmd:\n", 1)
    (short_tmp / "broken.yaml").write_text(broken)
    proc = schema_check(rootfs, short_tmp / "broken.yaml")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert "write_files.1.permissions: 384 is not of type 'string'" in output, output
    assert "runcmd: 'echo not a list' is not of type 'array'" in output, output
    (short_tmp / "yaml.yaml").write_text(example.replace("write_files:\n", "write_files: [\n", 1))
    proc = schema_check(rootfs, short_tmp / "yaml.yaml")
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_first_boot_installs_and_starts_the_agent(rootfs: Path, tree_wheelhouse: Path, short_tmp: Path) -> None:
    """A NoCloud first boot with the GPU-host example (profile demo, the bundle from a bind mount): cloud-init's
    stages finish with status done, the agent is installed from the wheelhouse, enabled, active as the emp-agent
    user and reaches phase ready; the settings and the 0600 secrets file are the ones the user-data wrote."""
    user_data = runnable_user_data((EXAMPLES_DIR / "gpu-host.yaml").read_text())
    seed = make_seed(short_tmp / "seed", user_data, "iid-emp-test-first-boot", "emp-gpu-test")
    assert schema_check(rootfs, seed / "user-data").returncode == 0
    bundle = make_bundle(short_tmp / "bundle")
    binds = [
        (seed, "/var/lib/cloud/seed/nocloud"),
        (bundle, "/opt/emp-bundle"),
        (tree_wheelhouse, "/opt/emp-bundle/wheelhouse"),
    ]
    with Container(short_tmp / "ct", lower=rootfs, binds=binds) as ct:
        state = ct.wait_running(timeout=240)
        ci = ct.run("cloud-init", "status", "--wait", "--long", check=False, timeout=120)
        assert ci.returncode == 0, ci.stdout + ci.stderr + diagnostics(ct)
        assert "status: done" in ci.stdout
        assert "DataSourceNoCloud" in ci.stdout
        assert state == "running", diagnostics(ct)
        assert ct.run("systemctl", "is-enabled", "emp-agent", check=False).stdout.strip() == "enabled"
        assert ct.run("systemctl", "is-active", "emp-agent", check=False).stdout.strip() == "active", diagnostics(ct)
        status = wait_ready(ct)
        assert status["phase"] == "ready"
        assert ct.run("hostname").stdout.strip() == "emp-gpu-test"
        main_pid = ct.run("systemctl", "show", "-p", "MainPID", "--value", "emp-agent").stdout.strip()
        uid = ct.run("awk", "/^Uid:/ { print $2 }", f"/proc/{main_pid}/status").stdout.strip()
        assert uid != "0"
        assert uid == ct.run("id", "-u", "emp-agent").stdout.strip()
        assert ct.run("stat", "-c", "%a %U", "/etc/emp-agent/env").stdout.split() == ["600", "root"]
        assert 'profile = "demo"' in ct.run("cat", "/etc/emp-agent/agent.toml").stdout
        assert ct.run("test", "-f", "/etc/emp-agent/profiles/demo.toml", check=False).returncode == 0


def test_first_boot_with_a_failing_install_reports_an_error(rootfs: Path, short_tmp: Path) -> None:
    """The same first boot with an empty wheelhouse: install.sh fails, the `set -e` block stops there, `cloud-init
    status` says error with rc 1 (cloud-final failed, the system is degraded) and emp-agent is neither installed as
    a unit nor enabled nor running: nothing half-installed that would pass for a working host."""
    user_data = runnable_user_data((EXAMPLES_DIR / "gpu-host.yaml").read_text())
    seed = make_seed(short_tmp / "seed", user_data, "iid-emp-test-broken", "emp-gpu-broken")
    bundle = make_bundle(short_tmp / "bundle")
    binds = [(seed, "/var/lib/cloud/seed/nocloud"), (bundle, "/opt/emp-bundle")]
    with Container(short_tmp / "ct", lower=rootfs, binds=binds) as ct:
        state = ct.run("systemctl", "is-system-running", "--wait", check=False, timeout=240).stdout.strip()
        ci = ct.run("cloud-init", "status", "--wait", "--long", check=False, timeout=120)
        assert ci.returncode == 1, ci.stdout + ci.stderr
        assert "status: error" in ci.stdout, ci.stdout
        assert state == "degraded"
        assert ct.run("systemctl", "is-failed", "cloud-final.service", check=False).stdout.strip() == "failed"
        output = ct.run("cat", "/var/log/cloud-init-output.log").stdout
        assert "No matching distribution found for emp-agent" in output, output[-3000:]
        assert ct.run("systemctl", "is-active", "emp-agent", check=False).stdout.strip() != "active"
        assert ct.run("test", "-e", "/etc/systemd/system/emp-agent.service", check=False).returncode == 1
        assert (
            ct.run(
                "test", "-e", "/etc/systemd/system/multi-user.target.wants/emp-agent.service", check=False
            ).returncode
            == 1
        )
        assert ct.run("test", "-e", "/usr/local/bin/emp-agent", check=False).returncode == 1
