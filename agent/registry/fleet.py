"""Reading the fleet back from Redis: which machines are live, suspect or dead, and which can take a job that
needs a service, GPU memory and models (the broker's query, and `emp-agent fleet`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.exceptions import RedisError

from agent.redact import redact_url
from agent.registry import keys
from agent.registry.connection import open_client, translate
from agent.registryurl import TlsFiles

FIELDS = ("machine_id", "phase", "reasons", "last_heartbeat_ms", "interval_ms", "epoch", "services_ready")
#: Phases in which a machine takes work (a degraded machine still serves the slots it advertises).
SERVING = ("ready", "degraded")


class Liveness(StrEnum):
    """What the broker may assume, judged by Redis's own clock."""

    LIVE = "live"  # beat within two intervals
    SUSPECT = "suspect"  # the record is there but beats are late: send no new work
    DEAD = "dead"  # the record expired (three intervals without a beat): requeue its work


@dataclass(frozen=True)
class Requirement:
    """What a job needs; empty fields need nothing."""

    service: str | None = None
    min_gpu_memory_mib: int = 0
    models: tuple[str, ...] = ()

    def unmet(self, record: dict[str, Any], caps: dict[str, Any]) -> str | None:
        """Why the machine cannot take the job (None: it can)."""
        if self.service and self.service not in record.get("services_ready", []):
            return f"service {self.service} not ready"
        if self.min_gpu_memory_mib:
            best = max((m for m in slot_memory(caps, self.service)), default=0)
            if best < self.min_gpu_memory_mib:
                return f"no offered GPU slot with {self.min_gpu_memory_mib} MiB (largest {best})"
        present = {m["name"] for m in caps.get("models", [])} | {m["sha256"] for m in caps.get("models", [])}
        missing = [m for m in self.models if m not in present]
        return f"models missing: {', '.join(missing)}" if missing else None


def slot_memory(caps: dict[str, Any], service: str | None) -> list[int]:
    """Memory of the GPU (or MIG device) behind each offered slot, for one job-facing service or all."""
    memory: dict[str, int] = {}
    for gpu in caps.get("gpus", []):
        if gpu.get("uuid") and gpu.get("memory_total_mib") is not None:
            memory[gpu["uuid"]] = gpu["memory_total_mib"]
        for mig in gpu.get("mig_devices", []):
            if mig.get("memory_total_mib") is not None:
                memory[mig["uuid"]] = mig["memory_total_mib"]
    return [
        memory[slot["gpu"]["uuid"]]
        for slot in caps.get("services", [])
        if slot.get("gpu")
        and slot["gpu"].get("uuid") in memory
        and (service is None or service in slot["capabilities"])
    ]


@dataclass
class Machine:
    """One machine as the fleet index and its record show it."""

    machine_id: str
    liveness: Liveness
    age_s: float
    phase: str | None = None
    reasons: list[str] = field(default_factory=list)
    epoch: int | None = None
    services_ready: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    unmet: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return {**self.__dict__, "liveness": self.liveness.value}


async def read_fleet(url: str, tls: TlsFiles | None = None, need: Requirement | None = None) -> list[Machine]:
    """Every machine in the fleet index with its liveness (Redis TIME), phase and whether it meets `need`."""
    client = open_client(url, tls)
    try:
        seconds, micros = await client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        index = await client.zrange(keys.FLEET_INDEX, 0, -1, withscores=True)
        async with client.pipeline(transaction=False) as pipe:
            for member, _score in index:
                pipe.hmget(keys.machine_key(member), [*FIELDS, "capabilities"])
            rows = await pipe.execute(raise_on_error=False) if index else []
    except (RedisError, OSError) as exc:
        raise translate(redact_url(url), exc) from None
    finally:
        await client.aclose()
    machines = []
    for (member, score), values in zip(index, rows, strict=True):
        try:
            if isinstance(values, Exception):
                raise values
            record = dict(zip([*FIELDS, "capabilities"], values, strict=True))
            machines.append(_machine(member, score, record, now_ms, need or Requirement()))
        except (RedisError, ValueError, TypeError, KeyError, AttributeError) as exc:  # one bad record, not all
            age = round((now_ms - score) / 1000, 1)
            reason = f"unreadable record: {type(exc).__name__}: {str(exc)[:120]}"
            machines.append(Machine(str(member), Liveness.SUSPECT, age, unmet=reason))
    return sorted(machines, key=lambda m: (m.liveness != Liveness.LIVE, m.machine_id))


def _machine(member: str, score: float, raw: dict[str, Any], now_ms: int, need: Requirement) -> Machine:
    if all(value is None for value in raw.values()):
        return Machine(member, Liveness.DEAD, round((now_ms - score) / 1000, 1), unmet="no record")
    last = int(raw["last_heartbeat_ms"] or score)
    interval = int(raw["interval_ms"] or 10_000)
    age_ms = now_ms - last
    caps = json.loads(raw["capabilities"] or "{}")
    if not isinstance(caps, dict):
        raise TypeError("capabilities is not an object")
    record = {"services_ready": json.loads(raw["services_ready"] or "[]")}
    unmet = need.unmet(record, caps)
    if unmet is None and raw["phase"] not in SERVING:  # includes a record without a phase
        unmet = f"phase {raw['phase']}"
    liveness = Liveness.LIVE if age_ms <= 2 * interval else Liveness.SUSPECT
    if unmet is None and liveness is not Liveness.LIVE:
        unmet = "heartbeat late"
    return Machine(
        machine_id=member,
        liveness=liveness,
        age_s=round(age_ms / 1000, 1),
        phase=raw["phase"],
        reasons=json.loads(raw["reasons"] or "[]"),
        epoch=int(raw["epoch"]) if raw["epoch"] else None,
        services_ready=record["services_ready"],
        gpus=[g.get("name") or "?" for g in caps.get("gpus", [])],
        unmet=unmet,
    )
