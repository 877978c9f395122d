"""Progress of one pull: bytes done and total per item and overall, lifecycle events, throttled progress events,
and the one-line bar shown on a terminal."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.statusview import format_pull

log = structlog.get_logger(__name__)
EventSink = Callable[[dict[str, Any]], None]
#: Progress events per item at most this often (plus every 10 %).
PROGRESS_INTERVAL_S = 1.0


class PullProgress:
    """Thread-safe counters (the pull runs in threads: sinks must be safe to call from any thread). Every event
    is logged; all but `model.progress` go to `sink` (the agent's event history, which ticks would flood), and
    the ticks go to `live` (subscribers of the event stream)."""

    def __init__(
        self,
        sink: EventSink | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        live: EventSink | None = None,
    ) -> None:
        self._sink = sink
        self._live = live
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._items: dict[str, dict[str, Any]] = {}
        self._started: float | None = None
        self._fetched = 0
        self.finished = False

    def planned(self, items: dict[str, tuple[int, int]], skipped: int, free_bytes: int) -> None:
        """`items`: name -> (size, bytes already in a partial) for everything that must be fetched."""
        with self._lock:
            self._started = self._monotonic()
            for name, (size, have) in items.items():
                self._items[name] = {"total": size, "done": have, "state": "queued", "last_tick": 0.0, "decile": 0}
        to_fetch = sum(size - have for size, have in items.values())
        self._emit("models.plan", items=len(items), skipped=skipped, bytes_to_fetch=to_fetch, free_bytes=free_bytes)

    def started(self, name: str, source: str, resumed: int) -> None:
        """An item began moving bytes."""
        with self._lock:
            self._items[name]["state"] = "downloading"
        self._emit("model.start", model=name, source=source, resumed_bytes=resumed)

    def advance(self, name: str, n: int) -> None:
        """`n` more bytes of `name` are on disk."""
        now = self._monotonic()
        with self._lock:
            item = self._items[name]
            item["done"] += n
            self._fetched += n
            decile = int(10 * item["done"] / item["total"]) if item["total"] else 10
            if now - item["last_tick"] < PROGRESS_INTERVAL_S and decile == item["decile"]:
                return
            item["last_tick"], item["decile"] = now, decile
            done, total = item["done"], item["total"]
            rate = self._rate_locked(now)
        log.info("model.progress", model=name, bytes=done, total=total, rate_bps=rate)
        if self._live is not None:
            self._live({"type": "model", "event": "model.progress", "model": name, "bytes": done, "total": total})

    def retry(self, name: str, reason: str, attempt: int) -> None:
        """A transient failure; the item will be tried again."""
        self._emit("model.retry", model=name, attempt=attempt, reason=reason)

    def ended(self, name: str, state: str, **fields: Any) -> None:
        """An item is verified and placed (`pulled`, `cached`), or `failed`."""
        with self._lock:
            if name in self._items:
                self._items[name]["state"] = state
                if state != "failed":
                    self._items[name]["done"] = self._items[name]["total"]
        self._emit("model.failed" if state == "failed" else "model.verified", model=name, state=state, **fields)

    def close(self, pulled: int, failed: int, duration_s: float) -> None:
        """The pull is over."""
        with self._lock:
            self.finished = True
            fetched = self._fetched
        rate = round(fetched / duration_s) if duration_s > 0 else 0
        self._emit("models.done", pulled=pulled, failed=failed, bytes=fetched, duration_s=duration_s, rate_bps=rate)

    def snapshot(self) -> dict[str, Any]:
        """For `emp-agent status`: bytes done and total, items done and total, current rate."""
        with self._lock:
            items = list(self._items.values())
            return {
                "bytes_done": sum(i["done"] for i in items),
                "bytes_total": sum(i["total"] for i in items),
                "items_done": sum(1 for i in items if i["state"] in ("pulled", "cached")),
                "items_failed": sum(1 for i in items if i["state"] == "failed"),
                "items_total": len(items),
                "rate_bps": self._rate_locked(self._monotonic()),
                "finished": self.finished,
            }

    @property
    def planned_yet(self) -> bool:
        """True once a plan was made."""
        return self._started is not None

    def _rate_locked(self, now: float) -> int:
        elapsed = now - self._started if self._started is not None else 0.0
        return round(self._fetched / elapsed) if elapsed > 0 else 0

    def _emit(self, name: str, **fields: Any) -> None:
        (log.warning if name in ("model.failed", "model.retry") else log.info)(name, **fields)
        if self._sink is not None:
            self._sink({"type": "model", "event": name, **fields})


def bar(snapshot: dict[str, Any], width: int = 30) -> str:
    """One terminal line: `[#########.....................] 1.2/4.0 GiB (30%) at 310 MB/s, 1/3 files`."""
    fraction = min(1.0, snapshot["bytes_done"] / snapshot["bytes_total"]) if snapshot["bytes_total"] else 1.0
    filled = int(width * fraction)
    return f"[{'#' * filled}{'.' * (width - filled)}] {format_pull(snapshot)}"
