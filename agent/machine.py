"""The machine phase: one honest answer to "is this host ready", computed from the stages, services and registry."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """The machine as the fleet sees it."""

    BOOTSTRAPPING = "bootstrapping"
    READY = "ready"  # every stage done, every required service RUNNING, registered
    DEGRADED = "degraded"  # serving, but something is missing (reasons say what)
    FAILED = "failed"  # a fatal stage failed; nothing will be served until an operator acts
    STOPPING = "stopping"
    DRAINING = "draining"  # taken out of rotation by an operator: no new work, then services stopped


def compute_phase(
    *,
    stopping: bool,
    draining: bool = False,
    fatal_error: str | None,
    pipeline_finished: bool,
    degraded: dict[str, str],
    unhealthy_services: dict[str, str],
    registry_connected: bool,
) -> tuple[Phase, list[str]]:
    """The phase and the reasons behind it (empty when ready)."""
    if stopping:
        return Phase.STOPPING, ["shutting down"]
    if draining:
        return Phase.DRAINING, ["drained by an operator (restart the agent to serve again)"]
    if fatal_error is not None:
        return Phase.FAILED, [fatal_error]
    if not pipeline_finished:
        return Phase.BOOTSTRAPPING, []
    reasons = [f"{key}: {value}" for key, value in degraded.items() if not key.startswith("stage ")]
    reasons += [f"service {name}: {why}" for name, why in unhealthy_services.items()]
    if not registry_connected:
        reasons.append("registry: not connected")
    return (Phase.DEGRADED, reasons) if reasons else (Phase.READY, [])
