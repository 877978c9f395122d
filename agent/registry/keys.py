"""Every Redis key and channel the agent writes, in one place (see docs/registry.md)."""

from __future__ import annotations

#: Version of the record layout; bumped on any incompatible change.
SCHEMA = 1
#: Sorted set: member = machine id, score = last heartbeat (Redis server time, ms).
FLEET_INDEX = "emp:fleet"


def machine_key(machine_id: str) -> str:
    """Hash with the machine record; the braces make it a Redis Cluster hash tag."""
    return f"emp:machine:{{{machine_id}}}"


def ttl_for(interval_s: float) -> int:
    """Record TTL: three missed heartbeats, at least 1 s."""
    return max(1, round(3 * interval_s))
