"""Expanding a profile's services into concrete instances: one per GPU or slot, each with port, env and argv."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.capabilities import SlotFacts, slot_view
from agent.host.gpu import GpuInfo
from agent.host.ports import allocate_port
from agent.profile import ProbeKind, Profile, RestartSpec, ServiceSpec
from agent.statefile import write_json_atomic
from agent.supervisor.readiness import Probe

#: What every child gets before the profile's own environment; nothing else leaks from the agent.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class InstanceSpec:
    """Everything needed to run one instance of a service."""

    name: str
    service: str
    slot: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None
    log_path: Path
    probe: Probe
    start_timeout_s: float
    start_seconds: float
    probe_interval_s: float
    restart: RestartSpec
    stop_signal: str
    stop_timeout_s: float
    memory_limit_mib: int | None = None
    gpu_memory_limit_mib: int | None = None
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 5
    liveness_interval_s: float | None = None
    liveness_failures: int = 3
    resource_interval_s: float = 2.0
    port: int | None = None
    gpu: GpuInfo | None = None
    per_gpu: bool = False
    capabilities: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    required: bool = True
    secret_values: frozenset[str] = field(default_factory=frozenset)
    #: The job matcher's view of this slot (agent.capabilities.slot_view), written into its capabilities file.
    matcher_view: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Paths:
    """Host paths that placeholders and the environment refer to."""

    model_root: Path
    state_dir: Path
    log_dir: Path


def expand(
    profile: Profile,
    gpus: list[GpuInfo],
    paths: Paths,
    machine_id: str,
    agent_env: Mapping[str, str],
    taken_ports: set[int] | None = None,
    keep_ports: Mapping[str, int | None] | None = None,
    facts: SlotFacts | None = None,
) -> list[InstanceSpec]:
    """All instances of all services in dependency order; ports are allocated free and recorded in `taken_ports`,
    except for instances named in `keep_ports`, which keep the port they have (re-expansion on restart)."""
    taken = taken_ports if taken_ports is not None else set()
    units = [u.uuid for u in gpu_units(gpus) if u.uuid]
    instances: list[InstanceSpec] = []
    ports: dict[tuple[str, int], int] = {}
    for name in dependency_order(profile.services):
        spec = profile.services[name]
        slots = _slots(spec, gpus)
        for slot, gpu in enumerate(slots):
            instance_name = name if len(slots) == 1 and not spec.per_gpu else f"{name}-{slot}"
            port = None
            kept = (keep_ports or {}).get(instance_name)
            if spec.port is not None:
                port = kept if kept is not None else allocate_port(spec.port + slot, taken)
                taken.add(port)
                ports[(name, slot)] = port
            dep_ports = {
                f"EMP_{dep.upper().replace('-', '_')}_PORT": str(ports.get((dep, slot), ports.get((dep, 0))))
                for dep in spec.depends_on
                if (dep, slot) in ports or (dep, 0) in ports
            }
            values = {
                "port": str(port) if port is not None else "",
                "gpu": str(gpu.index) if gpu else "",
                "gpu_uuid": (gpu.uuid or "") if gpu else "",
                "slot": str(slot),
                "instance": instance_name,
                "service": name,
                "model_root": str(paths.model_root),
                "state_dir": str(paths.state_dir),
                "log_dir": str(paths.log_dir),
                "python": sys.executable,
                "machine_id": machine_id,
            }
            instance = _instance(
                profile, name, spec, instance_name, slot, gpu, port, values, paths, agent_env, dep_ports
            )
            if not spec.per_gpu and units and "CUDA_VISIBLE_DEVICES" not in instance.env:
                # a service that is not per-GPU may still use GPUs: only this agent's, never another tenant's
                instance = replace(instance, env={**instance.env, "CUDA_VISIBLE_DEVICES": ",".join(units)})
            instances.append(instance)
            if facts is not None:
                view = slot_view(facts, name, instance_name, tuple(spec.capabilities), gpu)
                instances[-1] = replace(instances[-1], matcher_view=view)
    return instances


def declared_env(
    paths: Paths, shared: Mapping[str, str], own: Mapping[str, str], values: Mapping[str, str]
) -> dict[str, str]:
    """The base environment, then the profile's shared `[env]`, then the service's or step's own, with
    placeholders filled: all a child gets before the agent's own additions."""
    env = {**BASE_ENV, "HOME": str(paths.state_dir)}
    env.update({k: v.format_map(values) for k, v in shared.items()})
    env.update({k: v.format_map(values) for k, v in own.items()})
    return env


def dependency_order(services: Mapping[str, ServiceSpec]) -> list[str]:
    """Service names with every dependency before its dependents, otherwise in declaration order."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered:
            return
        for dep in services[name].depends_on:
            if dep in services:
                visit(dep)
        ordered.append(name)

    for name in services:
        visit(name)
    return ordered


def gpu_units(gpus: list[GpuInfo]) -> list[GpuInfo]:
    """What a per-GPU service gets one instance on: each GPU, or each MIG device of a GPU in MIG mode (a child
    with its own UUID and memory; CUDA sees only that slice). A GPU lost before it could be named gets none."""
    units = []
    for gpu in gpus:
        if not gpu.uuid:
            continue
        if gpu.mig_enabled and gpu.mig_devices:
            units += [
                replace(
                    gpu,
                    uuid=m.uuid,
                    name=m.name or (f"{gpu.name} MIG" if gpu.name else None),
                    memory_total_mib=m.memory_total_mib,
                    mig_enabled=False,
                    mig_devices=[],
                )
                for m in gpu.mig_devices
            ]
        else:
            units.append(gpu)
    return units


def _slots(spec: ServiceSpec, gpus: list[GpuInfo]) -> list[GpuInfo | None]:
    if not spec.per_gpu:
        return [None] * spec.instances
    usable = gpu_units(gpus)
    if not usable:
        return [None] * spec.instances  # a CPU-only host gets CPU slots
    return [gpu for gpu in usable for _ in range(spec.instances)]


def _instance(
    profile: Profile,
    name: str,
    spec: ServiceSpec,
    instance_name: str,
    slot: int,
    gpu: GpuInfo | None,
    port: int | None,
    values: dict[str, str],
    paths: Paths,
    agent_env: Mapping[str, str],
    dep_ports: Mapping[str, str],
) -> InstanceSpec:
    env = declared_env(paths, profile.env, spec.env, values)
    inherited = {k: agent_env[k] for k in spec.inherit_env if k in agent_env}
    env.update(inherited)
    env.update(
        {
            "EMP_MACHINE_ID": values["machine_id"],
            "EMP_SERVICE": name,
            "EMP_INSTANCE": instance_name,
            "EMP_SLOT": str(slot),
            "EMP_MODEL_ROOT": str(paths.model_root),
            "EMP_CAPABILITIES": ",".join(spec.capabilities),
            "EMP_CAPABILITIES_FILE": str(capabilities_file(paths, instance_name)),
        }
    )
    env.update(dep_ports)
    if port is not None:
        env["PORT"] = str(port)
    if spec.per_gpu:
        env["CUDA_VISIBLE_DEVICES"] = (gpu.uuid or "") if gpu else ""
        env["EMP_GPU_INDEX"] = str(gpu.index) if gpu else ""
    readiness = spec.readiness
    probe = Probe(
        kind=readiness.kind,
        url=(
            readiness.url.format_map(values)
            if readiness.url
            else f"http://127.0.0.1:{port}{readiness.path}"
            if readiness.kind is ProbeKind.HTTP and port
            else None
        ),
        port=port,
        socket=readiness.socket.format_map(values) if readiness.socket else None,
        command=tuple(arg.format_map(values) for arg in readiness.command or ()),
        expect_status=tuple(readiness.expect_status),
        pattern=readiness.pattern,
    )
    return InstanceSpec(
        name=instance_name,
        service=name,
        slot=slot,
        argv=tuple(arg.format_map(values) for arg in spec.command),
        env=env,
        cwd=spec.cwd.format_map(values) if spec.cwd else None,
        log_path=paths.log_dir / f"{instance_name}.log",
        probe=probe,
        start_timeout_s=readiness.timeout_s,
        start_seconds=readiness.start_seconds,
        probe_interval_s=readiness.interval_s,
        restart=spec.restart,
        stop_signal=spec.stop_signal,
        stop_timeout_s=spec.stop_timeout_s,
        memory_limit_mib=spec.memory_limit_mib,
        gpu_memory_limit_mib=spec.gpu_memory_limit_mib,
        log_max_bytes=spec.log_max_mib * 1024 * 1024,
        log_backups=spec.log_backups,
        liveness_interval_s=readiness.liveness_interval_s,
        liveness_failures=readiness.liveness_failures,
        resource_interval_s=spec.resource_interval_s,
        port=port,
        gpu=gpu,
        per_gpu=spec.per_gpu,
        capabilities=tuple(spec.capabilities),
        depends_on=tuple(spec.depends_on),
        required=spec.required,
        secret_values=frozenset(v for v in inherited.values() if v),
    )


def capabilities_file(paths: Paths, instance: str) -> Path:
    """Where an instance finds what the agent registers for it (written before each start)."""
    return paths.state_dir / "capabilities" / f"{instance}.json"


def write_capabilities_file(spec: InstanceSpec, machine_id: str) -> None:
    """The instance's own view of its slot: machine, service, job-facing names, port and GPU."""
    path = Path(spec.env["EMP_CAPABILITIES_FILE"])
    gpu = None
    if spec.gpu is not None:
        gpu = {
            "index": spec.gpu.index,
            "uuid": spec.gpu.uuid,
            "name": spec.gpu.name,
            "memory_total_mib": spec.gpu.memory_total_mib,
        }
    record = {
        "machine_id": machine_id,
        "service": spec.service,
        "instance": spec.name,
        "slot": spec.slot,
        "capabilities": list(spec.capabilities),
        "port": spec.port,
        "gpu": gpu,
        **(spec.matcher_view or {}),
    }
    write_json_atomic(path, record, durable=False)


def spec_hash(spec: InstanceSpec) -> str:
    """What the instance was started as (command, environment, directory): an adopted survivor must match it."""
    material = json.dumps([list(spec.argv), sorted(spec.env.items()), spec.cwd], separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()[:16]
