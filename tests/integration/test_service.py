"""The process table with real child processes, real signals and real readiness probes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil

from agent.host.launcher import ProcessLauncher
from agent.profile import ProbeKind, Profile, ReadinessSpec, RestartPolicy, RestartSpec, ServiceSpec
from agent.supervisor.instances import Paths, expand
from agent.supervisor.states import ServiceState
from agent.supervisor.table import ProcessTable
from tests.conftest import REPO
from tests.helpers import await_until

PROGRAMS = Path(__file__).resolve().parent.parent / "programs"
FAST = RestartSpec(backoff_initial_s=0.05, backoff_max_s=0.2, jitter=0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_service(pidfile: Path, readiness: ReadinessSpec, **extra: Any) -> ServiceSpec:
    """tests/programs/http_service.py on a free port, recording its pid in `pidfile`, restarted fast."""
    return ServiceSpec(
        command=["{python}", str(PROGRAMS / "http_service.py"), "{port}", str(pidfile)],
        port=free_port(),
        readiness=readiness,
        restart=FAST,
        **extra,
    )


def table_with(tmp: Path, **services: ServiceSpec) -> ProcessTable:
    table = ProcessTable(ProcessLauncher())
    for spec in expand(Profile(name="t", source="t", services=services), [], Paths(tmp, tmp, tmp / "logs"), "m", {}):
        table.add(spec)
    return table


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def transitions(table: ProcessTable, name: str) -> list[tuple[str, str]]:
    return [(e["from"], e["to"]) for e in table.events if e.get("instance") == name]


def test_service_is_running_only_when_ready_and_is_restarted_after_sigkill(tmp_path: Path) -> None:
    """RUNNING comes after the HTTP probe passes; a SIGKILLed child is restarted with a new pid."""
    pidfile = tmp_path / "pid"
    spec = http_service(pidfile, ReadinessSpec(kind=ProbeKind.HTTP, interval_s=0.05))
    table = table_with(tmp_path, web=spec)

    async def scenario() -> dict[str, Any]:
        await table.start_all()
        service = table.get("web")
        assert await service.wait_ready(30)
        first = int(pidfile.read_text())
        os.kill(first, signal.SIGKILL)
        await await_until(
            lambda: service.restarts == 1 and service.state is ServiceState.RUNNING, 30, what="restart after SIGKILL"
        )
        second = int(pidfile.read_text())
        snap = service.snapshot()
        await table.stop_all()
        return {"first": first, "second": second, "snap": snap, "state": service.state}

    result = asyncio.run(scenario())

    assert result["first"] != result["second"]
    assert "killed by SIGKILL; restarting in 0.0s" == next(e["reason"] for e in table.events if e["to"] == "BACKOFF")
    assert ServiceState.STOPPED == result["state"]
    assert ("killed by SIGKILL", 1) == (result["snap"]["last_error"], result["snap"]["restarts"])
    assert [
        ("STOPPED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "BACKOFF"),
        ("BACKOFF", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "STOPPING"),
        ("STOPPING", "STOPPED"),
    ] == transitions(table, "web")
    assert gone(result["second"])


def test_exit_before_ready_is_a_failed_start_and_crash_loop_ends_fatal(tmp_path: Path) -> None:
    """A child that exits before its probe passes is never RUNNING; the crash-loop limit makes it FATAL."""
    starts = tmp_path / "starts"
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "flaky.py"), str(starts), "0"],
        port=free_port(),
        readiness=ReadinessSpec(kind=ProbeKind.HTTP, interval_s=0.05),
        restart=FAST.model_copy(update={"crash_loop_limit": 3, "fatal_retry_s": None}),
    )
    table = table_with(tmp_path, web=spec)

    async def scenario() -> ServiceState:
        await table.start_all()
        service = table.get("web")
        await await_until(lambda: service.state is ServiceState.FATAL, 30, what="FATAL")
        await table.stop_all()
        return service.state

    assert ServiceState.FATAL == asyncio.run(scenario())
    assert 3 == starts.read_text().count("start")
    assert ("STARTING", "RUNNING") not in transitions(table, "web")
    assert "crash loop (3 failures in a row)" in table.events[-1]["reason"]
    assert "exited with code 0 before it was ready" in table.events[-1]["reason"]


def test_missing_command_is_a_spawn_error_with_its_reason(tmp_path: Path) -> None:
    """A binary that does not exist is reported as such, and the instance backs off instead of crashing us."""
    spec = ServiceSpec(command=["/nonexistent/bin/comfyui"], restart=FAST.model_copy(update={"crash_loop_limit": 2}))
    table = table_with(tmp_path, web=spec)

    async def scenario() -> dict[str, Any]:
        await table.start_all()
        service = table.get("web")
        await await_until(lambda: service.state is ServiceState.FATAL, 30, what="FATAL")
        snap = service.snapshot()
        await table.stop_all()
        return snap

    snap = asyncio.run(scenario())

    assert "can't find command '/nonexistent/bin/comfyui'" == snap["last_error"]
    assert snap["pid"] is None


def test_stop_kills_a_tree_that_ignores_sigterm_and_escaped_its_group(tmp_path: Path) -> None:
    """SIGTERM is ignored, the grandchild called setsid: after the stop timeout both are SIGKILLed and gone."""
    pidfile = tmp_path / "pids"
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "stubborn.py"), str(pidfile)],
        stop_timeout_s=0.5,
        readiness=ReadinessSpec(kind=ProbeKind.COMMAND, command=["test", "-s", str(pidfile)], interval_s=0.05),
    )
    table = table_with(tmp_path, stubborn=spec)

    async def scenario() -> tuple[list[int], ServiceState]:
        await table.start_all()
        assert await table.get("stubborn").wait_ready(30)
        pids = [int(p) for p in pidfile.read_text().split()]
        await table.stop_all()
        return pids, table.get("stubborn").state

    pids, state = asyncio.run(scenario())

    assert ServiceState.STOPPED == state
    assert [True, True] == [gone(pid) for pid in pids]


def test_stop_wins_over_a_pending_restart(tmp_path: Path) -> None:
    """A service waiting out a long backoff stops at once when asked, and is not restarted."""
    starts = tmp_path / "starts"
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "flaky.py"), str(starts), "3"],
        readiness=ReadinessSpec(start_seconds=0),
        restart=RestartSpec(backoff_initial_s=600, jitter=0),
    )
    table = table_with(tmp_path, web=spec)

    async def scenario() -> ServiceState:
        await table.start_all()
        service = table.get("web")
        await await_until(
            lambda: service.state is ServiceState.BACKOFF and service.failures == 2,
            30,
            what="the long BACKOFF after the second failure",
        )
        await asyncio.wait_for(table.stop_all(), 10)
        return service.state

    assert ServiceState.STOPPED == asyncio.run(scenario())
    assert 2 == starts.read_text().count("start")  # the first restart is immediate, the second waits 600 s


def test_on_failure_policy_leaves_a_clean_exit_alone(tmp_path: Path) -> None:
    """With on-failure, exit code 0 after start is final: EXITED, no restart."""
    starts = tmp_path / "starts"
    spec = ServiceSpec(
        command=[sys.executable, str(PROGRAMS / "flaky.py"), str(starts), "0"],
        readiness=ReadinessSpec(start_seconds=0),
        restart=RestartSpec(policy=RestartPolicy.ON_FAILURE),
    )
    table = table_with(tmp_path, job=spec)

    async def scenario() -> ServiceState:
        await table.start_all()
        service = table.get("job")
        await await_until(lambda: service.state is ServiceState.EXITED, 30, what="EXITED")
        await table.stop_all()
        return service.state

    assert ServiceState.EXITED == asyncio.run(scenario())
    assert 1 == starts.read_text().count("start")


def test_processes_that_escape_to_their_own_session_are_killed_when_the_main_process_exits(tmp_path: Path) -> None:
    """A service that starts a setsid'd helper and exits leaves nothing behind, restart after restart."""
    marker = tmp_path / "helper.pids"
    script = f"setsid sh -c 'echo $$ >> {marker}; exec sleep 777' & sleep 0.2; exit 1"
    spec = ServiceSpec(
        command=["sh", "-c", script],
        readiness=ReadinessSpec(start_seconds=0),
        restart=RestartSpec(backoff_initial_s=0.05, jitter=0, crash_loop_limit=3, fatal_retry_s=None),
    )
    table = table_with(tmp_path, leaky=spec)

    async def scenario() -> None:
        await table.start_all()
        service = table.get("leaky")
        await await_until(lambda: service.state is ServiceState.FATAL, 30, what="FATAL")

    asyncio.run(scenario())

    helpers = [int(p) for p in marker.read_text().split()]
    assert 3 == len(helpers)
    assert [] == [pid for pid in helpers if not gone(pid)]


def test_dependent_starts_once_its_dependency_recovers(tmp_path: Path) -> None:
    """A worker whose ComfyUI is FATAL at boot starts by itself once the ComfyUI comes up later."""
    flag = tmp_path / "binary-installed"
    dep = ServiceSpec(
        command=[
            "sh",
            "-c",
            f'test -f {flag} || exit 1; exec "$0" "$1" "$2"',
            sys.executable,
            str(PROGRAMS / "hang.py"),
            str(tmp_path / "a.pid"),
        ],
        readiness=ReadinessSpec(start_seconds=0.1, timeout_s=1),
        restart=RestartSpec(backoff_initial_s=0.05, jitter=0, crash_loop_limit=2, fatal_retry_s=0.3),
    )
    worker = ServiceSpec(
        command=[sys.executable, str(PROGRAMS / "hang.py"), str(tmp_path / "b.pid")],
        depends_on=["comfy"],
        readiness=ReadinessSpec(start_seconds=0.1),
    )
    table = table_with(tmp_path, comfy=dep, worker=worker)

    async def scenario() -> list[ServiceState]:
        waiting = await table.start_all()
        assert ["worker"] == waiting
        assert "waiting for dependency comfy" in (table.get("worker").last_error or "")
        flag.touch()
        await await_until(lambda: table.get("worker").state is ServiceState.RUNNING, 30, what="worker running")
        states = [table.get("comfy").state, table.get("worker").state]
        await table.stop_all()
        return states

    assert [ServiceState.RUNNING, ServiceState.RUNNING] == asyncio.run(scenario())


def test_instances_of_one_service_stop_in_parallel(tmp_path: Path) -> None:
    """Three instances ignoring SIGTERM are all STOPPING before the first is STOPPED (one timeout, not three)."""
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "stubborn.py"), str(tmp_path / "pids-{slot}")],
        instances=3,
        stop_timeout_s=0.5,
        readiness=ReadinessSpec(kind=ProbeKind.COMMAND, command=["test", "-s", str(tmp_path / "pids-{slot}")]),
    )
    table = table_with(tmp_path, stubborn=spec)

    async def scenario() -> None:
        await table.start_all()
        assert {} == await table.wait_ready(table.names(), 30)
        await table.stop_all()

    asyncio.run(scenario())

    order = [e["to"] for e in table.events if e["to"] in ("STOPPING", "STOPPED")]
    assert ["STOPPING"] * 3 + ["STOPPED"] * 3 == order


def test_memory_limit_on_the_whole_tree_restarts_and_counts_as_a_failure(tmp_path: Path) -> None:
    """A child growing 100 MiB/s past a 150 MiB limit is restarted with the reason, as a failure."""
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "hog.py"), "5", "2000"],
        readiness=ReadinessSpec(start_seconds=0.05),
        memory_limit_mib=150,
        resource_interval_s=0.1,
        stop_timeout_s=1,
        restart=RestartSpec(backoff_initial_s=30, jitter=0),
    )
    table = table_with(tmp_path, hog=spec)

    async def scenario() -> None:
        await table.start_all()
        await await_until(lambda: any(e["to"] == "BACKOFF" for e in table.events), 60, what="a restart")
        await table.stop_all()

    asyncio.run(scenario())

    reason = next(e["reason"] for e in table.events if e["to"] == "BACKOFF")
    assert reason.startswith("memory limit: process tree RSS ")
    assert " MiB > 150 MiB; restarting in 0.0s" in reason
    assert "reached" not in (tmp_path / "logs" / "hog.log").read_text()  # stopped long before 2000 MiB


def test_log_line_readiness_only_counts_output_of_the_current_start(tmp_path: Path) -> None:
    """Ready when the log shows the pattern; a line from a previous start never makes a new start RUNNING."""
    marker = tmp_path / "started-once"
    script = (
        f'if [ -f {marker} ]; then echo "still loading"; else touch {marker}; '
        'echo "To see the GUI go to: http://127.0.0.1:8188"; fi; exec "$0" "$1" "$2"'
    )
    spec = ServiceSpec(
        command=["sh", "-c", script, sys.executable, str(PROGRAMS / "hang.py"), str(tmp_path / "pid")],
        readiness=ReadinessSpec(kind=ProbeKind.LOG, pattern=r"^To see the GUI go to: ", timeout_s=1, interval_s=0.05),
        restart=RestartSpec(backoff_initial_s=0.05, jitter=0, crash_loop_limit=2, fatal_retry_s=None),
    )
    table = table_with(tmp_path, comfy=spec)

    async def scenario() -> str | None:
        await table.start_all()
        service = table.get("comfy")
        assert await service.wait_ready(30)
        assert service.pid is not None
        os.kill(service.pid, signal.SIGKILL)
        await await_until(lambda: service.state is ServiceState.FATAL, 30, what="FATAL")
        await table.stop_all()
        return service.last_error

    last_error = asyncio.run(scenario())

    assert [
        ("STOPPED", "STARTING"),
        ("STARTING", "RUNNING"),
        ("RUNNING", "BACKOFF"),
        ("BACKOFF", "STARTING"),
        ("STARTING", "FATAL"),
    ] == transitions(table, "comfy")
    assert "not ready within 1s (log /^To see the GUI go to: /)" == last_error


def test_sd_notify_ready_from_the_child(tmp_path: Path) -> None:
    """A child that says READY=1 on NOTIFY_SOCKET becomes RUNNING; one that never says it times out."""
    ready = ServiceSpec(
        command=["{python}", str(PROGRAMS / "notify_ready.py")],
        readiness=ReadinessSpec(kind=ProbeKind.NOTIFY, interval_s=0.05),
    )
    silent = ServiceSpec(
        command=["{python}", str(PROGRAMS / "hang.py"), str(tmp_path / "pid")],
        readiness=ReadinessSpec(kind=ProbeKind.NOTIFY, interval_s=0.05, timeout_s=1),
        restart=RestartSpec(crash_loop_limit=1, fatal_retry_s=None),
    )
    table = table_with(tmp_path, ready=ready, silent=silent)

    async def scenario() -> tuple[bool, str | None]:
        await table.start_all()
        ok = await table.get("ready").wait_ready(30)
        await await_until(lambda: table.get("silent").state is ServiceState.FATAL, 30, what="silent FATAL")
        error = table.get("silent").last_error
        await table.stop_all()
        return ok, error

    ok, error = asyncio.run(scenario())

    assert ok
    assert "not ready within 1s (notify)" == error


def test_case_grandchild_holding_a_port_is_gone_after_stop_and_the_port_binds_again(tmp_path: Path) -> None:
    """Process table case 1: a setsid'd grandchild that binds a port and ignores SIGTERM does not survive a
    stop, and a restart can bind the port again."""
    port = free_port()
    pids = tmp_path / "pids"
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "port_holder.py"), str(port), str(pids)],
        stop_timeout_s=0.5,
        readiness=ReadinessSpec(kind=ProbeKind.COMMAND, command=["test", "-s", str(pids)], interval_s=0.05),
    )
    table = table_with(tmp_path, holder=spec)

    async def scenario() -> list[int]:
        await table.start_all()
        assert await table.get("holder").wait_ready(30)
        first = [int(p) for p in pids.read_text().split()]
        pids.unlink()
        results = await table.control("restart", "holder")
        assert [True] == [r["ok"] for r in results]
        assert await table.get("holder").wait_ready(30)
        await table.stop_all()
        return first

    first = asyncio.run(scenario())

    assert [True, True] == [gone(pid) for pid in first]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # nothing of either run holds it any more


def test_case_sigterm_ignored_is_sigkilled_after_the_stop_timeout_and_never_respawned(tmp_path: Path) -> None:
    """Process table cases 6 and 11: STOPPING lasts the whole stop timeout (no earlier SIGKILL), no start
    happens meanwhile, and STOPPED comes only after the tree is reaped."""
    pidfile = tmp_path / "pids"
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "stubborn.py"), str(pidfile)],
        stop_timeout_s=2,
        readiness=ReadinessSpec(kind=ProbeKind.COMMAND, command=["test", "-s", str(pidfile)], interval_s=0.05),
    )
    table = table_with(tmp_path, stubborn=spec)

    async def scenario() -> tuple[float, list[int]]:
        await table.start_all()
        assert await table.get("stubborn").wait_ready(30)
        pids = [int(p) for p in pidfile.read_text().split()]
        started = asyncio.get_running_loop().time()
        await table.stop_all()
        return asyncio.get_running_loop().time() - started, pids

    took, pids = asyncio.run(scenario())

    assert took >= 2.0
    assert [True, True] == [gone(pid) for pid in pids]
    assert ["STOPPED->STARTING", "STARTING->RUNNING", "RUNNING->STOPPING", "STOPPING->STOPPED"] == [
        f"{a}->{b}" for a, b in transitions(table, "stubborn")
    ]


def test_case_unwritable_log_path_is_a_spawn_error_with_the_os_reason(tmp_path: Path) -> None:
    """Process table case 8: a log path that cannot be written is a spawn error with the OS text, no pid,
    and backoff applies."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "web.log").mkdir()  # the log file's path is a directory: open() fails with EISDIR
    spec = ServiceSpec(command=["true"], restart=RestartSpec(crash_loop_limit=2, fatal_retry_s=None))
    table = table_with(tmp_path, web=spec)

    async def scenario() -> dict[str, Any]:
        await table.start_all()
        service = table.get("web")
        await await_until(lambda: service.state is ServiceState.FATAL, 30, what="FATAL")
        await table.stop_all()
        return service.snapshot()

    snap = asyncio.run(scenario())

    assert f"cannot open log file {logs}/web.log: Is a directory" == snap["last_error"]
    assert snap["pid"] is None
    assert 1 == snap["restarts"]


def test_case_crash_loop_backs_off_to_the_cap_with_the_reason_visible(tmp_path: Path) -> None:
    """Process table case 9: a child that exits 1 forever gets growing delays up to the cap, never a storm,
    and the failure count and last reason are visible."""
    starts = tmp_path / "starts"
    spec = ServiceSpec(
        command=["{python}", str(PROGRAMS / "flaky.py"), str(starts), "1"],
        readiness=ReadinessSpec(start_seconds=0),
        restart=RestartSpec(
            backoff_initial_s=0.05, backoff_factor=2, backoff_max_s=0.2, jitter=0, crash_loop_limit=100
        ),
    )
    table = table_with(tmp_path, loop=spec)

    async def scenario() -> tuple[int, str | None]:
        await table.start_all()
        service = table.get("loop")
        await await_until(lambda: service.failures >= 6, 30, what="six failures")
        await table.stop_all()
        return service.failures, service.last_error

    failures, last_error = asyncio.run(scenario())

    delays = [e["reason"].rsplit("restarting in ", 1)[1] for e in table.events if e["to"] == "BACKOFF"][:6]
    assert ["0.0s", "0.1s", "0.1s", "0.2s", "0.2s", "0.2s"] == delays
    assert failures >= 6
    assert "exited with code 1" == last_error


def test_a_hung_service_is_detected_by_liveness_and_restarted(tmp_path: Path) -> None:
    """A RUNNING server that stops answering (SIGSTOP) fails its liveness probes and is restarted as a failure."""
    pidfile = tmp_path / "pid"
    spec = http_service(
        pidfile,
        ReadinessSpec(kind=ProbeKind.HTTP, interval_s=0.05, liveness_interval_s=0.1, liveness_failures=2),
        stop_timeout_s=2,
    )
    table = table_with(tmp_path, web=spec)

    async def scenario() -> tuple[int, int]:
        await table.start_all()
        service = table.get("web")
        assert await service.wait_ready(30)
        hung = int(pidfile.read_text())
        os.kill(hung, signal.SIGSTOP)
        await await_until(
            lambda: service.restarts == 1 and service.state is ServiceState.RUNNING, 60, what="restart after the hang"
        )
        fresh = int(pidfile.read_text())
        await table.stop_all()
        return hung, fresh

    hung, fresh = asyncio.run(scenario())

    reason = next(e["reason"] for e in table.events if e["to"] == "BACKOFF")
    assert reason.startswith("not live: 2 probes failed in a row (http http://127.0.0.1:")
    assert hung != fresh
    assert gone(hung)


def test_a_per_gpu_worker_waits_only_for_the_service_on_its_own_gpu(tmp_path: Path) -> None:
    """With two GPUs, worker-1 starts when comfy-1 is ready even though comfy-0 never gets ready."""
    from agent.host.gpu import GpuInfo

    comfy = ServiceSpec(
        command=[
            "sh",
            "-c",
            'test "$EMP_SLOT" = 1 || exit 1; exec "$0" "$1" "$2"',
            sys.executable,
            str(PROGRAMS / "hang.py"),
            str(tmp_path / "comfy.pid"),
        ],
        per_gpu=True,
        readiness=ReadinessSpec(start_seconds=0.1, timeout_s=1),
        restart=RestartSpec(crash_loop_limit=1, fatal_retry_s=None),
    )
    worker = ServiceSpec(
        command=[sys.executable, str(PROGRAMS / "hang.py"), str(tmp_path / "w-{slot}.pid")],
        per_gpu=True,
        depends_on=["comfy"],
        readiness=ReadinessSpec(start_seconds=0.1),
    )
    gpus = [GpuInfo(index=0, uuid="GPU-a"), GpuInfo(index=1, uuid="GPU-b")]
    table = ProcessTable(ProcessLauncher())
    profile = Profile(name="t", source="t", services={"comfy": comfy, "worker": worker})
    for spec in expand(profile, gpus, Paths(tmp_path, tmp_path, tmp_path / "logs"), "m", {}):
        table.add(spec)

    async def scenario() -> dict[str, ServiceState]:
        waiting = await table.start_all()
        await await_until(lambda: table.get("worker-1").state is ServiceState.RUNNING, 30, what="worker-1")
        states = {name: table.get(name).state for name in table.names()}
        await table.stop_all()
        assert ["worker-0"] == waiting
        return states

    assert {
        "comfy-0": ServiceState.FATAL,
        "comfy-1": ServiceState.RUNNING,
        "worker-0": ServiceState.STOPPED,
        "worker-1": ServiceState.RUNNING,
    } == asyncio.run(scenario())


def test_case_non_executable_file_is_a_spawn_error(tmp_path: Path) -> None:
    """Process table case 8: a command that is not executable is a spawn error with the reason, no pid."""
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    spec = ServiceSpec(command=[str(script)], restart=RestartSpec(crash_loop_limit=1, fatal_retry_s=None))
    table = table_with(tmp_path, web=spec)

    async def scenario() -> dict[str, Any]:
        await table.start_all()
        service = table.get("web")
        await await_until(lambda: service.state is ServiceState.FATAL, 30, what="FATAL")
        await table.stop_all()
        return service.snapshot()

    snap = asyncio.run(scenario())

    assert (f"permission denied executing '{script}'", None) == (snap["last_error"], snap["pid"])


def test_children_are_watched_through_pidfds_without_a_thread_each(tmp_path: Path) -> None:
    """With the agent's child watcher, five running instances (and their log writers) add no waiting thread, and
    a SIGKILLed one is still seen exiting and restarted."""
    script = tmp_path / "table.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio, os, signal, sys, threading
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from agent.host.launcher import ProcessLauncher, watch_children_by_pidfd
        from agent.profile import Profile, ReadinessSpec, RestartSpec, ServiceSpec
        from agent.supervisor.instances import Paths, expand
        from agent.supervisor.table import ProcessTable

        async def main():
            tmp = Path({str(tmp_path)!r})
            spec = ServiceSpec(command=["sleep", "300"], instances=5, readiness=ReadinessSpec(kind="none"),
                               restart=RestartSpec(backoff_initial_s=0.05, jitter=0.0))
            table = ProcessTable(ProcessLauncher())
            for s in expand(Profile(name="t", source="t", services={{"idle": spec}}), [], Paths(tmp, tmp, tmp / "logs"), "m", {{}}):
                table.add(s)
            await table.start_all()
            running = lambda: [i for i in table.snapshot() if i["state"] == "RUNNING" and i["pid"]]
            while len(running()) < 5:
                await asyncio.sleep(0.02)
            threads = threading.active_count()
            victim = running()[0]
            os.kill(victim["pid"], signal.SIGKILL)
            while not any(i["name"] == victim["name"] and i["restarts"] == 1 and i["state"] == "RUNNING" for i in table.snapshot()):
                await asyncio.sleep(0.02)
            await table.stop_all()
            (tmp / "threads").write_text(str(threads))

        watch_children_by_pidfd()
        asyncio.run(asyncio.wait_for(main(), 60))
        """)
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert 0 == result.returncode, result.stderr
    assert "1" == (tmp_path / "threads").read_text()
