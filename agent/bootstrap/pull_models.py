"""Stage pull_models: every model of the profile present and verified under the model root."""

from __future__ import annotations

from collections import Counter

from agent.bootstrap.context import BootstrapContext
from agent.errors import ModelPullError, StageFailed


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
            statuses = await ctx.models.pull(models)  # cancelled: the worker is stopped, partials stay
        except ModelPullError as exc:
            raise StageFailed(self.name, str(exc)) from None
        ctx.model_status.update(statuses)
        failures = [f"{s.name}: {s.error}" for s in statuses.values() if s.state == "failed"]
        if failures:
            raise StageFailed(self.name, "; ".join(failures))
        counts = Counter(s.state for s in statuses.values())
        return (
            f"{len(models)} model(s) in place: {counts['pulled']} pulled, {counts['cached']} from the cache, "
            f"{counts['verified']} already verified"
        )
