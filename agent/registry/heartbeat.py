"""The heartbeat: write the machine record every interval (with jitter) until shutdown; never fatal."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.errors import RegistryError
from agent.registry import keys
from agent.registry.client import Registry

log = structlog.get_logger(__name__)
JITTER = 0.1
DEREGISTER_TIMEOUT_S = 3.0
KICK_DELAY_S = 0.2


class Heartbeat:
    """Keeps the machine record alive; reconnects by simply trying again on the next beat."""

    def __init__(
        self,
        registry: Registry,
        machine_id: str,
        interval_s: float,
        record: Callable[[], dict[str, Any]],
        unit_random: Callable[[], float] = random.random,
    ) -> None:
        self._registry = registry
        self._machine_id = machine_id
        self._interval_s = interval_s
        self._record = record
        self._random = unit_random
        self.connected = False
        self.last_heartbeat: str | None = None
        self.last_error: str | None = None
        self.beats = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._kick = asyncio.Event()
        self._kick_pending = False

    async def beat(self) -> None:
        """Write the record once; raises RegistryError (and records it) when Redis does not take it."""
        try:
            now_ms = await self._registry.write(self._machine_id, self._record(), keys.ttl_for(self._interval_s))
        except RegistryError as exc:
            if self.connected or self.last_error != str(exc):
                log.warning("registry unreachable; will keep trying", error=str(exc))
            self.connected = False
            self.last_error = str(exc)
            raise
        if not self.connected:
            log.info("registered", machine_id=self._machine_id, beats=self.beats)
        self.connected = True
        self.last_error = None
        self.beats += 1
        self.last_heartbeat = datetime.fromtimestamp(now_ms / 1000, UTC).isoformat(timespec="milliseconds")

    def start(self) -> None:
        """Beat every interval from now on (no-op when already running)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="heartbeat")

    def kick(self) -> None:
        """Beat soon instead of at the next interval (the phase changed). Kicks within KICK_DELAY_S coalesce,
        and the beat stays out of the way of a restart that caused the change."""
        if self._kick_pending:
            return
        self._kick_pending = True

        def fire() -> None:
            self._kick_pending = False
            self._kick.set()

        asyncio.get_running_loop().call_later(KICK_DELAY_S, fire)

    def next_delay(self) -> float:
        """Interval with +-10% jitter so a fleet rebooted together does not beat in lockstep."""
        return self._interval_s * (1 + JITTER * (2 * self._random() - 1))

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            stop = asyncio.ensure_future(self._stopping.wait())
            kick = asyncio.ensure_future(self._kick.wait())
            await asyncio.wait({stop, kick}, timeout=self.next_delay(), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            kick.cancel()
            self._kick.clear()
            if self._stopping.is_set():
                return
            try:
                await self.beat()
            except RegistryError:
                pass  # logged by beat(); try again next interval
            except Exception:
                log.exception("heartbeat failed; trying again next interval")

    async def stop(self, deregister: bool = True) -> None:
        """Stop beating and, by default, remove the record (bounded wait: shutdown never hangs on Redis)."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        if deregister:
            try:
                async with asyncio.timeout(DEREGISTER_TIMEOUT_S):
                    await self._registry.remove(self._machine_id)
                log.info("deregistered", machine_id=self._machine_id)
            except (RegistryError, TimeoutError) as exc:
                log.warning("could not deregister; the record expires by its TTL", error=str(exc) or "timeout")
            self.connected = False
