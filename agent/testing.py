"""Fakes shipped next to the code they stand in for: an NVML module replaying recorded real values."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Pci:
    busId: str


@dataclass(frozen=True)
class _Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class _Process:
    pid: int
    usedGpuMemory: int | None


@dataclass(frozen=True)
class _Attributes:
    multiprocessorCount: int


@dataclass(frozen=True)
class _Mig:
    gpu: int
    slot: int


class FakeNvml:
    """Stands in for the `pynvml` module: same function names, the real NVMLError classes, recorded values.

    A recording (tests/fixtures/nvml/*.json, made by tests/nvml_capture.py from real `nvidia-smi -q -x`
    captures) holds NVML's own units; a None value answers NVML_ERROR_NOT_SUPPORTED, as the driver does.
    `init_error` makes nvmlInit raise (e.g. pynvml.NVML_ERROR_LIBRARY_NOT_FOUND);
    `errors[(function_name, gpu_index)] = NVML_ERROR_*` makes one call on one GPU raise (the dict may be changed
    between probes: a GPU lost mid-run); `hang` names functions that never return (a wedged driver).
    """

    NVMLError = pynvml.NVMLError

    def __init__(
        self,
        recording: dict[str, Any],
        init_error: int | None = None,
        errors: dict[tuple[str, int], int] | None = None,
        hang: frozenset[str] = frozenset(),
    ) -> None:
        self._rec = recording
        self._init_error = init_error
        self.errors = errors if errors is not None else {}
        self._hang = hang
        self.initialised = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML_"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *(n for n in dir(pynvml) if n.startswith("NVML_ERROR_"))]

    @property
    def recording(self) -> dict[str, Any]:
        """The values replayed; a test may change them between probes (a process appears on a GPU)."""
        return self._rec

    @classmethod
    def from_file(cls, path: Path, **kwargs: Any) -> FakeNvml:
        """Load a recording from tests/fixtures/nvml/*.json."""
        return cls(json.loads(path.read_text(encoding="utf-8")), **kwargs)

    def _value(self, handle: Any, call: str, key: str) -> Any:
        if call in self._hang:
            time.sleep(3600)
        index = handle.gpu if isinstance(handle, _Mig) else handle
        code = self.errors.get((call, index))
        if code is not None:
            raise pynvml.NVMLError(code)
        record: dict[str, Any] = self._rec["gpus"][index]
        if isinstance(handle, _Mig):
            record = record["mig_devices"][handle.slot]
        value = record.get(key)
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    # ---- system ------------------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self._init_error is not None:
            raise pynvml.NVMLError(self._init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._rec["driver_version"])

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return int(self._rec["cuda_driver_version"])

    def nvmlDeviceGetCount(self) -> int:
        if "nvmlDeviceGetCount" in self._hang:
            time.sleep(3600)
        return len(self._rec["gpus"])

    # ---- devices -----------------------------------------------------------------------------------------

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._value(index, "nvmlDeviceGetHandleByIndex", "uuid")
        return index

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(self._value(handle, "nvmlDeviceGetUUID", "uuid"))

    def nvmlDeviceGetName(self, handle: Any) -> bytes:
        return str(self._value(handle, "nvmlDeviceGetName", "name")).encode()  # old bindings answered bytes

    def nvmlDeviceGetArchitecture(self, handle: Any) -> int:
        return int(self._value(handle, "nvmlDeviceGetArchitecture", "architecture"))

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> _Memory:
        memory = self._value(handle, "nvmlDeviceGetMemoryInfo", "memory")
        return _Memory(memory["total"], memory["free"], memory["used"])

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        major, minor = self._value(handle, "nvmlDeviceGetCudaComputeCapability", "compute_capability")
        return int(major), int(minor)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return int(self._value(handle, "nvmlDeviceGetEnforcedPowerLimit", "power_limit_mw"))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return int(self._value(handle, "nvmlDeviceGetPowerUsage", "power_usage_mw"))

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return int(self._value(handle, "nvmlDeviceGetTemperature", "temperature_c"))

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> _Utilization:
        rates = self._value(handle, "nvmlDeviceGetUtilizationRates", "utilization")
        return _Utilization(int(rates["gpu"]), int(rates["memory"]))

    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int:
        return int(self._value(handle, "nvmlDeviceGetPersistenceMode", "persistence_mode"))

    def nvmlDeviceGetPciInfo(self, handle: Any) -> _Pci:
        return _Pci(str(self._value(handle, "nvmlDeviceGetPciInfo", "pci_bus_id")))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[_Process]:
        procs = self._value(handle, "nvmlDeviceGetComputeRunningProcesses", "processes")
        return [_Process(int(p["pid"]), p["used_memory"]) for p in procs]

    # ---- memory health -----------------------------------------------------------------------------------

    def nvmlDeviceGetEccMode(self, handle: Any) -> list[int]:
        return list(self._value(handle, "nvmlDeviceGetEccMode", "ecc_mode"))

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        counts = self._value(handle, "nvmlDeviceGetTotalEccErrors", "ecc_errors")
        kind = "uncorrected" if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else "corrected"
        span = "volatile" if counter == pynvml.NVML_VOLATILE_ECC else "aggregate"
        value = counts.get(f"{kind}_{span}")
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(value)

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        corrected, uncorrected, pending, failure = self._value(handle, "nvmlDeviceGetRemappedRows", "remapped_rows")
        return int(corrected), int(uncorrected), int(pending), int(failure)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        pending = self._value(handle, "nvmlDeviceGetRetiredPagesPendingStatus", "retired_pages_pending")
        return int(pynvml.NVML_FEATURE_ENABLED if pending else pynvml.NVML_FEATURE_DISABLED)

    # ---- MIG ---------------------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        current, pending = self._value(handle, "nvmlDeviceGetMigMode", "mig_mode")
        enable, disable = pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_DISABLE
        return [enable if current else disable, enable if pending else disable]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        self._value(handle, "nvmlDeviceGetMaxMigDeviceCount", "mig_mode")
        return 7  # an A100/H100 offers seven slots; the unused ones answer NOT_FOUND

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, slot: int) -> _Mig:
        devices = self._value(handle, "nvmlDeviceGetMigDeviceHandleByIndex", "mig_devices")
        if slot >= len(devices):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return _Mig(handle, slot)

    def nvmlDeviceGetGpuInstanceId(self, handle: _Mig) -> int:
        return int(self._value(handle, "nvmlDeviceGetGpuInstanceId", "gpu_instance_id"))

    def nvmlDeviceGetComputeInstanceId(self, handle: _Mig) -> int:
        return int(self._value(handle, "nvmlDeviceGetComputeInstanceId", "compute_instance_id"))

    def nvmlDeviceGetAttributes(self, handle: _Mig) -> _Attributes:
        return _Attributes(int(self._value(handle, "nvmlDeviceGetAttributes", "sm_count")))
