"""Talking to Redis through the emp_v1 function library: register, heartbeat, deregister (each one round trip);
redis errors become RegistryError here."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any, Protocol

import structlog
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from agent.errors import RegistryError
from agent.redact import redact_url
from agent.registry import keys
from agent.registry.connection import open_client, translate
from agent.registryurl import TlsFiles

log = structlog.get_logger(__name__)
LIBRARY = resources.files("agent.registry").joinpath("library.lua").read_text(encoding="utf-8")
#: The library's revision, as its source declares it: an agent loads its library over any older one.
REVISION = int(re.search(r"^local REVISION = (\d+)$", LIBRARY, re.MULTILINE).group(1))  # type: ignore[union-attr]
#: Events kept in each machine's stream (approximately: XADD MAXLEN ~).
STREAM_MAXLEN = 1000
#: How long a machine's event stream outlives its last registration.
STREAM_TTL_MS = 7 * 24 * 3600 * 1000


class Reply(StrEnum):
    """What the server said to a heartbeat or deregistration."""

    OK = "OK"
    NOT_REGISTERED = "NOT_REGISTERED"  # the record is missing, expired or older than ours: register again
    FENCED = "FENCED"  # a newer registration (epoch) by another agent owns this machine id: stop writing
    ADOPT = "ADOPT"  # a newer epoch taken by this very agent (a registration that arrived late): use it
    CAPS_NEEDED = "CAPS_NEEDED"  # the stored capabilities are not the ones caps_hash names: send them


@dataclass(frozen=True)
class Answer:
    """The reply, the epoch that owns the record (ours, or the newer one for FENCED), and the server's time."""

    reply: Reply
    epoch: int
    now_ms: int = 0


@dataclass(frozen=True)
class Beat:
    """One heartbeat: who sends it (machine, epoch, agent instance), the fields, the events, the status message."""

    machine_id: str
    epoch: int
    instance: str
    fields: dict[str, str]
    ttl_s: int
    events: list[str]
    status: tuple[str, str] | None = None  # (channel, message) of the original system's machine status


class Registry(Protocol):
    """Where the machine record lives."""

    async def register(self, machine_id: str, fields: dict[str, str], ttl_s: int, events: list[str]) -> Answer:
        """Create the record under a new epoch (returned as the answer's value)."""
        ...

    async def heartbeat(self, beat: Beat) -> Answer:
        """Refresh the record if the beat's epoch still owns it, append events, publish the status message; one
        round trip."""
        ...

    async def deregister(self, machine_id: str, epoch: int, instance: str, events: list[str]) -> Answer:
        """Delete the record if `epoch` still owns it, and the fleet index entry."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


class RedisRegistry:
    """Registry on a Redis (or Valkey) server, Sentinel-managed master or Cluster, given by URL."""

    def __init__(self, url: str, tls: TlsFiles | None = None) -> None:
        self._shown = redact_url(url)
        self._client = open_client(url, tls)
        self._loaded = False

    async def _ensure_library(self, force: bool = False) -> None:
        """Load our function library unless the server already holds this revision or a newer one."""
        if self._loaded and not force:
            return
        try:
            revision = int(await self._client.fcall("emp_v1_revision", 0))
        except ResponseError as exc:
            if "unknown command" in str(exc).lower():
                raise RegistryError(f"{self._shown}: the registry needs Redis 7.0 or newer (functions)") from None
            revision = 0
        if revision < REVISION:
            await self._client.function_load(LIBRARY, replace=True)
        self._loaded = True

    async def _call(self, build: Any) -> list[Any]:
        """Run a pipeline built by `build(pipe)`, loading the library first, and once more if the server lost it.
        The first command's failure raises RegistryError; a later one's is logged (the first already took
        effect, and re-sending its events would duplicate them)."""
        for attempt in (1, 2):
            try:
                await self._ensure_library(force=attempt == 2)
                async with self._client.pipeline(transaction=False) as pipe:
                    build(pipe)
                    results = list(await pipe.execute(raise_on_error=False))
                if isinstance(results[0], Exception):
                    raise results[0]
                for extra in results[1:]:
                    if isinstance(extra, Exception):
                        log.warning("registry: a secondary write failed", error=str(translate(self._shown, extra)))
                return results
            except ResponseError as exc:
                if attempt == 1 and "function not found" in str(exc).lower():
                    continue  # a restarted server without persistence: load and retry once
                raise translate(self._shown, exc) from None
            except (RedisError, RedisClusterException, OSError, ValueError, TypeError) as exc:
                raise translate(self._shown, exc) from None
        raise AssertionError("unreachable")

    async def register(self, machine_id: str, fields: dict[str, str], ttl_s: int, events: list[str]) -> Answer:
        record, counter, stream = keys.machine_key(machine_id), keys.epoch_key(machine_id), keys.events_key(machine_id)
        args = [json.dumps(fields), ttl_s * 1000, STREAM_MAXLEN, STREAM_TTL_MS, *events]

        def build(pipe: Any) -> None:
            pipe.fcall("emp_v1_register", 3, record, counter, stream, *args)
            pipe.fcall("emp_v1_index", 1, keys.FLEET_INDEX, machine_id, "seen")

        epoch, now = (await self._call(build))[0]
        return Answer(Reply.OK, int(epoch), int(now))

    async def heartbeat(self, beat: Beat) -> Answer:
        record, stream = keys.machine_key(beat.machine_id), keys.events_key(beat.machine_id)
        channel, message = beat.status or ("", "")
        args = [
            str(beat.epoch),
            beat.instance,
            json.dumps(beat.fields),
            beat.ttl_s * 1000,
            STREAM_MAXLEN,
            STREAM_TTL_MS,
            channel,
            message,
            *beat.events,
        ]

        def build(pipe: Any) -> None:
            pipe.fcall("emp_v1_heartbeat", 2, record, stream, *args)
            pipe.fcall("emp_v1_index", 1, keys.FLEET_INDEX, beat.machine_id, "seen")

        reply, value = (await self._call(build))[0]
        if reply == Reply.OK:
            return Answer(Reply.OK, beat.epoch, int(value))
        return Answer(Reply(reply), int(value))

    async def deregister(self, machine_id: str, epoch: int, instance: str, events: list[str]) -> Answer:
        record, stream = keys.machine_key(machine_id), keys.events_key(machine_id)
        args = [str(epoch), instance, STREAM_MAXLEN, STREAM_TTL_MS, *events]

        def build(pipe: Any) -> None:
            pipe.fcall("emp_v1_deregister", 2, record, stream, *args)

        reply, value = (await self._call(build))[0]
        answer = Answer(Reply(reply), int(value))
        if answer.reply is Reply.OK:
            await self._call(lambda pipe: pipe.fcall("emp_v1_index", 1, keys.FLEET_INDEX, machine_id, "gone"))
        return answer

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
