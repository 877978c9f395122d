"""The bootstrap pipeline's journal when the bootstrap is cancelled (shutdown, drain)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from agent.bootstrap.pipeline import Pipeline


class Hangs:
    name, fatal, always_run = "prepare", True, False

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def run(self, ctx: Any) -> str:
        self.entered.set()
        await asyncio.Event().wait()
        return "never"


class After:
    name, fatal, always_run = "start_services", True, False

    async def run(self, ctx: Any) -> str:
        return "ran"


def test_a_cancelled_bootstrap_leaves_no_stage_running(tmp_path: Path) -> None:
    """The stage that was running is failed with the reason, the later ones skipped, and the journal says so."""
    events: list[dict[str, Any]] = []
    hangs = Hangs()
    pipeline = Pipeline([hangs, After()], tmp_path / "bootstrap.json", events.append)

    async def scenario() -> None:
        task = asyncio.create_task(pipeline.run(None))  # type: ignore[arg-type]
        await hangs.entered.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    assert [("failed", "cancelled: the agent is stopping or was drained"), ("skipped", None)] == [
        (r.state.value, r.error) for r in pipeline.records
    ]
    journal = json.loads((tmp_path / "bootstrap.json").read_text())
    assert ["failed", "skipped"] == [s["state"] for s in journal["stages"]]
