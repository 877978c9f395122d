"""The GPU watch: probes again at an interval so readings stay fresh and health changes reach the machine record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from agent.host.gpu import GpuProbe, GpuReport, GpuState, follow, reconcile, visible

log = structlog.get_logger(__name__)


class GpuWatch:
    """Holds the current report of this agent's GPUs (those it took at boot, followed by UUID); `check()` probes
    once, `run()` forever. A probe that times out or fails leaves the GPUs unhealthy with its reason (a wedged
    driver must not be offered to jobs); nothing a probe does stops the watch."""

    def __init__(
        self,
        probe: GpuProbe,
        report: GpuReport,
        on_change: Callable[[GpuReport, list[dict[str, Any]]], None],
        cuda_visible_devices: str | None = None,
        select: list[str] | None = None,
    ) -> None:
        self._probe = probe
        self._mine = report
        self.report = report
        self._on_change = on_change
        self._cuda_visible = cuda_visible_devices
        self._select = select

    @property
    def needed(self) -> bool:
        """A host with no NVIDIA driver has nothing to watch."""
        return self.report.state is not GpuState.UNAVAILABLE

    async def check(self) -> list[dict[str, Any]]:
        """Probe now and report; returns the health changes (also passed to on_change with the new report)."""
        fresh = await self._probe.probe()
        if fresh.state is GpuState.AVAILABLE:
            if self._mine.state is GpuState.AVAILABLE:
                fresh = follow(fresh, self._mine)
            else:  # the boot probe failed: the agent's GPUs are chosen now, by the same rules as at boot
                fresh = visible(fresh, self._cuda_visible, self._select)
                self._mine = fresh
        merged, changes = reconcile(self.report, fresh)
        self.report = merged
        for change in changes:
            details = {k: v for k, v in change.items() if k not in ("type", "event")}
            log.warning("GPU health changed", health=change["event"].removeprefix("gpu."), **details)
        self._on_change(merged, changes)
        return changes

    async def run(self, interval_s: float) -> None:
        """Check every interval_s until cancelled; a failing check is logged and the next one still runs."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("GPU re-probe failed; trying again next interval")
