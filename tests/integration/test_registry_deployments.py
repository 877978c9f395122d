"""The registry on the deployment forms operators run: Sentinel with a failover, a three-node Cluster, TLS with a
private CA and an ACL user limited to the emp: prefix. Every server is started by the test on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from agent.errors import RegistryError
from agent.registry import keys
from agent.registry.client import RedisRegistry
from agent.registry.heartbeat import Heartbeat
from agent.registryurl import TlsFiles
from tests.helpers import await_until
from tests.integration.test_registry import recorder
from tests.redisfarm import Cluster, SentinelGroup, TlsServer

pytestmark = pytest.mark.slow


@pytest.fixture
def sentinel_group(short_tmp: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(short_tmp)
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def cluster(short_tmp: Path) -> Iterator[Cluster]:
    farm = Cluster(short_tmp)
    try:
        farm.start()
        yield farm
    finally:
        farm.stop()


@pytest.fixture
def tls_server(short_tmp: Path) -> Iterator[TlsServer]:
    server = TlsServer(short_tmp)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_sentinel_failover_is_followed_and_the_record_kept(sentinel_group: SentinelGroup) -> None:
    """Case 6: the master is killed; Sentinel promotes the replica; the agent's beats reach the new master and
    its record is there (same epoch, or a fresh registration if the replica had not caught up)."""
    old_master = sentinel_group.master_port()

    async def scenario() -> dict[str, str]:
        registry = RedisRegistry(sentinel_group.url)
        heartbeat = Heartbeat(registry, "m1", 0.3, recorder(), unit_random=lambda: 0.5)
        await heartbeat.beat()
        heartbeat.start()
        sentinel_group.kill(old_master)
        await await_until(lambda: sentinel_group.master_port() != old_master, 60, "failover")
        new_master = redis.Redis(port=sentinel_group.master_port(), decode_responses=True)

        def record_fresh() -> dict[str, str] | None:
            stored = new_master.hgetall(keys.machine_key("m1"))
            return stored if stored and heartbeat.connected else None

        stored = await await_until(record_fresh, 30, "record on the new master")
        before = int(stored["last_heartbeat_ms"])
        await await_until(
            lambda: int(new_master.hget(keys.machine_key("m1"), "last_heartbeat_ms") or 0) > before, 10, "a new beat"
        )
        await heartbeat.stop(deregister=True)
        await registry.aclose()
        return stored

    stored = asyncio.run(scenario())

    assert "ready" == stored["phase"]
    assert sentinel_group.master_port() != old_master


def test_cluster_registration_heartbeats_and_events_without_crossslot(cluster: Cluster) -> None:
    """Case 7: on a three-node Cluster the library is on every master, and register, heartbeat, events and
    deregister work for machines whose keys land on different nodes."""
    machines = [f"m{n}" for n in range(6)]

    async def scenario() -> list[tuple[str, str, int]]:
        registry = RedisRegistry(cluster.url)
        beats = [
            Heartbeat(registry, m, 10.0, recorder(machine_id=m), compat=lambda update: {"update_type": update})
            for m in machines
        ]
        for beat in beats:
            await beat.beat()
            beat.publish({"type": "service", "event": "state", "state": "RUNNING"})
            await beat.beat()
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
        seen = [
            (
                m,
                client.hget(keys.machine_key(m), "epoch") or "",
                len(client.xrange(keys.events_key(m))),
            )
            for m in machines
        ]
        for beat in beats:
            await beat.stop(deregister=True)
        assert 0 == sum(client.exists(keys.machine_key(m)) for m in machines)
        client.close()
        await registry.aclose()
        return seen

    seen = asyncio.run(scenario())
    slots = {key_slot(keys.machine_key(m).encode()) for m in machines}

    assert [(m, "1", 2) for m in machines] == seen  # "registered" and the service event
    assert len(slots) > 1


def test_tls_with_a_private_ca_and_an_acl_user(tls_server: TlsServer) -> None:
    """Case 8: rediss:// with the private CA and an ACL user allowed only emp:* keys registers and beats; the same
    user cannot touch any other key."""

    async def scenario() -> None:
        registry = RedisRegistry(tls_server.url, TlsFiles(ca_file=tls_server.ca_file))
        heartbeat = Heartbeat(registry, "m1", 10.0, recorder())
        await heartbeat.beat()
        await heartbeat.beat()
        assert heartbeat.connected
        await heartbeat.stop(deregister=True)
        await registry.aclose()

    asyncio.run(scenario())
    events = tls_server.admin().xrange(keys.events_key("m1"))
    agent = redis.Redis(
        port=tls_server.port,
        ssl=True,
        ssl_ca_certs=str(tls_server.ca_file),
        username=tls_server.user,
        password=tls_server.password,
    )

    assert ["registered", "deregistered"] == [json.loads(f["event"])["event"] for _id, f in events]
    with pytest.raises(redis.exceptions.NoPermissionError):
        agent.set("worker:someone-else", "x")


def test_tls_with_the_wrong_ca_fails_with_a_clear_message(tls_server: TlsServer, tmp_path: Path) -> None:
    """A CA that did not sign the server's certificate: a RegistryError saying so, without the password."""
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))

    async def scenario() -> Any:
        registry = RedisRegistry(tls_server.url, TlsFiles(ca_file=other))
        try:
            await registry.register("m1", {"machine_id": "m1"}, 30, [])
        finally:
            await registry.aclose()

    with pytest.raises(RegistryError) as caught:
        asyncio.run(scenario())

    assert "certificate verify failed" in str(caught.value)
    assert "redis_ca_file" in str(caught.value)
    assert tls_server.password not in str(caught.value)
