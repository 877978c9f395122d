"""The composition root: builds every component, runs bootstrap then supervision, and shuts down in order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import structlog

from agent import __version__
from agent.api.server import ControlApi
from agent.bootstrap.context import BootstrapContext
from agent.bootstrap.detect import gpu_problems
from agent.bootstrap.pipeline import Pipeline, Stage
from agent.bootstrap.stages import default_stages
from agent.capabilities import caps_hash, dynamic_record, offered, static_record
from agent.errors import AgentError, ConfigError, Problem, RegistryError
from agent.gpuwatch import GpuWatch
from agent.host.facts import read_host_readings
from agent.host.gpu import GpuProbe, GpuReport
from agent.host.heap import release_free_memory
from agent.host.launcher import Launcher, ProcessLauncher
from agent.host.lock import DirectoryLock
from agent.host.notify import Notifier
from agent.host.nvml import NvmlProbe
from agent.identity import boot_id, instance_id, machine_id
from agent.machine import Phase, compute_phase
from agent.profile import Profile, load_profile
from agent.pull.worker import PullWorker
from agent.registry import embedded
from agent.registry.client import RedisRegistry
from agent.registry.compat import compat_message
from agent.registry.heartbeat import Heartbeat
from agent.settings import Settings
from agent.supervisor.instances import InstanceSpec, Paths, expand, gpu_units, spec_hash
from agent.supervisor.ledger import ProcessLedger
from agent.supervisor.service import iso_now
from agent.supervisor.table import ProcessTable

log = structlog.get_logger(__name__)
EXIT_OK = 0
EXIT_FORCED = 1
REGISTRY_START_TIMEOUT_S = 30.0
#: Shutdown never waits longer than this for a hung Redis to take the "stopping" beat.
LAST_BEAT_TIMEOUT_S = 2.0
#: While the bootstrap makes progress, systemd's start timeout is pushed this far ahead, every EXTEND_EVERY_S.
EXTEND_START_S = 120.0
EXTEND_EVERY_S = 20.0
#: How often the status table's CPU and MEM columns are sampled.
USAGE_EVERY_S = 10.0


class Agent:
    """One agent process: `await Agent(...).run()` returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        profile: Profile,
        *,
        launcher: Launcher | None = None,
        gpu_probe: GpuProbe | None = None,
        stages: list[Stage] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self._launcher = launcher or ProcessLauncher()
        self._gpu_probe = gpu_probe or NvmlProbe(settings.gpu_probe_timeout_s)
        self._stages = stages or default_stages()
        self._environ = os.environ if environ is None else environ
        self._http_token = settings.http_token()  # a bad token file is a configuration error before anything runs
        self._api: ControlApi | None = None
        self._draining = False
        self._startup_task: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[dict[str, Any]] | None = None
        self.paths = Paths(settings.model_root, settings.state_dir, settings.log_dir)
        self.ledger = ProcessLedger(settings.state_dir / "processes.json")
        self.table = ProcessTable(self._launcher, ledger=self.ledger, respec=self.respec)
        self.table.add_listener(self._to_registry)
        self.table.add_listener(lambda _event: self._kick_if_phase_changed())
        self.machine_id = ""
        self.boot_id = boot_id()
        self.instance_id = instance_id()
        self.started_at = iso_now()
        self._started_mono = time.monotonic()
        self._stopping = False
        self._shutdown = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self._registry_url: str | None = None
        self._published_phase: Phase | None = None
        self._notifier = Notifier(self._environ)
        self._notified_ready = False
        self._ready_announced_at: int | None = None
        self._last_snapshot: list[dict[str, Any]] | None = None
        self._readings: tuple[int, int] | None = None
        self._usage: dict[str, dict[str, Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._registry: RedisRegistry | None = None
        self._startup_error: str | None = None
        self.pipeline: Pipeline | None = None
        self.ctx: BootstrapContext | None = None
        self.heartbeat: Heartbeat | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Startup, main loop until a signal, ordered shutdown."""
        self.settings.make_dirs("state_dir", "runtime_dir", "log_dir", "model_root")
        locks = self._lock_dirs()
        try:
            return await self._run_locked()
        finally:
            for lock in locks:
                lock.release()

    async def _run_locked(self) -> int:
        try:
            self.machine_id = machine_id(
                self.settings.machine_id, self.settings.state_dir, source=self.settings.machine_id_source
            )
        except OSError as exc:
            problem = Problem("settings", "EMP_AGENT_STATE_DIR", f"cannot keep the machine id: {exc}")
            raise ConfigError([problem]) from None
        structlog.contextvars.bind_contextvars(machine_id=self.machine_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        api = ControlApi(
            self.settings.control_socket,
            self.status,
            self.control,
            usage=lambda: asyncio.to_thread(self.table.usage),
            drain=self.drain,
            tcp=self.settings.http_address,
            tcp_token=self._http_token,
        )
        self._api = api
        self.table.add_listener(api.events.publish)
        await api.start()  # survivors of a previous agent are adopted or stopped as their instances come up
        log.info(
            "emp-agent starting",
            version=__version__,
            profile=self.profile.name,
            pid=os.getpid(),
            socket=str(self.settings.control_socket),
        )

        puller = PullWorker(
            self.settings,
            self._environ,
            sink=self._on_event,
            live=self._publish_live,
            context={"machine_id": self.machine_id},
        )
        self._notifier.notify(STATUS="starting")
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        extend = asyncio.create_task(self._keep_start_alive(), name="extend-start")
        sampler = asyncio.create_task(self._sample_usage(), name="usage")
        startup = asyncio.create_task(self._startup(puller), name="startup")
        self._startup_task = startup
        try:
            await self._shutdown.wait()
        finally:
            self._notifier.notify(STOPPING="1", STATUS="stopping")
            code = await self._teardown(startup, api)
            watchdog.cancel()
            extend.cancel()
            sampler.cancel()
        return code

    def _tell_service_manager(self, phase: Phase, reasons: list[str]) -> None:
        """STATUS= with the stage or phase; READY=1 once, when the bootstrap has finished (ready or not: a
        degraded or failed host is up and reporting, and systemd must not time the unit out)."""
        if not self._notifier.enabled:
            return
        running = (
            next((r.name for r in self.pipeline.records if r.state.value == "running"), None)
            if (self.pipeline)
            else None
        )
        status = f"bootstrapping: {running}" if running else phase.value + (f": {reasons[0]}" if reasons else "")
        fields = {"STATUS": status[:200]}
        if not self._notified_ready and self.pipeline is not None and self.pipeline.finished:
            fields["READY"] = "1"
            self._notified_ready = True
        self._notifier.notify(**fields)

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself: a wedged loop stops the pings and systemd restarts us."""
        interval = self._notifier.watchdog_interval_s
        while interval:
            self._notifier.notify(WATCHDOG="1")
            await asyncio.sleep(interval)

    async def _keep_start_alive(self) -> None:
        """While the bootstrap runs, ask systemd for EXTEND_START_S more each time it made progress (model bytes
        arrived, a stage moved on) or while a preparation step runs (each has its own timeout_s): a slow link
        keeps the unit starting, a stalled pull hits TimeoutStartSec."""
        if not self._notifier.enabled:
            return
        seen: tuple[Any, ...] | None = None
        while not (self.pipeline is not None and self.pipeline.finished):
            await asyncio.sleep(EXTEND_EVERY_S)
            ctx, pipeline = self.ctx, self.pipeline
            if ctx is None or pipeline is None:
                continue
            marker = (
                ctx.models.progress.snapshot()["bytes_done"] if ctx.models.progress.planned_yet else 0,
                tuple(r.state.value for r in pipeline.records),
            )
            preparing = any(r.name == "prepare" and r.state.value == "running" for r in pipeline.records)
            if marker != seen or preparing:  # a preparation step is bounded by its own timeout_s
                self._notifier.notify(EXTEND_TIMEOUT_USEC=str(int(EXTEND_START_S * 1_000_000)))
            seen = marker

    async def _sample_usage(self) -> None:
        """CPU % and RSS of each instance's process tree every USAGE_EVERY_S, for the status table's CPU and MEM
        columns (read in a thread: /proc walks stay off the event loop)."""
        previous: dict[str, tuple[float, float]] = {}
        while True:
            with contextlib.suppress(OSError):
                now = time.monotonic()
                usage = await asyncio.to_thread(self.table.usage)
                sampled: dict[str, dict[str, Any]] = {}
                for name, (rss, cpu_s) in usage.items():
                    percent = None
                    if name in previous and now > previous[name][0] and cpu_s >= previous[name][1]:
                        percent = round((cpu_s - previous[name][1]) / (now - previous[name][0]) * 100, 1)
                    sampled[name] = {"rss_bytes": rss, "cpu_percent": percent}
                    previous[name] = (now, cpu_s)
                self._usage = sampled
            await asyncio.sleep(USAGE_EVERY_S)

    async def _sweep_unclaimed(self) -> None:
        """Stop what a previous agent left that no instance of ours adopted (we hold the locks: it is no live
        agent's)."""
        leftovers = await asyncio.to_thread(self.ledger.sweep, keep=set(self.table.names()))
        if leftovers:
            log.warning("stopped processes a previous agent left and nothing adopted", instances=leftovers)

    def _lock_dirs(self) -> list[DirectoryLock]:
        """One agent per state dir and per runtime dir; a second one stops here, before touching anything."""
        dirs = {self.settings.state_dir.resolve(), self.settings.runtime_dir.resolve()}
        held: list[DirectoryLock] = []
        try:
            for directory in sorted(dirs):
                lock = DirectoryLock(directory)
                lock.acquire()
                held.append(lock)
        except BaseException:
            for lock in held:
                lock.release()
            raise
        return held

    async def _startup(self, puller: PullWorker) -> None:
        """Registry, then the bootstrap pipeline; cancelled as a whole when shutdown is requested."""
        try:
            url = await self._registry_url_or_embedded()
        except AgentError as exc:
            log.error("no registry", error=str(exc))
            self._startup_error = str(exc)
            return
        self._registry = RedisRegistry(url, self.settings.redis_tls)
        self.heartbeat = Heartbeat(
            self._registry,
            self.machine_id,
            self.settings.heartbeat_interval_s,
            self.record,
            compat=self.compat_status,
            instance=self.instance_id,
        )
        self.ctx = BootstrapContext(
            settings=self.settings,
            profile=self.profile,
            machine_id=self.machine_id,
            paths=self.paths,
            table=self.table,
            gpu_probe=self._gpu_probe,
            models=puller,
            registrar=self.heartbeat,
            agent_env=self._environ,
            ledger=self.ledger,
        )
        self.pipeline = Pipeline(self._stages, self.settings.state_dir / "bootstrap.json", self._on_event)
        await self.pipeline.run(self.ctx)
        await self._sweep_unclaimed()
        phase, reasons = self.phase()
        released = await asyncio.to_thread(release_free_memory)
        log.info("bootstrap finished", phase=phase.value, reasons=reasons, released_mib=round(released / 2**20, 1))
        self._kick_if_phase_changed()
        await asyncio.gather(self._watch_gpus(self.ctx), self._watch_host())

    async def _watch_host(self) -> None:
        """Host readings for the heartbeat's dynamic record, read in a thread (a hung NFS model root stalls this
        loop, never the agent)."""
        while True:
            with contextlib.suppress(OSError):
                self._readings = await asyncio.to_thread(read_host_readings, self.settings.model_root)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _watch_gpus(self, ctx: BootstrapContext) -> None:
        """After the bootstrap, probe the GPUs every gpu_reprobe_interval_s until shutdown (a CPU-only host and
        an interval of 0 skip it)."""
        if ctx.gpus is None or not self.settings.gpu_reprobe_interval_s:
            return
        watch = GpuWatch(
            ctx.gpu_probe,
            ctx.gpus,
            lambda report, changes: self.apply_gpus(ctx, report, changes),
            self._environ.get("CUDA_VISIBLE_DEVICES"),
            self.profile.gpu.select,
        )
        if watch.needed:
            await watch.run(self.settings.gpu_reprobe_interval_s)

    def apply_gpus(self, ctx: BootstrapContext, report: GpuReport, changes: list[dict[str, Any]]) -> None:
        """A new GPU report: fresh readings and host figures, degraded reasons recomputed, one event per health
        change, and the record published soon when anything the broker matches on moved."""
        ctx.gpus = report
        for key in [k for k in ctx.degraded if k == "gpu" or k.startswith("gpu ")]:
            del ctx.degraded[key]
        ctx.degraded.update(gpu_problems(report, self.profile.gpu))
        ctx.degraded.update(self._slotless(report))
        for change in changes:
            self._on_event({**change, "at": iso_now()})
        if changes and self.heartbeat is not None:
            self.heartbeat.kick()
        used: dict[int, int] = {}
        for gpu in report.gpus:
            for proc in gpu.processes or []:
                used[proc.pid] = used.get(proc.pid, 0) + (proc.used_memory_mib or 0)
        if used:
            task = asyncio.create_task(self.table.check_gpu_memory(used), name="gpu-memory-limits")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _slotless(self, report: GpuReport) -> dict[str, str]:
        """Healthy GPUs no per-GPU service runs on: slots are laid out when the services start, so a GPU that was
        not usable then (a failed boot probe) needs a restart of the agent to be used."""
        if not any(s.per_gpu for s in self.profile.services.values()):
            return {}
        used = {spec.gpu.uuid for n in self.table.names() if (spec := self.table.get(n).spec).gpu}
        missing = {}
        for gpu in report.gpus:
            units = [unit.uuid for unit in gpu_units([gpu])]  # the GPU, or its MIG devices: what slots go on
            if gpu.healthy and units and not any(u in used for u in units):
                missing[f"gpu {gpu.index}"] = (
                    "healthy but no service runs on it (it was not usable when the services started): "
                    "restart the agent to use it"
                )
        return missing

    def handle_exit(self, sig: int) -> None:
        """Signal handler: the first signal asks for an ordered shutdown, the second forces it."""
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown requested", signal=signal.Signals(sig).name)
            self._shutdown.set()
        else:
            log.warning("second signal: killing every service now", signal=signal.Signals(sig).name)
            self._force.set()
            self.table.force_kill_all()

    def _kick_if_phase_changed(self) -> None:
        """Publish at once when the phase changes, instead of waiting for the next heartbeat; tell systemd."""
        phase, reasons = self.phase()
        self._tell_service_manager(phase, reasons)
        if phase is not self._published_phase and self.heartbeat is not None:
            was, self._published_phase = self._published_phase, phase
            self.heartbeat.publish(
                {
                    "type": "machine",
                    "event": "phase",
                    "phase": phase.value,
                    "was": was,
                    "reasons": reasons,
                    "at": iso_now(),
                }
            )

    async def _teardown(self, startup: asyncio.Task[None], api: ControlApi) -> int:
        self._stopping = True
        log.info("stopping", phase=Phase.STOPPING.value)
        if not startup.done():
            startup.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await startup
        try:
            if self.heartbeat is not None and not self._draining:  # a drained machine has no record to update
                await self.heartbeat.halt()
                await self._last_beat()  # publish "stopping" before the record goes
                await self.heartbeat.stop(deregister=True)
            if self._registry is not None:
                await self._registry.aclose()
        except Exception:  # nothing on the registry's side may leave the services running (KillMode=process)
            log.exception("deregistration failed; stopping the services anyway")
        finally:
            await self.table.stop_all()
            await self._sweep_unclaimed()
            await api.stop()
        forced = self._force.is_set()
        log.info("stopped", forced=forced)
        return EXIT_FORCED if forced else EXIT_OK

    async def _registry_url_or_embedded(self) -> str:
        if self.settings.redis_url is not None:
            return self.settings.redis_url.get_secret_value()
        try:
            spec, url = embedded.server_spec(self.settings.registry_socket)
        except RegistryError as exc:
            raise AgentError(str(exc)) from None
        registry_profile = Profile(name="embedded", source="(built in)", services={embedded.SERVICE_NAME: spec})
        (instance,) = expand(registry_profile, [], self.paths, self.machine_id, {})
        survivor = self.ledger.survivor(instance.name)
        adopt = survivor if survivor is not None and survivor.spec_hash == spec_hash(instance) else None
        if survivor is not None and adopt is None:
            await asyncio.to_thread(self.ledger.sweep, keep=set(self.ledger.names()) - {instance.name})
        self.table.add(instance, adopt=adopt)
        await self.table.start_all([instance.name])
        log.info("no EMP_AGENT_REDIS_URL: running the embedded registry server", socket=url, binary=spec.command[0])
        not_ready = await self.table.wait_ready([instance.name], REGISTRY_START_TIMEOUT_S)
        if not_ready:
            log.error("embedded registry server not ready", reason=not_ready[instance.name])
        self._registry_url = url
        return url

    async def drain(self, grace_s: float) -> dict[str, Any]:
        """Take the machine out of rotation: publish phase `draining` at once (the broker stops assigning),
        give in-flight work `grace_s`, deregister, then stop the services in reverse order. The agent stays up
        (status, logs) and serves again only after a restart. A second drain waits for the first."""
        if self._stopping:
            raise AgentError("the agent is stopping")
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(grace_s), name="drain")
        return await asyncio.shield(self._drain_task)

    async def _drain(self, grace_s: float) -> dict[str, Any]:
        self._draining = True
        log.info("drain requested", grace_s=grace_s)
        self._on_event({"type": "machine", "event": "drain", "grace_s": grace_s, "at": iso_now()})
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()  # a drain during the bootstrap ends the bootstrap: nothing more starts
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup_task
        registered = self.heartbeat is not None and self.heartbeat.beats > 0
        if self.heartbeat is not None and registered:
            await self._last_beat()  # "draining" is in Redis before anything else happens
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shutdown.wait(), timeout=grace_s)
        deregistered = False
        if self.heartbeat is not None:
            deregistered = await self.heartbeat.stop(deregister=registered)
        running = [s["name"] for s in self.table.snapshot() if not s["service"].startswith("emp-") and s["pid"]]
        await self.table.stop_all(keep_own=True)
        log.info("drained", stopped=running, deregistered=deregistered)
        return {"phase": self.phase()[0].value, "stopped": running, "deregistered": deregistered}

    async def _last_beat(self) -> None:
        """One beat with a short deadline (shutdown and drain never wait long on Redis)."""
        assert self.heartbeat is not None
        try:
            async with asyncio.timeout(LAST_BEAT_TIMEOUT_S):
                await self.heartbeat.beat()
        except (RegistryError, TimeoutError):
            pass
        except Exception:
            log.exception("last heartbeat failed")

    async def control(self, action: str, name: str, sig: int | None = None) -> list[dict[str, Any]]:
        """The process table's control, except that a drained machine starts nothing."""
        if self._draining and action in ("start", "restart"):
            return [
                {"name": s.spec.name, "ok": False, "error": "the machine is drained; restart the agent to serve"}
                for s in self.table.resolve(name)
            ]
        return await self.table.control(action, name, sig)

    def _publish_live(self, event: dict[str, Any]) -> None:
        if self._api is not None:
            self._api.events.publish(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.table.events.append(event)
        if self._api is not None:
            self._api.events.publish(event)
        self._to_registry(event)
        self._kick_if_phase_changed()

    def _to_registry(self, event: dict[str, Any]) -> None:
        """The machine's event stream in Redis (queued while Redis is away); progress ticks stay local."""
        if self.heartbeat is not None and event.get("event") != "model.progress":
            self.heartbeat.publish(event)

    def respec(self, name: str) -> InstanceSpec | None:
        """The instance's spec from the profile as it is on disk now (applied by `restart`); None for the agent's
        own instances. Raises ConfigError when the profile no longer validates or lost the instance."""
        if name.startswith(embedded.SERVICE_NAME):
            return None
        profile = load_profile(self.profile.source, self.settings.profiles_dir)
        gpus = self.ctx.gpus.gpus if self.ctx and self.ctx.gpus else []
        ports = {n: self.table.get(n).spec.port for n in self.table.names()}
        facts = self.ctx.slot_facts() if self.ctx else None
        for spec in expand(profile, gpus, self.paths, self.machine_id, self._environ, keep_ports=ports, facts=facts):
            if spec.name == name:
                return spec
        raise ConfigError([Problem(profile.source, "services", f"instance {name} is no longer in the profile")])

    # ---- views -------------------------------------------------------------------------------------------

    def phase(self, in_registry: bool = False) -> tuple[Phase, list[str]]:
        """The machine phase now, and why. `in_registry`: as written to Redis, where "not connected" cannot be
        true (the write itself is the connection)."""
        failure = self.pipeline.fatal_failure() if self.pipeline else None
        hb = self.heartbeat
        degraded = dict(self.ctx.degraded) if self.ctx else {}
        if hb is not None and hb.fenced_by is not None:
            degraded["registry"] = hb.last_error or "fenced"
        return compute_phase(
            stopping=self._stopping,
            draining=self._draining,
            fatal_error=f"stage {failure.name} failed: {failure.error}" if failure else self._startup_error,
            pipeline_finished=bool(self.pipeline and self.pipeline.finished),
            degraded=degraded,
            unhealthy_services=self.table.unhealthy_required(),
            registry_connected=in_registry or bool(hb and (hb.connected or hb.fenced_by is not None)),
        )

    def capabilities(self, snapshot: list[dict[str, Any]]) -> dict[str, Any]:
        """The static capability record (docs/capabilities.md): host, GPUs, slots that can take jobs, models."""
        ctx = self.ctx
        models = [m.to_dict() for m in (ctx.model_status.values() if ctx else []) if m.in_place]
        return static_record(
            agent_version=__version__,
            profile=self.profile.name,
            host=ctx.host if ctx else None,
            gpus=ctx.gpus if ctx else None,
            slots=[s for s in snapshot if s["service"] != embedded.SERVICE_NAME],
            models=models,
            matching=self.settings.matching,
            gpu_required=self.profile.gpu.min_count > 0,
        )

    def record(self) -> dict[str, Any]:
        """The machine record written to Redis at every heartbeat."""
        phase, reasons = self.phase(in_registry=True)
        snapshot = self.table.snapshot()  # reads each instance's log state file: once per beat, not twice
        self._last_snapshot = snapshot  # the compat message of the same beat reuses it
        caps = self.capabilities(snapshot)
        gpus = self.ctx.gpus if self.ctx else None
        running = sorted(
            {
                name
                for s in snapshot
                if s["state"] == "RUNNING" and offered(s, gpus, self.profile.gpu.min_count > 0)
                for name in s["capabilities"]
            }
        )
        return {
            "schema": "1",
            "machine_id": self.machine_id,
            "boot_id": self.boot_id,
            "instance_id": self.instance_id,
            "agent_version": __version__,
            "profile": self.profile.name,
            "phase": phase.value,
            "reasons": reasons,
            "started_at": self.started_at,
            "capabilities": caps,
            "caps_hash": caps_hash(caps),
            "interval_ms": str(round(self.settings.heartbeat_interval_s * 1000)),
            "dynamic": dynamic_record(self._readings, gpus),
            "services_ready": running,
        }

    def compat_status(self, update_type: str) -> dict[str, Any]:
        """The original system's `machine:status:<id>` message, for its API and monitor (docs/registry.md)."""
        phase, reasons = self.phase(in_registry=True)
        beats = self.heartbeat.beats if self.heartbeat else 0
        if phase is Phase.READY and (self._ready_announced_at is None or beats <= self._ready_announced_at):
            self._ready_announced_at = beats  # announced once a beat after this one has gone through
            update_type = "machine_ready"
        elif phase is Phase.STOPPING:
            update_type = "shutdown"
        return compat_message(
            machine_id=self.machine_id,
            phase=phase,
            reasons=reasons,
            uptime_s=time.monotonic() - self._started_mono,
            snapshot=self._last_snapshot if self._last_snapshot is not None else self.table.snapshot(),
            gpu_count=len(self.ctx.gpus.gpus) if self.ctx and self.ctx.gpus else 0,
            update_type=update_type,
            health_url=f"http://{self.settings.http_listen}/healthz" if self.settings.http_listen else None,
        )

    def status(self) -> dict[str, Any]:
        """The document behind `emp-agent status --json` and GET /status."""
        phase, reasons = self.phase()
        hb = self.heartbeat
        ctx = self.ctx
        return {
            "schema": 1,
            "agent_version": __version__,
            "machine_id": self.machine_id,
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "profile": self.profile.name,
            "phase": phase.value,
            "reasons": reasons,
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "stages": [r.to_dict() for r in self.pipeline.records] if self.pipeline else [],
            "services": [
                {**s, **self._usage.get(s["name"], {"rss_bytes": None, "cpu_percent": None})}
                if s["pid"]
                else {**s, "rss_bytes": None, "cpu_percent": None}
                for s in self.table.snapshot()
            ],
            "models": [m.to_dict() for m in ctx.model_status.values()] if ctx else [],
            "pull": ctx.models.progress.snapshot() if ctx and ctx.models.progress.planned_yet else None,
            "gpus": ctx.gpus.to_dict() if ctx and ctx.gpus else None,
            "host": ctx.host.to_dict() if ctx and ctx.host else None,
            "registry": {
                "url": self._registry_url if self.settings.redis_url is None else self.settings.redis_url_redacted,
                "embedded": self.settings.redis_url is None,
                "connected": bool(hb and hb.connected),
                "last_heartbeat": hb.last_heartbeat if hb else None,
                "last_error": hb.last_error if hb else None,
                "epoch": hb.epoch if hb else None,
                "fenced_by": hb.fenced_by if hb else None,
                "events_queued": hb.queued if hb else 0,
                "events_dropped": hb.events_dropped if hb else 0,
            },
            "events": list(self.table.events)[-20:],
        }
