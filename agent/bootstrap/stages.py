"""The one list of bootstrap stages, in order."""

from __future__ import annotations

from agent.bootstrap.detect import Detect
from agent.bootstrap.pipeline import Stage
from agent.bootstrap.prepare import Prepare
from agent.bootstrap.pull_models import PullModels
from agent.bootstrap.ready import Ready
from agent.bootstrap.register import Register
from agent.bootstrap.start_services import StartServices, WaitReady


def default_stages() -> list[Stage]:
    """detect -> pull_models -> prepare -> start_services -> wait_ready -> register -> ready."""
    return [Detect(), PullModels(), Prepare(), StartServices(), WaitReady(), Register(), Ready()]
