"""Stage pull_models: every model of the profile present and verified under the model root."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from agent.bootstrap.context import BootstrapContext
from agent.errors import ModelPullError, StageFailed

T = TypeVar("T")


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
            statuses = await _in_daemon_thread(lambda: ctx.models.pull(models))
        except asyncio.CancelledError:
            ctx.models.cancel()  # transfers stop at their next chunk; partials stay for the next run
            raise
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


async def _in_daemon_thread(work: Callable[[], T]) -> T:
    """Run blocking work in a daemon thread: unlike the default executor, a stalled read in it can never hold up
    the agent's exit (cancellation is cooperative, through `ModelPuller.cancel`)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = work()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="emp-pull", daemon=True).start()
    return await future
