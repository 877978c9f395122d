"""The capability record the broker matches jobs against: a static part (hashed, republished on change), a dynamic
part for each heartbeat, and each slot's view in the shape the original workers gave the job matcher."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.host.facts import HostFacts
from agent.host.gpu import GpuInfo, GpuReport, GpuState
from agent.settings import Matching

SCHEMA = "emp.capabilities/v1"
#: Host facts that do not move while the machine runs (free memory and disk go in the dynamic part).
HOST_STATIC = (
    "hostname",
    "os",
    "kernel",
    "arch",
    "cpu_model",
    "cpu_logical",
    "cpu_physical",
    "memory_total_mib",
    "model_root_total_mib",
)


def caps_hash(static: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the static record (sorted keys, no whitespace)."""
    canonical = json.dumps(static, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def offered(slot: Mapping[str, Any], report: GpuReport | None, gpu_required: bool = False) -> bool:
    """Whether a slot can be advertised. A GPU slot only while its GPU is healthy. A CPU slot unless the profile
    requires GPUs, or it is a per-GPU service that fell back to the CPU on a host whose NVIDIA driver is there
    but could not be read (it would be offered GPU work it cannot do)."""
    gpu = slot.get("gpu")
    if gpu is not None:
        return report is not None and gpu.get("uuid") in report.healthy_uuids
    if gpu_required:
        return False
    return not (slot.get("per_gpu") and report is not None and report.state is not GpuState.UNAVAILABLE)


SLOT_FIELDS = ("name", "service", "capabilities", "port", "gpu")


def static_record(
    *,
    agent_version: str,
    profile: str,
    host: HostFacts | None,
    gpus: GpuReport | None,
    slots: Iterable[Mapping[str, Any]],
    models: Iterable[Mapping[str, Any]],
    matching: Matching | None = None,
    gpu_required: bool = False,
) -> dict[str, Any]:
    """What the machine offers: host, GPUs, the slots that can take jobs, the verified models, and the matcher
    settings (customers, location, cost)."""
    host_data = host.to_dict() if host else None
    return {
        "schema": SCHEMA,
        "agent_version": agent_version,
        "profile": profile,
        "host": {k: host_data[k] for k in HOST_STATIC} if host_data else None,
        "nvidia": (
            {
                "state": gpus.state.value,
                "driver_version": gpus.driver_version,
                "cuda_driver_version": gpus.cuda_driver_version,
            }
            if gpus
            else None
        ),
        "gpus": [g.static() for g in gpus.gpus] if gpus else [],
        "services": [{k: s[k] for k in SLOT_FIELDS} for s in slots if offered(s, gpus, gpu_required)],
        "models": [
            {"name": m["name"], "dest": m["dest"], "size_bytes": m["size"], "sha256": m["sha256"]} for m in models
        ],
        "matching": (matching or Matching()).model_dump(mode="json"),
    }


def dynamic_record(readings: tuple[int, int] | None, gpus: GpuReport | None) -> dict[str, Any]:
    """The readings that move (host memory available and model disk free, as read for this beat; the GPUs' as of
    the last probe): sent with every heartbeat, never hashed."""
    return {
        "memory_available_mib": readings[0] if readings else None,
        "model_root_free_mib": readings[1] if readings else None,
        "gpus": gpus.dynamic() if gpus else {},
    }


@dataclass(frozen=True)
class SlotFacts:
    """What every slot's capabilities file shares: the host, the verified models, the matcher settings."""

    machine_id: str
    agent_version: str
    host: HostFacts | None = None
    models: tuple[str, ...] = ()
    matching: Matching = field(default_factory=Matching)


def _gb(mib: int | None) -> float:
    return round(mib / 1024, 1) if mib else 0.0


def slot_view(
    facts: SlotFacts, service: str, instance: str, names: tuple[str, ...], gpu: GpuInfo | None
) -> dict[str, Any]:
    """The original workers' capability JSON for one slot, from real hardware: its own GPU's memory and model,
    the host's RAM and cores, the models present for each job-facing name, and the matcher settings."""
    matching = facts.matching
    view: dict[str, Any] = {
        "worker_id": f"{facts.machine_id}:{instance}",
        "machine_id": facts.machine_id,
        "services": list(names),
        "job_service_required_map": list(names),
        "hardware": {
            "gpu_memory_gb": _gb(gpu.memory_total_mib) if gpu else 0.0,
            "gpu_model": (gpu.name or "unknown") if gpu else "none",
            "gpu_count": 1 if gpu else 0,
            "ram_gb": _gb(facts.host.memory_total_mib) if facts.host else 0.0,
            "cpu_cores": facts.host.cpu_logical if facts.host else 0,
        },
        "models": {name: list(facts.models) for name in names},
        "customer_access": {
            "isolation": matching.customer_isolation.value,
            "allowed_customers": list(matching.allowed_customers),
            "denied_customers": list(matching.denied_customers),
            "max_concurrent_customers": matching.max_concurrent_customers,
        },
        "performance": {
            "concurrent_jobs": matching.concurrent_jobs,
            "quality_levels": ",".join(matching.quality_levels),
            "max_processing_time_minutes": matching.max_processing_time_minutes,
        },
        "metadata": {
            "version": facts.agent_version,
            "service": service,
            "platform": platform.system().lower(),
            "arch": platform.machine(),
        },
    }
    if matching.location is not None:
        view["location"] = matching.location.model_dump()
    if matching.cost is not None:
        view["cost"] = matching.cost.model_dump()
    return view
