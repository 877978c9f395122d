"""The GPU watch: probes again at an interval so readings stay fresh and health changes reach the machine record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from agent.host.gpu import GpuProbe, GpuReport, GpuState, reconcile, visible

log = structlog.get_logger(__name__)


class GpuWatch:
    """Holds the current report; `check()` probes once, `run()` forever. A probe that times out or fails leaves
    the GPUs unhealthy with its reason (a wedged driver must not be offered to jobs) and never raises."""

    def __init__(
        self,
        probe: GpuProbe,
        report: GpuReport,
        cuda_visible_devices: str | None,
        select: list[str],
        on_change: Callable[[GpuReport, list[dict[str, Any]]], None],
    ) -> None:
        self._probe = probe
        self.report = report
        self._cuda_visible = cuda_visible_devices
        self._select = select
        self._on_change = on_change

    @property
    def needed(self) -> bool:
        """A host with no NVIDIA driver has nothing to watch."""
        return self.report.state is not GpuState.UNAVAILABLE

    async def check(self) -> list[dict[str, Any]]:
        """Probe now and report; returns the health changes (also passed to on_change with the new report)."""
        fresh = visible(await self._probe.probe(), self._cuda_visible, self._select)
        merged, changes = reconcile(self.report, fresh)
        self.report = merged
        for change in changes:
            log.warning(
                "GPU health changed",
                **{k: v for k, v in change.items() if k not in ("type", "event")},
                health=change["event"].removeprefix("gpu."),
            )
        self._on_change(merged, changes)
        return changes

    async def run(self, interval_s: float) -> None:
        """Check every interval_s until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check()
