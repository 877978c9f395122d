"""GPU probe: recorded real NVML values through the fake, and the real no-driver path."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pynvml
import pytest

from agent.bootstrap.detect import gpu_shortfall
from agent.host.gpu import GpuReport, GpuState, NvmlProbe, read_gpus
from agent.profile import GpuRequirement
from agent.testing import FakeNvml
from tests.conftest import FIXTURES

A10G = FIXTURES / "nvml" / "a10g.json"
A5000 = FIXTURES / "nvml" / "a5000.json"


def test_recorded_a10g_host_is_read_with_units() -> None:
    """The recorded AWS g5 values come out as MiB, watts and a dotted compute capability."""
    report = read_gpus(FakeNvml.from_file(A10G))

    gpu = report.gpus[0]
    assert (GpuState.AVAILABLE, "515.105.01", "11.7") == (
        report.state,
        report.driver_version,
        report.cuda_driver_version,
    )
    assert ("NVIDIA A10G", "GPU-9a9a6c50-2a47-2f51-a902-b82c3b127e94", 23028, 22569, "8.6", 300.0, 17, False) == (
        gpu.name,
        gpu.uuid,
        gpu.memory_total_mib,
        gpu.memory_free_mib,
        gpu.compute_capability,
        gpu.power_limit_w,
        gpu.temperature_c,
        gpu.persistence_mode,
    )


def test_unsupported_field_is_null_with_reason_not_a_failed_probe() -> None:
    """NotSupported on power (GeForce) and NoPermission on temperature leave the rest of the GPU intact."""
    nvml = FakeNvml.from_file(
        A5000,
        errors={
            ("nvmlDeviceGetEnforcedPowerLimit", 0): pynvml.NVML_ERROR_NOT_SUPPORTED,
            ("nvmlDeviceGetTemperature", 0): pynvml.NVML_ERROR_NO_PERMISSION,
        },
    )

    gpu = read_gpus(nvml).gpus[0]

    assert (None, None, 24564) == (gpu.power_limit_w, gpu.temperature_c, gpu.memory_total_mib)
    assert {"power_limit": "not_supported", "temperature": "no_permission"} == gpu.errors
    assert 0 == nvml.initialised


@pytest.mark.parametrize(
    ("code", "state", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuState.UNAVAILABLE, "CPU-only host"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuState.UNAVAILABLE, "CPU-only host"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, GpuState.ERROR, "upgraded without a reboot"),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuState.ERROR, "video group"),
    ],
)
def test_init_failures_give_actionable_messages(code: int, state: GpuState, words: str) -> None:
    """Each known NVML init failure says what it means for the host."""
    report = read_gpus(FakeNvml.from_file(A10G, init_error=code))

    assert state == report.state
    assert words in report.message
    assert [] == report.gpus


def test_real_probe_on_a_host_without_driver_reports_cpu_only() -> None:
    """The real child-process probe on this driverless machine says unavailable, zero GPUs, no crash."""
    report = asyncio.run(NvmlProbe(timeout_s=60).probe())

    assert (GpuState.UNAVAILABLE, []) == (report.state, report.gpus)


def test_hung_probe_is_killed_at_its_deadline(tmp_path: Path) -> None:
    """A probe child that never answers is killed; the report says timeout and the caller carries on."""
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(hang.stat().st_mode | stat.S_IEXEC)

    report = asyncio.run(NvmlProbe(timeout_s=0.5, python=str(hang)).probe())

    assert GpuState.TIMEOUT == report.state
    assert "did not answer within 0.5s" in report.message


def test_report_round_trips_through_json_form() -> None:
    """What the child prints is what the parent reads."""
    report = read_gpus(FakeNvml.from_file(A10G))

    assert report == GpuReport.from_dict(report.to_dict())


def test_gpu_shortfall_states_exact_numbers() -> None:
    """A host with one 24 GB GPU against a 2 x 40 GB profile says exactly what is missing."""
    report = read_gpus(FakeNvml.from_file(A5000))

    assert "profile needs 2 GPU(s) with >= 40000 MiB, host has 0" == gpu_shortfall(
        GpuRequirement(min_count=2, min_memory_mib=40000), report
    )
    assert gpu_shortfall(GpuRequirement(min_count=1, min_memory_mib=20000), report) is None
