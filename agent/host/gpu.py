"""The GPU report: what the host's GPUs are (static) and how they are doing (dynamic), with health and visibility."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol


class GpuState(StrEnum):
    """Outcome of one probe."""

    AVAILABLE = "available"  # NVML answered (possibly with zero GPUs)
    UNAVAILABLE = "unavailable"  # no NVIDIA driver or library: a CPU-only host
    ERROR = "error"  # NVML is there but failed: needs an operator
    TIMEOUT = "timeout"  # the probe did not finish within its deadline


class GpuHealth(StrEnum):
    """Whether a GPU may be offered to jobs."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # uncorrectable ECC errors, a pending page retirement or row remap, a remap failure
    LOST = "lost"  # NVML reports it lost (fallen off the bus, Xid 79) or it vanished since the last probe


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance: a child of its GPU with its own UUID, schedulable on its own."""

    index: int
    uuid: str
    name: str | None = None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    sm_count: int | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ecc:
    """ECC mode and memory error counters; None where the GPU does not support the counter."""

    enabled: bool | None = None
    uncorrected_volatile: int | None = None
    corrected_volatile: int | None = None
    uncorrected_aggregate: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_uncorrectable: int | None = None
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU (None: NVML could not attribute memory, e.g. inside a container)."""

    pid: int
    used_memory_mib: int | None


#: Fields that describe what a GPU is; everything else is a reading that changes from probe to probe.
STATIC_FIELDS = (
    "index",
    "uuid",
    "name",
    "architecture",
    "pci_bus_id",
    "memory_total_mib",
    "compute_capability",
    "power_limit_w",
    "persistence_mode",
    "mig_enabled",
    "health",
    "health_reasons",
)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it; a field NVML cannot give is None with the reason in `errors`."""

    index: int
    uuid: str | None  # None only for a GPU NVML lost before it could name it
    name: str | None = None
    architecture: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None
    memory_free_mib: int | None = None
    compute_capability: str | None = None
    power_limit_w: float | None = None
    power_draw_w: float | None = None
    temperature_c: int | None = None
    utilization_gpu_pct: int | None = None
    utilization_memory_pct: int | None = None
    persistence_mode: bool | None = None
    mig_enabled: bool | None = None
    mig_devices: list[MigDevice] = field(default_factory=list)
    ecc: Ecc = field(default_factory=Ecc)
    processes: list[GpuProcess] | None = None
    health: GpuHealth = GpuHealth.HEALTHY
    health_reasons: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """May jobs be placed on it."""
        return self.health is GpuHealth.HEALTHY

    def static(self) -> dict[str, Any]:
        """What the GPU is: hashed into the capability record, so no reading that moves."""
        data = {name: _plain(getattr(self, name)) for name in STATIC_FIELDS}
        data["ecc_enabled"] = self.ecc.enabled
        data["mig_devices"] = [
            {k: v for k, v in asdict(m).items() if k not in ("memory_used_mib", "errors")} for m in self.mig_devices
        ]
        return data

    def dynamic(self) -> dict[str, Any]:
        """The readings sent with each heartbeat."""
        return {
            "memory_free_mib": self.memory_free_mib,
            "memory_used_mib": self.memory_used_mib,
            "utilization_gpu_pct": self.utilization_gpu_pct,
            "temperature_c": self.temperature_c,
            "power_draw_w": self.power_draw_w,
            "health": self.health.value,
            "processes": len(self.processes) if self.processes is not None else None,
        }


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, StrEnum) else value


def assess(ecc: Ecc) -> tuple[GpuHealth, list[str]]:
    """Health from the memory error state, with the operator-facing reasons."""
    reasons = []
    if ecc.uncorrected_volatile:
        reasons.append(f"{ecc.uncorrected_volatile} uncorrectable ECC error(s) since the last driver load")
    if ecc.retired_pages_pending:
        reasons.append("a memory page retirement is pending: reset the GPU or reboot")
    if ecc.remapped_rows_pending:
        reasons.append("a memory row remap is pending: reset the GPU or reboot")
    if ecc.remapped_rows_failure:
        reasons.append("memory row remapping failed: the GPU needs service")
    return (GpuHealth.UNHEALTHY if reasons else GpuHealth.HEALTHY), reasons


@dataclass(frozen=True)
class GpuReport:
    """The whole probe result."""

    state: GpuState
    message: str = ""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    #: GPUs NVML sees but this agent may not use (CUDA_VISIBLE_DEVICES or the profile's selection), by index.
    hidden: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        data = asdict(self)
        data["state"] = self.state.value
        for gpu in data["gpus"]:
            gpu["health"] = _plain(gpu["health"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuReport:
        """Inverse of to_dict."""
        gpus = []
        for raw in data.get("gpus", []):
            raw = dict(raw)
            raw["mig_devices"] = [MigDevice(**m) for m in raw.get("mig_devices", [])]
            raw["ecc"] = Ecc(**raw.get("ecc", {}))
            if raw.get("processes") is not None:
                raw["processes"] = [GpuProcess(**p) for p in raw["processes"]]
            raw["health"] = GpuHealth(raw.get("health", GpuHealth.HEALTHY))
            gpus.append(GpuInfo(**raw))
        return cls(
            state=GpuState(data["state"]),
            message=data.get("message", ""),
            driver_version=data.get("driver_version"),
            cuda_driver_version=data.get("cuda_driver_version"),
            gpus=gpus,
            hidden=list(data.get("hidden", [])),
        )

    @cached_property
    def healthy_uuids(self) -> frozenset[str]:
        """UUIDs of the GPUs jobs may be placed on now (the MIG devices of a healthy GPU included)."""
        found: set[str] = set()
        for gpu in self.gpus:
            if gpu.healthy and gpu.uuid:
                found.add(gpu.uuid)
                found.update(m.uuid for m in gpu.mig_devices)
        return frozenset(found)

    def static(self) -> dict[str, Any]:
        """The part of the report that belongs in the hashed capability record."""
        return {
            "state": self.state.value,
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "gpus": [g.static() for g in self.gpus],
        }

    def dynamic(self) -> dict[str, dict[str, Any]]:
        """Per-GPU readings keyed by UUID, for the heartbeat."""
        return {g.uuid: g.dynamic() for g in self.gpus if g.uuid}


class GpuProbe(Protocol):
    """Something that can tell which GPUs the host has."""

    async def probe(self) -> GpuReport: ...


def visible(report: GpuReport, cuda_visible_devices: str | None, select: list[str] | None = None) -> GpuReport:
    """The GPUs this agent may use: the ones CUDA_VISIBLE_DEVICES names (NVML index, GPU UUID or unique UUID
    prefix, or a MIG device's UUID, which keeps its GPU with only the named MIG devices; CUDA's rules: unset means
    all, empty means none, the list ends at the first entry that names nothing) and then the profile's `select`
    (same forms). The others are listed in `hidden`, with the reason in `message`. GPUs stay in index order."""
    picked: dict[int, set[str] | None] = {g.index: None for g in report.gpus}
    notes: list[str] = []
    if cuda_visible_devices is not None:
        picked = _pick(report.gpus, picked, cuda_visible_devices.split(","), "CUDA_VISIBLE_DEVICES", notes, True)
    if select:
        picked = _pick(report.gpus, picked, select, "profile gpu.select", notes, False)
    gpus = []
    for gpu in report.gpus:
        if gpu.index not in picked:
            continue
        migs = picked[gpu.index]
        gpus.append(gpu if migs is None else _with_migs(gpu, migs))
    if gpus == report.gpus and not notes:
        return report
    hidden = [g.index for g in report.gpus if g.index not in picked]
    said = [f"{len(hidden)} GPU(s) not visible to this agent"] if hidden else []
    message = "; ".join(part for part in [report.message, *said, *notes] if part)
    return replace(report, gpus=gpus, hidden=hidden, message=message)


def _with_migs(gpu: GpuInfo, keep: set[str]) -> GpuInfo:
    """The GPU with only the MIG devices whose UUIDs are in `keep`."""
    return replace(gpu, mig_devices=[m for m in gpu.mig_devices if m.uuid in keep])


def _pick(
    gpus: list[GpuInfo],
    allowed: dict[int, set[str] | None],
    entries: list[str],
    where: str,
    notes: list[str],
    stop_at_unknown: bool,
) -> dict[int, set[str] | None]:
    """Narrow `allowed` (GPU index -> None for the whole GPU, or the MIG UUIDs kept) to what `entries` name."""
    candidates = [g for g in gpus if g.index in allowed]
    chosen: dict[int, set[str] | None] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        found = _match(candidates, allowed, entry)
        if found is None:
            if stop_at_unknown:
                notes.append(f"{where} entry {entry!r} names no GPU; CUDA ignores it and every entry after it")
                break
            notes.append(f"{where} entry {entry!r} names no GPU this agent may use")
            continue
        gpu, mig = found
        if mig is None:
            chosen[gpu.index] = allowed[gpu.index]
        elif gpu.index not in chosen or chosen[gpu.index] is not None:
            mine = chosen.get(gpu.index)
            chosen[gpu.index] = (mine or set()) | {mig}
    return chosen


def _match(gpus: list[GpuInfo], allowed: dict[int, set[str] | None], entry: str) -> tuple[GpuInfo, str | None] | None:
    if entry.isascii() and entry.isdigit():
        return next(((g, None) for g in gpus if g.index == int(entry)), None)
    if entry.upper().startswith("MIG-"):
        migs = [
            (g, m.uuid)
            for g in gpus
            for m in g.mig_devices
            if m.uuid.startswith(entry) and (allowed[g.index] is None or m.uuid in (allowed[g.index] or set()))
        ]
        return migs[0] if len(migs) == 1 else None
    found = [g for g in gpus if g.uuid and (g.uuid.startswith(entry) or g.uuid.startswith(f"GPU-{entry}"))]
    return (found[0], None) if len(found) == 1 else None  # an ambiguous prefix names no GPU, as in CUDA


def follow(report: GpuReport, mine: GpuReport) -> GpuReport:
    """After the bootstrap, keep exactly the GPUs this agent took at boot (by UUID, and by index for a GPU NVML
    could not name), with the MIG devices it took: indexes shift when a GPU drops out, UUIDs do not."""
    uuids = {g.uuid: g for g in mine.gpus if g.uuid}
    unnamed = {g.index for g in mine.gpus if not g.uuid}
    gpus = []
    for gpu in report.gpus:
        if gpu.uuid in uuids:
            taken = uuids[gpu.uuid]
            gpus.append(_with_migs(gpu, {m.uuid for m in taken.mig_devices}) if taken.mig_enabled else gpu)
        elif gpu.uuid is None and gpu.index in unnamed:
            gpus.append(gpu)
    hidden = [g.index for g in report.gpus if not (g.uuid in uuids or (g.uuid is None and g.index in unnamed))]
    return replace(report, gpus=gpus, hidden=hidden)


def product_matches(name: str | None, pattern: str) -> bool:
    """Case-insensitive shell-style match of a GPU product name ("*H100*", "NVIDIA A100*")."""
    return name is not None and fnmatch.fnmatchcase(name.lower(), pattern.lower())


#: What a GPU is: a value that was known and now fails to read (a transient NVML error) keeps its last value, so
#: one flaky call neither changes caps_hash nor forgets the GPU's identity.
CARRIED = (
    "name",
    "architecture",
    "pci_bus_id",
    "memory_total_mib",
    "compute_capability",
    "power_limit_w",
    "persistence_mode",
)


def _carry(old: GpuInfo, gpu: GpuInfo) -> GpuInfo:
    kept = {f: getattr(old, f) for f in CARRIED if getattr(gpu, f) is None and getattr(old, f) is not None}
    unread = [k for k, why in gpu.errors.items() if k.startswith("ecc.") and why != "not_supported"]
    if gpu.healthy and not old.healthy and old.health is not GpuHealth.LOST and unread:
        # a health counter that could not be read is no evidence the fault went away
        kept["health"] = old.health
        kept["health_reasons"] = [*old.health_reasons, f"(health counters unreadable at the last probe: {unread[0]})"]
    return replace(gpu, **kept) if kept else gpu


def reconcile(previous: GpuReport, fresh: GpuReport) -> tuple[GpuReport, list[dict[str, Any]]]:
    """The fresh report, keeping sight of every GPU seen before: one that vanished, or that NVML lost before
    naming it, stays listed as lost; a failed probe leaves the GPUs unhealthy with its reason; a field or health
    counter that fails to read keeps its last value. Returns the report and one change per GPU whose health
    moved."""
    if fresh.state is not GpuState.AVAILABLE and previous.state is GpuState.AVAILABLE:
        reason = f"probe {fresh.state.value}: {fresh.message}"
        gpus = [replace(g, health=GpuHealth.UNHEALTHY, health_reasons=[reason]) for g in previous.gpus]
        merged = replace(previous, state=fresh.state, message=fresh.message, gpus=gpus)
    elif fresh.state is not GpuState.AVAILABLE:
        merged = replace(fresh, gpus=previous.gpus, hidden=previous.hidden) if previous.gpus else fresh
    else:
        by_uuid = {g.uuid: g for g in previous.gpus if g.uuid}
        by_index = {g.index: g for g in previous.gpus}
        gpus = []
        for gpu in fresh.gpus:
            old = by_uuid.get(gpu.uuid) if gpu.uuid else None
            if gpu.uuid is None and (named := by_index.get(gpu.index)) is not None and named.uuid is not None:
                gpu = replace(named, health=gpu.health, health_reasons=gpu.health_reasons, errors=gpu.errors)
            elif old is not None:
                gpu = _carry(old, gpu)
            gpus.append(gpu)
        seen = {g.uuid for g in gpus if g.uuid}
        for old in previous.gpus:
            if old.uuid and old.uuid not in seen:
                gpus.append(replace(old, health=GpuHealth.LOST, health_reasons=["no longer listed by NVML"]))
        merged = replace(fresh, gpus=sorted(gpus, key=lambda g: g.index))
    before = {g.uuid or f"index {g.index}": g for g in previous.gpus}
    changes = []
    for gpu in merged.gpus:
        old = before.get(gpu.uuid or f"index {gpu.index}")
        if old is not None and old.health is not gpu.health:
            changes.append(
                {
                    "type": "gpu",
                    "event": f"gpu.{gpu.health.value}",
                    "gpu": gpu.index,
                    "uuid": gpu.uuid,
                    "was": old.health.value,
                    "reasons": list(gpu.health_reasons),
                }
            )
    return merged, changes
