"""The process ledger: a restarted agent kills what a crashed one left, and never a recycled pid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from agent.supervisor.ledger import ProcessLedger
from tests.helpers import wait_until

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sweep_kills_a_leftover_group_including_an_escaped_grandchild(tmp_path: Path) -> None:
    """A stubborn service (ignores SIGTERM, grandchild in its own session) left behind is fully killed."""
    pidfile = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, str(PROGRAMS / "stubborn.py"), str(pidfile)], start_new_session=True)
    wait_until(pidfile.exists, 30, what="stubborn to start")
    pids = [int(p) for p in pidfile.read_text().split()]
    ProcessLedger(tmp_path / "processes.json").spawned("stubborn", proc.pid)

    found = ProcessLedger(tmp_path / "processes.json").sweep(grace_s=0.5)
    proc.wait(10)

    assert ["stubborn"] == found
    assert [False, False] == [alive(pid) for pid in pids]
    assert [] == ProcessLedger(tmp_path / "processes.json").sweep()


def test_sweep_leaves_a_process_whose_pid_was_reused(tmp_path: Path) -> None:
    """An entry whose create time does not match the live process with that pid is ignored."""
    proc = subprocess.Popen([sys.executable, str(PROGRAMS / "hang.py"), str(tmp_path / "pid")])
    try:
        (tmp_path / "processes.json").write_text(f'{{"old": {{"pid": {proc.pid}, "create_time": 1.0}}}}')

        found = ProcessLedger(tmp_path / "processes.json").sweep(grace_s=0.5)

        assert [] == found
        assert alive(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)


def test_survivor_is_verified_by_start_time_and_spawn_tag(tmp_path: Path) -> None:
    """A live process is a survivor only with the recorded start time, and never with another spawn tag."""
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "hang.py"), str(tmp_path / "pid")],
        env={"EMP_SPAWN_TAG": "tag-a", "PATH": "/usr/bin:/bin"},
    )
    try:
        wait_until((tmp_path / "pid").exists, 30, what="child up")
        ledger = ProcessLedger(tmp_path / "processes.json")
        ledger.spawned("mine", proc.pid, "tag-a", "hash1", 8188)
        survivor = ledger.survivor("mine")

        assert survivor is not None
        assert (proc.pid, "hash1", 8188) == (survivor.pid, survivor.spec_hash, survivor.port)
        ledger.spawned("other", proc.pid, "tag-b")
        assert ledger.survivor("other") is None
        assert [] == ledger.sweep(keep={"mine", "other"})
        assert alive(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
