"""The original system's `machine:status:<machine_id>` message, built from our own state so its API and monitor
keep working while they are replaced."""

from __future__ import annotations

import time
from typing import Any

from agent.machine import Phase

#: The original phases were starting, ready and shutdown; ours map onto them (ours is sent too, as emp_phase).
PHASES = {
    Phase.BOOTSTRAPPING: "starting",
    Phase.READY: "ready",
    Phase.DEGRADED: "ready",
    Phase.FAILED: "shutdown",
    Phase.STOPPING: "shutdown",
    Phase.DRAINING: "shutdown",
}
#: Our instance states as PM2 would have named them.
PM2_STATUS = {
    "RUNNING": "online",
    "STARTING": "launching",
    "BACKOFF": "waiting restart",
    "STOPPING": "stopping",
    "STOPPED": "stopped",
    "EXITED": "stopped",
    "FATAL": "errored",
}


def compat_message(
    *,
    machine_id: str,
    phase: Phase,
    reasons: list[str],
    uptime_s: float,
    snapshot: list[dict[str, Any]],
    gpu_count: int,
    update_type: str,
    health_url: str | None,
) -> dict[str, Any]:
    """`{machine_id, timestamp, update_type, structure, status, health_url}` as the original aggregator published
    it; each supervised instance stands for one of its workers."""
    instances = [s for s in snapshot if not s["service"].startswith("emp-")]
    workers: dict[str, Any] = {}
    worker_status: dict[str, Any] = {}
    services: dict[str, Any] = {}
    service_status: dict[str, Any] = {}
    for s in instances:
        running = s["state"] == "RUNNING"
        gpu = s.get("gpu")
        workers[s["name"]] = {
            "worker_id": s["name"],
            "pm2_name": s["name"],
            "gpu_id": gpu["index"] if gpu else None,
            "worker_type": s["service"],
            "resource_binding": "gpu" if gpu else "shared",
            "services": list(s["capabilities"]),
            "connectors": list(s["capabilities"]),
        }
        worker_status[s["name"]] = {
            "is_connected": running,
            "status": "idle" if running else "offline",
            "current_job_id": None,
            "last_activity": None,
        }
        key = f"{s['name']}.{s['service']}"
        services[key] = {"worker_id": s["name"], "service_type": s["service"], "pm2_name": s["name"]}
        service_status[key] = {
            **services[key],
            "status": "active" if running else "inactive",
            "health": "healthy" if running else "unknown" if s["state"] == "STARTING" else "unhealthy",
            "pm2_status": PM2_STATUS.get(s["state"], "unknown"),
        }
    return {
        "machine_id": machine_id,
        "timestamp": int(time.time() * 1000),
        "update_type": update_type,
        "structure": {
            "workers": workers,
            "services": services,
            "capabilities": sorted({c for s in instances for c in s["capabilities"]}),
            "gpu_count": gpu_count,
        },
        "status": {
            "machine": {
                "phase": PHASES[phase],
                "uptime_ms": int(uptime_s * 1000),
                "emp_phase": phase.value,
                "reasons": reasons,
            },
            "workers": worker_status,
            "services": service_status,
        },
        "health_url": health_url,
    }
