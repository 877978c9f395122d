"""Stage ready: the boot is over; say whether every required service is up or what is missing."""

from __future__ import annotations

from agent.bootstrap.context import BootstrapContext


class Ready:
    """Summarises; the machine phase itself is computed live by `agent.machine`."""

    name = "ready"
    fatal = False
    always_run = False

    async def run(self, ctx: BootstrapContext) -> str:
        problems = {**ctx.degraded, **ctx.table.unhealthy_required()}
        if problems:
            return "booted degraded: " + "; ".join(f"{k}: {v}" for k, v in problems.items())
        return "machine ready"
