"""Stage pull_models: every model of the profile present and verified under the model root."""

from __future__ import annotations

import asyncio

from agent.bootstrap.context import BootstrapContext
from agent.errors import ModelPullError, StageFailed
from agent.modelstore import ModelStatus
from agent.redact import redact_source


class PullModels:
    """Fails the boot when any model cannot be verified: a service must never load a truncated file."""

    name = "pull_models"
    fatal = True
    always_run = False

    async def run(self, ctx: BootstrapContext) -> str:
        models = ctx.profile.models
        if not models:
            return "no models in the profile"
        try:
            todo = await asyncio.to_thread(ctx.models.plan, models)
        except ModelPullError as exc:
            raise StageFailed(self.name, str(exc)) from None
        failures = []
        for name, spec in models.items():
            if name not in todo:
                ctx.model_status[name] = ModelStatus(
                    name, spec.dest, spec.sha256, spec.size, "verified", redact_source(spec.url)
                )
                continue
            try:
                ctx.model_status[name] = await ctx.models.ensure(name, spec)
            except ModelPullError as exc:
                ctx.model_status[name] = ModelStatus(
                    name, spec.dest, spec.sha256, spec.size, "failed", redact_source(spec.url), error=str(exc)
                )
                failures.append(f"{name}: {exc}")
        if failures:
            raise StageFailed(self.name, "; ".join(failures))
        pulled = sum(1 for s in ctx.model_status.values() if s.state == "pulled")
        return f"{len(models)} model(s) in place: {pulled} pulled, {len(models) - pulled} already verified"
