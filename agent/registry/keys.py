"""Every Redis key and channel the agent writes, in one place (see docs/registry.md)."""

from __future__ import annotations

#: Version of the record layout; bumped on any incompatible change.
SCHEMA = 1
#: Sorted set: member = machine id, score = when it was last seen (Redis server time, ms). A hint for listing.
FLEET_INDEX = "emp:fleet"
#: Pub/sub channel carrying every machine's events as they are appended to its stream.
EVENTS_CHANNEL = "emp:events"


def machine_key(machine_id: str) -> str:
    """Hash with the machine record; the braces make it a Redis Cluster hash tag shared by the machine's keys."""
    return f"emp:machine:{{{machine_id}}}"


def epoch_key(machine_id: str) -> str:
    """Counter of registrations: the fencing token (never expires, so epochs only grow)."""
    return f"emp:machine:{{{machine_id}}}:epoch"


def events_key(machine_id: str) -> str:
    """Capped stream of the machine's events."""
    return f"emp:machine:{{{machine_id}}}:events"


def compat_channel(machine_id: str) -> str:
    """The original system's machine status channel, still published for its API and monitor."""
    return f"machine:status:{machine_id}"


def ttl_for(interval_s: float) -> int:
    """Record TTL: three missed heartbeats, at least 1 s."""
    return max(1, round(3 * interval_s))
