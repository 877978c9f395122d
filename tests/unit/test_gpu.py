"""GPU probe: recorded real captures through the NVML fake, field by field; failures, health and visibility."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pynvml
import pytest

from agent.bootstrap.detect import gpu_problems, gpu_shortfall
from agent.gpuwatch import GpuWatch
from agent.host.gpu import GpuHealth, GpuReport, GpuState, reconcile, visible
from agent.host.nvml import NvmlProbe, read_gpus
from agent.profile import GpuRequirement
from agent.testing import FakeNvml
from tests.conftest import FIXTURES, REPO
from tests.nvml_capture import CAPTURES, convert, parse

NVML = FIXTURES / "nvml"
CAPTURE_FILES = sorted(CAPTURES.glob("*.xml"))
H100 = NVML / "h100x8.json"
A100_MIG = NVML / "a100-mig.json"
T4 = NVML / "t4.json"
RTX = NVML / "rtx3090.json"


def probe(path: Path, **kwargs: Any) -> GpuReport:
    return read_gpus(FakeNvml.from_file(path, **kwargs))


@pytest.mark.parametrize("capture", CAPTURE_FILES, ids=lambda p: p.stem)
def test_recordings_are_the_conversion_of_their_captures(capture: Path) -> None:
    """Every committed recording is exactly what tests/nvml_capture.py makes of its capture (no hand edits)."""
    recorded = json.loads((NVML / f"{capture.stem}.json").read_text(encoding="utf-8"))

    assert convert(capture) == recorded


@pytest.mark.parametrize("capture", CAPTURE_FILES, ids=lambda p: p.stem)
def test_fingerprint_matches_the_capture_field_by_field(capture: Path) -> None:
    """Driver, CUDA and every GPU field the probe reports equal what nvidia-smi printed for that host."""
    want = parse(capture)
    report = probe(NVML / f"{capture.stem}.json")

    assert (GpuState.AVAILABLE, want["driver_version"], want["cuda_version"]) == (
        report.state,
        report.driver_version,
        report.cuda_driver_version,
    )
    assert len(want["gpus"]) == len(report.gpus)
    for index, (gpu, exp) in enumerate(zip(report.gpus, want["gpus"], strict=True)):
        got = {
            "index": gpu.index,
            "name": gpu.name,
            "uuid": gpu.uuid,
            "pci_bus_id": gpu.pci_bus_id,
            "architecture": gpu.architecture,
            "memory": (gpu.memory_total_mib, gpu.memory_used_mib, gpu.memory_free_mib),
            "temperature_c": gpu.temperature_c,
            "power": (gpu.power_limit_w, gpu.power_draw_w),
            "utilization": (gpu.utilization_gpu_pct, gpu.utilization_memory_pct),
            "persistence_mode": gpu.persistence_mode,
            "mig_enabled": gpu.mig_enabled,
            "mig": [
                (m.gpu_instance_id, m.compute_instance_id, m.sm_count, m.memory_total_mib) for m in gpu.mig_devices
            ],
            "ecc": (gpu.ecc.enabled, gpu.ecc.uncorrected_volatile, gpu.ecc.corrected_volatile),
            "ecc_aggregate": gpu.ecc.uncorrected_aggregate,
            "retired_pages_pending": gpu.ecc.retired_pages_pending,
            "remap": (
                gpu.ecc.remapped_rows_uncorrectable,
                gpu.ecc.remapped_rows_pending,
                gpu.ecc.remapped_rows_failure,
            ),
            "processes": [(p.pid, p.used_memory_mib) for p in gpu.processes or []],
        }
        expected = {
            "index": index,
            "name": exp["name"],
            "uuid": exp["uuid"],
            "pci_bus_id": exp["pci_bus_id"],
            "architecture": (exp["architecture"] or "").split()[0].lower() or None,
            "memory": (exp["memory_total_mib"], exp["memory_used_mib"], exp["memory_free_mib"]),
            "temperature_c": exp["temperature_c"],
            "power": (exp["power_limit_w"], exp["power_draw_w"]),
            "utilization": (exp["utilization_gpu_pct"], exp["utilization_memory_pct"]),
            "persistence_mode": exp["persistence_mode"],
            "mig_enabled": exp["mig_enabled"],
            "mig": [
                (m["gpu_instance_id"], m["compute_instance_id"], m["sm_count"], m["memory_total_mib"])
                for m in exp["mig_devices"]
            ],
            "ecc": (
                exp["ecc_enabled"],
                exp["uncorrected_volatile"] if exp["ecc_enabled"] else None,
                exp["corrected_volatile"] if exp["ecc_enabled"] else None,
            ),
            "ecc_aggregate": exp["uncorrected_aggregate"] if exp["ecc_enabled"] else None,
            "retired_pages_pending": exp["retired_pages_pending"],
            "remap": (exp["remapped_rows_uncorrectable"], exp["remapped_rows_pending"], exp["remapped_rows_failure"]),
            "processes": [(p["pid"], p["used_memory_mib"]) for p in exp["processes"] if "C" in p["type"]],
        }
        assert expected == got, f"{capture.name} GPU {index}"
        assert GpuHealth.HEALTHY == gpu.health


def test_eight_h100_host_lists_every_gpu_by_uuid_and_bus() -> None:
    """The 8x H100 SXM capture gives eight Hopper GPUs of 81559 MiB, compute 9.0, 700 W, each its own bus id."""
    report = probe(H100)

    assert 8 == len({g.uuid for g in report.gpus}) == len({g.pci_bus_id for g in report.gpus})
    assert {("NVIDIA H100 80GB HBM3", "hopper", 81559, "9.0", 700.0, True)} == {
        (g.name, g.architecture, g.memory_total_mib, g.compute_capability, g.power_limit_w, g.persistence_mode)
        for g in report.gpus
    }


def test_mig_devices_are_children_with_their_own_uuid_and_memory() -> None:
    """The A100 with MIG on lists its four 1g instances (GI 3-6, 14 SMs, 19968 MiB) under the parent GPU."""
    gpu = probe(A100_MIG).gpus[0]

    assert gpu.mig_enabled is True
    assert [3, 4, 5, 6] == [m.gpu_instance_id for m in gpu.mig_devices]
    assert {(14, 19968)} == {(m.sm_count, m.memory_total_mib) for m in gpu.mig_devices}
    assert all(m.uuid.startswith("MIG-") for m in gpu.mig_devices)
    assert "not_supported" == gpu.errors["utilization_gpu_pct"]  # NVML has no utilisation under MIG


def test_compute_processes_are_listed_with_their_memory() -> None:
    """The T4 capture's python job (1005 MiB) is a compute process; Xorg, a graphics client, is not."""
    gpu = probe(T4).gpus[0]

    assert [(5762, 1005)] == [(p.pid, p.used_memory_mib) for p in gpu.processes or []]


OPTIONAL_CALLS = [
    "nvmlDeviceGetName",
    "nvmlDeviceGetArchitecture",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetPersistenceMode",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetEccMode",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetRetiredPagesPendingStatus",
    "nvmlDeviceGetComputeRunningProcesses",
]


def test_not_supported_on_every_optional_field_leaves_a_named_gpu() -> None:
    """With every optional call NotSupported the GPU is still listed by UUID, each field null with its reason."""
    errors = {(call, 0): pynvml.NVML_ERROR_NOT_SUPPORTED for call in OPTIONAL_CALLS}
    nvml = FakeNvml.from_file(H100, errors=errors)

    gpu = read_gpus(nvml).gpus[0]

    assert "GPU-00000000-0000-0000-0000-000000000000" == gpu.uuid
    assert (None, None, None, None, None, None, None) == (
        gpu.name,
        gpu.memory_total_mib,
        gpu.compute_capability,
        gpu.power_limit_w,
        gpu.temperature_c,
        gpu.mig_enabled,
        gpu.ecc.enabled,
    )
    assert 15 == len(gpu.errors)
    assert {"not_supported"} == set(gpu.errors.values())
    assert GpuHealth.HEALTHY == gpu.health  # no evidence of a fault is not a fault
    assert 0 == nvml.initialised


@pytest.mark.parametrize(
    ("code", "state", "words"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, GpuState.UNAVAILABLE, "CPU-only host"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuState.UNAVAILABLE, "CPU-only host"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, GpuState.ERROR, "upgraded without a reboot"),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuState.ERROR, "video group"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuState.ERROR, "fallen off the bus"),
    ],
)
def test_init_failures_give_actionable_messages(code: int, state: GpuState, words: str) -> None:
    """Each known NVML init failure says what it means for the host and what to do."""
    report = probe(H100, init_error=code)

    assert state == report.state
    assert words in report.message
    assert [] == report.gpus


def test_one_lost_gpu_does_not_fail_the_others() -> None:
    """GPU 3 answering GPU_IS_LOST for its handle is listed lost; the seven others are read in full."""
    report = probe(H100, errors={("nvmlDeviceGetHandleByIndex", 3): pynvml.NVML_ERROR_GPU_IS_LOST})

    assert GpuState.AVAILABLE == report.state
    assert [GpuHealth.LOST] == [g.health for g in report.gpus if g.index == 3]
    assert 7 == sum(g.healthy and g.memory_total_mib == 81559 for g in report.gpus)
    assert "GPU 3 lost" in report.message


def test_gpu_lost_in_the_middle_of_being_read_keeps_its_uuid() -> None:
    """A GPU that falls off the bus between two calls is reported lost under the UUID it already gave."""
    gpu = probe(H100, errors={("nvmlDeviceGetPowerUsage", 5): pynvml.NVML_ERROR_GPU_IS_LOST}).gpus[5]

    assert (GpuHealth.LOST, "GPU-00000005-0000-0000-0000-000000000005") == (gpu.health, gpu.uuid)


def test_uncorrectable_ecc_and_pending_remap_make_a_gpu_unhealthy() -> None:
    """Uncorrectable volatile ECC errors and a pending row remap each give the reason an operator acts on."""
    recording = json.loads(H100.read_text(encoding="utf-8"))
    recording["gpus"][2]["ecc_errors"]["uncorrected_volatile"] = 3
    recording["gpus"][6]["remapped_rows"] = [0, 1, 1, 0]

    report = read_gpus(FakeNvml(recording))

    assert (GpuHealth.UNHEALTHY, ["3 uncorrectable ECC error(s) since the last driver load"]) == (
        report.gpus[2].health,
        report.gpus[2].health_reasons,
    )
    assert ["a memory row remap is pending: reset the GPU or reboot"] == report.gpus[6].health_reasons
    assert {"gpu 2", "gpu 6"} == set(gpu_problems(report, GpuRequirement()))


def test_real_probe_on_a_host_without_driver_reports_cpu_only() -> None:
    """The real child-process probe on this driverless machine says unavailable, zero GPUs, no crash."""
    report = asyncio.run(NvmlProbe(timeout_s=60).probe())

    assert (GpuState.UNAVAILABLE, []) == (report.state, report.gpus)


def test_hanging_nvml_call_is_bounded_by_the_deadline() -> None:
    """A probe child stuck inside an NVML call (the fake sleeps) is killed at the deadline; the report says so."""
    probe = NvmlProbe(timeout_s=3, module="tests.programs.nvml_hang", extra_env={"PYTHONPATH": str(REPO)})

    report = asyncio.run(probe.probe())

    assert GpuState.TIMEOUT == report.state
    assert "did not answer within 3s" in report.message


def test_probe_child_that_dies_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A probe interpreter that exits non-zero gives an error report with its last line."""
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)

    report = asyncio.run(NvmlProbe(timeout_s=5, python=str(broken)).probe())

    assert (GpuState.ERROR, "NVML probe exited 139: Segmentation fault") == (report.state, report.message)


def test_report_round_trips_through_json_form() -> None:
    """What the child prints is what the parent reads, MIG children and processes included."""
    for path in (H100, A100_MIG, T4):
        report = probe(path)
        assert report == GpuReport.from_dict(json.loads(json.dumps(report.to_dict())))


@pytest.mark.parametrize(
    ("variable", "indexes"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6, 7]),
        ("", []),
        ("2,0", [0, 2]),
        ("GPU-00000005-0000-0000-0000-000000000005", [5]),
        ("GPU-00000004", [4]),
        ("1,GPU-00000007-0000-0000-0000-000000000007", [1, 7]),
        ("3,9,4", [3]),  # CUDA stops at the first entry naming no device
        ("GPU-0000000", []),  # a prefix shared by all eight names none
    ],
)
def test_cuda_visible_devices_by_index_and_uuid(variable: str | None, indexes: list[int]) -> None:
    """The agent keeps exactly the GPUs CUDA_VISIBLE_DEVICES would show a CUDA program, hidden ones listed."""
    report = visible(probe(H100), variable)

    assert sorted(indexes) == sorted(g.index for g in report.gpus)
    assert sorted(set(range(8)) - set(indexes)) == report.hidden


def test_profile_selection_narrows_further_and_names_unknown_entries() -> None:
    """gpu.select keeps GPUs by index or UUID within what CUDA_VISIBLE_DEVICES allows; a wrong entry is said."""
    report = visible(probe(H100), "0,1,2,3", ["1", "GPU-00000003-0000-0000-0000-000000000003", "6"])

    assert [1, 3] == [g.index for g in report.gpus]
    assert "profile gpu.select entry '6' names no GPU" in report.message


def test_gpu_shortfall_states_exact_numbers() -> None:
    """A 24 GB RTX host against a 2 x 40 GB H100 profile says exactly what is missing and why GPUs did not count."""
    report = probe(RTX)

    assert (
        "profile needs 2 healthy GPU(s) matching '*H100*' with >= 40000 MiB, host has 0; "
        "not counted: GPU 0 (NVIDIA GeForce RTX 3090, 24576 MiB, healthy)"
    ) == gpu_shortfall(GpuRequirement(min_count=2, min_memory_mib=40000, product="*H100*"), report)
    assert gpu_shortfall(GpuRequirement(min_count=1, min_memory_mib=20000, product="*rtx*"), report) is None


def test_an_unhealthy_gpu_does_not_count_towards_the_requirement() -> None:
    """Eight H100s with one lost fall short of a profile that needs eight."""
    report = probe(H100, errors={("nvmlDeviceGetHandleByIndex", 7): pynvml.NVML_ERROR_GPU_IS_LOST})

    shortfall = gpu_shortfall(GpuRequirement(min_count=8), report)

    assert shortfall is not None
    assert shortfall.startswith("profile needs 8 healthy GPU(s), host has 7")


class ScriptedProbe:
    """A probe answering from a live FakeNvml whose errors the test changes between probes."""

    def __init__(self, nvml: FakeNvml) -> None:
        self.nvml = nvml
        self.timeout = False

    async def probe(self) -> GpuReport:
        if self.timeout:
            return GpuReport(GpuState.TIMEOUT, "NVML probe did not answer within 20s")
        return read_gpus(self.nvml)


def test_gpu_lost_mid_run_then_back_emits_events_and_keeps_its_identity() -> None:
    """Re-probing: GPU 4 lost (by handle, so unnamed) stays listed by its UUID as lost, then recovers."""
    nvml = FakeNvml.from_file(H100)
    seen: list[list[dict[str, Any]]] = []
    watch = GpuWatch(ScriptedProbe(nvml), read_gpus(nvml), lambda _r, changes: seen.append(changes))

    nvml.errors[("nvmlDeviceGetHandleByIndex", 4)] = pynvml.NVML_ERROR_GPU_IS_LOST
    lost = asyncio.run(watch.check())
    gpu = watch.report.gpus[4]
    del nvml.errors[("nvmlDeviceGetHandleByIndex", 4)]
    back = asyncio.run(watch.check())

    assert [("gpu.lost", 4, "GPU-00000004-0000-0000-0000-000000000004", "healthy")] == [
        (c["event"], c["gpu"], c["uuid"], c["was"]) for c in lost
    ]
    assert (GpuHealth.LOST, 81559) == (gpu.health, gpu.memory_total_mib)
    assert [("gpu.healthy", 4)] == [(c["event"], c["gpu"]) for c in back]
    assert watch.report.gpus[4].healthy
    assert [] == asyncio.run(watch.check())
    assert [1, 1, 0] == [len(c) for c in seen]  # every check reports, changes or not: readings refresh


def test_a_gpu_that_vanishes_from_the_list_is_lost_not_forgotten() -> None:
    """If NVML stops listing a GPU (fallen off the bus), the agent keeps it, marked lost, instead of shrinking."""
    before = probe(H100)
    after = GpuReport(
        GpuState.AVAILABLE, "7 GPU(s)", before.driver_version, before.cuda_driver_version, before.gpus[:7]
    )

    merged, changes = reconcile(before, after)

    assert 8 == len(merged.gpus)
    assert (GpuHealth.LOST, ["no longer listed by NVML"]) == (merged.gpus[7].health, merged.gpus[7].health_reasons)
    assert ["gpu.lost"] == [c["event"] for c in changes]


def test_version_mismatch_or_timeout_at_reprobe_takes_every_gpu_out() -> None:
    """After an unattended driver upgrade (or a wedged driver) no GPU is offered, and the reason is kept."""
    nvml = FakeNvml.from_file(H100)
    scripted = ScriptedProbe(nvml)
    watch = GpuWatch(scripted, read_gpus(nvml), lambda _r, _c: None)

    scripted.timeout = True
    changes = asyncio.run(watch.check())

    assert 8 == len(changes) == sum(c["event"] == "gpu.unhealthy" for c in changes)
    assert GpuState.TIMEOUT == watch.report.state
    assert "gpu" in gpu_problems(watch.report, GpuRequirement())

    scripted.timeout = False
    mismatch = FakeNvml.from_file(H100, init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    scripted.nvml = mismatch
    asyncio.run(watch.check())
    assert "upgraded without a reboot" in watch.report.message
    assert not any(g.healthy for g in watch.report.gpus)

    scripted.nvml = nvml
    recovered = asyncio.run(watch.check())
    assert 8 == sum(c["event"] == "gpu.healthy" for c in recovered)


def test_probe_module_is_runnable_as_a_child() -> None:
    """`python -m agent.host.nvml` prints one JSON report (the form NvmlProbe reads)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "agent.host.nvml"], capture_output=True, check=True, timeout=60)

    assert GpuState.UNAVAILABLE == GpuReport.from_dict(json.loads(out.stdout)).state


def test_visible_gpus_stay_in_index_order_whatever_order_they_are_named_in() -> None:
    """CUDA_VISIBLE_DEVICES=5,2 keeps GPUs 2 and 5 in NVML order, so the record does not change on a re-probe."""
    report = visible(probe(H100), "5,GPU-00000002")

    assert [2, 5] == [g.index for g in report.gpus]


def test_a_mig_uuid_in_cuda_visible_devices_keeps_its_gpu_with_that_slice_only() -> None:
    """Naming one MIG device keeps the A100 with just that device (CUDA accepts MIG UUIDs)."""
    report = probe(A100_MIG)
    wanted = report.gpus[0].mig_devices[2].uuid

    narrowed = visible(report, wanted)

    assert [[wanted]] == [[m.uuid for m in g.mig_devices] for g in narrowed.gpus]
    assert "names no GPU" not in narrowed.message


def test_reprobe_follows_the_boot_gpus_by_uuid_when_one_drops_out() -> None:
    """With CUDA_VISIBLE_DEVICES=3,4, GPU 3 vanishing from NVML's list (indexes shift) leaves GPU 4 healthy and
    adopts no other GPU."""
    recording = json.loads(H100.read_text(encoding="utf-8"))
    nvml = FakeNvml(recording)
    scripted = ScriptedProbe(nvml)
    watch = GpuWatch(scripted, visible(read_gpus(nvml), "3,4"), lambda _r, _c: None)

    del recording["gpus"][3]
    changes = asyncio.run(watch.check())

    assert [("gpu.lost", "GPU-00000003-0000-0000-0000-000000000003")] == [(c["event"], c["uuid"]) for c in changes]
    assert {
        "GPU-00000003-0000-0000-0000-000000000003": GpuHealth.LOST,
        "GPU-00000004-0000-0000-0000-000000000004": GpuHealth.HEALTHY,
    } == {g.uuid: g.health for g in watch.report.gpus}


def test_an_unreadable_health_counter_does_not_make_a_sick_gpu_healthy() -> None:
    """GPU 1 has uncorrectable ECC errors; one probe where the ECC call fails keeps it unhealthy (and says why)."""
    recording = json.loads(H100.read_text(encoding="utf-8"))
    recording["gpus"][1]["ecc_errors"]["uncorrected_volatile"] = 3
    nvml = FakeNvml(recording)
    watch = GpuWatch(ScriptedProbe(nvml), read_gpus(nvml), lambda _r, _c: None)

    nvml.errors[("nvmlDeviceGetEccMode", 1)] = pynvml.NVML_ERROR_UNKNOWN
    changes = asyncio.run(watch.check())

    assert [] == changes
    assert GpuHealth.UNHEALTHY == watch.report.gpus[1].health
    assert "unreadable" in watch.report.gpus[1].health_reasons[-1]


def test_a_transient_error_on_a_static_field_keeps_its_last_value() -> None:
    """One NVML_ERROR_UNKNOWN on the power limit or PCI info does not blank the field (nor change caps_hash)."""
    nvml = FakeNvml.from_file(H100)
    watch = GpuWatch(ScriptedProbe(nvml), read_gpus(nvml), lambda _r, _c: None)
    before = [g.static() for g in watch.report.gpus]

    nvml.errors[("nvmlDeviceGetEnforcedPowerLimit", 0)] = pynvml.NVML_ERROR_UNKNOWN
    nvml.errors[("nvmlDeviceGetPciInfo", 2)] = pynvml.NVML_ERROR_TIMEOUT
    asyncio.run(watch.check())

    assert before == [g.static() for g in watch.report.gpus]


def test_the_watch_survives_a_probe_that_raises() -> None:
    """A re-probe that raises is logged and the next one still runs (and sees a lost GPU)."""

    class Flaky:
        def __init__(self) -> None:
            self.nvml = FakeNvml.from_file(H100)
            self.calls = 0

        async def probe(self) -> GpuReport:
            self.calls += 1
            if self.calls == 1:
                raise OSError("fork failed")
            return read_gpus(self.nvml)

    flaky = Flaky()
    seen: list[list[dict[str, Any]]] = []
    watch = GpuWatch(flaky, read_gpus(flaky.nvml), lambda _r, changes: seen.append(changes))
    flaky.nvml.errors[("nvmlDeviceGetHandleByIndex", 0)] = pynvml.NVML_ERROR_GPU_IS_LOST

    async def two_rounds() -> None:
        task = asyncio.create_task(watch.run(0.01))
        while flaky.calls < 2:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(two_rounds())

    assert ["gpu.lost"] == [c["event"] for changes in seen for c in changes]


def test_probe_child_does_not_import_from_the_working_directory(tmp_path: Path, monkeypatch: Any) -> None:
    """A pynvml.py in the directory the agent was started from is never run by the probe child, and the child
    does not inherit the agent's secrets."""
    marker = tmp_path / "ran"
    (tmp_path / "pynvml.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise ImportError\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMP_AGENT_REDIS_URL", "redis://:secret@db:6379")

    report = asyncio.run(NvmlProbe(timeout_s=60).probe())

    assert not marker.exists()
    assert GpuState.UNAVAILABLE == report.state
    assert "EMP_AGENT_REDIS_URL" not in NvmlProbe(timeout_s=1)._env


def test_a_probe_that_cannot_start_is_an_error_report() -> None:
    """A missing interpreter (the venv replaced by an upgrade) gives an error report, not an exception."""
    report = asyncio.run(NvmlProbe(timeout_s=5, python="/nonexistent/python").probe())

    assert GpuState.ERROR == report.state
    assert "cannot start the NVML probe" in report.message
