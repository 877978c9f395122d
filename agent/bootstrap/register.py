"""Stage register: first write of the machine record, then the heartbeat keeps it alive."""

from __future__ import annotations

from agent.bootstrap.context import BootstrapContext
from agent.errors import RegistryError, StageFailed


class Register:
    """Runs even after a failed boot, so the fleet sees the failure and its reason. Not fatal: the heartbeat
    keeps retrying, and the machine is degraded until Redis takes the record."""

    name = "register"
    fatal = False
    always_run = True

    async def run(self, ctx: BootstrapContext) -> str:
        ctx.registrar.start()
        try:
            await ctx.registrar.beat()
        except RegistryError as exc:
            raise StageFailed(self.name, f"{exc}; retrying every heartbeat") from None
        return f"registered as {ctx.machine_id}"
