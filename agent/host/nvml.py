"""Reading GPUs through NVML, one field at a time, in a child process with a deadline so a hung driver cannot
freeze the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from agent.host.gpu import Ecc, GpuHealth, GpuInfo, GpuProcess, GpuReport, GpuState, MigDevice, assess

MIB = 1024 * 1024
T = TypeVar("T")

LOST_REASON = "NVML reports the GPU fallen off the bus"
ARCHITECTURES = {
    2: "kepler",
    3: "maxwell",
    4: "pascal",
    5: "volta",
    6: "turing",
    7: "ampere",
    8: "ada",
    9: "hopper",
    10: "blackwell",
    13: "rubin",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def error_name(nvml: Any, exc: BaseException) -> str:
    """NVML's error as a short stable name (`not_supported`, `gpu_is_lost`, …)."""
    value = getattr(exc, "value", None)
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == value:
            return name.removeprefix("NVML_ERROR_").lower()
    return type(exc).__name__


class _Lost(Exception):
    """A GPU answered GPU_IS_LOST in the middle of being read."""


class _Fields:
    """Reads optional fields of one device; a failure is recorded under the field's name, a lost GPU aborts."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors: dict[str, str] = {}

    def get(self, key: str, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except self.nvml.NVMLError as exc:
            name = error_name(self.nvml, exc)
            if name == "gpu_is_lost":
                raise _Lost from None
            self.errors[key] = name
            return None
        except Exception as exc:  # a binding that answers something unexpected spoils this field, not the probe
            self.errors[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            return None


def read_gpus(nvml: Any) -> GpuReport:
    """Read every GPU through an nvidia-ml-py-shaped module (the real `pynvml`, or a recorded fake)."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return _init_failure(nvml, exc)
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda = _Fields(nvml).get("cuda", lambda: _cuda_version(nvml.nvmlSystemGetCudaDriverVersion_v2()))
        count = nvml.nvmlDeviceGetCount()
        gpus = [_read_one(nvml, index) for index in range(count)]
    except nvml.NVMLError as exc:
        return GpuReport(GpuState.ERROR, _listing_failure(nvml, exc))
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()
    lost = [g.index for g in gpus if g.health is GpuHealth.LOST]
    message = f"{len(gpus)} GPU(s)" + (f"; GPU {', '.join(map(str, lost))} lost" if lost else "")
    return GpuReport(GpuState.AVAILABLE, message, driver, cuda, gpus)


def _listing_failure(nvml: Any, exc: BaseException) -> str:
    name = error_name(nvml, exc)
    if name == "unknown":
        return (
            "NVML failed while listing GPUs: unknown error; in a container this usually means the GPU devices "
            "were detached (systemctl daemon-reload with the systemd cgroup driver): restart the container"
        )
    return f"NVML failed while listing GPUs: {name} ({exc})"


def _init_failure(nvml: Any, exc: BaseException) -> GpuReport:
    name = error_name(nvml, exc)
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
    if name == "gpu_is_lost":
        return GpuReport(GpuState.ERROR, "a GPU has fallen off the bus (Xid 79): reboot the host or reseat the GPU")
    return GpuReport(GpuState.ERROR, f"NVML init failed: {name} ({exc})")


def _cuda_version(raw: int) -> str:
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def _read_one(nvml: Any, index: int) -> GpuInfo:
    fields = _Fields(nvml)
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    except nvml.NVMLError as exc:
        name = error_name(nvml, exc)
        reason = LOST_REASON if name == "gpu_is_lost" else f"unreadable: {name}"
        return GpuInfo(index=index, uuid=None, health=GpuHealth.LOST, health_reasons=[reason], errors={"uuid": name})
    try:
        return _read_fields(nvml, index, handle, uuid, fields)
    except _Lost:
        return GpuInfo(
            index=index,
            uuid=uuid,
            health=GpuHealth.LOST,
            health_reasons=[LOST_REASON],
            errors={**fields.errors, "device": "gpu_is_lost"},
        )


def _read_fields(nvml: Any, index: int, handle: Any, uuid: str, f: _Fields) -> GpuInfo:
    memory = f.get("memory_total_mib", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    capability = f.get("compute_capability", lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    power_limit = f.get("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    power_draw = f.get("power_draw_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    utilization = f.get("utilization_gpu_pct", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    persistence = f.get("persistence_mode", lambda: nvml.nvmlDeviceGetPersistenceMode(handle))
    pci = f.get("pci_bus_id", lambda: nvml.nvmlDeviceGetPciInfo(handle))
    arch = f.get("architecture", lambda: nvml.nvmlDeviceGetArchitecture(handle))
    mig_mode = f.get("mig_enabled", lambda: nvml.nvmlDeviceGetMigMode(handle))
    mig_enabled = bool(mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE) if mig_mode is not None else None
    ecc = _read_ecc(nvml, handle, f)
    health, reasons = assess(ecc)
    return GpuInfo(
        index=index,
        uuid=uuid,
        name=f.get("name", lambda: _text(nvml.nvmlDeviceGetName(handle))),
        architecture=ARCHITECTURES.get(arch, f"unknown ({arch})") if arch is not None else None,
        pci_bus_id=_text(pci.busId) if pci is not None else None,
        memory_total_mib=memory.total // MIB if memory is not None else None,
        memory_used_mib=memory.used // MIB if memory is not None else None,
        memory_free_mib=memory.free // MIB if memory is not None else None,
        compute_capability=f"{capability[0]}.{capability[1]}" if capability is not None else None,
        power_limit_w=power_limit / 1000 if power_limit is not None else None,
        power_draw_w=round(power_draw / 1000, 3) if power_draw is not None else None,
        temperature_c=f.get("temperature_c", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        utilization_gpu_pct=utilization.gpu if utilization is not None else None,
        utilization_memory_pct=utilization.memory if utilization is not None else None,
        persistence_mode=bool(persistence) if persistence is not None else None,
        mig_enabled=mig_enabled,
        mig_devices=_read_mig(nvml, handle, f) if mig_enabled else [],
        ecc=ecc,
        processes=f.get("processes", lambda: _processes(nvml.nvmlDeviceGetComputeRunningProcesses(handle))),
        health=health,
        health_reasons=reasons,
        errors=f.errors,
    )


def _processes(raw: list[Any]) -> list[GpuProcess]:
    out = []
    for proc in raw:
        used = getattr(proc, "usedGpuMemory", None)
        out.append(GpuProcess(pid=int(proc.pid), used_memory_mib=used // MIB if isinstance(used, int) else None))
    return out


def _read_ecc(nvml: Any, handle: Any, f: _Fields) -> Ecc:
    mode = f.get("ecc.enabled", lambda: nvml.nvmlDeviceGetEccMode(handle))
    enabled = bool(mode[0]) if mode is not None else None

    def count(kind: int, counter: int) -> Callable[[], int]:
        return lambda: int(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, counter))

    uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    corrected = nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    counters: dict[str, int | None] = {}
    if enabled:
        counters["uncorrected_volatile"] = f.get("ecc.uncorrected_volatile", count(uncorrected, nvml.NVML_VOLATILE_ECC))
        counters["corrected_volatile"] = f.get("ecc.corrected_volatile", count(corrected, nvml.NVML_VOLATILE_ECC))
        counters["uncorrected_aggregate"] = f.get(
            "ecc.uncorrected_aggregate", count(uncorrected, nvml.NVML_AGGREGATE_ECC)
        )
    remap = f.get("ecc.remapped_rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle))
    pending = f.get("ecc.retired_pages_pending", lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
    return Ecc(
        enabled=enabled,
        **counters,
        retired_pages_pending=bool(pending == nvml.NVML_FEATURE_ENABLED) if pending is not None else None,
        remapped_rows_uncorrectable=int(remap[1]) if remap is not None else None,
        remapped_rows_pending=bool(remap[2]) if remap is not None else None,
        remapped_rows_failure=bool(remap[3]) if remap is not None else None,
    )


def _read_mig(nvml: Any, handle: Any, f: _Fields) -> list[MigDevice]:
    most = f.get("mig_devices", lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or 0
    devices = []
    for slot in range(most):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            uuid = _text(nvml.nvmlDeviceGetUUID(mig))
        except nvml.NVMLError as exc:
            if error_name(nvml, exc) == "gpu_is_lost":
                raise _Lost from None
            continue  # an empty MIG slot answers NOT_FOUND
        devices.append(_read_mig_device(nvml, mig, slot, uuid))
    return devices


def _read_mig_device(nvml: Any, mig: Any, slot: int, uuid: str) -> MigDevice:
    m = _Fields(nvml)
    memory = m.get("memory_total_mib", lambda: nvml.nvmlDeviceGetMemoryInfo(mig))
    attributes = m.get("sm_count", lambda: nvml.nvmlDeviceGetAttributes(mig))
    return MigDevice(
        index=slot,
        uuid=uuid,
        name=m.get("name", lambda: _text(nvml.nvmlDeviceGetName(mig))),
        gpu_instance_id=m.get("gpu_instance_id", lambda: int(nvml.nvmlDeviceGetGpuInstanceId(mig))),
        compute_instance_id=m.get("compute_instance_id", lambda: int(nvml.nvmlDeviceGetComputeInstanceId(mig))),
        memory_total_mib=memory.total // MIB if memory is not None else None,
        memory_used_mib=memory.used // MIB if memory is not None else None,
        sm_count=int(attributes.multiprocessorCount) if attributes is not None else None,
        errors=m.errors,
    )


#: What the probe child inherits from the agent: enough to find the driver library, nothing secret.
CHILD_ENV = ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL")
#: After SIGKILL, how long to wait for the child to go (one stuck in the driver, state D, may never).
REAP_TIMEOUT_S = 5.0


class NvmlProbe:
    """Runs `read_gpus(pynvml)` in `python -P -m agent.host.nvml` and kills it at the deadline. The child gets a
    minimal environment and never imports from the working directory."""

    def __init__(
        self,
        timeout_s: float,
        python: str = sys.executable,
        module: str = "agent.host.nvml",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._python = python
        self._module = module
        self._env = {k: v for k, v in os.environ.items() if k in CHILD_ENV} | (extra_env or {})

    async def probe(self) -> GpuReport:
        """Probe now; never raises for GPU trouble, the report says what happened."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python,
                "-P",
                "-m",
                self._module,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as exc:
            return GpuReport(GpuState.ERROR, f"cannot start the NVML probe ({self._python}): {exc.strerror or exc}")
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout_s)
        except asyncio.CancelledError:
            await self._kill(proc)
            raise
        except TimeoutError:
            reaped = await self._kill(proc)
            stuck = "" if reaped else " and could not be killed (stuck in the driver: reboot the host)"
            return GpuReport(
                GpuState.TIMEOUT,
                f"NVML probe did not answer within {self._timeout_s:g}s{stuck} (wedged GPU or driver?); carrying on",
            )
        if proc.returncode != 0:
            tail = err[-2000:].decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return GpuReport(GpuState.ERROR, f"NVML probe exited {proc.returncode}: {tail[0][:300]}")
        try:
            return GpuReport.from_dict(json.loads(out))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            shown = out[:200].decode(errors="replace")
            return GpuReport(GpuState.ERROR, f"NVML probe answered something unreadable ({exc}): {shown!r}")

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> bool:
        """SIGKILL and reap with a bound; False when the child would not go."""
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), REAP_TIMEOUT_S)
        except TimeoutError:
            return False
        return True


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
