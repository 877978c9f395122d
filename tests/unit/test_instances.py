"""Expanding services into instances: per-GPU slots, ports, and an environment that leaks nothing."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.host.gpu import GpuInfo
from agent.profile import Profile, ServiceSpec
from agent.supervisor.instances import Paths, expand

PATHS = Paths(Path("/models"), Path("/state"), Path("/logs"))
GPUS = [GpuInfo(index=0, uuid="GPU-aaaa"), GpuInfo(index=1, uuid="GPU-bbbb")]


def profile(**services: ServiceSpec) -> Profile:
    return Profile(name="t", source="t.toml", env={"SHARED": "1"}, services=services)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_one_instance_per_gpu_pinned_by_uuid() -> None:
    """A per-GPU service gets one instance per GPU, CUDA_VISIBLE_DEVICES set to that GPU's UUID."""
    spec = ServiceSpec(command=["serve", "--gpu", "{gpu}"], per_gpu=True)

    instances = expand(profile(web=spec), GPUS, PATHS, "m1", {})

    assert [("web-0", "GPU-aaaa", ("serve", "--gpu", "0")), ("web-1", "GPU-bbbb", ("serve", "--gpu", "1"))] == [
        (i.name, i.env["CUDA_VISIBLE_DEVICES"], i.argv) for i in instances
    ]


def test_cpu_only_host_gets_one_cpu_slot() -> None:
    """With no GPU, a per-GPU service still runs once, with no GPU visible."""
    (instance,) = expand(profile(web=ServiceSpec(command=["x"], per_gpu=True)), [], PATHS, "m1", {})

    assert ("web-0", "", None) == (instance.name, instance.env["CUDA_VISIBLE_DEVICES"], instance.gpu)


def test_ports_skip_a_port_already_in_use(busy_port: int) -> None:
    """The allocator checks each port is free; a busy one is skipped and the choice is passed to the child."""
    spec = ServiceSpec(command=["serve", "{port}"], per_gpu=True, port=busy_port)

    first, second = expand(profile(web=spec), GPUS, PATHS, "m1", {})

    assert busy_port not in (first.port, second.port)
    assert first.port != second.port
    assert (str(first.port), ("serve", str(first.port))) == (first.env["PORT"], first.argv)


def test_environment_is_exactly_declared_plus_agent_additions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the agent's environment leaks in unless named in inherit_env."""
    agent_env = {"HF_TOKEN": "hf_secret_value", "AWS_SECRET_ACCESS_KEY": "nope", "PATH": "/evil"}
    spec = ServiceSpec(command=["x"], env={"MODE": "{service}-{slot}"}, inherit_env=["HF_TOKEN"], capabilities=["c"])

    (instance,) = expand(profile(web=spec), [], PATHS, "m1", agent_env)

    assert {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/state",
        "SHARED": "1",
        "MODE": "web-0",
        "HF_TOKEN": "hf_secret_value",
        "EMP_MACHINE_ID": "m1",
        "EMP_SERVICE": "web",
        "EMP_INSTANCE": "web",
        "EMP_SLOT": "0",
        "EMP_MODEL_ROOT": "/models",
        "EMP_CAPABILITIES": "c",
        "EMP_CAPABILITIES_FILE": "/state/capabilities/web.json",
    } == dict(instance.env)
    assert frozenset({"hf_secret_value"}) == instance.secret_values


def test_dependents_learn_the_port_of_their_dependency_in_the_same_slot() -> None:
    """A worker per GPU is told the port of the ComfyUI on the same GPU."""
    services = {
        "comfyui": ServiceSpec(command=["c"], per_gpu=True, port=29188),
        "worker": ServiceSpec(command=["w"], per_gpu=True, depends_on=["comfyui"]),
    }

    instances = {i.name: i for i in expand(profile(**services), GPUS, PATHS, "m1", {})}

    assert instances["worker-1"].env["EMP_COMFYUI_PORT"] == str(instances["comfyui-1"].port)
    assert ["comfyui-0", "comfyui-1", "worker-0", "worker-1"] == list(instances)


def test_mig_devices_each_get_an_instance_pinned_by_their_uuid() -> None:
    """A per-GPU service on an A100 in MIG mode runs once per MIG device, seeing only that slice."""
    from agent.host.nvml import read_gpus
    from agent.testing import FakeNvml
    from tests.conftest import FIXTURES

    report = read_gpus(FakeNvml.from_file(FIXTURES / "nvml" / "a100-mig.json"))

    instances = expand(profile(web=ServiceSpec(command=["x"], per_gpu=True)), report.gpus, PATHS, "m1", {})

    assert [m.uuid for m in report.gpus[0].mig_devices] == [i.env["CUDA_VISIBLE_DEVICES"] for i in instances]
    assert {19968} == {i.gpu.memory_total_mib for i in instances if i.gpu}


def test_a_service_that_is_not_per_gpu_sees_only_this_agents_gpus() -> None:
    """A plain service gets CUDA_VISIBLE_DEVICES = the agent's GPUs, unless its profile sets the variable."""
    plain = ServiceSpec(command=["api"])
    pinned = ServiceSpec(command=["api"], env={"CUDA_VISIBLE_DEVICES": "1"})

    api, own = expand(profile(api=plain, own=pinned), GPUS, PATHS, "m1", {})

    assert ("GPU-aaaa,GPU-bbbb", "1") == (api.env["CUDA_VISIBLE_DEVICES"], own.env["CUDA_VISIBLE_DEVICES"])
    (cpu,) = expand(profile(api=plain), [], PATHS, "m1", {})
    assert "CUDA_VISIBLE_DEVICES" not in cpu.env
