"""The capability record: validates against docs/capabilities.schema.json, hashes only what does not move, takes
unhealthy GPUs' slots out, and gives each slot a matcher view of its own GPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.capabilities import SlotFacts, caps_hash, dynamic_record, static_record
from agent.host.facts import HostFacts
from agent.host.gpu import GpuHealth, GpuReport
from agent.host.nvml import read_gpus
from agent.profile import Profile, ServiceSpec
from agent.settings import Cost, CustomerIsolation, Location, Matching
from agent.supervisor.instances import InstanceSpec, Paths, expand, write_capabilities_file
from agent.testing import FakeNvml
from tests.conftest import FIXTURES

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "capabilities.schema.json").read_text())
RECORDINGS = sorted((FIXTURES / "nvml").glob("*.json"))
HOST = HostFacts(
    hostname="gpu-17",
    os="Debian GNU/Linux 12 (bookworm)",
    kernel="6.1.0-28-amd64",
    arch="x86_64",
    cpu_model="AMD EPYC 9454 48-Core Processor",
    cpu_logical=96,
    cpu_physical=48,
    memory_total_mib=1031530,
    memory_available_mib=998000,
    model_root_free_mib=3_500_000,
    model_root_total_mib=7_000_000,
)
MODEL = {"name": "sdxl", "dest": "checkpoints/sdxl.safetensors", "size": 6_938_078_334, "sha256": "a" * 64}


def validate(document: dict[str, Any], part: str | None = None) -> None:
    schema = SCHEMA if part is None else {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{part}"}
    jsonschema.Draft202012Validator(schema).validate(document)


def slots_for(report: GpuReport, tmp_path: Path, facts: SlotFacts | None = None) -> list[InstanceSpec]:
    profile = Profile(
        name="comfy",
        source="comfy.toml",
        services={"comfyui": ServiceSpec(command=["serve"], per_gpu=True, port=8188, capabilities=["comfyui"])},
    )
    return expand(profile, report.gpus, Paths(tmp_path / "m", tmp_path / "s", tmp_path / "l"), "m1", {}, facts=facts)


def record(report: GpuReport, tmp_path: Path) -> dict[str, Any]:
    slots = [
        {
            "name": s.name,
            "service": s.service,
            "capabilities": list(s.capabilities),
            "port": s.port,
            "gpu": {"index": s.gpu.index, "uuid": s.gpu.uuid} if s.gpu else None,
        }
        for s in slots_for(report, tmp_path)
    ]
    return static_record(agent_version="0.1.0", profile="comfy", host=HOST, gpus=report, slots=slots, models=[MODEL])


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.stem)
def test_record_of_every_fixture_host_validates_against_the_schema(recording: Path, tmp_path: Path) -> None:
    """Static and dynamic records of each recorded host (MIG, ECC, processes, N/A fields) follow the schema."""
    report = read_gpus(FakeNvml.from_file(recording))

    validate(record(report, tmp_path))
    validate(dynamic_record((998000, 3_500_000), report), "dynamic")


def test_hash_ignores_readings_and_follows_health(tmp_path: Path) -> None:
    """Free memory, temperature and power move without a new caps_hash; a GPU turning unhealthy changes it and
    its slot leaves the advertised services."""
    report = read_gpus(FakeNvml.from_file(FIXTURES / "nvml" / "h100x8.json"))
    busy = replace(
        report,
        gpus=[replace(g, memory_free_mib=1, temperature_c=80, power_draw_w=690.5) for g in report.gpus],
    )
    sick = replace(
        report,
        gpus=[replace(g, health=GpuHealth.UNHEALTHY, health_reasons=["x"]) if g.index == 3 else g for g in report.gpus],
    )

    calm, loaded, ill = record(report, tmp_path), record(busy, tmp_path), record(sick, tmp_path)

    assert caps_hash(calm) == caps_hash(loaded)
    assert caps_hash(calm) != caps_hash(ill)
    assert 8 == len(calm["services"])
    assert [0, 1, 2, 4, 5, 6, 7] == [s["gpu"]["index"] for s in ill["services"]]
    assert dynamic_record((998000, 3_500_000), report) != dynamic_record((998000, 3_500_000), busy)


def test_each_slot_file_describes_its_own_gpu(tmp_path: Path) -> None:
    """On a host with an L40S and a T4, each slot's file names its own GPU's model and memory, the host's RAM and
    cores, the verified models under its job-facing name, and the matcher settings; it validates."""
    l40s = json.loads((FIXTURES / "nvml" / "l40s.json").read_text())
    t4 = json.loads((FIXTURES / "nvml" / "t4.json").read_text())
    mixed = {**l40s, "gpus": [l40s["gpus"][0], t4["gpus"][0]]}
    report = read_gpus(FakeNvml(mixed))
    matching = Matching(
        customer_isolation=CustomerIsolation.STRICT,
        allowed_customers=["acme"],
        location=Location(region="eu-west", country="IE"),
        cost=Cost(tier="spot", rate_per_hour=0.9),
    )
    facts = SlotFacts("m1", "0.1.0", HOST, ("sdxl",), matching)

    first, second = slots_for(report, tmp_path, facts)
    views = []
    for spec in (first, second):
        write_capabilities_file(spec, "m1")
        views.append(json.loads(Path(spec.env["EMP_CAPABILITIES_FILE"]).read_text()))

    for view in views:
        validate(view, "slot")
    assert [("NVIDIA L40S", 45.0), ("Tesla T4", 15.0)] == [
        (v["hardware"]["gpu_model"], v["hardware"]["gpu_memory_gb"]) for v in views
    ]
    assert {(1007.4, 96)} == {(v["hardware"]["ram_gb"], v["hardware"]["cpu_cores"]) for v in views}
    assert [first.env["CUDA_VISIBLE_DEVICES"], second.env["CUDA_VISIBLE_DEVICES"]] == [v["gpu"]["uuid"] for v in views]
    assert {"comfyui": ["sdxl"]} == views[1]["models"]
    assert ("strict", ["acme"], "eu-west", "spot") == (
        views[0]["customer_access"]["isolation"],
        views[0]["customer_access"]["allowed_customers"],
        views[0]["location"]["region"],
        views[0]["cost"]["tier"],
    )


def test_cpu_slot_says_it_has_no_gpu(tmp_path: Path) -> None:
    """A CPU-only host's slot reports zero GPU memory and model "none", which no GPU requirement matches."""
    facts = SlotFacts("m1", "0.1.0", HOST)
    (spec,) = slots_for(GpuReport.from_dict({"state": "unavailable"}), tmp_path, facts)

    write_capabilities_file(spec, "m1")
    view = json.loads(Path(spec.env["EMP_CAPABILITIES_FILE"]).read_text())

    validate(view, "slot")
    assert (0.0, "none", 0) == (
        view["hardware"]["gpu_memory_gb"],
        view["hardware"]["gpu_model"],
        view["hardware"]["gpu_count"],
    )


def test_a_gpu_service_on_the_cpu_is_not_offered_when_the_gpus_could_not_be_read(tmp_path: Path) -> None:
    """A per-GPU service that fell back to a CPU slot because the probe failed (driver there, unreadable) is
    not advertised; on a host without a driver it is, unless the profile requires GPUs."""
    slot = {"name": "w-0", "service": "w", "capabilities": ["comfyui"], "port": None, "gpu": None, "per_gpu": True}

    def services(state: str, required: bool = False) -> list[Any]:
        report = GpuReport.from_dict({"state": state})
        record = static_record(
            agent_version="0", profile="p", host=HOST, gpus=report, slots=[slot], models=[], gpu_required=required
        )
        validate(record)
        return list(record["services"])

    assert [] == services("timeout")
    assert [] == services("error")
    assert ["w-0"] == [s["name"] for s in services("unavailable")]
    assert [] == services("unavailable", required=True)


def test_matching_settings_are_in_the_static_record(tmp_path: Path) -> None:
    """The broker sees customers, location and cost in Redis, not only in the slot files."""
    report = read_gpus(FakeNvml.from_file(FIXTURES / "nvml" / "t4.json"))
    record = static_record(
        agent_version="0",
        profile="p",
        host=HOST,
        gpus=report,
        slots=[],
        models=[],
        matching=Matching(allowed_customers=["acme"], cost=Cost(tier="spot")),
    )

    validate(record)
    assert (["acme"], "spot") == (record["matching"]["allowed_customers"], record["matching"]["cost"]["tier"])
