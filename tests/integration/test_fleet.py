"""The fleet query against a redis-server we start: liveness by Redis's clock, and the machines that meet a
job's needs, through the function and through `emp-agent fleet`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from agent.capabilities import caps_hash, static_record
from agent.host.nvml import read_gpus
from agent.registry import keys
from agent.registry.client import RedisRegistry
from agent.registry.fleet import Liveness, Requirement, read_fleet
from agent.registry.heartbeat import Heartbeat
from agent.testing import FakeNvml
from tests.conftest import FIXTURES, RedisServer
from tests.unit.test_capabilities import HOST

SDXL = {"name": "sdxl", "dest": "checkpoints/sdxl.safetensors", "size": 1, "sha256": "a" * 64}


def machine_record(machine_id: str, fixture: str, models: list[dict[str, Any]]) -> dict[str, Any]:
    """The record an agent with one comfyui slot per GPU of the recorded host would write."""
    report = read_gpus(FakeNvml.from_file(FIXTURES / "nvml" / f"{fixture}.json"))
    slots = [
        {
            "name": f"comfyui-{g.index}",
            "service": "comfyui",
            "capabilities": ["comfyui"],
            "port": 8188 + g.index,
            "gpu": {"index": g.index, "uuid": g.uuid},
            "per_gpu": True,
        }
        for g in report.gpus
    ]
    caps = static_record(agent_version="0", profile="p", host=HOST, gpus=report, slots=slots, models=models)
    return {
        "machine_id": machine_id,
        "phase": "ready",
        "reasons": [],
        "capabilities": caps,
        "caps_hash": caps_hash(caps),
        "interval_ms": "10000",
        "services_ready": ["comfyui"],
    }


def test_fleet_lists_liveness_and_the_machines_that_fit_a_job(redis_server: RedisServer) -> None:
    """Four machines: an 8x H100 with sdxl, a T4 without it, one whose beats are late and one whose record
    expired. The query says live/suspect/dead, and only the H100 fits comfyui + 40 GB + sdxl."""
    client = redis_server.client()

    async def scenario() -> tuple[dict[str, Any], list[str]]:
        registry = RedisRegistry(redis_server.url)
        for machine_id, fixture, models in [
            ("h100", "h100x8", [SDXL]),
            ("t4", "t4", []),
            ("late", "l40s", [SDXL]),
            ("gone", "a10g", []),
        ]:
            record = machine_record(machine_id, fixture, models)
            await Heartbeat(registry, machine_id, 10.0, lambda record=record: record).beat()
        await registry.aclose()
        client.hset(keys.machine_key("late"), "last_heartbeat_ms", "1000")  # its beats stopped long ago
        client.delete(keys.machine_key("gone"))  # its record expired
        client.zadd(keys.FLEET_INDEX, {"broken": 1, "odd": 1})
        client.set(keys.machine_key("broken"), "not a hash")  # garbage must not hide the rest
        client.hset(keys.machine_key("odd"), mapping={"capabilities": "[1, 2]", "phase": "ready"})
        everyone = await read_fleet(redis_server.url)
        fits = await read_fleet(redis_server.url, need=Requirement("comfyui", 40000, ("sdxl",)))
        return {m.machine_id: m.liveness for m in everyone}, [m.machine_id for m in fits if m.unmet is None]

    liveness, fits = asyncio.run(scenario())

    assert {
        "h100": Liveness.LIVE,
        "t4": Liveness.LIVE,
        "late": Liveness.SUSPECT,
        "gone": Liveness.DEAD,
        "broken": Liveness.SUSPECT,
        "odd": Liveness.SUSPECT,
    } == liveness
    assert ["h100"] == fits


def test_emp_agent_fleet_prints_the_table_and_fails_when_nothing_fits(redis_server: RedisServer) -> None:
    """`emp-agent fleet` on the registry from EMP_AGENT_REDIS_URL: a table of machines; with a requirement no
    machine meets, exit 1; --json for scripts."""

    async def register() -> None:
        registry = RedisRegistry(redis_server.url)
        record = machine_record("t4-host", "t4", [])
        await Heartbeat(registry, "t4-host", 10.0, lambda: record).beat()
        await registry.aclose()

    asyncio.run(register())
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMP_AGENT_")}
    env["EMP_AGENT_REDIS_URL"] = redis_server.url

    def fleet(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", "fleet", *extra]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    table, none_fit, as_json = fleet(), fleet("--min-gpu-memory-mib", "40000"), fleet("--service", "comfyui", "--json")

    assert 0 == table.returncode, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["MACHINE", "STATE", "AGE"]
    assert "t4-host" in table.stdout
    assert "1x Tesla T4" in table.stdout
    assert (1, "no machines\n") == (none_fit.returncode, none_fit.stdout)
    assert ["t4-host"] == [m["machine_id"] for m in json.loads(as_json.stdout)]
