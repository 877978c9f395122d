"""The control API on a real unix socket, read by the CLI's stdlib client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.api.client import request_json
from agent.api.server import ControlApi
from agent.errors import AgentError, AgentNotRunning
from tests.conftest import FIXTURES, REPO
from tests.helpers import await_until


def status() -> dict[str, Any]:
    return {"phase": "degraded", "reasons": ["service web-0: BACKOFF"], "machine_id": "m1"}


def test_status_healthz_and_readyz_over_the_socket(short_tmp: Path) -> None:
    """/status is the document, /healthz is 200 while alive, /readyz is 503 unless ready; socket mode 0660."""
    sock = short_tmp / "agent.sock"

    async def scenario() -> list[Any]:
        api = ControlApi(sock, status)
        await api.start()
        try:
            mode = stat.S_IMODE(sock.stat().st_mode)
            results = await asyncio.gather(
                *(asyncio.to_thread(request_json, sock, "GET", p) for p in ("/status", "/healthz", "/readyz"))
            )
            return [mode, *results]
        finally:
            await api.stop()

    mode, got_status, health, ready = asyncio.run(scenario())

    assert 0o660 == mode
    assert (200, status()) == got_status
    assert (200, {"status": "ok"}) == health
    assert (503, {"phase": "degraded", "reasons": ["service web-0: BACKOFF"]}) == ready
    assert not sock.exists()


def test_client_says_the_agent_is_not_running(short_tmp: Path) -> None:
    """No socket: AgentNotRunning with the path in the message."""
    with pytest.raises(AgentNotRunning, match="emp-agent is not running"):
        request_json(short_tmp / "agent.sock", "GET", "/status")


def test_a_second_agent_is_refused_and_a_stale_socket_is_replaced(short_tmp: Path) -> None:
    """A live socket is never stolen; one left by a dead agent is cleaned up."""
    sock = short_tmp / "agent.sock"

    async def scenario() -> None:
        first = ControlApi(sock, status)
        await first.start()
        with pytest.raises(AgentError, match="already serving"):
            await ControlApi(sock, status).start()
        await first.stop()

    asyncio.run(scenario())

    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()

    async def restart() -> int:
        api = ControlApi(sock, status)
        await api.start()
        code, _ = await asyncio.to_thread(request_json, sock, "GET", "/healthz")
        await api.stop()
        return code

    assert 200 == asyncio.run(restart())


def test_a_regular_file_at_the_socket_path_is_not_deleted(short_tmp: Path) -> None:
    """Something that is not a socket at the control socket path is an error, and is left alone."""
    path = short_tmp / "agent.sock"
    path.write_text("precious")

    with pytest.raises(AgentError, match="is not a socket"):
        asyncio.run(ControlApi(path, status).start())

    assert "precious" == path.read_text()


FULL_STATUS: dict[str, Any] = {
    "agent_version": "0.1.0",
    "machine_id": "emp-1",
    "profile": "demo",
    "phase": "degraded",
    "reasons": ["service web-0: BACKOFF"],
    "uptime_s": 12.5,
    "services": [
        {"name": "web-0", "service": "web", "state": "BACKOFF", "restarts": 3, "uptime_s": None},
        {"name": "api-0", "service": "api", "state": "RUNNING", "restarts": 0, "uptime_s": 10.0},
    ],
    "stages": [{"name": "pull_models", "state": "done", "duration_s": 2.5}],
    "models": [{"name": "m", "bytes_fetched": 1000}],
    "pull": {"bytes_done": 1000, "bytes_total": 1000},
    "gpus": {
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-1",
                "name": "NVIDIA A10G",
                "memory_total_mib": 23028,
                "memory_free_mib": 22000,
                "temperature_c": 31,
            }
        ]
    },
    "registry": {"connected": True, "last_heartbeat": "2026-12-03T10:00:00.000+00:00"},
}


def test_metrics_and_read_only_tcp_listener(short_tmp: Path) -> None:
    """/metrics is Prometheus text that prometheus-client's own parser reads back with the right values; the TCP
    listener serves the read-only endpoints and refuses control, which is never called."""
    from prometheus_client.parser import text_string_to_metric_families

    calls: list[tuple[str, str]] = []

    async def control(action: str, name: str, sig: int | None) -> list[dict[str, Any]]:
        calls.append((action, name))
        return []

    async def usage() -> dict[str, tuple[int, float]]:
        return {"api-0": (50 * 2**20, 1.5)}

    async def scenario() -> tuple[str, int, int, int]:
        api = ControlApi(short_tmp / "agent.sock", lambda: FULL_STATUS, control, usage=usage, tcp=("127.0.0.1", 0))
        await api.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.tcp_port}") as client:
                metrics = await client.get("/metrics")
                status_code = (await client.get("/status")).status_code
                post = await client.post("/services/web/stop")
                return metrics.text, status_code, post.status_code, metrics.status_code
        finally:
            await api.stop()

    text, status_code, post_code, metrics_code = asyncio.run(scenario())

    assert (200, 200) == (metrics_code, status_code)
    assert post_code in (404, 405)
    assert [] == calls
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    web, api_ = (("instance", "web-0"), ("service", "web")), (("instance", "api-0"), ("service", "api"))
    assert 1.0 == samples[("emp_service_state", (*web, ("state", "BACKOFF")))]
    assert 0.0 == samples[("emp_service_state", (*web, ("state", "RUNNING")))]
    assert 3.0 == samples[("emp_service_restarts_total", web)]
    assert 1.0 == samples[("emp_service_up", api_)]
    assert 50 * 2**20 == samples[("emp_service_memory_rss_bytes", api_)]
    assert 1.5 == samples[("emp_service_cpu_seconds_total", api_)]
    assert 1.0 == samples[("emp_machine_phase", (("phase", "degraded"),))]
    assert 2.5 == samples[("emp_stage_duration_seconds", (("stage", "pull_models"),))]
    assert (
        23028 * 2**20
        == samples[("emp_gpu_memory_total_bytes", (("gpu", "0"), ("name", "NVIDIA A10G"), ("uuid", "GPU-1")))]
    )
    assert 1000 == samples[("emp_models_fetched_bytes_total", ())]
    assert 1.0 == samples[("emp_registry_connected", ())]
    assert samples[("emp_heartbeat_age_seconds", ())] > 0


def test_events_stream_as_server_sent_events_and_a_slow_reader_loses_the_oldest(short_tmp: Path) -> None:
    """Without a WebSocket upgrade /events is a text/event-stream of JSON events; a reader that falls more than
    its queue behind loses the oldest events and counts them, never blocking the publisher."""
    from agent.api.events import EventHub

    async def scenario() -> list[str]:
        api = ControlApi(short_tmp / "agent.sock", lambda: FULL_STATUS, tcp=("127.0.0.1", 0))
        await api.start()
        try:
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.tcp_port}") as client,
                client.stream("GET", "/events") as response,
            ):
                assert "text/event-stream" == response.headers["content-type"]
                lines = response.aiter_lines()
                assert ": emp-agent events" == await anext(lines)
                await await_until(lambda: api.events.subscribers == 1, what="the reader subscribed")
                api.events.publish({"type": "service", "instance": "web-0", "to": "BACKOFF"})
                return [await anext(lines) for _ in range(3)]
        finally:
            await api.stop()

    assert ["", "event: service", 'data: {"type": "service", "instance": "web-0", "to": "BACKOFF"}'] == asyncio.run(
        scenario()
    )

    async def slow() -> tuple[int, int]:
        hub = EventHub(size=3)
        async with hub.subscribe() as subscription:
            for n in range(5):
                hub.publish({"n": n})
            return subscription.dropped, (await subscription.queue.get())["n"]

    assert (2, 2) == asyncio.run(slow())


@pytest.mark.skipif(os.geteuid() != 0, reason="running the client as another user needs root")
def test_a_user_outside_the_group_is_refused_by_the_socket(short_tmp: Path) -> None:
    """The socket is 0660 root:emp-agent (root's group here): the CLI's client running as `nobody` is refused
    with one clear line, and the status never reaches it."""
    short_tmp.chmod(0o755)
    sock = short_tmp / "agent.sock"

    def as_nobody() -> str:
        """Fork, drop to nobody, try the request; the child reports what it got through a pipe."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only this thread exists here
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    outcome = f"answered {request_json(sock, 'GET', '/status')}"
                except AgentError as exc:
                    outcome = str(exc)
                os.write(write_end, outcome.encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            text = pipe.read().decode()
        os.waitpid(pid, 0)
        return text

    async def scenario() -> str:
        api = ControlApi(sock, status)
        await api.start()
        try:
            return await asyncio.to_thread(as_nobody)
        finally:
            await api.stop()

    assert f"permission denied on {sock}: run as root or a member of the emp-agent group" == asyncio.run(scenario())


def test_cli_status_golden_outputs(short_tmp: Path) -> None:
    """`emp-agent status` prints exactly the golden table for a fixed status document, `--json` the document
    itself; both exit 4 because the machine is degraded. (Regenerate the golden file when the table changes on
    purpose.)"""
    document = json.loads((FIXTURES / "status" / "degraded.json").read_text())
    golden = (FIXTURES / "status" / "degraded.txt").read_text()
    sock = short_tmp / "agent.sock"

    async def scenario() -> list[subprocess.CompletedProcess[str]]:
        api = ControlApi(sock, lambda: document)
        await api.start()
        try:
            return [
                await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "agent", "status", "--socket", str(sock), *extra],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                for extra in ([], ["--json"])
            ]
        finally:
            await api.stop()

    table, as_json = asyncio.run(scenario())

    assert (4, golden) == (table.returncode, table.stdout)
    assert (4, document) == (as_json.returncode, json.loads(as_json.stdout))


def test_control_over_tcp_needs_the_bearer_token(short_tmp: Path) -> None:
    """With a token configured, control on the TCP listener works only with `Authorization: Bearer <token>`:
    without it or with a wrong one the answer is 401 and the control source is never called; GETs stay open."""
    token = "s3cret-token-0123456789"
    calls: list[tuple[str, str]] = []

    async def control(action: str, name: str, sig: int | None) -> list[dict[str, Any]]:
        calls.append((action, name))
        return [{"name": name, "ok": True}]

    async def scenario() -> list[int]:
        api = ControlApi(short_tmp / "agent.sock", lambda: FULL_STATUS, control, tcp=("127.0.0.1", 0), tcp_token=token)
        await api.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.tcp_port}") as client:
                codes = [(await client.post("/services/web/stop")).status_code]
                wrong = {"Authorization": "Bearer s3cret-token-0123456780"}
                codes.append((await client.post("/services/web/stop", headers=wrong)).status_code)
                codes.append((await client.get("/status")).status_code)
                assert [] == calls
                right = {"Authorization": f"Bearer {token}"}
                codes.append((await client.post("/services/web/stop", headers=right)).status_code)
                return codes
        finally:
            await api.stop()

    assert [401, 401, 200, 200] == asyncio.run(scenario())
    assert [("stop", "web")] == calls


def test_an_unusable_token_file_is_a_configuration_error(tmp_path: Path) -> None:
    """A token file that is missing or too short stops the agent before anything starts, naming the file."""
    from agent.errors import ConfigError
    from agent.settings import Settings

    short = tmp_path / "token"
    short.write_text("abc\n")

    for path, words in ((tmp_path / "missing", "cannot read"), (short, "16+ characters")):
        with pytest.raises(ConfigError) as caught:
            Settings(http_token_file=path).http_token()
        assert f"{path}: http_token_file: " in str(caught.value.problems[0])
        assert words in str(caught.value.problems[0])


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "nothing usable answers"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"phase":', "cut short (9 of 50 bytes)"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{}\r\n", "no Content-Length"),
        (None, "did not answer within 0.5s"),
    ],
    ids=["not-http", "truncated", "chunked", "silent"],
)
def test_the_cli_client_names_what_was_wrong_with_the_answer(short_tmp: Path, answer: bytes | None, words: str) -> None:
    """Whatever sits on the socket instead of an agent, the client ends with one clear error, never a hang or
    a traceback."""
    import socket
    import threading

    sock = short_tmp / "agent.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen()
    release = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            if answer is not None:
                conn.sendall(answer)
            else:
                release.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(AgentError, match=re.escape(words)):
            request_json(sock, "GET", "/status", timeout=0.5)
    finally:
        release.set()
        thread.join(10)
        listener.close()
