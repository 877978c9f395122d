"""What the stages share: inputs (settings, profile, adapters) and what earlier stages found."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent import __version__
from agent.capabilities import SlotFacts
from agent.host.facts import HostFacts
from agent.host.gpu import GpuProbe, GpuReport
from agent.profile import Profile
from agent.pull.status import ModelStatus
from agent.pull.worker import PullWorker
from agent.settings import Settings
from agent.supervisor.instances import Paths
from agent.supervisor.ledger import ProcessLedger
from agent.supervisor.table import ProcessTable


class Registrar(Protocol):
    """The part of the heartbeat the register stage needs."""

    async def beat(self) -> None: ...

    def start(self) -> None: ...


@dataclass
class BootstrapContext:
    """Inputs are set by the daemon; the result fields are filled by the stages in order."""

    settings: Settings
    profile: Profile
    machine_id: str
    paths: Paths
    table: ProcessTable
    gpu_probe: GpuProbe
    models: PullWorker
    registrar: Registrar
    agent_env: Mapping[str, str]
    ledger: ProcessLedger | None = None
    host: HostFacts | None = None
    gpus: GpuReport | None = None
    model_status: dict[str, ModelStatus] = field(default_factory=dict)
    service_names: list[str] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)

    def slot_facts(self) -> SlotFacts:
        """What each slot's capabilities file shares, as known now (after detect and pull_models)."""
        models = tuple(sorted(m.name for m in self.model_status.values() if m.in_place))
        return SlotFacts(self.machine_id, __version__, self.host, models, self.settings.matching)
