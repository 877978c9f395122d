"""The heartbeat: register under a fencing epoch, then refresh the machine record every interval (with jitter),
carrying queued events; re-register when the record is gone; stop for good when a newer agent owns the id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.errors import RegistryError
from agent.registry import keys
from agent.registry.client import Answer, Beat, Registry, Reply

log = structlog.get_logger(__name__)
JITTER = 0.1
DEREGISTER_TIMEOUT_S = 2.0
KICK_DELAY_S = 0.2
#: Events kept while Redis is unreachable; beyond this the oldest are dropped (and counted).
EVENT_QUEUE = 1000
#: Events sent with one beat at most (the rest go with the next).
EVENTS_PER_BEAT = 200
#: A re-registration waits up to this fraction of the interval, so a fleet whose Redis lost its data does not
#: come back in one burst.
REREGISTER_SPREAD = 0.2


class Heartbeat:
    """Keeps the machine record alive; reconnects by trying again each interval (the interval is the cap)."""

    def __init__(
        self,
        registry: Registry,
        machine_id: str,
        interval_s: float,
        record: Callable[[], dict[str, Any]],
        unit_random: Callable[[], float] = random.random,
        compat: Callable[[str], dict[str, Any]] | None = None,
        instance: str = "",
    ) -> None:
        self._registry = registry
        self._machine_id = machine_id
        self._interval_s = interval_s
        self._record = record
        self._random = unit_random
        self._compat = compat
        self._instance = instance
        self._beating = asyncio.Lock()
        self.connected = False
        self.last_heartbeat: str | None = None
        self.last_error: str | None = None
        self.beats = 0
        self.epoch: int | None = None
        self.fenced_by: int | None = None
        self.events_dropped = 0
        self._events: deque[str] = deque()
        self._acked_caps: str | None = None
        self._deregistered = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._kick = asyncio.Event()
        self._kick_pending = False
        self._kicked = False

    # ---- events ------------------------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        """Queue an event for the machine's stream; sent with the next beat (soon: this kicks one)."""
        self._queue([json.dumps({"machine_id": self._machine_id, **event}, sort_keys=True, default=str)], front=False)
        self.kick()

    @property
    def queued(self) -> int:
        """Events waiting to be sent."""
        return len(self._events)

    def _queue(self, events: list[str], front: bool) -> None:
        for event in reversed(events) if front else events:
            if len(self._events) >= EVENT_QUEUE:
                self.events_dropped += 1
                if front:
                    continue  # the older event is the one that goes
                self._events.popleft()
            if front:
                self._events.appendleft(event)
            else:
                self._events.append(event)

    def _take_events(self) -> list[str]:
        return [self._events.popleft() for _ in range(min(EVENTS_PER_BEAT, len(self._events)))]

    # ---- beating -----------------------------------------------------------------------------------------

    async def beat(self) -> None:
        """Write the record once; raises RegistryError (and records it) when Redis does not take it. Beats never
        overlap (the register stage, the loop and shutdown may all ask for one)."""
        async with self._beating:
            await self._beat()

    async def _beat(self) -> None:
        if self.fenced_by is not None or self._deregistered:
            return
        record = self._record()
        fields = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in record.items()}
        events = self._take_events()
        update = "event_driven" if self._kicked else "periodic"
        self._kicked = False
        ttl = keys.ttl_for(self._interval_s)
        try:
            if self.epoch is None:
                answer = await self._registry.register(self._machine_id, fields, ttl, events)
                self.epoch = answer.epoch
                log.info("registered", machine_id=self._machine_id, epoch=self.epoch, beats=self.beats)
            else:
                sent = await self._send(record, fields, ttl, events, update)
                if sent is None:
                    return
                answer = sent
        except RegistryError as exc:
            self._queue(events, front=True)
            if self.connected or self.last_error != str(exc):
                log.warning("registry unreachable; will keep trying", error=str(exc))
            self.connected = False
            self.last_error = str(exc)
            raise
        except BaseException:
            self._queue(events, front=True)  # whatever went wrong, the events are not lost
            raise
        self._acked_caps = record.get("caps_hash")
        self.connected = True
        self.last_error = None
        self.beats += 1
        self.last_heartbeat = datetime.fromtimestamp(answer.now_ms / 1000, UTC).isoformat(timespec="milliseconds")

    async def _send(
        self, record: dict[str, Any], fields: dict[str, str], ttl: int, events: list[str], update: str
    ) -> Answer | None:
        """A heartbeat, following the server's answer: adopt our own late registration, send the capabilities
        when the stored ones are not current; None when the record is gone or fenced."""
        assert self.epoch is not None
        status = (keys.compat_channel(self._machine_id), json.dumps(self._compat(update))) if self._compat else None
        for _ in range(3):
            small = dict(fields)
            caps = record.get("caps_hash")
            if caps is not None and caps == self._acked_caps:
                small.pop("capabilities", None)  # unchanged: the small fields alone
            beat = Beat(self._machine_id, self.epoch, self._instance, small, ttl, events, status)
            answer = await self._registry.heartbeat(beat)
            if answer.reply is Reply.OK:
                return answer
            if answer.reply is Reply.ADOPT:
                log.info("a late registration of this agent took a newer epoch; using it", epoch=answer.epoch)
                self.epoch = answer.epoch
            elif answer.reply is Reply.CAPS_NEEDED:
                self._acked_caps = None  # the server lost or never stored them (an old snapshot): send them
            elif answer.reply is Reply.NOT_REGISTERED:
                self._lost_record(events)
                return None
            else:
                self._fenced(answer.epoch)
                return None
        raise RegistryError(f"the registry kept answering {answer.reply.value}")

    def _lost_record(self, events: list[str]) -> None:
        """The record expired or Redis lost its data: register again soon, with what was not yet sent."""
        log.warning("machine record missing in Redis (expired, or the server lost its data); registering again")
        self.epoch = None
        self._acked_caps = None
        self._queue(events, front=True)
        self.connected = False
        self.last_error = "record missing; registering again"
        delay = self._interval_s * REREGISTER_SPREAD * self._random()
        asyncio.get_running_loop().call_later(delay, self._kick.set)

    def _fenced(self, owner: int) -> None:
        """A newer agent registered this machine id: never write again (no flapping); say so loudly."""
        self.fenced_by = owner
        self.connected = False
        self.last_error = (
            f"fenced: another agent registered machine id {self._machine_id} (epoch {owner} > ours {self.epoch}); "
            "this agent no longer writes to the registry. Two hosts sharing one id (a cloned image?) must be "
            "given their own (remove <state_dir>/machine-id and /etc/machine-id, then restart)."
        )
        log.error("registry write fenced", machine_id=self._machine_id, epoch=self.epoch, owner_epoch=owner)
        self._stopping.set()

    def start(self) -> None:
        """Beat every interval from now on (no-op when already running)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="heartbeat")

    def kick(self) -> None:
        """Beat soon instead of at the next interval (the phase changed, an event waits). Kicks within
        KICK_DELAY_S coalesce, and the beat stays out of the way of a restart that caused the change."""
        if self._kick_pending or self._task is None:
            return
        self._kick_pending = True

        def fire() -> None:
            self._kick_pending = False
            self._kicked = True
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

    async def halt(self) -> None:
        """Stop the beat loop now, cancelling a beat in flight (one against a hung Redis must not hold a
        shutdown); beat() and stop() still work afterwards."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def stop(self, deregister: bool = True) -> bool:
        """Stop beating and, by default, remove the record (bounded wait: shutdown never hangs on Redis). Once
        deregistered, no later beat writes the record again. True when the record was removed."""
        await self.halt()
        removed = False
        if deregister and self.epoch is not None and self.fenced_by is None:
            try:
                async with asyncio.timeout(DEREGISTER_TIMEOUT_S):
                    async with self._beating:
                        answer = await self._registry.deregister(
                            self._machine_id, self.epoch, self._instance, self._take_events()
                        )
                self._deregistered = True
                if answer.reply is Reply.FENCED:
                    log.warning("not deregistering: a newer agent owns this machine id", owner_epoch=answer.epoch)
                else:
                    removed = True
                    log.info("deregistered", machine_id=self._machine_id)
            except (RegistryError, TimeoutError) as exc:
                log.warning("could not deregister; the record expires by its TTL", error=str(exc) or "timeout")
        self.connected = False
        return removed
