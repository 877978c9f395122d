"""The process table: every service instance by name, started in dependency order and stopped in reverse."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from agent.errors import AgentError, UnknownService
from agent.host.launcher import Launcher
from agent.supervisor.instances import InstanceSpec
from agent.supervisor.ledger import ProcessLedger, Survivor
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
        respec: Callable[[str], InstanceSpec | None] | None = None,
    ) -> None:
        self._launcher = launcher
        self._respec = respec
        self._ledger = ledger
        self._monotonic = monotonic
        self._services: dict[str, ManagedService] = {}
        self._deferred: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[EventSink] = [on_event] if on_event else []
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)

    def add_listener(self, sink: EventSink) -> None:
        """Also send every state change to `sink`."""
        self._listeners.append(sink)

    def _emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for sink in self._listeners:
            sink(event)

    def add(self, spec: InstanceSpec, adopt: Survivor | None = None) -> ManagedService:
        """Register an instance (not started); `adopt` makes its first run take over a survivor instead of
        spawning."""
        if spec.name in self._services:
            raise ValueError(f"duplicate instance name {spec.name}")
        service = ManagedService(
            spec, self._launcher, self._emit, monotonic=self._monotonic, ledger=self._ledger, adopt=adopt
        )
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

    def resolve(self, name: str) -> list[ManagedService]:
        """Instances named by an operator: an instance, every instance of a service, or `all` (the agent's own
        `emp-*` instances are only reached by their exact name)."""
        if name == "all":
            return [s for s in self._services.values() if not s.spec.service.startswith("emp-")]
        if name in self._services:
            return [self._services[name]]
        instances = self.instances_of(name)
        if not instances:
            raise UnknownService(name)
        return instances

    async def control(self, action: str, name: str, sig: int | None = None) -> list[dict[str, Any]]:
        """Start, stop, restart or signal what `name` resolves to; one result per instance, never raising for
        a single instance's trouble (UnknownService for a name that matches nothing)."""
        targets = self.resolve(name)
        results = await asyncio.gather(*(self._control_one(action, s, sig) for s in targets))
        return list(results)

    async def _control_one(self, action: str, service: ManagedService, sig: int | None) -> dict[str, Any]:
        name = service.spec.name
        if action != "signal":  # an operator's start/stop/restart replaces a start waiting on a dependency
            deferred = self._deferred.pop(name, None)
            if deferred is not None:
                deferred.cancel()
        error = None
        new_spec = None
        if action == "restart" and self._respec is not None:
            try:
                new_spec = self._respec(name)  # validate the changed profile before stopping anything
            except AgentError as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return {
                    "name": name,
                    "ok": False,
                    "error": f"profile not reloaded: {first}",
                    "state": service.state.value,
                }
        if action in ("stop", "restart"):
            await service.stop()
        if new_spec is not None:
            service.spec = new_spec
        if action in ("start", "restart"):
            if service.state in (ServiceState.STARTING, ServiceState.RUNNING, ServiceState.BACKOFF):
                error = f"already {service.state.value}"
            else:
                service.last_error = None
                service.start()
        if action == "signal" and sig is not None and not service.send_signal(sig):
            error = f"not running ({service.state.value})"
        if action == "reopen-logs" and not service.reopen_log():
            error = f"no log writer running ({service.state.value})"
        return {"name": name, "ok": error is None, "error": error, "state": service.state.value}

    def instances_of(self, service: str) -> list[ManagedService]:
        """Every instance of one service."""
        return [s for s in self._services.values() if s.spec.service == service]

    async def start_all(self, names: Iterable[str] | None = None) -> list[str]:
        """Start instances in order, each once its dependencies are ready. An instance whose dependency is not
        ready within the dependency's start timeout is started later, as soon as it is; returns their names."""
        waiting = []
        for name in names if names is not None else self.names():
            service = self._services[name]
            blocker = await self._dependencies_ready(service)
            if blocker is None:
                service.start()
                continue
            service.last_error = f"waiting for {blocker}"
            log.warning("start deferred until its dependency is ready", instance=name, reason=blocker)
            self._deferred[name] = asyncio.create_task(self._start_when_ready(service), name=f"deferred:{name}")
            waiting.append(name)
        return waiting

    def dependencies_of(self, service: ManagedService) -> list[ManagedService]:
        """The instances `service` waits for: per dependency, the instance on the same slot (a worker waits for
        the ComfyUI on its own GPU, not for every GPU's), or every instance when none shares its slot."""
        found = []
        for dep in service.spec.depends_on:
            instances = self.instances_of(dep)
            same_slot = [i for i in instances if i.spec.slot == service.spec.slot]
            found += same_slot if len(instances) > 1 and same_slot else instances
        return found

    async def _dependencies_ready(self, service: ManagedService) -> str | None:
        for instance in self.dependencies_of(service):
            if not await instance.wait_ready(instance.spec.start_timeout_s):
                return f"dependency {instance.spec.name} ({instance.state.value})"
        return None

    async def _start_when_ready(self, service: ManagedService) -> None:
        for instance in self.dependencies_of(service):
            await instance.wait_running()
        self._deferred.pop(service.spec.name, None)
        service.last_error = None
        service.start()

    async def wait_ready(self, names: Iterable[str], timeout_s: float) -> dict[str, str]:
        """Wait (in parallel) until each named instance is RUNNING; returns name -> why not, for the failures."""
        targets = [self._services[name] for name in names]
        results = await asyncio.gather(*(s.wait_ready(timeout_s) for s in targets))
        return {
            s.spec.name: f"{s.state.value}: {s.last_error or 'not ready in time'}"
            for s, ok in zip(targets, results, strict=True)
            if not ok
        }

    async def stop_all(self, keep_own: bool = False) -> None:
        """Stop service by service in reverse start order (dependents first); the instances of one service stop
        in parallel, so shutdown takes one stop timeout per service, not one per instance. `keep_own` leaves the
        agent's own `emp-*` instances running (a drain)."""
        for task in self._deferred.values():
            task.cancel()
        self._deferred.clear()
        groups: list[list[ManagedService]] = []
        for name in reversed(self.names()):
            service = self._services[name]
            if keep_own and service.spec.service.startswith("emp-"):
                continue
            if groups and groups[-1][0].spec.service == service.spec.service:
                groups[-1].append(service)
            else:
                groups.append([service])
        for group in groups:
            await asyncio.gather(*(service.stop() for service in group))

    async def check_gpu_memory(self, used_by_pid: Mapping[int, int]) -> None:
        """Every instance with a GPU memory limit checks it against the processes' GPU memory (MiB by pid)."""
        await asyncio.gather(*(s.check_gpu_memory(used_by_pid) for s in list(self._services.values())))

    def force_kill_all(self) -> None:
        """SIGKILL every tree at once (second signal during shutdown)."""
        for service in self._services.values():
            service.force_kill()

    def usage(self) -> dict[str, tuple[int, float]]:
        """(RSS bytes, CPU seconds) of each instance that has a live process tree (walks /proc: call it off the
        event loop)."""
        found = {}
        for name, service in list(self._services.items()):
            child = service.child
            if child is not None:
                found[name] = child.usage(sampling=True)
        return found

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
