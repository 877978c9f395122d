"""emp-agent under a real systemd (PID 1 in fresh namespaces on an overlay of this host's root, container.py),
installed the way operators install it: `install.sh --wheelhouse` from the offline wheelhouse, profile demo (the
embedded registry plus model-server-0 and inference-0). One container for the module; every test first brings
the agent to the state it needs (ensure_ready / a fresh start), so each can also run alone.

Measured numbers are printed with a `hostint:` prefix (pytest -s shows them)."""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tests.hostint.container import Container, require_host

#: The first test also builds the session's wheelhouse (pip downloads and compiles on a cold cache).
pytestmark = [pytest.mark.slow, pytest.mark.hostint, pytest.mark.timeout(300)]

UNIT = "emp-agent"
AGENT = "/opt/emp-agent/bin/emp-agent"
UNIT_CGROUP = "/sys/fs/cgroup/system.slice/emp-agent.service"
#: Watchdog for these tests (the unit ships 30 s): the agent pings every half of it from its event loop.
WATCHDOG_S = 3
#: What each instance of the demo profile runs.
SERVICES = {
    "emp-registry": r"/(valkey|redis)-server\b",
    "model-server-0": r" -m http\.server 18100 ",
    "inference-0": r" -m agent\.demo_service --port 18200 ",
}
#: The one log writer that carries every instance's output.
LOG_WRITER = r" -I -S \S+/agent/logwriter\.py\b"
#: Host units that would start in a container of the host root (the *.wants links are removed as well).
MASK = [
    "getty@.service",
    "console-getty.service",
    "serial-getty@.service",
    "systemd-timesyncd.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "dpkg-db-backup.timer",
    "logrotate.timer",
]
PREPARE = "rm -f /etc/systemd/system/*.wants/*\n" + "".join(f"ln -sf /dev/null /etc/systemd/system/{u}\n" for u in MASK)
#: The only lines a second install.sh run may print: nothing changed.
UNCHANGED = re.compile(r"^install\.sh: (emp-agent (\S+) in /opt/emp-agent \(was \2\)|done)$")
#: What the idempotence check fingerprints: every path install.sh writes.
INSTALLED = [
    "/opt/emp-agent",
    "/usr/local/bin/emp-agent",
    "/etc/emp-agent",
    "/etc/systemd/system/emp-agent.service",
    "/etc/systemd/system/multi-user.target.wants/emp-agent.service",
    "/usr/lib/sysusers.d/emp-agent.conf",
]


@dataclass
class Host:
    """The booted container with emp-agent installed (not started), and what the first install printed."""

    ct: Container
    install: str
    numbers: dict[str, float] = field(default_factory=dict)

    def run(self, *argv: str, timeout: float = 120) -> str:
        return self.ct.run(*argv, timeout=timeout).stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", UNIT, *(f"-p{p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def status(self) -> dict[str, Any]:
        """`emp-agent status --json` over /run/emp-agent/agent.sock, as root inside the container."""
        return json.loads(self.run(AGENT, "status", "--json", timeout=30))  # type: ignore[no-any-return]

    def status_or_none(self) -> dict[str, Any] | None:
        """The status, or None while the agent does not answer (restarting)."""
        proc = self.ct.run(AGENT, "status", "--json", check=False, timeout=30)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *matches)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def unit_processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process in the unit's cgroup, in the container's PID namespace."""
        script = (
            f"[ -e {UNIT_CGROUP}/cgroup.procs ] || exit 0; "
            f"for p in $(cat {UNIT_CGROUP}/cgroup.procs); do "
            "printf '%s ' $p; tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null; echo; done"
        )
        rows = []
        for line in self.run("sh", "-c", script).splitlines():
            pid, _, cmdline = line.partition(" ")
            rows.append((int(pid), " " + cmdline))
        return rows

    def note(self, name: str, seconds: float) -> None:
        self.numbers[name] = seconds
        print(f"\nhostint: {name} {seconds:.2f} s")


def service_pids(status: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: s["pid"] for s in status["services"]}


def counts(host: Host) -> dict[str, int]:
    """How many processes of each instance, of the log writer and of the agent run in the unit's cgroup (one each,
    always)."""
    procs = host.unit_processes()
    result = {}
    for name, pattern in SERVICES.items():
        result[name] = sum(1 for _, cmd in procs if re.search(pattern, cmd))
    result["log writer"] = sum(1 for _, cmd in procs if re.search(LOG_WRITER, cmd))
    result["agent"] = sum(1 for _, cmd in procs if cmd.endswith(f"{AGENT} run "))
    return result


ONE_EACH = {**{n: 1 for n in SERVICES}, "log writer": 1, "agent": 1}


def said(entries: list[dict[str, Any]], event: str, **fields: str) -> bool:
    """Whether the agent logged `event` (with these key=value fields) in these journal entries: native journal
    fields (MESSAGE "event key=value ...") or a JSON line on stderr."""
    for entry in entries:
        message = entry.get("MESSAGE")
        if not isinstance(message, str):
            continue
        if message.startswith("{"):
            try:
                doc = json.loads(message)
            except ValueError:
                continue
            if doc.get("event") == event and all(json.dumps(doc.get(k)).strip('"') == v for k, v in fields.items()):
                return True
        elif (message == event or message.startswith(event + " ")) and all(
            f" {k}={v}" in message for k, v in fields.items()
        ):
            return True
    return False


def ensure_ready(host: Host) -> dict[str, Any]:
    """Start the agent unless it runs; return its status once the phase is ready."""
    if host.show("ActiveState")["ActiveState"] != "active":
        host.run("systemctl", "start", UNIT)
    main = host.show("MainPID")["MainPID"]

    def ready() -> dict[str, Any] | None:
        status = host.status_or_none()
        return status if status is not None and status["phase"] == "ready" and str(status["pid"]) == main else None

    status = wait_until(ready, timeout=60, interval=0.1, what="agent phase ready")
    assert status is not None
    return status


def wait_restarted(host: Host, old_pid: str) -> dict[str, str]:
    """systemd's view once the unit is active again with a new main process."""

    def restarted() -> dict[str, str] | None:
        props = host.show("ActiveState", "MainPID", "NRestarts")
        return props if props["ActiveState"] == "active" and props["MainPID"] not in ("0", old_pid) else None

    props = wait_until(restarted, timeout=60, interval=0.1, what="the agent restarted")
    assert props is not None
    return props


@pytest.fixture(scope="module")
def host(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """Boot, install from /opt/wheels with `--no-start`, set profile demo and a 3 s watchdog (drop-in)."""
    require_host()
    ct = Container(tmp_path_factory.mktemp("ct-systemd"), binds=[(wheelhouse, "/opt/wheels")], prepare=PREPARE)
    t0 = time.monotonic()
    ct.boot()
    try:
        state = ct.wait_running()
        print(f"\nhostint: container boot to {state} {time.monotonic() - t0:.2f} s")
        t0 = time.monotonic()
        first = ct.run("bash", "/opt/wheels/install.sh", "--wheelhouse", "/opt/wheels", "--no-start", timeout=300)
        print(f"hostint: install.sh (first run) {time.monotonic() - t0:.2f} s")
        ct.run("sh", "-c", "echo EMP_AGENT_PROFILE=demo >> /etc/emp-agent/env")
        ct.run("mkdir", "-p", "/etc/systemd/system/emp-agent.service.d")
        ct.run(
            "sh",
            "-c",
            "cat > /etc/systemd/system/emp-agent.service.d/50-hostint.conf",
            input=f"[Service]\nWatchdogSec={WATCHDOG_S}\n",
        )
        ct.run("systemctl", "daemon-reload")
        yield Host(ct, first.stdout + first.stderr)
    finally:
        ct.stop()


def fingerprint(host: Host) -> str:
    """Every installed path with type, mode, owner, size and mtime (links: their target); the files' hashes."""
    paths = " ".join(shlex.quote(p) for p in INSTALLED)
    return host.run(
        "sh",
        "-c",
        f"find {paths} ! -type l -printf '%p %y %m %u:%g %s %T@\\n' | sort; "
        f"find {paths} -type l -printf '%p -> %l\\n' | sort; "  # install.sh re-links /usr/local/bin/emp-agent
        f"find {paths} -type f -print0 | sort -z | xargs -0 sha256sum; "
        "grep -c '^emp-agent:' /etc/passwd /etc/group /etc/shadow /etc/gshadow; id emp-agent; "
        "systemctl is-enabled emp-agent",
    )


def test_installer_twice_changes_nothing(host: Host) -> None:
    """A second `install.sh --wheelhouse` run on an installed host changes no file (same content, mode, owner and
    mtime under /opt/emp-agent, /etc/emp-agent, the unit and its enablement; operator edits to /etc/emp-agent/env
    kept), creates no second account, and says only that the version is unchanged and done."""
    assert "install.sh: wrote /etc/systemd/system/emp-agent.service" in host.install
    assert "install.sh: created user emp-agent" in host.install
    before = fingerprint(host)
    second = host.ct.run("bash", "/opt/wheels/install.sh", "--wheelhouse", "/opt/wheels", "--no-start", timeout=300)
    after = fingerprint(host)
    changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
    assert changed == [], "\n".join(changed[:40])
    assert [line for line in second.stdout.splitlines() if not UNCHANGED.match(line)] == []
    assert second.stdout.rstrip().endswith("install.sh: done")
    assert second.stderr == ""
    assert "/etc/passwd:1\n/etc/group:1\n/etc/shadow:1\n/etc/gshadow:1\n" in before
    assert "EMP_AGENT_PROFILE=demo" in host.run("cat", "/etc/emp-agent/env")
    assert host.run("stat", "-c", "%a %U", "/etc/emp-agent/env").split() == ["600", "root"]


def test_start_returns_after_ready(host: Host) -> None:
    """`systemctl start emp-agent` (Type=notify) returns only once the agent sent READY=1 after its bootstrap:
    the unit is active/running at once, every bootstrap stage is done, the journal has "bootstrap finished"
    before systemd's "Started"; the phase is ready, StatusText is the agent's STATUS line and `systemctl status`
    shows it."""
    if host.show("ActiveState")["ActiveState"] != "inactive":
        host.run("systemctl", "stop", UNIT)
    t0 = time.monotonic()
    host.run("systemctl", "start", UNIT, timeout=300)
    host.note("start->active", time.monotonic() - t0)
    props = host.show("ActiveState", "SubState", "MainPID", "InvocationID", "WatchdogUSec", "StatusText")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["WatchdogUSec"] == f"{WATCHDOG_S}s"
    status = host.status()
    assert str(status["pid"]) == props["MainPID"]
    assert status["stages"]
    assert all(stage["state"] == "done" for stage in status["stages"]), status["stages"]
    invocation = host.journal(f"_SYSTEMD_INVOCATION_ID={props['InvocationID']}")
    assert said(invocation, "bootstrap finished")
    started = [e for e in host.journal("_PID=1", f"INVOCATION_ID={props['InvocationID']}") if "Started" in e["MESSAGE"]]
    finished = [e for e in invocation if said([e], "bootstrap finished")]
    assert started
    assert finished
    assert int(finished[0]["__MONOTONIC_TIMESTAMP"]) < int(started[0]["__MONOTONIC_TIMESTAMP"])
    wait_until(lambda: host.status()["phase"] == "ready", timeout=30, interval=0.1, what="phase ready")
    wait_until(lambda: host.show("StatusText")["StatusText"] == "ready", timeout=30, interval=0.1, what="STATUS=ready")
    shown = host.ct.run("systemctl", "status", "--no-pager", "-n", "0", UNIT)
    assert "Active: active (running)" in shown.stdout
    assert 'Status: "ready"' in shown.stdout
    assert f"Main PID: {props['MainPID']} (emp-agent)" in shown.stdout


def test_journal_fields(host: Host) -> None:
    """Under systemd the agent logs to journald with native fields: `journalctl -u emp-agent EMP_SERVICE=inference-0`
    and `EMP_STAGE=register` return its lines, each with SYSLOG_IDENTIFIER=emp-agent, a PRIORITY and the
    EMP_MACHINE_ID of the status."""
    status = ensure_ready(host)
    for match in ("EMP_SERVICE=inference-0", "EMP_STAGE=register"):
        entries = host.journal("-u", UNIT, match)
        assert entries, f"journalctl -u emp-agent {match} returned nothing"
        for entry in entries:
            assert entry["SYSLOG_IDENTIFIER"] == "emp-agent", entry
            assert entry["PRIORITY"] in "01234567", entry
            assert entry["EMP_MACHINE_ID"] == status["machine_id"], entry
            assert entry["_TRANSPORT"] == "journal", entry  # sent natively, not parsed from stderr
    warnings = host.journal("-u", UNIT, "SYSLOG_IDENTIFIER=emp-agent", "PRIORITY=4")
    assert all("EMP_MACHINE_ID" in e for e in warnings)


def test_sigkill_restarts_and_adopts(host: Host) -> None:
    """SIGKILL of the agent's main process: systemd restarts it (NRestarts +1, Restart=on-failure) and the new
    agent adopts the services the old one left running (KillMode=process): same pids, and never a second copy
    of any service or log writer in the unit's cgroup (the old writer goes on carrying the adopted services'
    output; the new agent starts one only for what it starts)."""
    status = ensure_ready(host)
    before = service_pids(status)
    assert set(before) == set(SERVICES)
    assert counts(host) == ONE_EACH
    old = host.show("MainPID", "NRestarts")
    t0 = time.monotonic()
    host.run("systemctl", "kill", "--kill-who=main", "-s", "KILL", UNIT)
    new = wait_restarted(host, old["MainPID"])
    host.note("SIGKILL->active again (RestartSec=5s)", time.monotonic() - t0)
    assert int(new["NRestarts"]) == int(old["NRestarts"]) + 1
    after = ensure_ready(host)
    assert str(after["pid"]) == new["MainPID"]
    assert service_pids(after) == before
    assert counts(host) == ONE_EACH


def test_watchdog_restarts_a_stopped_agent(host: Host) -> None:
    """SIGSTOP of the agent's main process stops its WATCHDOG=1 pings: after WatchdogSec (3 s here) systemd
    records Result=watchdog ("Watchdog timeout" in the journal), kills and restarts it (NRestarts +1), and the new
    agent adopts the services (same pids, one of each)."""
    status = ensure_ready(host)
    before = service_pids(status)
    old = host.show("MainPID", "NRestarts", "InvocationID")
    t0 = time.monotonic()
    host.run("systemctl", "kill", "--kill-who=main", "-s", "STOP", UNIT)
    wait_until(
        lambda: (
            host.show("Result")["Result"] == "watchdog"
            or int(host.show("NRestarts")["NRestarts"]) > int(old["NRestarts"])
        ),
        timeout=WATCHDOG_S + 15,
        interval=0.05,
        what="the watchdog to fire",
    )
    fired = time.monotonic() - t0
    host.note("SIGSTOP->watchdog fired", fired)
    new = wait_restarted(host, old["MainPID"])
    host.note("SIGSTOP->active again (RestartSec=5s)", time.monotonic() - t0)
    assert fired < WATCHDOG_S + 5
    assert int(new["NRestarts"]) == int(old["NRestarts"]) + 1
    messages = [e["MESSAGE"] for e in host.journal("_PID=1", f"INVOCATION_ID={old['InvocationID']}")]
    assert any("Watchdog timeout" in m for m in messages), messages
    assert any("Failed with result 'watchdog'" in m for m in messages), messages
    after = ensure_ready(host)
    assert service_pids(after) == before
    assert counts(host) == ONE_EACH


def test_reload_keeps_the_agent_serving(host: Host) -> None:
    """`systemctl reload emp-agent` (what operators and config tools run after editing /etc/emp-agent) never
    takes the machine down: afterwards the same agent process is active, phase ready, with the same services.
    (A unit without ExecReload= refuses the reload instead, which passes too.)"""
    status = ensure_ready(host)
    old = host.show("MainPID", "NRestarts")
    reload = host.ct.run("systemctl", "reload", UNIT, check=False, timeout=120)
    # ExecReload's kill has returned, so a signal is pending: two round trips through the agent's event loop
    # (each takes several loop iterations) let its handler run and the agent act on it before we look.
    answers = [host.status_or_none(), host.status_or_none()]
    why = f"systemctl reload (rc {reload.returncode}) took the agent down:\n" + host.run(
        "journalctl", "--no-pager", "-u", UNIT, "-n", "15"
    )
    assert answers[1] is not None, why
    assert (answers[1]["phase"], answers[1]["pid"]) == ("ready", status["pid"]), why
    assert host.show("ActiveState", "MainPID", "NRestarts") == {"ActiveState": "active", **old}, why
    assert service_pids(answers[1]) == service_pids(status)


def test_stop_leaves_nothing(host: Host) -> None:
    """`systemctl stop emp-agent`: the agent stops every service itself and exits 0 well within TimeoutStopSec;
    no process of the unit is left (its cgroup is gone, no service runs anywhere in the container), systemd
    killed nothing, and the journal shows the agent deregistered and stopped unforced."""
    ensure_ready(host)
    old = host.show("MainPID", "InvocationID")
    t0 = time.monotonic()
    host.run("systemctl", "stop", UNIT, timeout=330)
    host.note("stop->inactive", time.monotonic() - t0)
    props = host.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus", "ControlGroup")
    assert props == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED
        "ExecMainStatus": "0",
        "ControlGroup": "",
    }
    assert host.ct.run("test", "-e", UNIT_CGROUP, check=False).returncode == 1
    everything = host.run("sh", "-c", "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done 2>/dev/null")
    for name, pattern in SERVICES.items():
        assert not re.search(pattern, everything), f"{name} still runs after stop"
    invocation = host.journal(f"_SYSTEMD_INVOCATION_ID={old['InvocationID']}")
    assert said(invocation, "deregistered")
    assert said(invocation, "stopped", forced="false")
    systemd = [e["MESSAGE"] for e in host.journal("_PID=1", f"INVOCATION_ID={old['InvocationID']}")]
    assert not [m for m in systemd if re.search(r"Killing process|remains running|timed out|SIGKILL", m)], systemd
