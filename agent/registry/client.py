"""Talking to Redis: write, refresh and remove the machine record; redis errors become RegistryError here."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Protocol, cast

import redis.asyncio as redis
from redis.exceptions import RedisError

from agent.errors import RegistryError
from agent.redact import redact_url
from agent.registry import keys

TIMEOUT_S = 5.0


class Registry(Protocol):
    """Where the machine record lives."""

    async def write(self, machine_id: str, record: dict[str, Any], ttl_s: int) -> int:
        """Write the record with a TTL and refresh the fleet index; returns the server time in ms."""
        ...

    async def remove(self, machine_id: str) -> None:
        """Delete the record and its fleet index entry."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


class RedisRegistry:
    """Registry on a Redis (or Valkey) server given by URL."""

    def __init__(self, url: str) -> None:
        self._shown = redact_url(url)
        self._client = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, decode_responses=True
        )

    async def write(self, machine_id: str, record: dict[str, Any], ttl_s: int) -> int:
        key = keys.machine_key(machine_id)
        try:
            seconds, micros = await self._client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            fields = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in record.items()}
            fields["last_heartbeat_ms"] = str(now_ms)
            # The capabilities are written only when their hash differs from the one Redis holds (first beat,
            # a change, or the record expired); every other beat carries the small fields alone.
            republish = "caps_hash" not in record or await self._client.hget(key, "caps_hash") != record["caps_hash"]
            if not republish:
                fields.pop("capabilities", None)
            async with self._client.pipeline(transaction=True) as pipe:
                if republish:
                    pipe.delete(key)
                pipe.hset(key, mapping=cast(Any, fields))  # redis-py's Mapping type is invariant in its key
                pipe.expire(key, ttl_s)
                pipe.zadd(keys.FLEET_INDEX, {machine_id: now_ms})
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._translate(exc) from None
        return now_ms

    async def remove(self, machine_id: str) -> None:
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(keys.machine_key(machine_id))
                pipe.zrem(keys.FLEET_INDEX, machine_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._translate(exc) from None

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    def _translate(self, exc: BaseException) -> RegistryError:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return RegistryError(f"{self._shown}: {type(exc).__name__}: {message}")
