"""emp-agent: the host agent for GPU fleets (bootstrap, supervise, register)."""

__version__ = "0.1.0"
