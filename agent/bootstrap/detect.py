"""Stage detect: host facts through psutil and GPUs through NVML, checked against the profile's needs."""

from __future__ import annotations

import asyncio

import structlog

from agent.bootstrap.context import BootstrapContext
from agent.host.facts import read_host_facts
from agent.host.gpu import GpuReport, GpuState
from agent.profile import GpuRequirement

log = structlog.get_logger(__name__)


class Detect:
    """Never fails on GPU trouble: a host without a driver is a CPU-only host; NVML errors degrade it."""

    name = "detect"
    fatal = True
    always_run = False

    async def run(self, ctx: BootstrapContext) -> str:
        ctx.host = await asyncio.to_thread(read_host_facts, ctx.settings.model_root)
        ctx.gpus = await ctx.gpu_probe.probe()
        if ctx.gpus.state is GpuState.UNAVAILABLE:
            log.info("no NVIDIA GPU driver: CPU-only host", reason=ctx.gpus.message)
        elif ctx.gpus.state is not GpuState.AVAILABLE:
            log.error("GPU probe failed", state=ctx.gpus.state.value, reason=ctx.gpus.message)
            ctx.degraded["gpu"] = ctx.gpus.message
        shortfall = gpu_shortfall(ctx.profile.gpu, ctx.gpus)
        if shortfall:
            ctx.degraded["gpu requirement"] = shortfall
        count = len(ctx.gpus.gpus)
        host = ctx.host
        return f"{host.cpu_logical} CPUs, {host.memory_total_mib} MiB RAM, {count} GPU(s) ({ctx.gpus.state.value})"


def gpu_shortfall(need: GpuRequirement, report: GpuReport) -> str | None:
    """What the host lacks against the profile's GPU requirement, in exact numbers; None when it has enough."""
    eligible = [g for g in report.gpus if (g.memory_total_mib or 0) >= need.min_memory_mib]
    if len(eligible) >= need.min_count:
        return None
    memory = f" with >= {need.min_memory_mib} MiB" if need.min_memory_mib else ""
    return f"profile needs {need.min_count} GPU(s){memory}, host has {len(eligible)}"
