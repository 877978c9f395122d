"""The registry contract against redis-servers we start: functions, fencing epochs, events, outages, clock skew."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from agent.errors import RegistryError
from agent.registry import keys
from agent.registry.client import Beat, RedisRegistry, Reply
from agent.registry.heartbeat import Heartbeat
from tests.conftest import RedisServer
from tests.helpers import await_until


def recorder(**fields: Any) -> Callable[[], dict[str, Any]]:
    """A record function whose fields the test can change between beats."""
    state: dict[str, Any] = {
        "schema": "1",
        "machine_id": "m1",
        "phase": "ready",
        "capabilities": {"services": ["comfyui"]},
        "caps_hash": "sha256:1",
        **fields,
    }

    def record() -> dict[str, Any]:
        return dict(state)

    record.state = state  # type: ignore[attr-defined]
    return record


def stream_events(client: Any, machine_id: str = "m1") -> list[dict[str, Any]]:
    return [json.loads(fields["event"]) for _id, fields in client.xrange(keys.events_key(machine_id))]


def test_register_beat_and_deregister_through_the_function_library(redis_server: RedisServer) -> None:
    """The first beat registers under epoch 1 (record with TTL, fleet index, a `registered` event); the next beats
    refresh it; a clean stop deletes the record and the index entry and leaves a `deregistered` event."""
    client = redis_server.client()
    key = keys.machine_key("m1")

    async def scenario() -> tuple[dict[str, str], int, float | None, list[str]]:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, recorder())
        await heartbeat.beat()
        await heartbeat.beat()
        stored = client.hgetall(key)
        ttl = client.ttl(key)
        score = client.zscore(keys.FLEET_INDEX, "m1")
        await heartbeat.stop(deregister=True)
        await heartbeat.beat()  # a beat after deregistration writes nothing
        await registry.aclose()
        return stored, ttl, score, [e["event"] for e in stream_events(client)]

    stored, ttl, score, events = asyncio.run(scenario())

    assert ("ready", {"services": ["comfyui"]}, "1") == (
        stored["phase"],
        json.loads(stored["capabilities"]),
        stored["epoch"],
    )
    assert 25 < ttl <= 30
    assert score is not None
    assert abs(int(stored["last_heartbeat_ms"]) - int(score)) < 1000
    assert (0, None) == (client.exists(key), client.zscore(keys.FLEET_INDEX, "m1"))
    assert ["registered", "deregistered"] == events
    assert "emp_v1" in json.dumps(client.function_list())


def test_capabilities_are_written_only_when_their_hash_changes(redis_server: RedisServer) -> None:
    """A beat whose caps_hash Redis already holds refreshes the small fields and leaves the capabilities alone;
    a new hash writes them again."""
    client = redis_server.client()
    key = keys.machine_key("m1")
    record = recorder()

    async def scenario() -> list[tuple[str, str]]:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, record)
        seen = []
        await heartbeat.beat()
        client.hset(key, "capabilities", "marker")  # a rewrite of the capabilities would replace it
        record.state["phase"] = "degraded"  # type: ignore[attr-defined]
        await heartbeat.beat()
        seen.append((client.hget(key, "phase"), client.hget(key, "capabilities")))
        record.state.update(capabilities={"gpus": 7}, caps_hash="sha256:2")  # type: ignore[attr-defined]
        await heartbeat.beat()
        seen.append((client.hget(key, "caps_hash"), client.hget(key, "capabilities")))
        await registry.aclose()
        return seen

    assert [("degraded", "marker"), ("sha256:2", '{"gpus": 7}')] == asyncio.run(scenario())


def test_redis_restart_that_lost_everything_is_healed_within_one_beat(redis_server: RedisServer) -> None:
    """Case 1: Redis stops (beats fail, the agent says disconnected, events queue), comes back empty (no
    functions, no record): the next beat loads the library, is told NOT_REGISTERED, registers again under a new
    epoch and delivers the queued events."""
    client_factory = redis_server.client

    async def scenario() -> tuple[list[bool], dict[str, str], list[str]]:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 0.2, recorder(), unit_random=lambda: 0.5)
        states = []
        await heartbeat.beat()
        heartbeat.start()
        redis_server.stop()
        heartbeat.publish({"type": "service", "event": "state", "instance": "comfyui-0", "state": "BACKOFF"})
        await await_until(lambda: not heartbeat.connected, 10, "disconnected")
        states.append(heartbeat.connected)
        redis_server.start()  # no persistence: the server comes back empty
        await await_until(lambda: heartbeat.connected, 10, "registered again")
        states.append(heartbeat.connected)
        stored = client_factory().hgetall(keys.machine_key("m1"))
        events = [e["event"] for e in stream_events(client_factory())]
        await heartbeat.stop(deregister=False)
        await registry.aclose()
        return states, stored, events

    states, stored, events = asyncio.run(scenario())

    assert [False, True] == states
    assert stored["phase"] == "ready"
    assert "state" in events
    assert "registered" in events


def test_a_newer_registration_fences_the_older_agent_without_flapping(redis_server: RedisServer) -> None:
    """Case 3: two agents with one machine id. The later registration (epoch 2) wins; the older agent's next
    beat is refused, it stops writing for good and says why; the record keeps epoch 2 beat after beat."""
    client = redis_server.client()
    key = keys.machine_key("m1")

    async def scenario() -> tuple[Heartbeat, list[str]]:
        registry_a, registry_b = RedisRegistry(redis_server.url), RedisRegistry(redis_server.url)
        old = Heartbeat(registry_a, "m1", 10.0, recorder(instance_id="a"))
        new = Heartbeat(registry_b, "m1", 10.0, recorder(instance_id="b"))
        await old.beat()
        await new.beat()
        owners = []
        for _ in range(3):
            await old.beat()
            await new.beat()
            owners.append(f"{client.hget(key, 'instance_id')}@{client.hget(key, 'epoch')}")
        await old.stop(deregister=True)  # the fenced agent must not delete the new owner's record either
        owners.append(f"{client.hget(key, 'instance_id')}@{client.hget(key, 'epoch')}")
        await registry_a.aclose()
        await registry_b.aclose()
        return old, owners

    old, owners = asyncio.run(scenario())

    assert ["b@2"] * 4 == owners
    assert (2, False) == (old.fenced_by, old.connected)
    assert old.last_error is not None
    assert "another agent registered machine id m1 (epoch 2 > ours 1)" in old.last_error


def test_a_heartbeat_after_deregistration_does_not_resurrect_the_record(redis_server: RedisServer) -> None:
    """Case 4: a late heartbeat (a paused agent's) for a deregistered record is told NOT_REGISTERED and writes
    nothing."""
    client = redis_server.client()

    async def scenario() -> Reply:
        registry = RedisRegistry(redis_server.url)
        answer = await registry.register("m1", {"machine_id": "m1", "phase": "ready"}, 30, [])
        await registry.deregister("m1", answer.epoch, "", [])
        late = await registry.heartbeat(Beat("m1", answer.epoch, "", {"phase": "ready"}, 30, []))
        await registry.aclose()
        return late.reply

    assert Reply.NOT_REGISTERED == asyncio.run(scenario())
    assert 0 == client.exists(keys.machine_key("m1"))


def test_record_fields_cannot_overwrite_the_fencing_fields(redis_server: RedisServer) -> None:
    """A record whose fields are named epoch or last_heartbeat_ms changes neither: only the functions set them."""
    client = redis_server.client()

    async def scenario() -> None:
        registry = RedisRegistry(redis_server.url)
        sneaky = {"machine_id": "m1", "epoch": "99", "last_heartbeat_ms": "1", "registered_at_ms": "1"}
        answer = await registry.register("m1", sneaky, 30, [])
        await registry.heartbeat(Beat("m1", answer.epoch, "", sneaky, 30, []))
        await registry.aclose()

    asyncio.run(scenario())
    stored = client.hgetall(keys.machine_key("m1"))

    assert "1" == stored["epoch"]
    assert int(stored["last_heartbeat_ms"]) > 1_000_000
    assert int(stored["registered_at_ms"]) > 1_000_000


def test_liveness_uses_the_server_clock_not_the_agents(redis_server: RedisServer, monkeypatch: Any) -> None:
    """Case 5: with the agent's clock 10 minutes fast, the record's last_heartbeat_ms and the fleet index score
    are still Redis TIME."""
    client = redis_server.client()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 600)

    async def scenario() -> None:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, recorder())
        await heartbeat.beat()
        await heartbeat.beat()
        await registry.aclose()

    asyncio.run(scenario())
    seconds, micros = client.time()
    server_ms = int(seconds) * 1000 + int(micros) // 1000

    assert abs(server_ms - int(client.hget(keys.machine_key("m1"), "last_heartbeat_ms"))) < 5000
    assert abs(server_ms - int(client.zscore(keys.FLEET_INDEX, "m1") or 0)) < 5000


def test_events_queue_is_bounded_and_counts_what_it_dropped(redis_server: RedisServer) -> None:
    """While Redis is away at most EVENT_QUEUE events wait (the oldest go, counted); the rest arrive in order."""
    from agent.registry.heartbeat import EVENT_QUEUE

    client = redis_server.client()

    async def scenario() -> Heartbeat:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, recorder())
        for n in range(EVENT_QUEUE + 5):
            heartbeat.publish({"type": "test", "event": "n", "n": n})
        while heartbeat.queued:
            await heartbeat.beat()
        await registry.aclose()
        return heartbeat

    heartbeat = asyncio.run(scenario())
    numbers = [e["n"] for e in stream_events(client) if e.get("type") == "test"]

    assert 5 == heartbeat.events_dropped
    assert list(range(5, EVENT_QUEUE + 5)) == numbers


def test_compat_machine_status_is_published_with_each_beat(redis_server: RedisServer) -> None:
    """The original `machine:status:<id>` message goes out on the heartbeat's round trip."""
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe(keys.compat_channel("m1"))
    pubsub.get_message(timeout=2)

    async def scenario() -> None:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(
            registry, "m1", 10.0, recorder(), compat=lambda update: {"machine_id": "m1", "update_type": update}
        )
        await heartbeat.beat()  # registers: no status message yet
        await heartbeat.beat()
        await registry.aclose()

    asyncio.run(scenario())
    message = pubsub.get_message(timeout=5)

    assert message is not None
    assert {"machine_id": "m1", "update_type": "periodic"} == json.loads(message["data"])


def test_errors_never_show_the_password(short_tmp: Any) -> None:
    """An unreachable password-protected URL fails with the password masked."""

    async def scenario() -> str:
        registry = RedisRegistry("redis://default:hunter2hunter2@127.0.0.1:1/0")
        try:
            await registry.register("m1", {"machine_id": "m1"}, 30, [])
        except RegistryError as exc:
            return str(exc)
        finally:
            await registry.aclose()
        return ""

    message = asyncio.run(scenario())

    assert message.startswith("redis://default:***@127.0.0.1:1/0: ")
    assert "hunter2" not in message


def test_a_record_from_an_older_epoch_means_register_again_not_fenced(redis_server: RedisServer) -> None:
    """Redis restored from an old snapshot (or a failover to a lagging replica) holds epoch 1 while the agent has
    epoch 2: the agent registers again instead of fencing itself for good."""
    client = redis_server.client()
    key = keys.machine_key("m1")

    async def scenario() -> Heartbeat:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, recorder(), unit_random=lambda: 0.0)
        await heartbeat.beat()
        client.hset(key, "epoch", "0")  # the server went back in time
        await heartbeat.beat()  # told NOT_REGISTERED
        await heartbeat.beat()  # registers again
        await registry.aclose()
        return heartbeat

    heartbeat = asyncio.run(scenario())

    assert (None, True) == (heartbeat.fenced_by, heartbeat.connected)
    assert int(client.hget(key, "epoch") or 0) == heartbeat.epoch


def test_a_late_registration_of_the_same_agent_is_adopted_not_fenced(redis_server: RedisServer) -> None:
    """A registration that timed out and then arrived after its retry took a newer epoch: the same agent instance
    adopts it and keeps beating."""
    client = redis_server.client()
    key = keys.machine_key("m1")

    async def scenario() -> Heartbeat:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, recorder(instance_id="agent-a"), instance="agent-a")
        await heartbeat.beat()  # epoch 1
        late = RedisRegistry(redis_server.url)  # the stalled first attempt lands now
        await late.register("m1", {"machine_id": "m1", "instance_id": "agent-a"}, 30, [])
        await late.aclose()
        await heartbeat.beat()
        await registry.aclose()
        return heartbeat

    heartbeat = asyncio.run(scenario())

    assert (None, 2, True) == (heartbeat.fenced_by, heartbeat.epoch, heartbeat.connected)
    assert "2" == client.hget(key, "epoch")


def test_capabilities_are_resent_when_the_server_holds_other_ones(redis_server: RedisServer) -> None:
    """After a restore from an older snapshot with the same epoch, the stored capabilities are not the ones the
    agent last sent: the server asks for them and the record is whole again in the same beat."""
    client = redis_server.client()
    key = keys.machine_key("m1")
    record = recorder()

    async def scenario() -> None:
        registry = RedisRegistry(redis_server.url)
        heartbeat = Heartbeat(registry, "m1", 10.0, record)
        await heartbeat.beat()
        record.state.update(capabilities={"gpus": 7}, caps_hash="sha256:2")  # type: ignore[attr-defined]
        await heartbeat.beat()
        client.hset(key, mapping={"caps_hash": "sha256:1", "capabilities": '{"services": ["comfyui"]}'})
        await heartbeat.beat()
        await registry.aclose()

    asyncio.run(scenario())

    assert ("sha256:2", {"gpus": 7}) == (client.hget(key, "caps_hash"), json.loads(client.hget(key, "capabilities")))
