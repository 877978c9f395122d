"""One supervised service instance: spawn, readiness, exit classification, backoff, stop."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.errors import SpawnError
from agent.host.launcher import UNKNOWN_EXIT, AdoptedChild, Child, Launcher
from agent.host.logpipes import LogPipe, LogSpec
from agent.profile import ProbeKind
from agent.statefile import read_json
from agent.supervisor import policy
from agent.supervisor.instances import InstanceSpec, spec_hash, write_capabilities_file
from agent.supervisor.ledger import ProcessLedger, Survivor
from agent.supervisor.notify import NotifyListener
from agent.supervisor.readiness import attempt
from agent.supervisor.states import ServiceState, check_transition

log = structlog.get_logger(__name__)

EventSink = Callable[[dict[str, Any]], None]
#: Probe kinds that can be repeated as a liveness check once the instance is RUNNING.
LIVENESS_KINDS = frozenset({ProbeKind.HTTP, ProbeKind.TCP, ProbeKind.UNIX, ProbeKind.COMMAND})
#: After SIGKILL, how long we wait for every process of the tree to disappear.
REAP_DEADLINE_S = 10.0


def iso_now(wall: Callable[[], float] = time.time) -> str:
    """Wall-clock time for display, in UTC ISO 8601."""
    return datetime.fromtimestamp(wall(), UTC).isoformat(timespec="milliseconds")


class ManagedService:
    """Owns one instance's process and state; all decisions go through `agent.supervisor.policy`."""

    def __init__(
        self,
        spec: InstanceSpec,
        launcher: Launcher,
        on_event: EventSink,
        monotonic: Callable[[], float] = time.monotonic,
        unit_random: Callable[[], float] = random.random,
        ledger: ProcessLedger | None = None,
        adopt: Survivor | None = None,
    ) -> None:
        self.spec = spec
        self._ledger = ledger
        self._adopt = adopt
        self._launcher = launcher
        self._on_event = on_event
        self._monotonic = monotonic
        self._random = unit_random
        self.state = ServiceState.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_exit_code: int | None = None
        self._starts = 0
        self._spawned_at: float | None = None
        self._next_start_at: float | None = None  # monotonic; while BACKOFF or FATAL with a retry
        self._ready_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._sweepers: set[asyncio.Task[None]] = set()

    # ---- operator surface -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (no-op while already supervised)."""
        if self._task is not None and not self._task.done():
            return
        self._stop = asyncio.Event()
        self.failures = 0
        self._task = asyncio.create_task(self._run(), name=f"service:{self.spec.name}")

    async def stop(self) -> None:
        """Stop and wait until every process of the instance has been reaped. Wins over any restart."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._sweepers:
            await asyncio.gather(*self._sweepers)

    def send_signal(self, sig: int) -> bool:
        """Send `sig` to the instance's process group; False when no process is running."""
        if self._child is None:
            return False
        self._child.signal_group(sig)
        return True

    def reopen_log(self) -> bool:
        """Make the instance's log writer reopen its file; False when it has none running."""
        if self._output is None:
            return False
        self._output.reopen()
        return True

    def force_kill(self) -> None:
        """SIGKILL the tree now, without waiting (used when the operator insists)."""
        self._stop.set()
        if self._child is not None:
            self._child.kill_tree()

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once RUNNING; False when it ends up EXITED/FATAL/STOPPED or the timeout passes."""
        deadline = self._monotonic() + timeout_s
        while True:
            if self.state is ServiceState.RUNNING:
                return True
            if self.state in (ServiceState.EXITED, ServiceState.FATAL) or (
                self.state is ServiceState.STOPPED and (self._task is None or self._task.done())
            ):
                return False
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def wait_running(self) -> None:
        """Wait, without a deadline, until the instance is RUNNING (it may be FATAL for a while first)."""
        while self.state is not ServiceState.RUNNING:
            changed = self._changed
            await changed.wait()

    def snapshot(self) -> dict[str, Any]:
        """The instance as status shows it."""
        now = self._monotonic()
        uptime = now - self._spawned_at if self._spawned_at is not None and self.pid is not None else None
        gpu = self.spec.gpu
        return {
            "name": self.spec.name,
            "service": self.spec.service,
            "state": self.state.value,
            "pid": self.pid,
            "restarts": self.restarts,
            "failures": self.failures,
            "crash_loop_limit": self.spec.restart.crash_loop_limit,
            "next_start_in_s": self._next_start_in(now),
            "uptime_s": round(uptime, 3) if uptime is not None else None,
            "port": self.spec.port,
            "gpu": {"index": gpu.index, "uuid": gpu.uuid} if gpu else None,
            "per_gpu": self.spec.per_gpu,
            "slot": self.spec.slot,
            "last_error": self.last_error,
            "last_exit_code": self.last_exit_code,
            "capabilities": list(self.spec.capabilities),
            "required": self.spec.required,
            "log": {"path": str(self.spec.log_path), **self._log_counts()},
        }

    def _next_start_in(self, now: float) -> float | None:
        if self._next_start_at is None or self.state not in (ServiceState.BACKOFF, ServiceState.FATAL):
            return None
        return round(max(0.0, self._next_start_at - now), 1)

    @property
    def child(self) -> Child | None:
        """The live process tree, if any (for resource usage)."""
        return self._child

    # ---- internals --------------------------------------------------------------------------------------

    _child: Child | None = None
    _killed_reason: str | None = None
    _log_offset: int = 0
    _notify: NotifyListener | None = None
    _output: LogPipe | None = None
    _last_log_counts: dict[str, Any] | None = None
    _adopting: bool = False

    def _set(self, new: ServiceState, reason: str | None = None) -> None:
        check_transition(self.state, new)
        old, self.state = self.state, new
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        event = {
            "type": "service",
            "instance": self.spec.name,
            "service": self.spec.service,
            "from": old.value,
            "to": new.value,
            "at": iso_now(),
        }
        if reason:
            event["reason"] = reason
        level = "warning" if new in (ServiceState.BACKOFF, ServiceState.FATAL) else "info"
        getattr(log, level)("service state", instance=self.spec.name, old=old.value, new=new.value, reason=reason)
        self._on_event(event)

    async def _run(self) -> None:
        try:
            await self._supervise()
            await self._close_output()
        except Exception as exc:  # a bug in the agent must not leave an unsupervised child behind
            log.exception("supervision failed", instance=self.spec.name)
            self.last_error = f"agent error: {exc}"
            if self._child is not None:
                self._child.kill_tree()
            self.pid = None
            self.state = ServiceState.FATAL
            with contextlib.suppress(Exception):
                await self._close_output()

    async def _supervise(self) -> None:
        while not self._stop.is_set():
            facts = await self._one_run()
            if facts is None:
                return
            self.failures = policy.failures_after(self.spec.restart, facts, self.failures)
            verdict = policy.verdict(self.spec.restart, facts, self.failures)
            reason = self.last_error or f"exited with {facts.returncode}"
            if verdict is policy.Verdict.LEAVE:
                self._set(ServiceState.EXITED, reason)
                return
            if verdict is policy.Verdict.GIVE_UP:
                retry = self.spec.restart.fatal_retry_s
                self._next_start_at = self._monotonic() + retry if retry else None
                self._set(
                    ServiceState.FATAL,
                    f"{reason}; crash loop ({self.failures} failures in a row)"
                    + (f", retrying in {retry:g}s" if retry else ""),
                )
                if retry is None or await self._sleep_unless_stopped(retry):
                    if self._stop.is_set():
                        self._set(ServiceState.STOPPED, "stop requested")
                    return
                self.failures = 0
                continue
            delay = policy.backoff_delay(self.spec.restart, self.failures, self._random())
            self._next_start_at = self._monotonic() + delay
            self._set(ServiceState.BACKOFF, f"{reason}; restarting in {delay:.1f}s")
            if await self._sleep_unless_stopped(delay):
                self._set(ServiceState.STOPPED, "stop requested")
                return

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep; True when a stop was requested meanwhile. No wait at all for 0 s: an immediate restart does
        not give the event loop to other work (a heartbeat the state change kicked) before the spawn."""
        if seconds <= 0:
            return self._stop.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _one_run(self) -> policy.ExitFacts | None:
        """Spawn, wait for readiness and then for the exit. None when stopped on request."""
        self._set(ServiceState.STARTING)
        self._starts += 1
        if self._starts > 1:
            self.restarts += 1
        self._ready_since = None
        try:
            self._log_offset = self.spec.log_path.stat().st_size
        except OSError:
            self._log_offset = 0
        self._adopting = False
        child = await self._adopted() if self._adopt is not None else await self._spawn()
        if child is None:
            return policy.ExitFacts(None, False, None, self._monotonic())
        return await self._supervise_child(child)

    async def _adopted(self) -> Child:
        """Take over the survivor a previous agent left (first run only), and a share in its output pipe; readiness
        is checked as for a start."""
        survivor, self._adopt = self._adopt, None
        assert survivor is not None
        self._adopting = True
        log.info("adopted a running instance left by the previous agent", instance=self.spec.name, pid=survivor.pid)
        self._output = await self._launcher.adopt_log(self._log_spec(), survivor.pid)
        return AdoptedChild(survivor.pid, survivor.tag, survivor.create_time)

    def _log_spec(self) -> LogSpec:
        return LogSpec(self.spec.log_path, self.spec.log_max_bytes, self.spec.log_backups)

    async def _spawn(self) -> Child | None:
        """Start the process; None (with last_error set) when the OS refuses."""
        env = dict(self.spec.env)
        self._notify = NotifyListener() if self.spec.probe.kind is ProbeKind.NOTIFY else None
        if self._notify is not None:
            env["NOTIFY_SOCKET"] = self._notify.env_value
        try:
            if self._output is not None and not self._output.alive:  # an adopted instance's pipe
                self._background(self._output.close())
                self._output = None
            if self._output is None:
                self._output = await self._launcher.open_log(self._log_spec())
            self._output.write_line(f"=== emp-agent: start #{self._starts} of {self.spec.name}")
            if "EMP_CAPABILITIES_FILE" in self.spec.env and self.spec.matcher_view is not None:
                write_capabilities_file(self.spec, self.spec.env.get("EMP_MACHINE_ID", ""))
            child = await self._launcher.spawn(self.spec.argv, env, self.spec.cwd, self._output)
        except SpawnError as exc:
            self.last_error = str(exc)
            self._close_notify()
            return None
        except OSError as exc:  # the capabilities file could not be written
            self.last_error = f"cannot write {exc.filename}: {exc.strerror}"
            self._close_notify()
            return None
        if self._ledger is not None:
            self._ledger.spawned(self.spec.name, child.pid, child.tag, spec_hash(self.spec), self.spec.port)
        return child

    async def _supervise_child(self, child: Child) -> policy.ExitFacts | None:
        """Wait for readiness and then for the exit of one run. None when stopped on request."""
        self._child, self.pid, self._spawned_at = child, child.pid, self._monotonic()
        exit_task = asyncio.create_task(child.wait())
        stop_task = asyncio.create_task(self._stop.wait())
        self._killed_reason = None
        watcher = asyncio.create_task(self._watch_memory(child)) if self.spec.memory_limit_mib else None
        liveness: asyncio.Task[None] | None = None
        try:
            outcome = await self._await_ready(exit_task, stop_task)
            if outcome == "ready":
                self._ready_since = self._monotonic()  # last_error stays: it says how the previous run ended
                self._set(ServiceState.RUNNING, f"ready ({self.spec.probe.describe()})")
                if self.spec.liveness_interval_s and self.spec.probe.kind in LIVENESS_KINDS:
                    liveness = asyncio.create_task(self._watch_liveness(child))
                await asyncio.wait({exit_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
                outcome = "exited" if exit_task.done() else "stop"
            if outcome == "stop":
                self._set(ServiceState.STOPPING, "stop requested")
                await self._terminate(child, exit_task)
                self._set(ServiceState.STOPPED, "stopped")
                return None
            if outcome == "timeout":
                self.last_error = f"not ready within {self.spec.start_timeout_s:g}s ({self.spec.probe.describe()})"
                await self._terminate(child, exit_task)
                return policy.ExitFacts(None, False, None, self._monotonic())
            returncode = exit_task.result()
            ended = self._monotonic()
            await self._after_exit(child)
            if returncode == UNKNOWN_EXIT:  # an adopted process: its status went to its real parent
                self.last_error = "exited (adopted from the previous agent: exit status unknown)"
                return policy.ExitFacts(None, self._ready_since is not None, self._ready_since, ended)
            self.last_exit_code = returncode
            was_ready = self._ready_since is not None
            if self._killed_reason:  # killed by us: a failure whatever the exit code says
                self.last_error = self._killed_reason
                return policy.ExitFacts(None, was_ready, self._ready_since, ended)
            self.last_error = _describe_exit(returncode, was_ready)
            return policy.ExitFacts(returncode, was_ready, self._ready_since, ended)
        finally:
            stop_task.cancel()
            self._close_notify()
            for task in (watcher, liveness):
                if task is not None:
                    task.cancel()
            self.pid = None
            self._child = None
            if self._ledger is not None:
                self._ledger.reaped(self.spec.name)

    async def _close_output(self) -> None:
        """Supervision ended (stopped, exited, gave up): let the log writer drain and exit."""
        if self._output is not None:
            output, self._output = self._output, None
            await output.close()
            self._last_log_counts = output.counts

    def _log_counts(self) -> dict[str, Any]:
        """Dropped lines and the last log error: as the log writer last reported them to us (its state file sits
        next to the log, so it cannot be written when the log cannot), else from that file (an adopted instance,
        or none started yet)."""
        counts = self._output.counts if self._output is not None else self._last_log_counts
        if counts is None:
            counts = read_json(LogSpec(self.spec.log_path).state_path)
        if not isinstance(counts, dict):
            return {}
        return {"dropped_lines": counts.get("dropped_lines") or 0, "last_error": counts.get("last_error")}

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    async def _watch_memory(self, child: Child) -> None:
        """Every resource interval, sum the RSS of the whole tree; over the limit, stop it (SIGKILL after the
        stop timeout). The exit that follows counts as a failure with the reason."""
        limit = self.spec.memory_limit_mib or 0
        while True:
            await asyncio.sleep(self.spec.resource_interval_s)
            rss = await asyncio.to_thread(child.tree_rss_mib)
            if rss <= limit:
                continue
            log.warning("memory limit exceeded, restarting", instance=self.spec.name, rss_mib=rss, limit_mib=limit)
            await self._kill_for(child, f"memory limit: process tree RSS {rss} MiB > {limit} MiB")
            return

    async def check_gpu_memory(self, used_by_pid: Mapping[int, int]) -> None:
        """With a GPU memory limit: sum what NVML attributes to the instance's processes (MiB by pid, from the
        last GPU probe); over the limit, stop it, and the exit counts as a failure with the reason."""
        limit, child = self.spec.gpu_memory_limit_mib, self._child
        if not limit or child is None or self._killed_reason:
            return
        pids = await asyncio.to_thread(child.pids)
        used = sum(used_by_pid.get(pid, 0) for pid in pids)
        if used > limit and child is self._child:
            log.warning(
                "GPU memory limit exceeded, restarting", instance=self.spec.name, used_mib=used, limit_mib=limit
            )
            await self._kill_for(child, f"GPU memory limit: {used} MiB > {limit} MiB")

    async def _watch_liveness(self, child: Child) -> None:
        """While RUNNING, repeat the readiness probe every liveness interval; after `liveness_failures` failures
        in a row the instance is hung (e.g. SIGSTOPped, deadlocked): stop it and restart it as a failure."""
        misses = 0
        while True:
            await asyncio.sleep(self.spec.liveness_interval_s or 0)
            if await attempt(self.spec.probe, self.spec.env, self.spec.log_path, self._log_offset):
                misses = 0
                continue
            misses += 1
            if misses >= self.spec.liveness_failures:
                reason = f"not live: {misses} probes failed in a row ({self.spec.probe.describe()})"
                log.warning("service stopped answering, restarting", instance=self.spec.name, reason=reason)
                await self._kill_for(child, reason)
                return

    async def _kill_for(self, child: Child, reason: str) -> None:
        """Stop the tree on our own initiative; the exit that follows is a failure with `reason`."""
        self._killed_reason = reason
        child.signal_group(signal.Signals[self.spec.stop_signal])
        child.signal_group(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot act on the stop signal
        await asyncio.sleep(self.spec.stop_timeout_s)
        child.kill_tree()

    async def _await_ready(self, exit_task: asyncio.Task[int], stop_task: asyncio.Task[Any]) -> str:
        deadline = self._monotonic() + self.spec.start_timeout_s
        probe = self.spec.probe
        if self._adopting and probe.kind in (ProbeKind.NOTIFY, ProbeKind.LOG):
            return "ready"  # it said so to the previous agent; the signal cannot be repeated
        if probe.kind is ProbeKind.NONE:
            deadline = self._monotonic() + self.spec.start_seconds
        while True:
            if stop_task.done():
                return "stop"
            if exit_task.done():
                return "exited"
            if probe.kind is ProbeKind.NOTIFY:
                passed = self._notify is not None and self._notify.poll()
            else:
                passed = probe.kind is not ProbeKind.NONE and await attempt(
                    probe, self.spec.env, self.spec.log_path, self._log_offset
                )
            if passed:
                if not exit_task.done():
                    return "ready"
                continue
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                return "ready" if probe.kind is ProbeKind.NONE else "timeout"
            await asyncio.wait(
                {exit_task, stop_task},
                timeout=min(self.spec.probe_interval_s, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )

    async def _terminate(self, child: Child, exit_task: asyncio.Task[int]) -> None:
        """Stop signal to the group, SIGKILL to the tree after the stop timeout, then wait for all to go."""
        child.signal_group(signal.Signals[self.spec.stop_signal])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exit_task), self.spec.stop_timeout_s)
        if not exit_task.done():
            log.warning("stop timeout passed, killing", instance=self.spec.name, timeout_s=self.spec.stop_timeout_s)
            child.kill_tree()
            await exit_task
        self.last_exit_code = exit_task.result()
        await self._reap_leftovers(child)

    async def _after_exit(self, child: Child) -> None:
        """The main process exited. Group members left behind are killed before the restart (they may hold the
        port); when the group is already empty, the slower search for descendants that escaped it runs beside
        the restart, and `stop()` still waits for it."""
        if not child.group_empty():
            await self._reap_leftovers(child)
            return
        self._background(self._reap_leftovers(child))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` beside supervision; `stop()` waits for it."""
        task = asyncio.create_task(work)
        self._sweepers.add(task)
        task.add_done_callback(self._sweepers.discard)

    async def _reap_leftovers(self, child: Child) -> None:
        """After the main process ended, no descendant may linger holding ports or GPU memory. The search walks
        /proc in a thread, so it never delays the restart it runs beside."""
        deadline = self._monotonic() + REAP_DEADLINE_S
        while await asyncio.to_thread(child.group_alive):
            child.kill_tree()
            if self._monotonic() > deadline:
                log.error("processes of the instance survive SIGKILL", instance=self.spec.name)
                break
            await asyncio.sleep(0.05)


def _describe_exit(returncode: int, was_ready: bool) -> str:
    when = "" if was_ready else " before it was ready"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}{when}"
    return f"exited with code {returncode}{when}"
