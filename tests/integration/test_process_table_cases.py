"""The process table's failure cases at the scale the issue states them (5 MB/s for 60 s, a binary that appears
after 30 s, 100 MB/s towards 3 GB): slow, real programs, real signals. Faster, scaled-down variants of the same
behaviour run by default in test_service.py and test_logs.py."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.profile import ProbeKind, ReadinessSpec, RestartPolicy, RestartSpec, ServiceSpec
from agent.supervisor.states import ServiceState
from tests.helpers import await_until
from tests.integration.test_logs import kept_line_numbers, run_until_exited
from tests.integration.test_service import PROGRAMS, free_port, table_with, transitions

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def delays(table: Any, name: str) -> list[str]:
    """The restart delays the table announced, in order."""
    return [
        e["reason"].rsplit("restarting in ", 1)[1]
        for e in table.events
        if e.get("instance") == name and e["to"] == "BACKOFF"
    ]


def test_case_4_five_mb_a_second_for_a_minute_rotates_within_bounds_losing_no_line(tmp_path: Path) -> None:
    """Process table case 4: a child writes 5 MB/s for 60 s (300 MB) with log_max_mib 10 and 3 backups: the
    service's logs never take more than 4 x 10 MiB on disk at any moment (sampled every 50 ms while it runs),
    and the lines kept are the last ones written, consecutive, each exactly once, none dropped."""
    total, rate = 300_000_000, 5_000_000
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "chatty.py"), str(total), str(rate)],
        readiness=ReadinessSpec(start_seconds=0),
        restart=RestartSpec(policy=RestartPolicy.ON_FAILURE),
        log_max_mib=10,
        log_backups=3,
    )
    logs = tmp_path / "logs"
    files = [logs / f"chatty.log.{n}" for n in (3, 2, 1)] + [logs / "chatty.log"]
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            size = 0
            for path in [*files, logs / "chatty.log.4"]:
                with contextlib.suppress(FileNotFoundError):
                    size += path.stat().st_size
            peak = max(peak, size)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        snap = run_until_exited(tmp_path, spec)
    finally:
        done.set()
        sampler.join()

    assert ("EXITED", "exited with code 0") == (snap["state"], snap["last_error"])
    assert 0 == snap["log"]["dropped_lines"]
    assert 4 * 10 * MiB < total  # the bound below is rotation's doing, not a small run
    assert peak <= 4 * 10 * MiB + 200
    assert not (logs / "chatty.log.4").exists()
    numbers = kept_line_numbers(files)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert total // 100 - 1 == numbers[-1]
    assert len(numbers) * 114 > 3 * 10 * MiB  # the backups are full: rotation kept all it was allowed to


def test_case_7_a_child_that_raises_before_it_is_ready_is_never_running(tmp_path: Path) -> None:
    """Process table case 7: a service that must answer HTTP raises an exception before it listens: it is never
    RUNNING, each try is a failed start with the exit reason, and it backs off with growing delays."""
    spec = ServiceSpec(
        command=["{python}", "-c", "raise RuntimeError('checkpoint missing')"],
        port=free_port(),
        readiness=ReadinessSpec(kind=ProbeKind.HTTP, interval_s=0.05, timeout_s=10),
        restart=RestartSpec(backoff_initial_s=0.2, backoff_max_s=0.8, jitter=0, crash_loop_limit=4, fatal_retry_s=None),
    )
    table = table_with(tmp_path, web=spec)

    async def scenario() -> dict[str, Any]:
        await table.start_all()
        service = table.get("web")
        await await_until(lambda: service.state is ServiceState.FATAL, 60, what="FATAL after four failed starts")
        snap: dict[str, Any] = service.snapshot()
        await table.stop_all()
        return snap

    snap = asyncio.run(scenario())

    assert "RUNNING" not in {to for _, to in transitions(table, "web")}
    assert ["0.0s", "0.2s", "0.4s"] == delays(table, "web")
    assert "exited with code 1 before it was ready" == snap["last_error"]
    assert "RuntimeError: checkpoint missing" in (tmp_path / "logs" / "web.log").read_text()


def test_case_9_two_seconds_then_exit_1_forever_backs_off_to_the_cap_without_a_storm(tmp_path: Path) -> None:
    """Process table case 9: a child that runs 2 s and exits 1, forever: the delays double up to the cap and
    stay there, the failure count and the last reason are visible in the snapshot, and the number of starts
    over the run is exactly what those delays allow (no restart storm)."""
    starts = tmp_path / "starts"
    spec = ServiceSpec(
        command=["sh", "-c", f"echo start >> {starts}; sleep 2; exit 1"],
        readiness=ReadinessSpec(start_seconds=0.2),
        restart=RestartSpec(backoff_initial_s=0.5, backoff_factor=2, backoff_max_s=2, jitter=0, crash_loop_limit=100),
    )
    table = table_with(tmp_path, loop=spec)

    async def scenario() -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        await table.start_all()
        service = table.get("loop")
        await await_until(lambda: service.failures >= 6, 60, what="six failures")
        snap: dict[str, Any] = service.snapshot()
        elapsed = time.monotonic() - started
        await table.stop_all()
        return snap, elapsed

    snap, elapsed = asyncio.run(scenario())

    assert ["0.0s", "0.5s", "1.0s", "2.0s", "2.0s", "2.0s"] == delays(table, "loop")[:6]
    assert snap["failures"] >= 6
    assert "exited with code 1" == snap["last_error"]
    runs = starts.read_text().count("start")
    assert runs == snap["restarts"] + 1
    # Six runs of 2 s and the delays between them: at least 17.5 s; a storm would be many more runs.
    assert elapsed >= 6 * 2 + 0.5 + 1 + 2 + 2
    assert runs <= 8


def test_case_10_a_binary_that_appears_after_30_s_is_started_without_a_human(tmp_path: Path) -> None:
    """Process table case 10: the command does not exist when the agent starts (spawn errors, backing off with
    the default restart settings); 30 s later it is installed; the next retry starts it and it is RUNNING,
    with nobody calling start."""
    binary = tmp_path / "opt" / "comfyui"
    spec = ServiceSpec(command=[str(binary)], readiness=ReadinessSpec(start_seconds=0.2))
    table = table_with(tmp_path, comfy=spec)

    async def scenario() -> tuple[list[str], dict[str, Any]]:
        started = time.monotonic()
        await table.start_all()
        service = table.get("comfy")
        await await_until(
            lambda: time.monotonic() - started >= 30 and service.failures >= 3, 60, what="30 s of spawn errors"
        )
        errors = [e["reason"] for e in table.events if e["to"] == "BACKOFF"]
        binary.parent.mkdir()
        binary.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import time; time.sleep(600)'\n")
        binary.chmod(0o755)
        await await_until(lambda: service.state is ServiceState.RUNNING, 90, what="RUNNING after the install")
        snap: dict[str, Any] = service.snapshot()
        await table.stop_all()
        return errors, snap

    errors, snap = asyncio.run(scenario())

    assert len(errors) >= 3
    assert [] == [reason for reason in errors if f"can't find command '{binary}'" not in reason]
    assert ServiceState.RUNNING.value == snap["state"]
    assert snap["pid"] is not None


def test_case_11_a_child_that_takes_5_s_to_exit_on_sigterm_is_never_respawned_meanwhile(tmp_path: Path) -> None:
    """Process table case 11: a service that needs 5 s to finish after SIGTERM (stop timeout 10 s) is STOPPING
    for those 5 s, gets no SIGKILL, is not started again meanwhile (the stop wins over its restart policy
    `always`), and is STOPPED once it has exited and been reaped."""
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "slow_exit.py"), "5"],
        readiness=ReadinessSpec(kind=ProbeKind.LOG, pattern="^running$", timeout_s=30),
        stop_timeout_s=10,
        restart=RestartSpec(policy=RestartPolicy.ALWAYS, backoff_initial_s=0.05, jitter=0),
    )
    table = table_with(tmp_path, slow=spec)

    async def scenario() -> tuple[float, bool]:
        await table.start_all()
        service = table.get("slow")
        await await_until(lambda: service.state is ServiceState.RUNNING, 30, what="RUNNING")
        pid = service.snapshot()["pid"]
        started = time.monotonic()
        await service.stop()
        took = time.monotonic() - started
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        await table.stop_all()
        return took, gone

    took, gone = asyncio.run(scenario())

    assert 4.5 <= took < 9, took
    assert gone
    after_stop = transitions(table, "slow")[transitions(table, "slow").index(("RUNNING", "STOPPING")) :]
    assert [("RUNNING", "STOPPING"), ("STOPPING", "STOPPED")] == after_stop
    log = (tmp_path / "logs" / "slow.log").read_text()
    assert "finished" in log
    assert 1 == log.count("=== emp-agent: start #")


def test_case_12_a_tree_growing_100_mb_a_second_is_restarted_soon_after_crossing_500_mb(tmp_path: Path) -> None:
    """Process table case 12: a service and its child each allocate 50 MiB/s towards 1.5 GiB (3 GiB in all)
    under memory_limit_mib 500 and the default check interval: neither process alone reaches the limit, the
    tree does, and it is restarted within seconds of crossing it (the measured RSS is at most ~3 s of growth
    past the limit), as a failure, with the reason; nothing of the tree is left."""
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "hog.py"), "2.5", "1536", "2"],
        readiness=ReadinessSpec(start_seconds=0.1),
        memory_limit_mib=500,
        stop_timeout_s=2,
        restart=RestartSpec(backoff_initial_s=60, jitter=0),
    )
    table = table_with(tmp_path, hog=spec)

    async def scenario() -> tuple[list[int], dict[str, Any]]:
        await table.start_all()
        service = table.get("hog")
        await await_until(lambda: service.state is ServiceState.RUNNING, 30, what="RUNNING")
        pid = service.snapshot()["pid"]
        children = await await_until(lambda: psutil.Process(pid).children(), 30, what="the service's child")
        tree = [pid] + [c.pid for c in children]
        await await_until(lambda: service.failures, 60, what="the restart")
        snap: dict[str, Any] = service.snapshot()
        await table.stop_all()
        return tree, snap

    tree, snap = asyncio.run(scenario())

    reason = next(e["reason"] for e in table.events if e["to"] == "BACKOFF")
    measured = int(reason.split("process tree RSS ", 1)[1].split(" MiB", 1)[0])
    assert 500 < measured <= 500 + 3 * 100, reason
    assert reason.startswith("memory limit: process tree RSS ")
    assert " MiB > 500 MiB" in reason
    assert 1 == snap["failures"]
    assert "reached" not in (tmp_path / "logs" / "hog.log").read_text()
    assert [] == [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
