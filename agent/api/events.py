"""Live events for operators: every stage, service and model event fanned out to the WebSocket and
server-sent-events subscribers, each with a bounded queue (a slow reader loses its oldest events, counted)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

#: Events kept per subscriber before the oldest are dropped.
QUEUE_SIZE = 1000


class Subscription:
    """One reader's queue; `dropped` counts what it lost by being slow."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=size)  # None: the end
        self.dropped = 0

    def offer(self, event: dict[str, Any] | None) -> None:
        """Queue without blocking the publisher; the oldest event goes when full."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
                self.dropped += 1
        self.queue.put_nowait(event)


class EventHub:
    """Publishers call `publish` from the event loop; readers iterate `subscribe()`."""

    def __init__(self, size: int = QUEUE_SIZE) -> None:
        self._size = size
        self._subscribers: set[Subscription] = set()

    @property
    def subscribers(self) -> int:
        """How many readers are attached."""
        return len(self._subscribers)

    def publish(self, event: dict[str, Any]) -> None:
        """Hand the event to every reader."""
        for subscription in list(self._subscribers):
            subscription.offer(event)

    def close(self) -> None:
        """End every reader's stream (the agent is stopping)."""
        for subscription in list(self._subscribers):
            subscription.offer(None)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        """Attach a reader for the duration of the block."""
        subscription = Subscription(self._size)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
