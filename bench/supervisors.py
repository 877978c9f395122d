"""Side-by-side benchmark: emp-agent, supervisord and PM2, each supervising N idle children, in one run.

Measures, per supervisor: daemon RSS (and its private part, USS), the supervisor's own helper processes (emp-agent's
log writers), idle CPU, status CLI wall time, and restart latency after SIGKILL of a child (until a new process
with the same tag has exec'd). emp-agent runs with its systemd unit's Environment=. Prints a Markdown table and
writes JSON.

    bash bench/setup.sh                      # supervisor, PM2 and emp-agent (as a host installs it) into bench/.tools
    bench/.tools/agent/bin/python bench/supervisors.py --children 10 --kills 10 --status-reps 15 --out bench/results.json

Everything runs in a fresh temporary directory on unix sockets; every process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil

from agent.host.launcher import descendants

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD = HERE / "child.py"
TOOLS = HERE / ".tools"
TICK = os.sysconf("SC_CLK_TCK")


def tagged_children(daemon: int, prefix: str) -> dict[str, int]:
    """tag -> pid of the daemon's descendants whose last argv word starts with `prefix` (exec'd, not zombies: a
    zombie's command line is empty, and a forked child shows its parent's until it execs). The tree is read
    through the kernel's children lists (the agent's own `descendants`), so the poll that times a restart costs
    well under a millisecond and barely competes with the supervisor it measures (psutil's children() reads every
    process on the machine each time)."""
    found = {}
    for pid in (descendants(daemon) or set()) - {daemon}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read().split(b"\0")[:-1]
        except OSError:
            continue
        if cmd and cmd[-1].decode().startswith(prefix) and str(CHILD).encode() in cmd:
            found[cmd[-1].decode()] = pid
    return found


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.0005)
    raise TimeoutError(what)


class Supervisor:
    name = ""
    daemon_pid = 0

    def __init__(self, work: Path, children: int) -> None:
        self.work = work
        self.children = children
        self.prefix = f"{self.name}-"

    def start(self) -> None: ...
    def status_argv(self) -> list[str]: ...
    def stop(self) -> None: ...
    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cli_env(self) -> dict[str, str]:
        return self.env()

    def helpers(self) -> list[psutil.Process]:
        """Processes of the supervisor's own besides the daemon (none for supervisord and PM2: they log
        in-process)."""
        return []


def unit_environment() -> dict[str, str]:
    """The Environment= of the systemd unit, so the agent runs here as a host runs it; its byte-code cache is
    the one bench/setup.sh filled, as install.sh fills the host's."""
    env: dict[str, str] = {}
    for line in (REPO / "systemd" / "emp-agent.service").read_text().splitlines():
        if line.startswith("Environment="):
            env.update(item.split("=", 1) for item in line.removeprefix("Environment=").split())
    if "PYTHONPYCACHEPREFIX" in env:
        env["PYTHONPYCACHEPREFIX"] = str(TOOLS / "pycache")
    return env


class EmpAgent(Supervisor):
    name = "emp-agent"

    def env(self) -> dict[str, str]:
        # systemd gives the agent no Python variables but the unit's own.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EMP_AGENT_", "PYTHON"))}
        env.update(unit_environment())
        env.update(
            {
                "EMP_AGENT_STATE_DIR": str(self.work / "state"),
                "EMP_AGENT_RUNTIME_DIR": str(self.work / "run"),
                "EMP_AGENT_LOG_DIR": str(self.work / "log"),
                "EMP_AGENT_MODEL_ROOT": str(self.work / "models"),
                "EMP_AGENT_PROFILE": str(self.work / "bench.toml"),
                "EMP_AGENT_LOG_LEVEL": "warning",
            }
        )
        return env

    def start(self) -> None:
        (self.work / "bench.toml").write_text(
            textwrap.dedent(f"""
            [services.idle]
            command = ["{sys.executable}", "{CHILD}", "{self.prefix}{{slot}}"]
            instances = {self.children}
            stop_timeout_s = 10
            readiness = {{ kind = "none", start_seconds = 0.1 }}
        """)
        )
        agent = shutil.which("emp-agent", path=str(Path(sys.executable).parent)) or "emp-agent"
        self.err = (self.work / "agent.err").open("wb")
        self.proc = subprocess.Popen([agent, "run"], env=self.env(), stdout=subprocess.DEVNULL, stderr=self.err)
        self.daemon_pid = self.proc.pid
        wait_for(
            lambda: subprocess.run(self.status_argv(), env=self.cli_env(), capture_output=True).returncode == 0,
            60,
            "emp-agent ready",
        )

    def status_argv(self) -> list[str]:
        agent = shutil.which("emp-agent", path=str(Path(sys.executable).parent)) or "emp-agent"
        return [agent, "status"]

    def cli_env(self) -> dict[str, str]:
        """An operator's shell: the settings, none of the unit's interpreter variables."""
        return {k: v for k, v in self.env().items() if k not in unit_environment()}

    def helpers(self) -> list[psutil.Process]:
        """The agent's own helper processes: its log writer (one for all the instances)."""
        return [
            p
            for p in psutil.Process(self.daemon_pid).children()
            if any(part.endswith("agent/logwriter.py") for part in p.cmdline())
        ]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.err.close()


class Supervisord(Supervisor):
    name = "supervisord"

    def start(self) -> None:
        conf = self.work / "supervisord.conf"
        conf.write_text(
            textwrap.dedent(f"""
            [unix_http_server]
            file={self.work}/supervisor.sock
            [supervisord]
            pidfile={self.work}/supervisord.pid
            logfile={self.work}/supervisord.log
            childlogdir={self.work}
            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
            [supervisorctl]
            serverurl=unix://{self.work}/supervisor.sock
            [program:idle]
            command={sys.executable} {CHILD} {self.prefix}%(process_num)02d
            process_name=%(program_name)s_%(process_num)02d
            numprocs={self.children}
            autorestart=true
            startsecs=0
        """)
        )
        subprocess.run([str(TOOLS / "venv/bin/supervisord"), "-c", str(conf)], check=True)
        pidfile = self.work / "supervisord.pid"
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "supervisord pid")
        self.daemon_pid = int(pidfile.read_text())

    def status_argv(self) -> list[str]:
        return [str(TOOLS / "venv/bin/supervisorctl"), "-c", str(self.work / "supervisord.conf"), "status"]

    def stop(self) -> None:
        os.kill(self.daemon_pid, signal.SIGTERM)
        wait_for(lambda: not psutil.pid_exists(self.daemon_pid), 60, "supervisord exit")


class Pm2(Supervisor):
    name = "pm2"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PM2_HOME": str(self.work / "pm2home"), "PM2_DISABLE_VERSION_CHECK": "true"}

    def start(self) -> None:
        home = self.work / "pm2home"
        home.mkdir()
        (home / "touch").write_text("")  # or the first CLI call tries to reach the network
        apps = [
            {
                "name": f"idle-{i:02d}",
                "script": str(CHILD),
                "interpreter": sys.executable,
                "args": [f"{self.prefix}{i:02d}"],
                "autorestart": True,
            }
            for i in range(self.children)
        ]
        (self.work / "eco.json").write_text(json.dumps({"apps": apps}))
        subprocess.run(
            [*self.pm2(), "start", str(self.work / "eco.json")], env=self.env(), check=True, capture_output=True
        )
        self.daemon_pid = int((home / "pm2.pid").read_text())

    def pm2(self) -> list[str]:
        return [str(TOOLS / "pm2/node_modules/.bin/pm2")]

    def status_argv(self) -> list[str]:
        return [*self.pm2(), "ls"]

    def stop(self) -> None:
        subprocess.run([*self.pm2(), "kill"], env=self.env(), capture_output=True, check=False)


def measure(sup: Supervisor, args: argparse.Namespace) -> dict[str, Any]:
    sup.start()
    try:
        wait_for(lambda: len(tagged_children(sup.daemon_pid, sup.prefix)) == args.children, 60, "children up")
        time.sleep(args.settle)  # let start-up work finish before sampling the idle daemon
        daemon = psutil.Process(sup.daemon_pid)
        rss_mb = daemon.memory_info().rss / 1e6
        uss_mb = daemon.memory_full_info().uss / 1e6  # its private pages: what it costs beyond shared libraries
        helpers = sup.helpers()
        helpers_rss_mb = sum(p.memory_info().rss for p in helpers) / 1e6
        helpers_uss_mb = sum(p.memory_full_info().uss for p in helpers) / 1e6
        cpu0 = sum(daemon.cpu_times()[:2])
        time.sleep(args.idle_window)
        idle_ms_per_s = (sum(daemon.cpu_times()[:2]) - cpu0) * 1000 / args.idle_window
        status_ms = []
        for _ in range(args.status_reps):
            started = time.perf_counter()
            subprocess.run(sup.status_argv(), env=sup.cli_env(), capture_output=True, check=False)
            status_ms.append((time.perf_counter() - started) * 1000)
        latencies = []
        for n in range(args.kills):
            before = tagged_children(sup.daemon_pid, sup.prefix)
            tag = sorted(before)[n % len(before)]
            os.kill(before[tag], signal.SIGKILL)
            killed = time.perf_counter()
            old = before[tag]
            wait_for(
                lambda t=tag, o=old: (p := tagged_children(sup.daemon_pid, sup.prefix).get(t)) and p != o,
                30,
                f"{sup.name} restart of {tag}",
            )
            latencies.append((time.perf_counter() - killed) * 1000)
            time.sleep(args.between_kills)
        time.sleep(args.settle)
        rss_end_mb = daemon.memory_info().rss / 1e6  # after the status calls and the restarts
        return {
            "rss_mb": round(rss_mb, 1),
            "rss_mb_end": round(rss_end_mb, 1),
            "uss_mb": round(uss_mb, 1),
            "helpers": len(helpers),
            "helpers_rss_mb": round(helpers_rss_mb, 1),
            "helpers_uss_mb": round(helpers_uss_mb, 1),
            "idle_cpu_ms_per_s": round(idle_ms_per_s, 2),
            "status_ms_median": round(statistics.median(status_ms), 1),
            "status_ms_p90": round(sorted(status_ms)[int(0.9 * (len(status_ms) - 1))], 1),
            "restart_ms_median": round(statistics.median(latencies), 1),
            "restart_ms_max": round(max(latencies), 1),
        }
    finally:
        sup.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--children", type=int, default=10)
    parser.add_argument(
        "--kills",
        type=int,
        default=10,
        help="one per child by default: a second crash of the same instance within healthy_reset_s is backed off on purpose",
    )
    parser.add_argument("--status-reps", type=int, default=15)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--idle-window", type=float, default=60.0)
    parser.add_argument("--between-kills", type=float, default=0.3)
    parser.add_argument("--only", default="emp-agent,supervisord,pm2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    classes = {c.name: c for c in (EmpAgent, Supervisord, Pm2)}
    results: dict[str, Any] = {"children": args.children, "kills": args.kills, "loadavg": os.getloadavg()}
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory(prefix="emp-bench-", dir="/tmp") as work:
            results[name] = measure(classes[name](Path(work), args.children), args)
            leftovers = [p for p in psutil.process_iter(["cmdline"]) if work in " ".join(p.info["cmdline"] or [])]
            for proc in leftovers:
                proc.kill()
            results[name]["leftovers_killed"] = len(leftovers)
    print("| metric | " + " | ".join(args.only.split(",")) + " |")
    print("|---|" + "---|" * len(args.only.split(",")))
    for metric in (
        "rss_mb",
        "rss_mb_end",
        "uss_mb",
        "helpers",
        "helpers_rss_mb",
        "helpers_uss_mb",
        "idle_cpu_ms_per_s",
        "status_ms_median",
        "status_ms_p90",
        "restart_ms_median",
        "restart_ms_max",
    ):
        print(f"| {metric} | " + " | ".join(str(results[n][metric]) for n in args.only.split(",")) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
