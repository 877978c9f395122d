"""The registry against a redis-server we start: record, TTL, removal, and recovery after an outage."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from agent.errors import RegistryError
from agent.registry import keys
from agent.registry.client import RedisRegistry
from agent.registry.heartbeat import Heartbeat
from tests.conftest import RedisServer


def record() -> dict[str, Any]:
    return {"schema": "1", "machine_id": "m1", "phase": "ready", "capabilities": {"services": ["comfyui"]}}


def test_beat_writes_the_record_with_a_ttl_and_stop_removes_it(redis_server: RedisServer) -> None:
    """A heartbeat writes the hash (JSON for nested fields), sets TTL 3x interval and indexes the machine."""
    client = redis_server.client()

    async def scenario() -> tuple[dict[str, str], int, float | None]:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, record)
        await heartbeat.beat()
        stored = client.hgetall(keys.machine_key("m1"))
        ttl = client.ttl(keys.machine_key("m1"))
        score = client.zscore(keys.FLEET_INDEX, "m1")
        await heartbeat.stop(deregister=True)
        await registry.aclose()
        return stored, ttl, score

    stored, ttl, score = asyncio.run(scenario())

    assert ("ready", {"services": ["comfyui"]}) == (stored["phase"], json.loads(stored["capabilities"]))
    assert 25 < ttl <= 30
    assert score is not None
    assert int(stored["last_heartbeat_ms"]) == int(score)
    assert (0, None) == (client.exists(keys.machine_key("m1")), client.zscore(keys.FLEET_INDEX, "m1"))


def test_capabilities_are_written_only_when_their_hash_changes(redis_server: RedisServer) -> None:
    """A beat with the caps_hash Redis already holds refreshes the small fields and leaves the capabilities alone;
    a new hash, or a record that expired, writes them again."""
    client = redis_server.client()
    key = keys.machine_key("m1")
    first = {"phase": "ready", "capabilities": {"gpus": 8}, "caps_hash": "sha256:1"}
    fewer = {"phase": "degraded", "capabilities": {"gpus": 7}, "caps_hash": "sha256:2"}

    async def scenario() -> list[tuple[str, str]]:
        registry = RedisRegistry(redis_server.url)
        seen = []
        await registry.write("m1", first, 30)
        client.hset(key, "capabilities", "marker")  # a rewrite of the capabilities would replace it
        await registry.write("m1", {**first, "phase": "degraded"}, 30)
        seen.append((client.hget(key, "phase"), client.hget(key, "capabilities")))
        await registry.write("m1", fewer, 30)
        seen.append((client.hget(key, "phase"), client.hget(key, "capabilities")))
        client.delete(key)
        await registry.write("m1", fewer, 30)
        seen.append((client.hget(key, "caps_hash"), client.hget(key, "capabilities")))
        await registry.aclose()
        return seen

    assert [
        ("degraded", "marker"),
        ("degraded", '{"gpus": 7}'),
        ("sha256:2", '{"gpus": 7}'),
    ] == asyncio.run(scenario())


def test_heartbeat_survives_redis_outage_and_reregisters(redis_server: RedisServer) -> None:
    """Redis going away marks the registry disconnected; when it is back the next beat writes the record again."""

    async def scenario() -> list[bool]:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 0.1, record)
        seen = []
        await heartbeat.beat()
        seen.append(heartbeat.connected)
        redis_server.stop()
        with pytest.raises(RegistryError):
            await heartbeat.beat()
        seen.append(heartbeat.connected)
        redis_server.start()
        heartbeat.start()
        deadline = asyncio.get_running_loop().time() + 20
        while not heartbeat.connected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        seen.append(heartbeat.connected)
        await heartbeat.stop(deregister=False)
        await registry.aclose()
        return seen

    assert [True, False, True] == asyncio.run(scenario())
    assert redis_server.client().exists(keys.machine_key("m1"))


def test_errors_never_show_the_password(short_tmp) -> None:  # type: ignore[no-untyped-def]
    """An unreachable password-protected URL fails with the password masked."""

    async def scenario() -> str:
        registry = RedisRegistry("redis://default:hunter2hunter2@127.0.0.1:1/0")
        try:
            await registry.write("m1", record(), 30)
        except RegistryError as exc:
            return str(exc)
        finally:
            await registry.aclose()
        return "no error"

    message = asyncio.run(scenario())

    assert message.startswith("redis://default:***@127.0.0.1:1/0: ")
    assert "hunter2" not in message
