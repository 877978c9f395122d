"""GPU inventory through NVML, read in a child process with a deadline so a hung driver cannot freeze us."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

MIB = 1024 * 1024
T = TypeVar("T")


class GpuState(StrEnum):
    """Outcome of one probe."""

    AVAILABLE = "available"  # NVML answered (possibly with zero GPUs)
    UNAVAILABLE = "unavailable"  # no NVIDIA driver or library: a CPU-only host
    ERROR = "error"  # NVML is there but failed: needs an operator
    TIMEOUT = "timeout"  # the probe did not finish within its deadline


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it; a field NVML cannot give is None with the reason in `errors`."""

    index: int
    uuid: str
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_mib: int | None = None
    memory_free_mib: int | None = None
    compute_capability: str | None = None
    power_limit_w: float | None = None
    temperature_c: int | None = None
    persistence_mode: bool | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuReport:
    """The whole probe result."""

    state: GpuState
    message: str = ""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuReport:
        """Inverse of to_dict."""
        return cls(
            state=GpuState(data["state"]),
            message=data.get("message", ""),
            driver_version=data.get("driver_version"),
            cuda_driver_version=data.get("cuda_driver_version"),
            gpus=[GpuInfo(**gpu) for gpu in data.get("gpus", [])],
        )


class GpuProbe(Protocol):
    """Something that can tell which GPUs the host has."""

    async def probe(self) -> GpuReport: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _error_name(nvml: Any, exc: BaseException) -> str:
    value = getattr(exc, "value", None)
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == value:
            return name.removeprefix("NVML_ERROR_").lower()
    return type(exc).__name__


def read_gpus(nvml: Any) -> GpuReport:
    """Read every GPU through an nvidia-ml-py-shaped module (the real `pynvml`, or a recorded fake)."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return _init_failure(nvml, exc)
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _optional(lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion_v2()), nvml)
        count = nvml.nvmlDeviceGetCount()
        gpus = [_read_one(nvml, index) for index in range(count)]
    except nvml.NVMLError as exc:
        return GpuReport(GpuState.ERROR, f"NVML failed while listing GPUs: {_error_name(nvml, exc)} ({exc})")
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    return GpuReport(GpuState.AVAILABLE, f"{len(gpus)} GPU(s)", driver, cuda, gpus)


def _init_failure(nvml: Any, exc: BaseException) -> GpuReport:
    name = _error_name(nvml, exc)
    if name in {"library_not_found", "driver_not_loaded"}:
        return GpuReport(
            GpuState.UNAVAILABLE,
            f"no NVIDIA driver ({name}): treating this as a CPU-only host with zero GPUs",
        )
    if name == "lib_rm_version_mismatch":
        return GpuReport(
            GpuState.ERROR,
            "NVIDIA driver/library version mismatch: the driver was upgraded without a reboot; "
            "reboot the host (or reload the nvidia kernel modules)",
        )
    if name == "no_permission":
        return GpuReport(GpuState.ERROR, "no permission to open /dev/nvidia*: add the agent user to the video group")
    return GpuReport(GpuState.ERROR, f"NVML init failed: {name} ({exc})")


def _cuda_version(raw: int) -> str:
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def _optional(read: Callable[[], T], nvml: Any, errors: dict[str, str] | None = None, key: str = "") -> T | None:
    try:
        return read()
    except nvml.NVMLError as exc:
        if errors is not None:
            errors[key] = _error_name(nvml, exc)
        return None


def _read_one(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    errors: dict[str, str] = {}
    memory = _optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), nvml, errors, "memory")
    capability = _optional(lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle), nvml, errors, "compute")
    power_mw = _optional(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle), nvml, errors, "power_limit")
    temperature = _optional(
        lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), nvml, errors, "temperature"
    )
    persistence = _optional(lambda: nvml.nvmlDeviceGetPersistenceMode(handle), nvml, errors, "persistence")
    pci = _optional(lambda: nvml.nvmlDeviceGetPciInfo(handle), nvml, errors, "pci")
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_optional(lambda: _text(nvml.nvmlDeviceGetName(handle)), nvml, errors, "name"),
        pci_bus_id=_text(pci.busId) if pci is not None else None,
        memory_total_mib=memory.total // MIB if memory is not None else None,
        memory_free_mib=memory.free // MIB if memory is not None else None,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability is not None else None,
        power_limit_w=power_mw / 1000 if power_mw is not None else None,
        temperature_c=temperature,
        persistence_mode=bool(persistence) if persistence is not None else None,
        errors=errors,
    )


class NvmlProbe:
    """Runs `read_gpus(pynvml)` in `python -m agent.host.gpu` and kills it at the deadline."""

    def __init__(self, timeout_s: float, python: str = sys.executable) -> None:
        self._timeout_s = timeout_s
        self._python = python

    async def probe(self) -> GpuReport:
        """Probe now; never raises for GPU trouble, the report says what happened."""
        proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "agent.host.gpu",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout_s)
        except asyncio.CancelledError:
            proc.kill()
            await asyncio.shield(proc.wait())
            raise
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return GpuReport(
                GpuState.TIMEOUT,
                f"NVML probe did not answer within {self._timeout_s:g}s (wedged GPU or driver?); carrying on",
            )
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return GpuReport(GpuState.ERROR, f"NVML probe exited {proc.returncode}: {tail[0]}")
        return GpuReport.from_dict(json.loads(out))


def _probe_main() -> int:
    try:
        import pynvml
    except ImportError:
        report = GpuReport(GpuState.UNAVAILABLE, "nvidia-ml-py is not installed: treating as a CPU-only host")
    else:
        report = read_gpus(pynvml)
    json.dump(report.to_dict(), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(_probe_main())
