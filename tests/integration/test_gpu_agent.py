"""A real agent (in this process, real child services, a redis-server we start) on a recorded GPU host: the GPUs it
may use, and what a GPU lost at a re-probe does to the machine and its published capabilities."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pynvml

from agent.daemon import Agent
from agent.host.gpu import GpuReport, GpuState
from agent.host.nvml import read_gpus
from agent.machine import Phase
from agent.profile import load_profile
from agent.registry import keys
from agent.testing import FakeNvml
from tests.conftest import FIXTURES, REPO, RedisServer, agent_settings
from tests.helpers import await_until


class RecordedHost:
    """The probe, answered in-process from a recorded 8x H100 host whose faults the test switches."""

    def __init__(self) -> None:
        self.nvml = FakeNvml.from_file(FIXTURES / "nvml" / "h100x8.json")
        self.wedged = False

    async def probe(self) -> GpuReport:
        if self.wedged:
            return GpuReport(GpuState.TIMEOUT, "NVML probe did not answer within 20s (wedged GPU or driver?)")
        return read_gpus(self.nvml)


def gpu_agent(short_tmp: Path, redis_server: RedisServer, host: RecordedHost, visible: str, extra: str = "") -> Agent:
    """An agent with one per-GPU HTTP service on the recorded host, re-probing every 0.2 s."""
    profile_path = short_tmp / "gpu.toml"
    profile_path.write_text(
        "[services.worker]\n"
        f'command = ["{sys.executable}", "{REPO}/tests/programs/http_service.py", "{{port}}", '
        '"{state_dir}/{instance}.pid"]\n'
        'per_gpu = true\nport = 18600\ncapabilities = ["comfyui"]\nstop_timeout_s = 5\n'
        f'{extra}[services.worker.readiness]\nkind = "http"\n'
    )
    settings = agent_settings(
        short_tmp, redis_server.url, "m-gpu", heartbeat_interval_s=0.3, gpu_reprobe_interval_s=0.2
    )
    environ = {"PATH": os.environ["PATH"], "CUDA_VISIBLE_DEVICES": visible}
    return Agent(settings, load_profile(str(profile_path), short_tmp), gpu_probe=host, environ=environ)


def test_lost_gpu_takes_its_slot_out_of_the_record_and_comes_back(short_tmp: Path, redis_server: RedisServer) -> None:
    """With CUDA_VISIBLE_DEVICES=2,5 the agent runs two slots pinned by UUID. GPU 5 lost at a re-probe: the machine
    is degraded with the reason, a gpu.lost event is published, the slot leaves the capabilities in Redis (new
    caps_hash) and services_ready; when the GPU answers again everything comes back. The service keeps running."""
    host = RecordedHost()
    agent = gpu_agent(short_tmp, redis_server, host, "2,5")
    client = redis_server.client()
    key = keys.machine_key("m-gpu")

    def published() -> dict[str, Any]:
        stored = client.hgetall(key)
        return {
            "caps_hash": stored.get("caps_hash"),
            "slots": [
                s["gpu"]["index"] for s in json.loads(stored.get("capabilities", '{"services": []}'))["services"]
            ],
            "ready": json.loads(stored.get("services_ready", "[]")),
        }

    async def scenario() -> None:
        run = asyncio.create_task(agent.run())
        try:
            await await_until(lambda: agent.phase()[0] is Phase.READY, 60, "ready")
            snapshot = agent.table.snapshot()
            assert [
                ("worker-0", "GPU-00000002-0000-0000-0000-000000000002"),
                ("worker-1", "GPU-00000005-0000-0000-0000-000000000005"),
            ] == [(s["name"], s["gpu"]["uuid"]) for s in snapshot]
            first = await await_until(lambda: (p := published())["slots"] == [2, 5] and p, 20, "two slots published")
            assert ["comfyui"] == first["ready"]

            host.nvml.errors[("nvmlDeviceGetHandleByIndex", 5)] = pynvml.NVML_ERROR_GPU_IS_LOST
            await await_until(lambda: agent.phase()[0] is Phase.DEGRADED, 20, "degraded")
            assert any("gpu 5: lost" in reason for reason in agent.phase()[1])
            lost = await await_until(lambda: (p := published())["slots"] == [2] and p, 20, "slot withdrawn")
            assert lost["caps_hash"] != first["caps_hash"]
            events = [e for e in agent.table.events if e.get("type") == "gpu"]
            assert [("gpu.lost", 5)] == [(e["event"], e["gpu"]) for e in events]
            assert all(s["state"] == "RUNNING" for s in agent.table.snapshot())

            del host.nvml.errors[("nvmlDeviceGetHandleByIndex", 5)]
            await await_until(lambda: agent.phase()[0] is Phase.READY, 20, "ready again")
            back = await await_until(lambda: (p := published())["slots"] == [2, 5] and p, 20, "slot back")
            assert back["caps_hash"] == first["caps_hash"]
        finally:
            agent.handle_exit(signal.SIGTERM)
            assert 0 == await run

    asyncio.run(scenario())


def test_gpus_unreadable_at_boot_are_not_advertised_and_ask_for_a_restart_when_back(
    short_tmp: Path, redis_server: RedisServer
) -> None:
    """The boot probe times out: the per-GPU service runs on a CPU slot, which is not offered to jobs, and the
    machine is degraded. When the driver answers again the GPUs are healthy but have no service: the machine stays
    degraded and says to restart the agent."""
    host = RecordedHost()
    host.wedged = True
    agent = gpu_agent(short_tmp, redis_server, host, "0")
    client = redis_server.client()
    key = keys.machine_key("m-gpu")

    async def scenario() -> None:
        run = asyncio.create_task(agent.run())
        try:
            await await_until(lambda: agent.phase()[0] is Phase.DEGRADED, 60, "degraded")
            await await_until(lambda: client.hget(key, "capabilities"), 20, "registered")
            assert [] == json.loads(client.hget(key, "capabilities") or "{}")["services"]
            assert [] == json.loads(client.hget(key, "services_ready") or "null")

            host.wedged = False
            await await_until(
                lambda: any("restart the agent to use it" in r for r in agent.phase()[1]), 20, "restart asked"
            )
            assert Phase.DEGRADED is agent.phase()[0]
        finally:
            agent.handle_exit(signal.SIGTERM)
            assert 0 == await run

    asyncio.run(scenario())


def test_gpu_memory_limit_restarts_the_instance_as_a_failure(short_tmp: Path, redis_server: RedisServer) -> None:
    """A per-GPU service with gpu_memory_limit_mib: when NVML attributes more GPU memory than that to its process
    (the recorded host, with the real service's pid in GPU 2's process list), the instance is stopped and restarted
    as a failure, with the reason."""
    host = RecordedHost()
    agent = gpu_agent(short_tmp, redis_server, host, "2", extra="gpu_memory_limit_mib = 8000\n")

    async def scenario() -> dict[str, Any]:
        run = asyncio.create_task(agent.run())
        try:
            await await_until(lambda: agent.phase()[0] is Phase.READY, 60, "ready")
            (instance,) = agent.table.snapshot()
            host.nvml.recording["gpus"][2]["processes"] = [{"pid": instance["pid"], "used_memory": 9000 * 2**20}]
            restarted = await await_until(
                lambda: (s := agent.table.snapshot()[0])["restarts"] >= 1 and s, 30, "a restart over the limit"
            )
            host.nvml.recording["gpus"][2]["processes"] = []
            return restarted
        finally:
            agent.handle_exit(signal.SIGTERM)
            assert 0 == await run

    restarted = asyncio.run(scenario())

    assert "GPU memory limit: 9000 MiB > 8000 MiB" == restarted["last_error"]
