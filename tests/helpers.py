"""Test helpers: waiting on conditions with deadlines, never on bare sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)
        last = condition()
    return last


async def await_until(condition: Callable[[], T | Awaitable[T]], deadline_s: float = 20.0, what: str = "") -> T:
    """Async twin of wait_until."""
    timeout = deadline_s
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        value = await result if asyncio.iscoroutine(result) else result
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.05)
