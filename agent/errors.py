"""The agent's exception hierarchy; dependency errors are translated into these at the boundary.

    AgentError
     ├── ConfigError          settings or profile are invalid (carries one Problem per fault)
     ├── GpuError             NVML failed in a way that is not "no driver"
     ├── ModelPullError       a model could not be fetched or verified
     ├── SpawnError           a service's process could not be started
     ├── StageFailed          a bootstrap stage failed (wraps the cause, names the stage)
     ├── RegistryError        Redis could not be reached or refused a command
     ├── UnknownService       an operator named a service that does not exist
     └── AgentNotRunning      the control socket does not answer

Only `agent.cli` turns these into exit codes.
"""

from __future__ import annotations


class Problem:
    """One fault in an input file: where it is and what is wrong. (A plain class, not a dataclass: this module
    is on the `status` path, and importing dataclasses costs more than the rest of that path.)"""

    __slots__ = ("field", "message", "source")

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Problem):
            return NotImplemented
        return (self.source, self.field, self.message) == (other.source, other.field, other.message)

    def __hash__(self) -> int:
        return hash((self.source, self.field, self.message))

    def __repr__(self) -> str:
        return f"Problem({self.source!r}, {self.field!r}, {self.message!r})"

    def __str__(self) -> str:
        where = f"{self.source}: {self.field}" if self.field else self.source
        return f"{where}: {self.message}"


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """Settings or a profile are invalid; `problems` lists each fault on its own line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class GpuError(AgentError):
    """NVML answered with an error that needs an operator (driver mismatch, lost GPU, hang)."""


class ModelPullError(AgentError):
    """A model could not be downloaded, copied or verified."""


class SpawnError(AgentError):
    """The operating system refused to start a service's process."""


class StageFailed(AgentError):
    """A bootstrap stage failed; `stage` names it."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"stage {stage} failed: {reason}")


class RegistryError(AgentError):
    """Redis could not be reached or refused a command."""


class UnknownService(AgentError):
    """An operator named a service that is not in the process table."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"{name}: ERROR (no such service)")


class AgentNotRunning(AgentError):
    """Nothing answers on the control socket."""
