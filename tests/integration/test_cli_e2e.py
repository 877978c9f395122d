"""The whole agent through the real CLI: demo profile to `ready`, restart after SIGKILL, clean SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from agent.registry import keys
from tests.conftest import REPO, RedisServer
from tests.helpers import wait_until

PROGRAMS = REPO / "tests" / "programs"


class AgentProcess:
    """`python -m agent run` with its own dirs under a short temp path."""

    def __init__(self, root: Path, profile: Path, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMP_AGENT_")},
            "EMP_AGENT_STATE_DIR": str(root / "state"),
            "EMP_AGENT_RUNTIME_DIR": str(root / "run"),
            "EMP_AGENT_LOG_DIR": str(root / "log"),
            "EMP_AGENT_MODEL_ROOT": str(root / "models"),
            "EMP_AGENT_PROFILE": str(profile),
            "EMP_AGENT_HEARTBEAT_INTERVAL_S": "0.5",
            "EMP_AGENT_LOG_FORMAT": "json",
            **(extra_env or {}),
        }
        self.log = (root / "agent.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=root
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
        )

    def status(self) -> dict[str, Any] | None:
        result = self.cli("status", "--json")
        if result.returncode not in (0, 1, 4):  # ready, failed, partial; 3 means not running (yet)
            return None
        status: dict[str, Any] = json.loads(result.stdout)
        assert {"ready": 0, "failed": 1}.get(status["phase"], 4) == result.returncode
        return status

    def wait_phase(self, *phases: str, timeout: float = 90) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            assert self.process.poll() is None, f"agent exited early: {self.read_log()}"
            status = self.status()
            return status if status and status["phase"] in phases else None

        return wait_until(reached, timeout, interval=0.2, what=f"phase in {phases}")

    def read_log(self) -> str:
        return (self.root / "agent.log").read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            self.log.close()


@pytest.fixture
def agent_dirs(short_tmp: Path) -> Iterator[Path]:
    return short_tmp


def service(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status["services"] if s["name"] == name)


def family(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [pid] + [child.pid for child in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_demo_profile_end_to_end(agent_dirs: Path) -> None:
    """Demo boots to ready on the embedded registry, serves, survives SIGKILL of a service, stops clean."""
    agent = AgentProcess(agent_dirs, REPO / "profiles" / "demo.toml")
    try:
        status = agent.wait_phase("ready", "failed")
        assert "ready" == status["phase"], agent.read_log()
        assert ["done"] * 7 == [s["state"] for s in status["stages"]]
        assert {"emp-registry": "RUNNING", "model-server-0": "RUNNING", "inference-0": "RUNNING"} == {
            s["name"]: s["state"] for s in status["services"]
        }
        assert [("demo-checkpoint", "pulled")] == [(m["name"], m["state"]) for m in status["models"]]
        assert status["registry"]["embedded"]
        assert status["registry"]["connected"]

        store = redis.Redis(
            unix_socket_path=str(agent_dirs / "state" / "registry" / "redis.sock"), decode_responses=True
        )
        key = keys.machine_key(status["machine_id"])
        stored = wait_until(
            lambda: (r := store.hgetall(key)) and r["phase"] == "ready" and r, 20, what="ready record in redis"
        )
        assert ["demo-inference", "model-files"] == json.loads(stored["services_ready"])

        inference = service(status, "inference-0")
        request = urllib.request.Request(f"http://127.0.0.1:{inference['port']}/prompt", data=b'{"prompt": "a cat"}')
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        assert "bbbde649b2a1721d4bcb9fd3626f8711ac11bb57fe7e7848adf11c8d0bd65792" == answer["model"]

        os.kill(inference["pid"], signal.SIGKILL)
        restarted = wait_until(
            lambda: (
                (s := agent.status())
                and service(s, "inference-0")["restarts"] == 1
                and service(s, "inference-0")["state"] == "RUNNING"
                and s
            ),
            60,
            interval=0.2,
            what="inference-0 restarted",
        )
        assert inference["pid"] != service(restarted, "inference-0")["pid"]

        pids = family(agent.process.pid)
        assert len(pids) >= 4
    finally:
        code = agent.stop()

    assert 0 == code, agent.read_log()
    assert [] == [pid for pid in pids if alive(pid)]
    assert not (agent_dirs / "run" / "agent.sock").exists()
    assert 3 == agent.cli("status").returncode


#: Libraries the long-running agent must never hold: the GPU binding (the probe is a child), the HTTP client and
#: retry stack (the model pull is a child), a second Redis client, aiohttp; and wsproto until a client upgrades.
NOT_IN_THE_DAEMON = ("pynvml", "httpx", "httpcore", "h2", "idna", "certifi", "tenacity", "valkey", "aiohttp", "wsproto")


@pytest.mark.slow
def test_the_running_daemon_holds_no_library_it_does_not_use(agent_dirs: Path) -> None:
    """The agent that ran the demo through every stage (a model pulled, the GPU probed, services started and
    registered) and then stopped never imported the pull's HTTP stack, the GPU binding or a second Redis client:
    checked in the real process, so a lazy import on any path of `run` is caught. It runs optimised, as the
    systemd unit runs it (PYTHONOPTIMIZE=2: no docstrings, no asserts)."""
    site = agent_dirs / "site"
    site.mkdir()
    # Every Python process that inherits PYTHONPATH writes the modules it held at exit, under its own pid.
    (site / "sitecustomize.py").write_text(
        "import atexit, json, os, sys\n"
        f"atexit.register(lambda: open(f'{site}/{{os.getpid()}}.json', 'w').write(json.dumps(sorted(sys.modules))))\n"
    )
    agent = AgentProcess(
        agent_dirs,
        REPO / "profiles" / "demo.toml",
        {"PYTHONPATH": f"{site}:{REPO}", "PYTHONOPTIMIZE": "2"},
    )
    try:
        status = agent.wait_phase("ready", "failed")
        assert "ready" == status["phase"], agent.read_log()
        assert [("demo-checkpoint", "pulled")] == [(m["name"], m["state"]) for m in status["models"]]
    finally:
        code = agent.stop()

    assert 0 == code, agent.read_log()
    held = json.loads((site / f"{agent.process.pid}.json").read_text())
    assert "agent.daemon" in held
    assert [] == [m for m in held if m.split(".")[0] in NOT_IN_THE_DAEMON]


@pytest.mark.slow
def test_failed_boot_is_visible_in_status_and_redis_and_sigterm_deregisters(
    agent_dirs: Path, redis_server: RedisServer
) -> None:
    """A model whose hash does not match fails the boot: phase failed with the reason, in status and in Redis."""
    asset = agent_dirs / "weights.bin"
    asset.write_bytes(b"not the weights you pinned")
    profile = agent_dirs / "broken.toml"
    profile.write_text(
        f'[models.w]\nurl = "file:weights.bin"\ndest = "w.bin"\nsha256 = "{"ab" * 32}"\n'
        f'[services.web]\ncommand = ["{sys.executable}", "-m", "http.server", "{{port}}"]\nport = 28080\n'
    )
    agent = AgentProcess(
        agent_dirs, profile, {"EMP_AGENT_REDIS_URL": redis_server.url, "EMP_AGENT_MACHINE_ID": "e2e-failed"}
    )
    client = redis_server.client()
    try:
        agent.wait_phase("failed")
        expected = ["done", "failed", "skipped", "skipped", "skipped", "done", "skipped"]
        status = wait_until(
            lambda: (s := agent.status()) and [st["state"] for st in s["stages"]] == expected and s,
            30,
            interval=0.2,
            what="bootstrap to finish",
        )
        assert "sha256 mismatch" in status["reasons"][0]
        assert [] == status["services"]
        stored = wait_until(lambda: client.hgetall(keys.machine_key("e2e-failed")), 20, what="record in redis")
        assert "failed" == stored["phase"]
        assert "sha256 mismatch" in json.loads(stored["reasons"])[0]
        assert not (agent_dirs / "models" / "w.bin").exists()
    finally:
        code = agent.stop()

    assert 0 == code
    assert 0 == client.exists(keys.machine_key("e2e-failed"))


@pytest.mark.slow
def test_second_signal_forces_the_stop(agent_dirs: Path) -> None:
    """A service ignoring SIGTERM with a long stop timeout is SIGKILLed when a second signal arrives."""
    pidfile = agent_dirs / "pids"
    profile = agent_dirs / "stubborn.toml"
    profile.write_text(
        f'[services.stubborn]\ncommand = ["{sys.executable}", "{PROGRAMS / "stubborn.py"}", "{pidfile}"]\n'
        f'stop_timeout_s = 600\n[services.stubborn.readiness]\nkind = "command"\n'
        f'command = ["test", "-s", "{pidfile}"]\ninterval_s = 0.05\n'
    )
    agent = AgentProcess(agent_dirs, profile)
    try:
        agent.wait_phase("ready")
        pids = [int(p) for p in pidfile.read_text().split()]
        agent.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "STOPPING" in agent.read_log(), 30, what="stop to begin")
        agent.process.send_signal(signal.SIGINT)
        code = agent.process.wait(60)
    finally:
        agent.stop()

    assert 1 == code
    assert [] == [pid for pid in pids if alive(pid)]


def test_check_reports_each_problem_and_starts_nothing(short_tmp: Path) -> None:
    """`emp-agent check` on a typo, a wrong type and a missing file: three lines, exit 2, no state written."""
    profile = short_tmp / "bad.toml"
    profile.write_text(
        '[services.web]\ncomand = ["x"]\ncommand = ["y"]\nport = "http"\n'
        f'[models.m]\nurl = "file:gone.bin"\ndest = "m.bin"\nsha256 = "{"0" * 64}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_AGENT_")}
    env["EMP_AGENT_STATE_DIR"] = str(short_tmp / "state")

    result = subprocess.run(
        [sys.executable, "-m", "agent", "check", "--profile", str(profile)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert 2 == result.returncode
    assert [
        f"error: {profile}: models.m.url: file not found: {short_tmp}/gone.bin",
        f"error: {profile}: services.web.comand: unknown field (typo?)",
        f"error: {profile}: services.web.port: Input should be a valid integer",
    ] == sorted(result.stderr.splitlines())
    assert not (short_tmp / "state").exists()


def test_detect_prints_the_fingerprint_as_a_table_or_json(short_tmp: Path) -> None:
    """`emp-agent detect` on this driverless machine: a readable table saying CPU-only, and --json with the same
    facts; exit 0 both times."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_AGENT_")}
    env["EMP_AGENT_MODEL_ROOT"] = str(short_tmp / "models")

    def detect(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", "detect", *extra], env=env, capture_output=True, text=True, timeout=60
        )

    table, as_json = detect(), detect("--json")

    assert (0, 0) == (table.returncode, as_json.returncode)
    data = json.loads(as_json.stdout)
    assert ("unavailable", []) == (data["gpus"]["state"], data["gpus"]["gpus"])
    assert f"cpu      {data['host']['cpu_model']}" in table.stdout
    assert "nvidia   unavailable" in table.stdout
    assert "CPU-only host" in table.stdout


@pytest.mark.slow
def test_sigterm_during_a_stuck_prepare_step_leaves_nothing_running(agent_dirs: Path) -> None:
    """Shutdown in the middle of the bootstrap cancels it and kills the step's process."""
    pidfile = agent_dirs / "step.pid"
    profile = agent_dirs / "stuck.toml"
    profile.write_text(f'[prepare.stuck]\ncommand = ["{sys.executable}", "{PROGRAMS / "hang.py"}", "{pidfile}"]\n')
    agent = AgentProcess(agent_dirs, profile)
    try:
        wait_until(pidfile.exists, 60, what="prepare step to start")
        step_pid = int(pidfile.read_text())
        status = agent.wait_phase("bootstrapping")
        assert "running" == next(s["state"] for s in status["stages"] if s["name"] == "prepare")
    finally:
        code = agent.stop()

    assert 0 == code
    assert not alive(step_pid)


@pytest.mark.slow
def test_agent_restarted_after_sigkill_adopts_survivors_and_replaces_changed_ones(agent_dirs: Path) -> None:
    """Process table case 2: after the agent is SIGKILLed, the next agent adopts what still runs as it was
    started (never two instances, same ports), replaces what the profile changed, and supervises the adopted
    ones for real: a SIGKILL of an adopted process is seen and restarted."""
    profiles = agent_dirs / "profiles"
    shutil.copytree(REPO / "profiles", profiles)
    first = AgentProcess(agent_dirs, profiles / "demo.toml")
    try:
        status = first.wait_phase("ready")
        before = {s["name"]: s for s in status["services"]}
        first.process.kill()
        first.process.wait(30)
        assert all(alive(s["pid"]) for s in before.values())
    finally:
        first.log.close()
    demo = profiles / "demo.toml"
    demo.write_text(demo.read_text().replace("port = 18200\n", 'port = 18200\nenv = { DEMO_VARIANT = "2" }\n'))

    second = AgentProcess(agent_dirs, profiles / "demo.toml")
    try:
        status = second.wait_phase("ready")
        after = {s["name"]: s for s in status["services"]}
        assert {n: s["port"] for n, s in before.items()} == {n: s["port"] for n, s in after.items()}
        assert before["model-server-0"]["pid"] == after["model-server-0"]["pid"]
        assert before["emp-registry"]["pid"] == after["emp-registry"]["pid"]
        assert before["inference-0"]["pid"] != after["inference-0"]["pid"]
        assert not alive(before["inference-0"]["pid"])
        start = next(st for st in status["stages"] if st["name"] == "start_services")
        assert start["detail"].endswith("(1 adopted from the previous agent)")

        adopted = after["model-server-0"]["pid"]
        os.kill(adopted, signal.SIGKILL)
        restarted = wait_until(
            lambda: (
                (s := second.status())
                and s["phase"] == "ready"
                and service(s, "model-server-0")["pid"] not in (None, adopted)
                and s
            ),
            60,
            interval=0.2,
            what="adopted model-server-0 restarted after SIGKILL",
        )
        assert (
            "exited (adopted from the previous agent: exit status unknown)"
            == service(restarted, "model-server-0")["last_error"]
        )
        pids = family(second.process.pid)
    finally:
        assert 0 == second.stop()

    assert [] == [pid for pid in pids if alive(pid)]
    assert not alive(after["emp-registry"]["pid"])


def ticks(log: Path) -> list[int]:
    """The numbers of ticker.py's lines in its log."""
    return [int(line.rsplit(b" ", 1)[1]) for line in log.read_bytes().splitlines() if b" tick " in line]


@pytest.mark.slow
def test_an_adopted_service_keeps_its_log_when_the_previous_agents_writer_dies(agent_dirs: Path) -> None:
    """After an agent SIGKILL the previous agent's log writer goes on draining the adopted service's output, and
    `reopen-logs` reaches it; when that writer is killed too, the service (which dies of SIGPIPE) lives on, the
    new agent's writer takes its pipe over, and the lines keep coming into the same file."""
    profile = agent_dirs / "ticker.toml"
    profile.write_text(f'[services.ticker]\ncommand = ["{sys.executable}", "{PROGRAMS / "ticker.py"}"]\n')
    log = agent_dirs / "log" / "ticker.log"
    first = AgentProcess(agent_dirs, profile)
    try:
        pid = service(first.wait_phase("ready"), "ticker")["pid"]
        writers = [
            p.pid for p in psutil.Process(first.process.pid).children() if "logwriter.py" in " ".join(p.cmdline())
        ]
        first.process.kill()
        first.process.wait(30)
    finally:
        first.log.close()
    assert 1 == len(writers)
    second = AgentProcess(agent_dirs, profile)
    try:
        assert pid == service(second.wait_phase("ready"), "ticker")["pid"]
        log.rename(log.with_name("ticker.log.rotated"))
        assert 0 == second.cli("reopen-logs", "ticker").returncode
        wait_until(lambda: log.exists() and len(ticks(log)) >= 10, 30, what="lines in the reopened file")

        os.kill(writers[0], signal.SIGKILL)
        seen = ticks(log)[-1]
        wait_until(lambda: ticks(log)[-1] > seen + 50, 30, interval=0.1, what="lines after the writer died")
        status = second.status()
        pids = family(second.process.pid)
    finally:
        assert 0 == second.stop()

    assert status is not None
    assert (pid, 0) == (service(status, "ticker")["pid"], service(status, "ticker")["restarts"])
    numbers = ticks(log)
    assert numbers == sorted(set(numbers))
    assert [] == [p for p in pids if alive(p)]


@pytest.mark.slow
def test_one_agent_per_state_dir_and_sighup_stops_cleanly(agent_dirs: Path) -> None:
    """A second agent on the same state dir is refused before touching anything; SIGHUP (a closed SSH
    session) shuts the first one down in order instead of orphaning its services."""
    first = AgentProcess(agent_dirs, REPO / "profiles" / "demo.toml")
    try:
        status = first.wait_phase("ready")
        second = subprocess.run(
            [sys.executable, "-m", "agent", "run"],
            env={**first.env, "EMP_AGENT_RUNTIME_DIR": str(agent_dirs / "run2")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert 1 == second.returncode
        assert f"another emp-agent (pid {first.process.pid}) is using {agent_dirs}/state" in second.stderr
        pids = [s["pid"] for s in status["services"]]
        first.process.send_signal(signal.SIGHUP)
        code = first.process.wait(60)
    finally:
        first.stop()

    assert 0 == code
    assert [] == [pid for pid in pids if alive(pid)]


@pytest.mark.slow
def test_operator_controls_services_through_the_cli(agent_dirs: Path) -> None:
    """stop/start/restart/signal by instance, service or `all`, one line per instance, documented exit codes."""
    agent = AgentProcess(agent_dirs, REPO / "profiles" / "demo.toml")
    try:
        status = agent.wait_phase("ready")
        first_pid = service(status, "model-server-0")["pid"]

        stop = agent.cli("stop", "inference")
        assert (0, "inference-0: stopped\n") == (stop.returncode, stop.stdout)
        stopped = agent.status()
        assert stopped is not None
        assert ("STOPPED", "degraded") == (service(stopped, "inference-0")["state"], stopped["phase"])
        assert 4 == agent.cli("status").returncode

        mixed = agent.cli("start", "inference-0", "nope")
        assert (4, "inference-0: started\nnope: ERROR (no such service)\n") == (mixed.returncode, mixed.stdout)
        agent.wait_phase("ready")

        again = agent.cli("start", "model-server-0")
        assert (1, "model-server-0: ERROR (already RUNNING)\n") == (again.returncode, again.stdout)

        restart = agent.cli("restart", "all")
        assert 0 == restart.returncode
        assert ["inference-0: restarted", "model-server-0: restarted"] == sorted(restart.stdout.splitlines())
        status = agent.wait_phase("ready")
        assert first_pid != service(status, "model-server-0")["pid"]
        assert "RUNNING" == service(status, "emp-registry")["state"]

        reopened = agent.cli("reopen-logs")
        assert (0, ["inference-0: log reopened", "model-server-0: log reopened"]) == (
            reopened.returncode,
            sorted(reopened.stdout.splitlines()),
        )
        caps = json.loads((agent_dirs / "state" / "capabilities" / "inference-0.json").read_text())
        assert (["demo-inference"], service(status, "inference-0")["port"], None) == (
            caps["capabilities"],
            caps["port"],
            caps["gpu"],
        )

        bad = agent.cli("signal", "model-server-0", "NOPE")
        assert (1, "model-server-0: ERROR (unknown signal 'NOPE')\n") == (bad.returncode, bad.stdout)
        before = service(status, "model-server-0")
        signalled = agent.cli("signal", "model-server-0", "TERM")
        assert (0, "model-server-0: signalled\n") == (signalled.returncode, signalled.stdout)
        wait_until(
            lambda: (
                (s := agent.status())
                and service(s, "model-server-0")["restarts"] > before["restarts"]
                and service(s, "model-server-0")["pid"] != before["pid"]
                and s["phase"] == "ready"
            ),
            60,
            interval=0.2,
            what="model-server-0 restarted by its policy after SIGTERM",
        )
    finally:
        assert 0 == agent.stop()


@pytest.mark.slow
def test_restart_applies_the_changed_profile_and_refuses_a_broken_one(agent_dirs: Path) -> None:
    """FOO=1,BAR=1 changed to FOO=2: after `restart` the child sees FOO=2 and no BAR; a profile edited into
    an invalid state is refused and the running service is left alone."""
    dump = agent_dirs / "env.json"
    profile = agent_dirs / "envs.toml"

    def write(env: str) -> None:
        profile.write_text(
            f'[services.envy]\ncommand = ["{sys.executable}", "{PROGRAMS / "env_dump.py"}", "{dump}"]\n'
            f"env = {{ {env} }}\n"
            f'[services.envy.readiness]\nkind = "command"\ncommand = ["test", "-s", "{dump}"]\ninterval_s = 0.05\n'
        )

    write('FOO = "1", BAR = "1"')
    agent = AgentProcess(agent_dirs, profile, {"SHELL_SECRET": "must-not-leak"})
    try:
        agent.wait_phase("ready")
        first = json.loads(dump.read_text())
        assert ("1", "1") == (first["FOO"], first["BAR"])
        assert "SHELL_SECRET" not in first

        profile.write_text(profile.read_text().replace("command = [", "comand = [", 1))
        refused = agent.cli("restart", "envy")
        assert 1 == refused.returncode
        assert refused.stdout.startswith("envy: ERROR (profile not reloaded: ")
        assert "RUNNING" == service(agent.wait_phase("ready"), "envy")["state"]

        dump.unlink()
        write('FOO = "2"')
        restarted = agent.cli("restart", "envy")
        assert (0, "envy: restarted\n") == (restarted.returncode, restarted.stdout)
        agent.wait_phase("ready")
        second = json.loads(wait_until(lambda: dump.exists() and dump.read_text(), 30, what="new env dump"))
    finally:
        assert 0 == agent.stop()

    assert "2" == second["FOO"]
    assert "BAR" not in second


@pytest.mark.slow
def test_agent_speaks_sd_notify_to_its_service_manager(agent_dirs: Path) -> None:
    """Under Type=notify: STATUS with the stage, READY=1 once the boot is over, WATCHDOG=1 from the loop at
    half of WATCHDOG_USEC, STOPPING=1 on SIGTERM — on a real datagram socket standing in for systemd."""
    import socket as socketlib
    import uuid

    name = f"emp-test-notify-{uuid.uuid4().hex}"
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(0.2)
    seen: list[str] = []

    def drain() -> None:
        with contextlib.suppress(TimeoutError):
            seen.extend(listener.recv(4096).decode().splitlines())

    def receive_until(line: str, timeout: float) -> None:
        wait_until(lambda: drain() or line in seen, timeout, interval=0, what=f"{line} on NOTIFY_SOCKET")

    agent = AgentProcess(
        agent_dirs, REPO / "profiles" / "demo.toml", {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "400000"}
    )
    try:
        receive_until("READY=1", 90)
        assert any(line.startswith("STATUS=bootstrapping: ") for line in seen)
        assert "ready" == agent.wait_phase("ready")["phase"]
        receive_until("STATUS=ready", 30)
        before = seen.count("WATCHDOG=1")
        wait_until(
            lambda: drain() or seen.count("WATCHDOG=1") >= before + 3, 30, interval=0, what="three more watchdog pings"
        )
        agent.process.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1", 30)
        code = agent.process.wait(60)
    finally:
        agent.stop()
        listener.close()

    assert 0 == code
    assert 1 == seen.count("READY=1")


@pytest.mark.slow
def test_running_demo_serves_metrics_on_its_read_only_listener_and_its_logs(agent_dirs: Path) -> None:
    """With `http_listen` set, a scraper on TCP reads the live agent's metrics: real RSS and CPU of each
    service's process tree, the phase, and the pull's bytes; a WebSocket on /events receives the transition
    caused by killing a child; `status --watch` redraws until Ctrl-C. `emp-agent logs` finds an instance's log through
    the agent, by instance or by service name."""
    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = AgentProcess(
        agent_dirs, REPO / "profiles" / "demo.toml", extra_env={"EMP_AGENT_HTTP_LISTEN": f"127.0.0.1:{port}"}
    )
    try:
        assert "ready" == agent.wait_phase("ready", "failed")["phase"], agent.read_log()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        events = asyncio.run(_kill_and_watch(port, service(agent.status() or {}, "inference-0")["pid"]))
        watcher = subprocess.Popen(
            [sys.executable, "-m", "agent", "status", "--watch", "--interval", "0.2"],
            env=agent.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        wait_until(lambda: sum(line.startswith("machine ") for line in lines) >= 2, 30, what="two status frames")
        watcher.send_signal(signal.SIGINT)
        watched = watcher.wait(10)
        by_service = agent.cli("logs", "inference", "-n", "3")
        by_instance = agent.cli("logs", "inference-0", "-n", "3")
        unknown = agent.cli("logs", "nope")
    finally:
        agent.stop()

    samples = {
        (s.name, s.labels.get("instance"), s.labels.get("phase")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert 1.0 == samples[("emp_machine_phase", None, "ready")]
    assert 1.0 == samples[("emp_service_up", "inference-0", None)]
    assert samples[("emp_service_memory_rss_bytes", "inference-0", None)] > 1_000_000
    assert samples[("emp_service_cpu_seconds_total", "inference-0", None)] > 0
    assert 262144 == samples[("emp_models_fetched_bytes_total", None, None)]
    assert (0, 3) == (by_instance.returncode, len(by_instance.stdout.splitlines())), by_instance.stderr
    assert by_service.stdout == by_instance.stdout
    assert (1, "nope: ERROR (no such service)\n") == (unknown.returncode, unknown.stderr)
    assert ("RUNNING", "BACKOFF") == (events[0]["from"], events[0]["to"])
    assert 0 == watched
    assert "killed by SIGKILL" in events[0]["reason"]


async def _kill_and_watch(port: int, pid: int) -> list[dict[str, Any]]:
    """A WebSocket client on /events sees inference-0 leave RUNNING after its process is SIGKILLed."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(f"http://127.0.0.1:{port}/events") as ws:
        os.kill(pid, signal.SIGKILL)
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(30):
            while not seen:
                event = await ws.receive_json()
                if event.get("type") == "service" and event.get("instance") == "inference-0":
                    seen.append(event)
        return seen


@pytest.mark.slow
def test_drain_publishes_draining_then_deregisters_and_stops_the_services(agent_dirs: Path) -> None:
    """`emp-agent drain --timeout 1`: Redis sees phase `draining` at once, then the record goes and every
    service stops (the agent's own registry stays up), the agent keeps answering; a second drain writes nothing,
    a restart is refused, and SIGTERM ends it cleanly."""
    agent = AgentProcess(agent_dirs, REPO / "profiles" / "demo.toml")
    try:
        status = agent.wait_phase("ready", "failed")
        assert "ready" == status["phase"], agent.read_log()
        store = redis.Redis(
            unix_socket_path=str(agent_dirs / "state" / "registry" / "redis.sock"), decode_responses=True
        )
        key = keys.machine_key(status["machine_id"])
        drain = subprocess.Popen(
            [sys.executable, "-m", "agent", "drain", "--timeout", "1"], env=agent.env, stdout=subprocess.PIPE, text=True
        )
        wait_until(lambda: store.hget(key, "phase") == "draining", 20, interval=0.02, what="draining in redis")
        out, _ = drain.communicate(timeout=60)
        after = agent.status() or {}
        gone = store.exists(key)
        again = agent.cli("drain", "--timeout", "5")  # answers with the first drain's result, writes nothing
        still_gone = store.exists(key)
        refused = agent.cli("restart", "inference-0")
    finally:
        code = agent.stop()

    assert 0 == drain.returncode, out
    assert "drained: 2 instance(s) stopped, deregistered; phase draining\n" == out
    assert "draining" == after["phase"]
    assert {"emp-registry": "RUNNING", "model-server-0": "STOPPED", "inference-0": "STOPPED"} == {
        s["name"]: s["state"] for s in after["services"]
    }
    assert 0 == gone
    assert (0, out, 0) == (again.returncode, again.stdout, still_gone)
    assert (1, "inference-0: ERROR (the machine is drained; restart the agent to serve)\n") == (
        refused.returncode,
        refused.stdout,
    )
    assert 0 == code, agent.read_log()


@pytest.mark.slow
def test_bootstrap_until_prepare_bakes_what_first_boot_then_reuses(agent_dirs: Path) -> None:
    """`emp-agent bootstrap --until prepare` pulls and prepares, registers nothing, starts nothing and keeps no
    machine id; an agent started on the same dirs afterwards pulls nothing and re-runs no step; a bake beside
    a running agent is refused."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMP_AGENT_")},
        "EMP_AGENT_STATE_DIR": str(agent_dirs / "state"),
        "EMP_AGENT_RUNTIME_DIR": str(agent_dirs / "run"),
        "EMP_AGENT_LOG_DIR": str(agent_dirs / "log"),
        "EMP_AGENT_MODEL_ROOT": str(agent_dirs / "models"),
        "EMP_AGENT_PROFILE": str(REPO / "profiles" / "demo.toml"),
    }

    def bake() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", "bootstrap", "--until", "prepare"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=agent_dirs)

    baked = bake()

    assert 0 == baked.returncode, baked.stderr
    assert ["detect", "pull_models", "prepare"] == [line.split()[0] for line in baked.stdout.splitlines()]
    assert not (agent_dirs / "state" / "machine-id").exists()
    assert not (agent_dirs / "run" / "agent.sock").exists()
    agent = AgentProcess(agent_dirs, REPO / "profiles" / "demo.toml")
    try:
        status = agent.wait_phase("ready")
        details = {s["name"]: s["detail"] for s in status["stages"]}
        assert "0 pulled" in details["pull_models"]
        assert "1 already verified" in details["pull_models"]
        assert "0 step(s) run" in details["prepare"]
        refused = bake()
        assert 1 == refused.returncode
        assert "another emp-agent" in refused.stderr
    finally:
        assert 0 == agent.stop()


@pytest.mark.slow
def test_status_table_shows_cpu_and_memory_of_each_service(agent_dirs: Path) -> None:
    """A few seconds after start the status document and table carry each running instance's RSS and CPU %,
    sampled from its real process tree."""
    agent = AgentProcess(agent_dirs, REPO / "profiles" / "demo.toml")
    try:
        agent.wait_phase("ready")
        status = wait_until(
            lambda: (s := agent.status()) and service(s, "inference-0").get("cpu_percent") is not None and s,
            60,
            interval=0.5,
            what="a CPU sample of inference-0",
        )
        inference = service(status, "inference-0")
        assert 1_000_000 < inference["rss_bytes"] < 2_000_000_000
        assert 0 <= inference["cpu_percent"] < 200
        table = agent.cli("status").stdout
        header = next(line for line in table.splitlines() if line.startswith("SERVICE"))
        assert header.split()[:7] == ["SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEM"]
    finally:
        assert 0 == agent.stop()
