"""Prometheus exposition (prometheus-client) of the status document and the services' resource usage."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.machine import Phase
from agent.supervisor.states import ServiceState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGE_STATES = ("pending", "running", "done", "failed", "skipped")
#: instance -> (RSS bytes, CPU seconds) of its whole process tree
Usage = Mapping[str, tuple[int, float]]


def render(status: dict[str, Any], usage: Usage, now: datetime) -> bytes:
    """The exposition text for one scrape: a fresh registry each time, so nothing global is kept."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status, usage, now))
    return generate_latest(registry)


class _StatusCollector(Collector):
    """Turns one status document into metric families."""

    def __init__(self, status: dict[str, Any], usage: Usage, now: datetime) -> None:
        self._status = status
        self._usage = usage
        self._now = now

    def collect(self) -> Iterator[Metric]:
        status = self._status
        info = InfoMetricFamily("emp_agent", "The agent build and identity.")
        info.add_metric(
            [], {"version": status["agent_version"], "machine_id": status["machine_id"], "profile": status["profile"]}
        )
        yield info
        phase = GaugeMetricFamily("emp_machine_phase", "1 for the machine's current phase.", labels=["phase"])
        for value in Phase:
            phase.add_metric([value.value], 1.0 if status["phase"] == value.value else 0.0)
        yield phase
        yield GaugeMetricFamily(
            "emp_agent_uptime_seconds", "Seconds since the agent started.", value=status["uptime_s"]
        )
        yield from self._services()
        yield from self._stages()
        yield from self._gpus()
        yield from self._registry()

    def _services(self) -> Iterator[Metric]:
        labels = ["instance", "service"]
        state = GaugeMetricFamily("emp_service_state", "1 for the instance's current state.", labels=[*labels, "state"])
        restarts = CounterMetricFamily("emp_service_restarts", "Starts after the first.", labels=labels)
        uptime = GaugeMetricFamily("emp_service_uptime_seconds", "Seconds since the process started.", labels=labels)
        up = GaugeMetricFamily("emp_service_up", "1 when RUNNING (ready).", labels=labels)
        rss = GaugeMetricFamily("emp_service_memory_rss_bytes", "RSS of the instance's process tree.", labels=labels)
        cpu = CounterMetricFamily("emp_service_cpu_seconds", "CPU time of the live process tree.", labels=labels)
        for svc in self._status["services"]:
            key = [svc["name"], svc["service"]]
            for value in ServiceState:
                state.add_metric([*key, value.value], 1.0 if svc["state"] == value.value else 0.0)
            restarts.add_metric(key, svc["restarts"])
            up.add_metric(key, 1.0 if svc["state"] == ServiceState.RUNNING.value else 0.0)
            if svc["uptime_s"] is not None:
                uptime.add_metric(key, svc["uptime_s"])
            if svc["name"] in self._usage:
                tree_rss, tree_cpu = self._usage[svc["name"]]
                rss.add_metric(key, tree_rss)
                cpu.add_metric(key, tree_cpu)
        yield from (state, restarts, uptime, up, rss, cpu)

    def _stages(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("emp_stage_state", "1 for the stage's state.", labels=["stage", "state"])
        took = GaugeMetricFamily("emp_stage_duration_seconds", "How long the stage took.", labels=["stage"])
        for stage in self._status["stages"]:
            for value in STAGE_STATES:
                state.add_metric([stage["name"], value], 1.0 if stage["state"] == value else 0.0)
            if stage["duration_s"] is not None:
                took.add_metric([stage["name"]], stage["duration_s"])
        yield from (state, took)
        pull = self._status.get("pull")
        if pull:
            yield GaugeMetricFamily(
                "emp_models_pull_bytes", "Model bytes on disk in this pull.", value=pull["bytes_done"]
            )
            yield GaugeMetricFamily(
                "emp_models_pull_bytes_total", "Model bytes this pull must have.", value=pull["bytes_total"]
            )
        fetched = sum(m.get("bytes_fetched", 0) for m in self._status.get("models", []))
        yield CounterMetricFamily("emp_models_fetched_bytes", "Model bytes downloaded since the start.", value=fetched)

    def _gpus(self) -> Iterator[Metric]:
        report = self._status.get("gpus") or {}
        labels = ["gpu", "uuid", "name"]
        total = GaugeMetricFamily("emp_gpu_memory_total_bytes", "GPU memory.", labels=labels)
        free = GaugeMetricFamily("emp_gpu_memory_free_bytes", "Free GPU memory at the last probe.", labels=labels)
        temp = GaugeMetricFamily("emp_gpu_temperature_celsius", "GPU temperature at the last probe.", labels=labels)
        for gpu in report.get("gpus", []):
            key = [str(gpu["index"]), gpu["uuid"], gpu.get("name") or ""]
            for family, field, scale in ((total, "memory_total_mib", 2**20), (free, "memory_free_mib", 2**20)):
                if gpu.get(field) is not None:
                    family.add_metric(key, gpu[field] * scale)
            if gpu.get("temperature_c") is not None:
                temp.add_metric(key, gpu["temperature_c"])
        yield GaugeMetricFamily("emp_gpus", "GPUs the probe found.", value=len(report.get("gpus", [])))
        yield from (total, free, temp)

    def _registry(self) -> Iterator[Metric]:
        reg = self._status["registry"]
        yield GaugeMetricFamily(
            "emp_registry_connected", "1 when the last heartbeat reached Redis.", value=reg["connected"]
        )
        if reg.get("last_heartbeat"):
            age = (self._now - datetime.fromisoformat(reg["last_heartbeat"])).total_seconds()
            yield GaugeMetricFamily(
                "emp_heartbeat_age_seconds", "Seconds since the last heartbeat.", value=max(0.0, age)
            )
