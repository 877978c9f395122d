"""The process table: every service instance by name, started in dependency order and stopped in reverse."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from agent.errors import UnknownService
from agent.host.launcher import Launcher
from agent.supervisor.instances import InstanceSpec
from agent.supervisor.ledger import ProcessLedger
from agent.supervisor.service import EventSink, ManagedService
from agent.supervisor.states import ServiceState

log = structlog.get_logger(__name__)
EVENT_HISTORY = 200


class ProcessTable:
    """Name -> ManagedService, in start order."""

    def __init__(
        self,
        launcher: Launcher,
        on_event: EventSink | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        ledger: ProcessLedger | None = None,
    ) -> None:
        self._launcher = launcher
        self._ledger = ledger
        self._monotonic = monotonic
        self._services: dict[str, ManagedService] = {}
        self._listeners: list[EventSink] = [on_event] if on_event else []
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)

    def add_listener(self, sink: EventSink) -> None:
        """Also send every state change to `sink`."""
        self._listeners.append(sink)

    def _emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for sink in self._listeners:
            sink(event)

    def add(self, spec: InstanceSpec) -> ManagedService:
        """Register an instance (not started)."""
        if spec.name in self._services:
            raise ValueError(f"duplicate instance name {spec.name}")
        service = ManagedService(spec, self._launcher, self._emit, monotonic=self._monotonic, ledger=self._ledger)
        self._services[spec.name] = service
        return service

    def get(self, name: str) -> ManagedService:
        """The instance called `name`; UnknownService otherwise."""
        try:
            return self._services[name]
        except KeyError:
            raise UnknownService(name) from None

    def names(self) -> list[str]:
        """Instance names in start order."""
        return list(self._services)

    def instances_of(self, service: str) -> list[ManagedService]:
        """Every instance of one service."""
        return [s for s in self._services.values() if s.spec.service == service]

    async def start_all(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """Start instances in order, each after its dependencies are ready; returns name -> reason not started."""
        skipped: dict[str, str] = {}
        for name in names if names is not None else self.names():
            service = self._services[name]
            blocker = await self._dependencies_ready(service)
            if blocker:
                skipped[name] = blocker
                log.warning("not starting: dependency not ready", instance=name, reason=blocker)
                continue
            service.start()
        return skipped

    async def _dependencies_ready(self, service: ManagedService) -> str | None:
        for dep in service.spec.depends_on:
            for instance in self.instances_of(dep):
                if not await instance.wait_ready(instance.spec.start_timeout_s):
                    return f"dependency {instance.spec.name} is {instance.state.value}"
        return None

    async def wait_ready(self, names: Iterable[str], timeout_s: float) -> dict[str, str]:
        """Wait (in parallel) until each named instance is RUNNING; returns name -> why not, for the failures."""
        targets = [self._services[name] for name in names]
        results = await asyncio.gather(*(s.wait_ready(timeout_s) for s in targets))
        return {
            s.spec.name: f"{s.state.value}: {s.last_error or 'not ready in time'}"
            for s, ok in zip(targets, results, strict=True)
            if not ok
        }

    async def stop_all(self) -> None:
        """Stop in reverse start order; each instance only after its dependents are down."""
        for name in reversed(self.names()):
            await self._services[name].stop()

    def force_kill_all(self) -> None:
        """SIGKILL every tree at once (second signal during shutdown)."""
        for service in self._services.values():
            service.force_kill()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every instance as status shows it, in start order."""
        return [s.snapshot() for s in self._services.values()]

    def unhealthy_required(self) -> dict[str, str]:
        """Required instances that are not RUNNING, with the reason."""
        return {
            s.spec.name: f"{s.state.value}" + (f" ({s.last_error})" if s.last_error else "")
            for s in self._services.values()
            if s.spec.required and s.state is not ServiceState.RUNNING
        }
