"""Stage detect: host facts through psutil and GPUs through NVML, narrowed to the GPUs this agent may use and
checked against the profile's needs."""

from __future__ import annotations

import asyncio

import structlog

from agent.bootstrap.context import BootstrapContext
from agent.host.facts import read_host_facts
from agent.host.gpu import GpuReport, GpuState, product_matches, visible
from agent.profile import GpuRequirement

log = structlog.get_logger(__name__)


class Detect:
    """Never fails on GPU trouble: a host without a driver is a CPU-only host; NVML errors degrade it."""

    name = "detect"
    fatal = True
    always_run = False

    async def run(self, ctx: BootstrapContext) -> str:
        ctx.host = await asyncio.to_thread(read_host_facts, ctx.settings.model_root)
        report = await ctx.gpu_probe.probe()
        ctx.gpus = visible(report, ctx.agent_env.get("CUDA_VISIBLE_DEVICES"), ctx.profile.gpu.select)
        if ctx.gpus.state is GpuState.UNAVAILABLE:
            log.info("no NVIDIA GPU driver: CPU-only host", reason=ctx.gpus.message)
        elif ctx.gpus.state is not GpuState.AVAILABLE:
            log.error("GPU probe failed", state=ctx.gpus.state.value, reason=ctx.gpus.message)
        problems = gpu_problems(ctx.gpus, ctx.profile.gpu)
        for key, reason in problems.items():
            log.warning("GPU problem: the machine will be degraded", problem=key, reason=reason)
        ctx.degraded.update(problems)
        count = len(ctx.gpus.gpus)
        host = ctx.host
        hidden = f", {len(ctx.gpus.hidden)} hidden" if ctx.gpus.hidden else ""
        return (
            f"{host.cpu_logical} CPUs, {host.memory_total_mib} MiB RAM, {count} GPU(s){hidden} ({ctx.gpus.state.value})"
        )


def gpu_problems(report: GpuReport, need: GpuRequirement) -> dict[str, str]:
    """The machine's degraded reasons that come from its GPUs: a failed probe, each unhealthy or lost GPU, and
    the shortfall against the profile (keys "gpu", "gpu <index>", "gpu requirement")."""
    problems: dict[str, str] = {}
    if report.state in (GpuState.ERROR, GpuState.TIMEOUT):
        problems["gpu"] = report.message
    for gpu in report.gpus:
        if not gpu.healthy:
            problems[f"gpu {gpu.index}"] = f"{gpu.health.value}: {'; '.join(gpu.health_reasons)}"
    shortfall = gpu_shortfall(need, report)
    if shortfall:
        problems["gpu requirement"] = shortfall
    return problems


def gpu_shortfall(need: GpuRequirement, report: GpuReport) -> str | None:
    """What the host lacks against the profile's GPU requirement, in exact numbers; None when it has enough."""
    if need.min_count == 0:
        return None
    eligible = [
        g
        for g in report.gpus
        if g.healthy
        and (g.memory_total_mib or 0) >= need.min_memory_mib
        and (need.product is None or product_matches(g.name, need.product))
    ]
    if len(eligible) >= need.min_count:
        return None
    wanted = f"{need.min_count} healthy GPU(s)"
    wanted += f" matching {need.product!r}" if need.product else ""
    wanted += f" with >= {need.min_memory_mib} MiB" if need.min_memory_mib else ""
    counted = {g.index for g in eligible}
    others = [
        f"GPU {g.index} ({g.name or 'unnamed'}, {g.memory_total_mib if g.memory_total_mib is not None else '?'} MiB, "
        f"{g.health.value})"
        for g in report.gpus
        if g.index not in counted
    ]
    return f"profile needs {wanted}, host has {len(eligible)}" + (
        f"; not counted: {', '.join(others)}" if others else ""
    )
