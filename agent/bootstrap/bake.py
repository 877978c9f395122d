"""Running the first bootstrap stages alone, for image bakes: detect, pull the models, prepare; never register,
never leave a service running, never persist a machine identity."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import structlog

from agent.bootstrap.context import BootstrapContext
from agent.bootstrap.pipeline import Pipeline, StageRecord
from agent.bootstrap.stages import default_stages
from agent.errors import AgentError
from agent.host.launcher import ProcessLauncher
from agent.host.lock import DirectoryLock
from agent.host.nvml import NvmlProbe
from agent.profile import Profile
from agent.pull.worker import PullWorker
from agent.settings import Settings
from agent.supervisor.instances import Paths
from agent.supervisor.table import ProcessTable

log = structlog.get_logger(__name__)
#: The stages an image bake may stop after (the later ones start services and register).
BAKE_STAGES = ("detect", "pull_models", "prepare")
#: The machine id placeholders see during a bake; the real one is derived at first boot on each host.
BAKE_MACHINE_ID = "image-bake"


class _NoRegistry:
    """A bake registers nothing."""

    async def beat(self) -> None:
        return None

    def start(self) -> None:
        return None


async def bake(settings: Settings, profile: Profile, until: str, environ: Mapping[str, str]) -> list[StageRecord]:
    """Run the stages up to and including `until`; the records say what each did. Holds the state dir's lock, so
    it refuses to run beside an agent on the same state."""
    if until not in BAKE_STAGES:
        raise AgentError(f"--until must be one of {', '.join(BAKE_STAGES)}")
    settings.make_dirs("state_dir", "log_dir", "model_root")
    lock = DirectoryLock(settings.state_dir)
    lock.acquire()
    try:
        stages = default_stages()
        stages = stages[: [s.name for s in stages].index(until) + 1]
        ctx = BootstrapContext(
            settings=settings,
            profile=profile,
            machine_id=settings.machine_id or BAKE_MACHINE_ID,
            paths=Paths(settings.model_root, settings.state_dir, settings.log_dir),
            table=ProcessTable(ProcessLauncher()),
            gpu_probe=NvmlProbe(settings.gpu_probe_timeout_s),
            models=PullWorker(settings, environ),
            registrar=_NoRegistry(),
            agent_env=environ,
        )
        pipeline = Pipeline(stages, settings.state_dir / "bootstrap.json", lambda _event: None)
        await pipeline.run(ctx)  # cancelling it stops the pull worker; partials stay for the next run
        return pipeline.records
    finally:
        lock.release()


def run_bake(settings: Settings, profile: Profile, until: str) -> list[StageRecord]:
    """`emp-agent bootstrap --until STAGE`."""
    return asyncio.run(bake(settings, profile, until, os.environ))
