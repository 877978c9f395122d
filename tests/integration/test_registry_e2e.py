"""The whole agent against a redis-server the test starts and stops: outages never touch the services, and the
machine is back in Redis within a heartbeat; an agent started before Redis registers when it appears; two agents
with one machine id do not flap."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from agent.registry import keys
from tests.conftest import RedisServer
from tests.helpers import wait_until
from tests.integration.test_cli_e2e import AgentProcess, service

pytestmark = pytest.mark.slow
INTERVAL_S = 0.5


def web_profile(directory: Path) -> Path:
    profile = directory / "web.toml"
    profile.write_text(
        f'[services.web]\ncommand = ["{sys.executable}", "-m", "http.server", "{{port}}", "--bind", "127.0.0.1"]\n'
        'port = 28180\ncapabilities = ["web"]\n[services.web.readiness]\nkind = "http"\n'
    )
    return profile


def test_redis_outage_leaves_services_alone_and_the_record_returns_within_a_beat(
    short_tmp: Path, redis_server: RedisServer
) -> None:
    """Case 1: Redis stopped for longer than the record's TTL while the agent runs: the service keeps its pid,
    status says the registry is disconnected; Redis restarted empty: the record is back within a heartbeat."""
    agent = AgentProcess(
        short_tmp, web_profile(short_tmp), {"EMP_AGENT_REDIS_URL": redis_server.url, "EMP_AGENT_MACHINE_ID": "e2e-o"}
    )
    key = keys.machine_key("e2e-o")
    try:
        status = agent.wait_phase("ready")
        pid = service(status, "web-0")["pid"] if any(s["name"] == "web-0" for s in status["services"]) else None
        pid = pid or service(status, "web")["pid"]
        wait_until(lambda: redis_server.client().exists(key), 20, what="registered")

        redis_server.stop()
        down = wait_until(
            lambda: (s := agent.status()) and not s["registry"]["connected"] and s, 30, what="disconnected"
        )
        assert "registry: not connected" in down["reasons"]
        time.sleep(3 * INTERVAL_S * 2)  # an outage longer than the record's TTL (3 beats)
        during = agent.status()
        assert during is not None
        assert [(pid, "RUNNING")] == [(s["pid"], s["state"]) for s in during["services"]]

        redis_server.start()  # no persistence: it comes back empty
        started = time.monotonic()
        wait_until(lambda: redis_server.client().exists(key), 20, interval=0.02, what="record back")
        elapsed = time.monotonic() - started
        assert elapsed < INTERVAL_S * 1.1 + 1.5, f"record back after {elapsed:.2f}s"
        stored = redis_server.client().hgetall(key)
        assert ("ready", ["web"]) == (stored["phase"], json.loads(stored["services_ready"]))
        assert int(stored["epoch"]) >= 1
    finally:
        code = agent.stop()
    assert 0 == code


def test_agent_started_before_redis_bootstraps_and_registers_when_it_appears(
    short_tmp: Path, redis_server: RedisServer
) -> None:
    """Case 2: Redis unreachable at start: the bootstrap completes and the service runs (degraded: registry not
    connected); when Redis appears the agent registers and becomes ready."""
    redis_server.stop()
    agent = AgentProcess(
        short_tmp, web_profile(short_tmp), {"EMP_AGENT_REDIS_URL": redis_server.url, "EMP_AGENT_MACHINE_ID": "e2e-l"}
    )
    try:
        status = agent.wait_phase("degraded")
        status = wait_until(
            lambda: (s := agent.status()) and s["services"] and s["services"][0]["state"] == "RUNNING" and s,
            30,
            what="service running",
        )
        assert ["registry: not connected"] == status["reasons"]
        redis_server.start()
        agent.wait_phase("ready")
        stored = wait_until(lambda: redis_server.client().hgetall(keys.machine_key("e2e-l")), 20, what="record")
        assert "ready" == stored["phase"]
    finally:
        code = agent.stop()
    assert 0 == code


def test_two_agents_with_one_machine_id_the_later_wins_and_the_older_says_so(
    short_tmp: Path, redis_server: RedisServer
) -> None:
    """Case 3 through the CLI: a second agent (another state dir, same machine id) registers; the first is fenced,
    degraded with the reason in its status, and never writes again; the record stays the second's."""
    first_dir, second_dir = short_tmp / "a", short_tmp / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    env = {"EMP_AGENT_REDIS_URL": redis_server.url, "EMP_AGENT_MACHINE_ID": "e2e-clone"}
    first = AgentProcess(first_dir, web_profile(first_dir), env)
    second = None
    key = keys.machine_key("e2e-clone")
    client = redis_server.client()
    try:
        first.wait_phase("ready")
        wait_until(lambda: client.hget(key, "epoch") == "1", 20, what="first registered")
        second = AgentProcess(second_dir, web_profile(second_dir), env)
        second.wait_phase("ready")
        fenced = wait_until(lambda: (s := first.status()) and s["registry"]["fenced_by"] and s, 30, what="first fenced")
        assert "degraded" == fenced["phase"]
        assert any("another agent registered machine id e2e-clone" in r for r in fenced["reasons"])
        owner = client.hget(key, "instance_id")
        time.sleep(INTERVAL_S * 4)  # several beats of both agents: no flapping
        assert (owner, "2") == (client.hget(key, "instance_id"), client.hget(key, "epoch"))
        assert "registry write fenced" in first.read_log()
    finally:
        assert 0 == first.stop()
        if second is not None:
            assert 0 == second.stop()
