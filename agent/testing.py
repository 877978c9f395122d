"""Fakes shipped next to the code they stand in for: an NVML module replaying recorded real values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

MIB = 1024 * 1024


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Pci:
    busId: str


class FakeNvml:
    """Stands in for the `pynvml` module: same function names, the real NVMLError classes, recorded values.

    `init_error` makes nvmlInit raise (e.g. pynvml.NVML_ERROR_LIBRARY_NOT_FOUND);
    `errors[(function_name, gpu_index)] = NVML_ERROR_*` makes one call on one GPU raise.
    """

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(
        self, recording: dict[str, Any], init_error: int | None = None, errors: dict[tuple[str, int], int] | None = None
    ) -> None:
        self._rec = recording
        self._init_error = init_error
        self._errors = errors or {}
        self.initialised = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML_ERROR_"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *(n for n in dir(pynvml) if n.startswith("NVML_ERROR_"))]

    @classmethod
    def from_file(cls, path: Path, **kwargs: Any) -> FakeNvml:
        """Load a recording from tests/fixtures/nvml/*.json."""
        return cls(json.loads(path.read_text(encoding="utf-8")), **kwargs)

    def _gpu(self, handle: int, call: str) -> dict[str, Any]:
        code = self._errors.get((call, handle))
        if code is not None:
            raise pynvml.NVMLError(code)
        gpu: dict[str, Any] = self._rec["gpus"][handle]
        return gpu

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
        return len(self._rec["gpus"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self._gpu(handle, "nvmlDeviceGetUUID")["uuid"])

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return str(self._gpu(handle, "nvmlDeviceGetName")["name"]).encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Memory:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return _Memory(gpu["memory_total_mib"] * MIB, gpu["memory_free_mib"] * MIB, gpu["memory_used_mib"] * MIB)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        major, minor = self._gpu(handle, "nvmlDeviceGetCudaComputeCapability")["compute_capability"]
        return int(major), int(minor)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit")["power_limit_mw"])

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetTemperature")["temperature_c"])

    def nvmlDeviceGetPersistenceMode(self, handle: int) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetPersistenceMode")["persistence_mode"])

    def nvmlDeviceGetPciInfo(self, handle: int) -> _Pci:
        return _Pci(str(self._gpu(handle, "nvmlDeviceGetPciInfo")["pci_bus_id"]))
