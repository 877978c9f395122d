"""The model pull in its own child process, as the agent runs it: what it relays, how it stops, how it fails."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.errors import ModelPullError
from agent.profile import ModelSpec
from agent.pull.worker import PullWorker
from agent.settings import Settings
from tests.conftest import REPO
from tests.fileserver import FileServer, serve_files
from tests.helpers import await_until, wait_until
from tests.integration.test_pull import BIG, MIB, SMALL, _covered, sha

TOKEN = "hf-worker-secret-token-4711"


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serve_files({"small.bin": SMALL, "big.bin": BIG}) as files:
        yield files


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"pull_disk_margin_mib": 0, "pull_ranged_min_mib": 64, **overrides}
    return Settings(model_root=tmp_path / "models", state_dir=tmp_path / "state", **values)


def model(server: FileServer, name: str, data: bytes, dest: str, **extra: Any) -> ModelSpec:
    return ModelSpec(url=f"{server.url}/{name}", dest=dest, sha256=sha(data), size=len(data), **extra)


def test_the_worker_pulls_and_relays_events_progress_and_the_result(
    tmp_path: Path, server: FileServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Both models arrive verified; the lifecycle events and the final progress come back to the agent's side;
    the source token (sent to the server) appears in none of the worker's log lines."""
    events: list[dict[str, Any]] = []
    environ = {**os.environ, "HF_TOKEN_FOR_TEST": TOKEN}
    models = {
        "a": model(server, "small.bin", SMALL, "a/small.bin", auth_env="HF_TOKEN_FOR_TEST"),
        "b": model(server, "big.bin", BIG, "b/big.bin"),
    }
    worker = PullWorker(settings(tmp_path), environ, sink=events.append, context={"machine_id": "m-worker"})

    statuses = asyncio.run(worker.pull(models))

    assert {"a": "pulled", "b": "pulled"} == {name: s.state for name, s in statuses.items()}
    assert SMALL == (tmp_path / "models" / "a" / "small.bin").read_bytes()
    assert BIG == (tmp_path / "models" / "b" / "big.bin").read_bytes()
    names = [e["event"] for e in events]
    assert "models.plan" == names[0]
    assert "models.done" == names[-1]
    assert 2 == names.count("model.verified")
    final = worker.progress.snapshot()
    assert (len(SMALL) + len(BIG), 2, True) == (final["bytes_done"], final["items_done"], final["finished"])
    assert any(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in server.requests)
    logged = capfd.readouterr().err
    assert "model.verified" in logged
    assert "m-worker" in logged
    assert TOKEN not in logged


def test_cancelling_stops_the_worker_and_the_next_pull_resumes(tmp_path: Path, server: FileServer) -> None:
    """Cancelled mid-file (the server holding the rest back), the worker is gone within its stop timeout, the
    partial stays, and the next pull fetches only what the partial does not hold."""
    gate = threading.Event()
    server.rate["big.bin"] = 1.5 * MIB  # a slow link: the partial's record (saved once a second) moves on the way
    server.pause_at["big.bin"] = (len(BIG) // 2, gate)
    models = {"b": model(server, "big.bin", BIG, "b/big.bin")}
    worker = PullWorker(settings(tmp_path), os.environ, stop_timeout_s=5)
    pids: list[int] = []

    async def cancel_midway() -> None:
        task = asyncio.create_task(worker.pull(models))
        await await_until(lambda: _covered(tmp_path / "models") >= 3 * MIB, deadline_s=60, what="3 MiB recorded")
        assert worker.pid is not None
        pids.append(worker.pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    kept = _covered(tmp_path / "models")
    del server.pause_at["big.bin"], server.rate["big.bin"]
    gate.set()
    server.requests.clear()

    statuses = asyncio.run(PullWorker(settings(tmp_path), os.environ).pull(models))

    assert "pulled" == statuses["b"].state
    assert BIG == (tmp_path / "models" / "b" / "big.bin").read_bytes()
    assert len(BIG) - kept == sum(r.sent for r in server.data_requests("big.bin"))


def test_a_worker_killed_mid_pull_is_a_pull_error_naming_the_signal(tmp_path: Path, server: FileServer) -> None:
    """SIGKILL from outside (the OOM killer): the pull fails with a reason, the agent's side does not hang."""
    gate = threading.Event()
    server.pause_at["big.bin"] = (len(BIG) // 4, gate)
    worker = PullWorker(settings(tmp_path), os.environ)

    async def kill_midway() -> None:
        task = asyncio.create_task(worker.pull({"b": model(server, "big.bin", BIG, "b/big.bin")}))
        await await_until(lambda: worker.progress.planned_yet, deadline_s=60, what="the plan")
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        await task

    try:
        with pytest.raises(ModelPullError, match="killed by signal 9"):
            asyncio.run(kill_midway())
    finally:
        gate.set()


def test_a_plan_the_disk_cannot_hold_is_relayed_as_a_pull_error(tmp_path: Path, server: FileServer) -> None:
    """The child's own ModelPullError (a disk margin larger than any disk) reaches the agent with its text."""
    worker = PullWorker(settings(tmp_path, pull_disk_margin_mib=1024**3), os.environ)

    with pytest.raises(ModelPullError, match="free"):
        asyncio.run(worker.pull({"a": model(server, "small.bin", SMALL, "a/small.bin")}))


def test_only_the_pull_settings_travel_to_the_worker(tmp_path: Path) -> None:
    """The request carries the pull_* settings and paths, never the Redis URL (with its password) or the token
    file."""
    worker = PullWorker(
        settings(tmp_path, redis_url="redis://:redis-secret-pw@127.0.0.1:1/0", pull_attempts=7), os.environ
    )

    request = worker.request({})

    assert 7 == request["settings"]["pull_attempts"]
    assert str(tmp_path / "models") == request["settings"]["model_root"]
    assert "redis-secret-pw" not in str(request)
    assert not any(name.startswith(("redis", "http_")) for name in request["settings"])


def test_the_worker_dies_with_a_killed_agent(tmp_path: Path, server: FileServer) -> None:
    """An agent SIGKILLed mid-pull takes its worker with it (no orphan holding the partial's lock until its
    transfers time out)."""
    gate = threading.Event()
    server.pause_at["big.bin"] = (len(BIG) // 4, gate)
    pidfile = tmp_path / "worker.pid"
    script = tmp_path / "agent.py"
    script.write_text(
        textwrap.dedent(f"""
        import asyncio, os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from agent.profile import ModelSpec
        from agent.pull.worker import PullWorker
        from agent.settings import Settings

        async def main():
            worker = PullWorker(Settings(model_root={str(tmp_path / "models")!r}, state_dir={str(tmp_path / "state")!r},
                                         pull_disk_margin_mib=0), os.environ)
            task = asyncio.create_task(worker.pull({{"b": ModelSpec(url={server.url + "/big.bin"!r}, dest="b.bin",
                                                                   sha256={sha(BIG)!r}, size={len(BIG)})}}))
            while not worker.progress.planned_yet:
                await asyncio.sleep(0.05)
            Path({str(pidfile)!r}).write_text(str(worker.pid))
            await task

        asyncio.run(main())
        """)
    )
    agent = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), timeout=60, what="the worker's pid")
        worker = psutil.Process(int(pidfile.read_text()))
        agent.kill()
        agent.wait()
        wait_until(
            lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, timeout=20, what="worker gone"
        )
    finally:
        agent.kill()
        gate.set()
