"""Turns real `nvidia-smi -q -x` captures into NVML recordings that agent.testing.FakeNvml replays.

    python -m tests.nvml_capture            # rewrite tests/fixtures/nvml/*.json from captures/*.xml

`parse` reads a capture into plain values in nvidia-smi's own units (MiB, W, °C, "Enabled"); `to_recording` turns
those into what NVML itself returns (bytes, mW, enum integers), so the probe's unit handling is exercised.
Two things a capture does not hold are filled from published facts, and marked as such in the recording:
compute capability (NVIDIA's table, developer.nvidia.com/cuda-gpus) and MIG device UUIDs (`nvidia-smi -L`
shows them, `-q -x` does not; placeholders derived from the parent UUID and the instance ids).
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "fixtures" / "nvml"
CAPTURES = HERE / "captures"
MIB = 1024 * 1024

#: NVIDIA's published compute capability per product (a capture does not state it).
COMPUTE_CAPABILITY = {
    "NVIDIA H100 80GB HBM3": (9, 0),
    "NVIDIA A100-SXM4-80GB": (8, 0),
    "NVIDIA L40S": (8, 9),
    "Tesla T4": (7, 5),
    "NVIDIA GeForce RTX 3090": (8, 6),
    "NVIDIA A10G": (8, 6),
}
#: nvidia-smi's architecture names to NVML's nvmlDeviceArchitecture_t values.
ARCHITECTURE = {"Turing": 6, "Ampere": 7, "Ada Lovelace": 8, "Hopper": 9, "Blackwell": 10}


def _text(node: ET.Element | None, path: str) -> str | None:
    found = node.find(path) if node is not None else None
    if found is None or found.text is None:
        return None
    value = found.text.strip()
    return None if value in ("", "N/A", "None", "[N/A]", "[Not Supported]") else value


def _number(node: ET.Element | None, path: str) -> float | None:
    value = _text(node, path)
    if value is None:
        return None
    match = re.match(r"^-?[0-9.]+", value)
    return float(match.group()) if match else None


def _int(node: ET.Element | None, path: str) -> int | None:
    value = _number(node, path)
    return int(value) if value is not None else None


def _flag(node: ET.Element | None, path: str) -> bool | None:
    value = _text(node, path)
    return None if value is None else value in ("Enabled", "Yes")


def _sum(node: ET.Element | None, pattern: str) -> int | None:
    """Total of the numeric children whose tag matches (NVML's totals add up every memory location)."""
    if node is None:
        return None
    values = [_int(node, child.tag) for child in node if re.fullmatch(pattern, child.tag)]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def parse(path: Path) -> dict[str, Any]:
    """The capture's values that the probe reports, in nvidia-smi's units; None where it says N/A."""
    root = ET.parse(path).getroot()
    gpus = []
    for gpu in root.findall("gpu"):
        power = gpu.find("gpu_power_readings")
        if power is None:
            power = gpu.find("power_readings")
        limit = _number(power, "enforced_power_limit") or _number(power, "current_power_limit")
        draw = _number(power, "power_draw") or _number(power, "average_power_draw")
        ecc = gpu.find("ecc_errors")
        volatile = ecc.find("volatile") if ecc is not None else None
        aggregate = ecc.find("aggregate") if ecc is not None else None
        remap = gpu.find("remapped_rows")
        has_remap = remap is not None and len(remap) > 0
        processes = [
            {
                "pid": int(_int(p, "pid") or 0),
                "type": _text(p, "type") or "",
                "used_memory_mib": _int(p, "used_memory"),
            }
            for p in gpu.findall("processes/process_info")
        ]
        mig_devices = [
            {
                "index": _int(m, "index"),
                "gpu_instance_id": _int(m, "gpu_instance_id"),
                "compute_instance_id": _int(m, "compute_instance_id"),
                "sm_count": _int(m, "device_attributes/shared/multiprocessor_count"),
                "memory_total_mib": _int(m, "fb_memory_usage/total"),
                "memory_used_mib": _int(m, "fb_memory_usage/used"),
                "memory_free_mib": _int(m, "fb_memory_usage/free"),
            }
            for m in gpu.findall("mig_devices/mig_device")
        ]
        gpus.append(
            {
                "name": _text(gpu, "product_name"),
                "architecture": _text(gpu, "product_architecture"),
                "uuid": _text(gpu, "uuid"),
                "pci_bus_id": _text(gpu, "pci/pci_bus_id"),
                "persistence_mode": _flag(gpu, "persistence_mode"),
                "mig_enabled": _flag(gpu, "mig_mode/current_mig"),
                "mig_pending": _flag(gpu, "mig_mode/pending_mig"),
                "mig_devices": mig_devices,
                "memory_total_mib": _int(gpu, "fb_memory_usage/total"),
                "memory_used_mib": _int(gpu, "fb_memory_usage/used"),
                "memory_free_mib": _int(gpu, "fb_memory_usage/free"),
                "utilization_gpu_pct": _int(gpu, "utilization/gpu_util"),
                "utilization_memory_pct": _int(gpu, "utilization/memory_util"),
                "ecc_enabled": _flag(gpu, "ecc_mode/current_ecc"),
                "ecc_pending": _flag(gpu, "ecc_mode/pending_ecc"),
                "uncorrected_volatile": _sum(volatile, r".*_uncorrectable.*"),
                "corrected_volatile": _sum(volatile, r".*_correctable"),
                "uncorrected_aggregate": _sum(aggregate, r".*_uncorrectable.*"),
                "retired_pages_pending": _flag(gpu, "retired_pages/pending_retirement"),
                "remapped_rows_corrected": _int(remap, "remapped_row_corr") if has_remap else None,
                "remapped_rows_uncorrectable": _int(remap, "remapped_row_unc") if has_remap else None,
                "remapped_rows_pending": _flag(remap, "remapped_row_pending") if has_remap else None,
                "remapped_rows_failure": _flag(remap, "remapped_row_failure") if has_remap else None,
                "temperature_c": _int(gpu, "temperature/gpu_temp"),
                "power_limit_w": limit,
                "power_draw_w": draw,
                "processes": processes,
            }
        )
    return {
        "driver_version": _text(root, "driver_version"),
        "cuda_version": _text(root, "cuda_version"),
        "attached_gpus": _int(root, "attached_gpus"),
        "gpus": gpus,
    }


def _memory(total: int | None, used: int | None, free: int | None) -> dict[str, int] | None:
    if total is None:
        return None
    return {"total": total * MIB, "used": (used or 0) * MIB, "free": (free or 0) * MIB}


def _pair(current: bool | None, pending: bool | None) -> list[int] | None:
    return None if current is None else [int(current), int(pending if pending is not None else current)]


def to_recording(capture: dict[str, Any], source: str) -> dict[str, Any]:
    """What NVML returns for the captured host; None stands for NVML_ERROR_NOT_SUPPORTED."""
    major, minor = (capture["cuda_version"] or "0.0").split(".")
    gpus = []
    for gpu in capture["gpus"]:
        capability = COMPUTE_CAPABILITY.get(gpu["name"])
        if capability is None:
            raise SystemExit(f"{source}: add the compute capability of {gpu['name']!r} to COMPUTE_CAPABILITY")
        ecc_on = gpu["ecc_enabled"]
        remap = (
            [
                gpu["remapped_rows_corrected"],
                gpu["remapped_rows_uncorrectable"],
                int(gpu["remapped_rows_pending"]),
                int(gpu["remapped_rows_failure"]),
            ]
            if gpu["remapped_rows_pending"] is not None
            else None
        )
        gpus.append(
            {
                "uuid": gpu["uuid"],
                "name": gpu["name"],
                "architecture": ARCHITECTURE.get(gpu["architecture"] or ""),
                "pci_bus_id": gpu["pci_bus_id"],
                "memory": _memory(gpu["memory_total_mib"], gpu["memory_used_mib"], gpu["memory_free_mib"]),
                "compute_capability": list(capability),
                "power_limit_mw": round(gpu["power_limit_w"] * 1000) if gpu["power_limit_w"] is not None else None,
                "power_usage_mw": round(gpu["power_draw_w"] * 1000) if gpu["power_draw_w"] is not None else None,
                "temperature_c": gpu["temperature_c"],
                "utilization": (
                    {"gpu": gpu["utilization_gpu_pct"], "memory": gpu["utilization_memory_pct"]}
                    if gpu["utilization_gpu_pct"] is not None
                    else None
                ),
                "persistence_mode": int(gpu["persistence_mode"]) if gpu["persistence_mode"] is not None else None,
                "mig_mode": _pair(gpu["mig_enabled"], gpu["mig_pending"]),
                "mig_devices": [
                    {
                        "uuid": f"MIG-{gpu['uuid'].removeprefix('GPU-')[:-2]}{m['gpu_instance_id']:02x}",
                        "gpu_instance_id": m["gpu_instance_id"],
                        "compute_instance_id": m["compute_instance_id"],
                        "sm_count": m["sm_count"],
                        "memory": _memory(m["memory_total_mib"], m["memory_used_mib"], m["memory_free_mib"]),
                    }
                    for m in gpu["mig_devices"]
                ],
                "ecc_mode": _pair(ecc_on, gpu["ecc_pending"]),
                "ecc_errors": (
                    {
                        "uncorrected_volatile": gpu["uncorrected_volatile"],
                        "corrected_volatile": gpu["corrected_volatile"],
                        "uncorrected_aggregate": gpu["uncorrected_aggregate"],
                    }
                    if ecc_on
                    else None
                ),
                "retired_pages_pending": (
                    int(gpu["retired_pages_pending"]) if gpu["retired_pages_pending"] is not None else None
                ),
                "remapped_rows": remap,
                "processes": [
                    {"pid": p["pid"], "used_memory": p["used_memory_mib"] * MIB if p["used_memory_mib"] else None}
                    for p in gpu["processes"]
                    if "C" in p["type"]  # NVML's compute list; graphics-only clients (Xorg) are another call
                ],
            }
        )
    return {
        "_source": f"Converted by tests/nvml_capture.py from captures/{source}; see the comment at its top.",
        "_filled": "compute_capability from NVIDIA's published table; MIG UUIDs are placeholders",
        "driver_version": capture["driver_version"],
        "cuda_driver_version": int(major) * 1000 + int(minor) * 10,
        "gpus": gpus,
    }


def convert(xml: Path) -> dict[str, Any]:
    """The recording for one capture file."""
    return to_recording(parse(xml), xml.name)


def main() -> int:
    """Rewrite every recording from its capture."""
    for xml in sorted(CAPTURES.glob("*.xml")):
        out = HERE / f"{xml.stem}.json"
        out.write_text(json.dumps(convert(xml), indent=1) + "\n", encoding="utf-8")
        print(f"{xml.name} -> {out.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
