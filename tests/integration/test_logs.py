"""Service output: timestamped, rotated without losing or duplicating a line, and never blocking the child."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from agent.host.launcher import ProcessLauncher
from agent.host.logpipes import LogSpec
from agent.profile import Profile, ReadinessSpec, RestartPolicy, RestartSpec, ServiceSpec
from agent.supervisor.instances import Paths, expand
from agent.supervisor.states import ServiceState
from agent.supervisor.table import ProcessTable
from tests.helpers import await_until, wait_until

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"
ONCE = RestartSpec(policy=RestartPolicy.ON_FAILURE)
LINE = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z line (\d{8}) x{85}$")


def kept_line_numbers(files: list[Path]) -> list[int]:
    """The numbers of chatty.py's lines in the given log files, oldest file first; every other line must be the
    agent's start header."""
    numbers = []
    for path in files:
        for raw in path.read_bytes().splitlines():
            match = LINE.match(raw)
            if match:
                numbers.append(int(match.group(1)))
            else:
                assert raw.split(b" ", 1)[1].startswith(b"=== emp-agent: start #1 of chatty"), raw
    return numbers


def run_until_exited(tmp_path: Path, spec: ServiceSpec) -> dict:  # type: ignore[type-arg]
    table = ProcessTable(ProcessLauncher())
    for instance in expand(
        Profile(name="t", source="t", services={"chatty": spec}),
        [],
        Paths(tmp_path, tmp_path, tmp_path / "logs"),
        "m",
        {},
    ):
        table.add(instance)

    async def scenario() -> dict:  # type: ignore[type-arg]
        await table.start_all()
        service = table.get("chatty")
        await await_until(lambda: service.state is ServiceState.EXITED, 120, what="EXITED")
        await table.stop_all()  # returns once supervision has ended, the log writer included
        return service.snapshot()

    return asyncio.run(scenario())


def test_rotation_keeps_every_line_once_and_bounds_the_disk(tmp_path: Path) -> None:
    """Process table case 4 (scaled down): 6 MiB through 1 MiB x 3 backups: at most ~4 MiB on disk, and the
    kept lines are consecutive, each once, each with a timestamp."""
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "chatty.py"), str(6 * 1024 * 1024)],
        readiness=ReadinessSpec(start_seconds=0),
        restart=ONCE,
        log_max_mib=1,
        log_backups=3,
    )

    snap = run_until_exited(tmp_path, spec)

    logs = tmp_path / "logs"
    files = [logs / f"chatty.log.{n}" for n in (3, 2, 1)] + [logs / "chatty.log"]
    assert sum(f.stat().st_size for f in files) <= 4 * 1024 * 1024 + 200
    assert not (logs / "chatty.log.4").exists()
    numbers = kept_line_numbers(files)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert (6 * 1024 * 1024) // 100 - 1 == numbers[-1]
    assert 0 == snap["log"]["dropped_lines"]


def test_a_failing_log_never_blocks_the_child_and_is_reported(tmp_path: Path) -> None:
    """Process table case 3: with every log write failing (the log is /dev/full), a child writing 10 MB as
    fast as it can still finishes; status reports the dropped lines and the error."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "chatty.log").symlink_to("/dev/full")
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "chatty.py"), str(10 * 1000 * 1000)],
        readiness=ReadinessSpec(start_seconds=0),
        restart=ONCE,
    )

    snap = run_until_exited(tmp_path, spec)

    assert ("EXITED", "exited with code 0") == (snap["state"], snap["last_error"])
    assert snap["log"]["dropped_lines"] >= 100_000
    assert snap["log"]["last_error"].endswith("chatty.log: No space left on device")
    state = json.loads(LogSpec(logs / "chatty.log").state_path.read_text())
    assert state["tail"][-1].startswith("line 00099999 ")


def test_logs_command_prints_the_tail_and_follows_across_rotation(tmp_path: Path) -> None:
    """`emp-agent logs NAME -n 2 -f` (no agent running: the configured log_dir) prints the last two lines, then
    new lines, including those written just before a rotation and those in the new file after it."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    log = log_dir / "web-0.log"
    log.write_bytes(b"one\ntwo\nthree\n")
    env = {
        "PATH": os.environ["PATH"],
        "EMP_AGENT_LOG_DIR": str(log_dir),
        "EMP_AGENT_RUNTIME_DIR": str(tmp_path / "run"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "logs", "web-0", "-n", "2", "-f"], env=env, stdout=subprocess.PIPE
    )
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read1(4096), b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_until(lambda: b"".join(out) == b"two\nthree\n", what="the last two lines")
        with log.open("ab") as handle:
            handle.write(b"four\n")
        wait_until(lambda: b"four\n" in b"".join(out), what="an appended line")
        with log.open("ab") as handle:
            handle.write(b"five\n")
        log.rename(log_dir / "web-0.log.1")
        log.write_bytes(b"six\n")
        wait_until(lambda: b"".join(out).endswith(b"six\n"), what="the line in the new file")
    finally:
        proc.terminate()
        proc.wait(10)

    assert b"two\nthree\nfour\nfive\nsix\n" == b"".join(out)


def test_logs_for_an_unknown_name_without_a_log_fails(tmp_path: Path) -> None:
    """No agent, no file: one line naming the path, exit 1."""
    env = {"PATH": os.environ["PATH"], "EMP_AGENT_LOG_DIR": str(tmp_path), "EMP_AGENT_RUNTIME_DIR": str(tmp_path)}

    result = subprocess.run([sys.executable, "-m", "agent", "logs", "nope"], env=env, capture_output=True, text=True)

    assert 1 == result.returncode
    assert f"nope: ERROR (no log at {tmp_path}/nope.log)\n" == result.stderr
