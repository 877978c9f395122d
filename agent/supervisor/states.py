"""Service instance states and the only transitions allowed between them."""

from __future__ import annotations

from enum import StrEnum


class ServiceState(StrEnum):
    """Where one service instance is in its life."""

    STOPPED = "STOPPED"  # not running, not wanted (or not yet started)
    STARTING = "STARTING"  # spawned, readiness probe not yet passed
    RUNNING = "RUNNING"  # spawned and ready
    BACKOFF = "BACKOFF"  # failed or exited unexpectedly; waiting before the next start
    STOPPING = "STOPPING"  # stop signal sent, waiting for the whole tree to exit
    EXITED = "EXITED"  # exited and the restart policy says leave it
    FATAL = "FATAL"  # crash loop: gave up for now (retried after fatal_retry_s if set)


TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    ServiceState.STOPPED: frozenset({ServiceState.STARTING}),
    ServiceState.STARTING: frozenset(
        {ServiceState.RUNNING, ServiceState.BACKOFF, ServiceState.FATAL, ServiceState.STOPPING, ServiceState.EXITED}
    ),
    ServiceState.RUNNING: frozenset(
        {ServiceState.BACKOFF, ServiceState.FATAL, ServiceState.STOPPING, ServiceState.EXITED}
    ),
    ServiceState.BACKOFF: frozenset({ServiceState.STARTING, ServiceState.STOPPED}),
    ServiceState.STOPPING: frozenset({ServiceState.STOPPED}),
    ServiceState.EXITED: frozenset({ServiceState.STARTING, ServiceState.STOPPED}),
    ServiceState.FATAL: frozenset({ServiceState.STARTING, ServiceState.STOPPED}),
}

#: States in which a process of the instance may exist.
PROCESS_STATES = frozenset({ServiceState.STARTING, ServiceState.RUNNING, ServiceState.STOPPING})


class IllegalTransition(RuntimeError):
    """A bug: the code asked for a transition the table does not allow."""


def check_transition(current: ServiceState, new: ServiceState) -> None:
    """Raise IllegalTransition unless current -> new is allowed."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"{current.value} -> {new.value} is not a legal transition")
