"""Packer: the golden-image templates pass Debian's packer (1.6.6) `validate` and `fmt -check`, a broken copy does
not, and a real `packer build -only=null.*` of the GPU template provisions a stock Debian 12 container over SSH
with the template's own provisioners (install.sh, `emp-agent bootstrap --until prepare`, the identity scrub).
The result is then booted as an instance's first boot: it gets its own identity and the agent reaches ready with
the baked models, without pulling them again."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent.identity import machine_id as derive_machine_id
from tests.helpers import wait_until
from tests.hostint.container import Container
from tests.hostint.rootfs import rootfs_fixture, tree_wheelhouse_fixture, wait_ready  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
PACKER_DIR = REPO / "packer"
TEMPLATES = sorted(PACKER_DIR.glob("*.pkr.hcl"))
DEMO = tomllib.loads((REPO / "profiles" / "demo.toml").read_text())["models"]["demo-checkpoint"]
MODEL = f"/var/lib/emp-agent/models/{DEMO['dest']}"

pytestmark = [pytest.mark.slow, pytest.mark.hostint, pytest.mark.timeout(400)]

#: No index, no version check, no plugin download: Debian's packer with its built-in builders only.
PACKER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "CHECKPOINT_DISABLE": "1"}
#: Lists the processes of the agent or of a profile's services in the container (its own argv is `python3 -`).
FIND_AGENT_PROCESSES = """
import os
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    text = b" ".join(argv).decode(errors="replace")
    if "/opt/emp-agent/" in text or "agent.demo_service" in text or "http.server" in text or "redis-server" in text:
        print(pid, text)
"""


@pytest.fixture(autouse=True)
def _need_packer() -> None:
    if shutil.which("packer") is None:
        pytest.fail("packer is missing: apt-get install packer (scripts/test installs it)")


def packer(*argv: str, home: Path, cwd: Path | None = None, netns_of: int | None = None, timeout: float = 60):  # type: ignore[no-untyped-def]
    """Run packer (in the network namespace of the container whose PID 1 is `netns_of`, when given)."""
    prefix = ["nsenter", "-t", str(netns_of), "-n"] if netns_of is not None else []
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [*prefix, "packer", *argv],
        cwd=cwd or home,
        env={**PACKER_ENV, "HOME": str(home), "TMPDIR": str(home)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ssh_key(directory: Path) -> Path:
    """A fresh ed25519 key pair: directory/id, directory/id.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "emp-packer-test", "-f", str(directory / "id")],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return directory / "id"


def validate_vars(short_tmp: Path) -> list[str]:
    """What `packer validate` needs besides the templates: a wheelhouse directory (file provisioner sources must
    exist), a GCP project and an SSH key for the null source."""
    wheelhouse = short_tmp / "wheelhouse"
    wheelhouse.mkdir(exist_ok=True)
    (wheelhouse / "emp_agent-0.0.0-py3-none-any.whl").write_bytes(b"")
    key = short_tmp / "keys" / "id"
    if not key.exists():
        ssh_key(key.parent)
    return [
        "-var",
        f"wheelhouse={wheelhouse}",
        "-var",
        "gcp_project_id=emp-test",
        "-var",
        f"null_ssh_private_key_file={key}",
    ]


@pytest.mark.parametrize("template", TEMPLATES, ids=[path.name for path in TEMPLATES])
def test_template_validates_and_is_formatted(template: Path, short_tmp: Path) -> None:
    """Each template validates with Debian's packer 1.6.6 (every source, its provisioners' files present) and is in
    `packer fmt` form; it has the amazon-ebs, googlecompute and null sources and no Packer >= 1.7 block."""
    proc = packer("validate", *validate_vars(short_tmp), str(template), home=short_tmp / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = packer("fmt", "-check", "-diff", str(template), home=short_tmp / "home")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = template.read_text()
    assert not re.search(r"^\s*(packer\s*\{|required_plugins)", text, re.M)
    for kind in ("amazon-ebs", "googlecompute", "null"):
        assert re.search(rf'^source "{kind}" "', text, re.M), kind


def test_templates_exist_for_base_and_gpu() -> None:
    """There is a base and a GPU template; only the GPU one bakes a profile (bootstrap --until prepare), and both
    end with the identity scrub."""
    assert {path.name for path in TEMPLATES} >= {"base.pkr.hcl", "gpu.pkr.hcl"}
    gpu, base = (PACKER_DIR / "gpu.pkr.hcl").read_text(), (PACKER_DIR / "base.pkr.hcl").read_text()
    assert "scripts/bake-profile.sh" in gpu
    assert "scripts/bake-profile.sh" not in base
    assert "emp-agent bootstrap --until prepare" in (PACKER_DIR / "scripts" / "bake-profile.sh").read_text()
    for text in (gpu, base):
        provisioners = re.findall(r'^  provisioner "([a-z-]+)"', text, re.M)
        assert provisioners == ["shell", "file", "file", "shell", "shell"]
        assert text.rstrip().endswith('script = "${path.root}/scripts/scrub-identity.sh"\n  }\n}')


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("instance_type = var.aws_instance_type", "instance_typ = var.aws_instance_type"),
            'Did you mean "instance_type"?',
        ),
        (('provisioner "file"', 'provisioner "fiel"'), "Unknown provisioner type"),
        (("region        = var.aws_region", "region        = var.aws_regoin"), "aws_regoin"),
        (('scripts/scrub-identity.sh"', 'scripts/scrub-identities.sh"'), "scrub-identities.sh"),
    ],
    ids=["argument-typo", "unknown-provisioner", "undefined-variable", "missing-script"],
)
def test_validate_rejects_a_broken_copy(edit: tuple[str, str], message: str, short_tmp: Path) -> None:
    """The check is not a rubber stamp: a copy of the GPU template (with its scripts next to it) validates, and the
    same copy with one mistake fails with rc 1 and a message naming it; an unformatted copy fails `fmt -check`."""
    copy = short_tmp / "packer"
    shutil.copytree(PACKER_DIR, copy, ignore=shutil.ignore_patterns("*.md"))
    template = copy / "gpu.pkr.hcl"
    variables = [*validate_vars(short_tmp), "-var", f"install_sh={REPO / 'bootstrap' / 'install.sh'}"]
    assert packer("validate", *variables, str(template), home=short_tmp / "home").returncode == 0
    good = template.read_text()
    old, new = edit
    assert old in good
    template.write_text(good.replace(old, new, 1))
    proc = packer("validate", *variables, str(template), home=short_tmp / "home")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in " ".join((proc.stdout + proc.stderr).split())  # packer wraps its messages
    template.write_text(good.replace("  sources = [", "  sources    =   ["))
    assert packer("fmt", "-check", str(template), home=short_tmp / "home").returncode == 3


def snapshot(ct: Container, dest: Path) -> None:
    """Copy the container's root filesystem as it is now (the tree plus every change the build made, deletions
    included) to `dest`: the "image". Mount points come back as empty directories."""
    assert ct.pid is not None
    dest.mkdir()
    root = f"/proc/{ct.pid}/root"
    subprocess.run(
        [
            "bash",
            "-c",
            'set -o pipefail; tar -C "$1" --one-file-system --numeric-owner -cf - . | tar -C "$2" --numeric-owner -xf -',
            "snapshot",
            root,
            str(dest),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for name, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777)):
        (dest / name).mkdir(exist_ok=True)
        (dest / name).chmod(mode)


def exists(ct: Container, path: str) -> bool:
    return ct.run("test", "-e", path, check=False).returncode == 0


def read(ct: Container, path: str) -> str:
    return ct.run("cat", path).stdout


def test_null_build_bakes_the_gpu_image_and_it_first_boots_with_its_own_identity(
    rootfs: Path, tree_wheelhouse: Path, short_tmp: Path
) -> None:
    """`packer build -only=null.*` of packer/gpu.pkr.hcl over SSH into a booted Debian 12 container (profile demo,
    the wheelhouse uploaded): afterwards emp-agent is installed and enabled but not running and nothing of the
    bake runs; the profile's model is in place, verified and owned by emp-agent; the machine id, the agent's
    identity and state, cloud-init's state and the SSH host keys are gone. Booting that tree as a new instance
    (cloud-init with a new instance id): systemd makes a new machine id, the agent derives a new machine id from
    it, reaches phase ready without pulling the model again (its source is corrupted first), and sshd runs with
    new host keys."""
    key = ssh_key(short_tmp / "keys")
    prepare = (
        "touch /etc/cloud/cloud-init.disabled\n"  # the build machine: sshd only, reached with the test's key
        "mkdir -p -m 700 /root/.ssh\n"
        "cp /mnt/emp-keys/id.pub /root/.ssh/authorized_keys\n"
        "chmod 600 /root/.ssh/authorized_keys\n"
    )
    image = short_tmp / "image"
    with Container(short_tmp / "build", lower=rootfs, binds=[(key.parent, "/mnt/emp-keys")], prepare=prepare) as ct:
        assert ct.wait_running(timeout=120) == "running"
        wait_until(lambda: exists(ct, "/run/sshd.pid"), timeout=30, interval=0.1, what="sshd")
        build_machine_id = read(ct, "/etc/machine-id").strip()
        build_host_key = read(ct, "/etc/ssh/ssh_host_ed25519_key.pub")
        assert build_machine_id
        proc = packer(
            "build",
            "-color=false",
            "-only=null.*",
            "-var",
            f"wheelhouse={tree_wheelhouse}",
            "-var",
            "profile=demo",
            "-var",
            f"null_ssh_private_key_file={key}",
            str(PACKER_DIR / "gpu.pkr.hcl"),
            home=short_tmp / "home",
            netns_of=ct.pid,
            timeout=300,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-6000:]
        assert re.search(r"pull_models +done +1 model\(s\) in place: 1 pulled", output), output[-6000:]
        assert "bake-profile.sh: profile demo baked" in output

        # Installed and enabled for the next boot, not running; nothing of the bake left running.
        assert ct.run("systemctl", "is-enabled", "emp-agent", check=False).stdout.strip() == "enabled"
        assert ct.run("systemctl", "is-active", "emp-agent", check=False).stdout.strip() == "inactive"
        assert ct.run("python3", "-", input=FIND_AGENT_PROCESSES).stdout == ""
        assert read(ct, "/etc/emp-agent/agent.toml").startswith('profile = "demo"\n')
        # The profile's model, verified, owned by the service's user, with its index.
        assert ct.run("sha256sum", MODEL).stdout.split()[0] == DEMO["sha256"]
        assert ct.run("stat", "-c", "%U", MODEL, "/var/lib/emp-agent").stdout.split() == ["emp-agent"] * 2
        assert DEMO["dest"] in read(ct, "/var/lib/emp-agent/models.json")
        # The build machine's identity is gone.
        assert ct.run("stat", "-c", "%s", "/etc/machine-id").stdout.strip() == "0"
        for gone in (
            "/var/lib/dbus/machine-id",
            "/var/lib/emp-agent/machine-id",
            "/var/lib/emp-agent/processes.json",
            "/var/lib/emp-agent/bootstrap.json",
            "/var/lib/emp-agent/registry",
            "/var/lib/cloud/instance",
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_rsa_key",
            "/tmp/emp-agent-bake",
        ):
            assert not exists(ct, gone), gone
        assert ct.run("find", "/var/log/emp-agent", "-mindepth", "1").stdout == ""
        snapshot(ct, image)

    # The image's first boot, as a new instance: cloud-init runs (NoCloud, a new instance id), and the model's
    # source now holds other bytes, so that pulling it again would fail verification.
    seed = short_tmp / "seed"
    seed.mkdir()
    (seed / "meta-data").write_text("instance-id: iid-emp-test-from-image\nlocal-hostname: emp-gpu-clone\n")
    (seed / "user-data").write_text("#cloud-config\n{}\n")
    prepare = (
        "rm -f /etc/cloud/cloud-init.disabled /root/.ssh/authorized_keys\n"
        f"head -c {DEMO['size']} /dev/zero > /etc/emp-agent/profiles/assets/demo-checkpoint.bin\n"
    )
    with Container(
        short_tmp / "clone", lower=image, binds=[(seed, "/var/lib/cloud/seed/nocloud")], prepare=prepare
    ) as ct:
        state = ct.wait_running(timeout=180)
        ci = ct.run("cloud-init", "status", "--wait", "--long", check=False, timeout=120)
        assert ci.returncode == 0, ci.stdout + ci.stderr
        status = wait_ready(ct)
        journal = ct.run("journalctl", "-u", "emp-agent", "--no-pager", "-n", "80").stdout
        assert state == "running", ct.run("systemctl", "--failed", "--no-legend").stdout
        stages = {stage["name"]: stage for stage in status["stages"]}  # type: ignore[union-attr]
        assert stages["pull_models"]["state"] == "done", journal
        assert re.search(r"1 model\(s\) in place: 0 pulled", str(stages["pull_models"]["detail"])), stages
        new_machine_id = read(ct, "/etc/machine-id").strip()
        assert new_machine_id
        assert new_machine_id != build_machine_id
        stored = read(ct, "/var/lib/emp-agent/machine-id").splitlines()
        assert status["machine_id"] == stored[0]
        etc = short_tmp / "etc-machine-id"
        etc.write_text(f"{new_machine_id}\n")
        assert stored[0] == derive_machine_id(None, short_tmp / "derive-new", etc_machine_id=etc)
        etc.write_text(f"{build_machine_id}\n")
        assert stored[0] != derive_machine_id(None, short_tmp / "derive-old", etc_machine_id=etc)
        assert ct.run("systemctl", "is-active", "ssh").stdout.strip() == "active"
        assert read(ct, "/etc/ssh/ssh_host_ed25519_key.pub") != build_host_key
        assert os.path.getsize(image / MODEL.lstrip("/")) == DEMO["size"]
        assert hashlib.sha256((image / MODEL.lstrip("/")).read_bytes()).hexdigest() == DEMO["sha256"]
