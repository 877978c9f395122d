"""Stage start_services: expand the profile into instances, put them in the process table, start them in order."""

from __future__ import annotations

import asyncio

from agent.bootstrap.context import BootstrapContext
from agent.errors import StageFailed
from agent.supervisor.instances import expand, spec_hash


class StartServices:
    """Spawn failures are not raised here: they become BACKOFF/FATAL states of the instance."""

    name = "start_services"
    fatal = True
    always_run = False

    async def run(self, ctx: BootstrapContext) -> str:
        gpus = ctx.gpus.gpus if ctx.gpus else []
        ledger = ctx.ledger
        survivors = {n: s for n in (ledger.names() if ledger else []) if ledger and (s := ledger.survivor(n))}
        keep_ports = {name: s.port for name, s in survivors.items() if s.port is not None}
        try:
            instances = expand(
                ctx.profile,
                gpus,
                ctx.paths,
                ctx.machine_id,
                ctx.agent_env,
                keep_ports=keep_ports,
                facts=ctx.slot_facts(),
            )
        except OSError as exc:
            raise StageFailed(self.name, f"cannot allocate ports: {exc.strerror or exc}") from None
        adopt = {
            spec.name: survivors[spec.name]
            for spec in instances
            if spec.name in survivors and survivors[spec.name].spec_hash == spec_hash(spec)
        }
        if ledger is not None:  # survivors we cannot adopt (changed spec, gone from the profile) stop first
            await asyncio.to_thread(ledger.sweep, keep=set(adopt) | set(ctx.table.names()))
        for spec in instances:
            ctx.table.add(spec, adopt=adopt.get(spec.name))
        ctx.service_names = [spec.name for spec in instances]
        waiting = await ctx.table.start_all(ctx.service_names)
        detail = f"{len(instances) - len(waiting)} of {len(instances)} instance(s) started"
        detail += f" ({len(adopt)} adopted from the previous agent)" if adopt else ""
        return detail + (f", {len(waiting)} waiting for a dependency" if waiting else "")


class WaitReady:
    """Not fatal: a service that is not ready yet keeps being supervised; the machine is degraded meanwhile."""

    name = "wait_ready"
    fatal = False
    always_run = False

    async def run(self, ctx: BootstrapContext) -> str:
        names = [n for n in ctx.service_names if ctx.table.get(n).spec.required]
        if not names:
            return "no required services"
        timeout = max(ctx.table.get(n).spec.start_timeout_s for n in names)
        not_ready = await ctx.table.wait_ready(names, timeout)
        if not_ready:
            raise StageFailed(self.name, "; ".join(f"{n}: {why}" for n, why in not_ready.items()))
        return f"{len(names)} required instance(s) ready"
