"""What a pull did to each model: the answer the pull gives the bootstrap and `emp-agent status`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ModelStatus:
    """What happened to one model in this pull."""

    name: str
    dest: str
    sha256: str
    size: int | None
    state: str  # "verified" (already in place), "cached" (placed from the cache), "pulled", "failed"
    source: str
    duration_s: float = 0.0
    bytes_fetched: int = 0
    error: str | None = None

    @property
    def in_place(self) -> bool:
        """True when the destination holds the verified file."""
        return self.state in ("verified", "cached", "pulled")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelStatus:
        """The inverse of `to_dict` (the pull worker's answer)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
