"""Running stages in order with state, timing and reasons, persisted to a journal in the state dir."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.bootstrap.context import BootstrapContext
from agent.errors import AgentError, StageFailed
from agent.statefile import write_json_atomic
from agent.supervisor.service import EventSink, iso_now

log = structlog.get_logger(__name__)


class StageState(StrEnum):
    """Where one stage is."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class Stage(Protocol):
    """One step of the bootstrap.

    `fatal`: a failure makes the machine `failed` and skips the later stages (except `always_run` ones);
    a non-fatal failure makes it `degraded` and the pipeline goes on.
    """

    name: str
    fatal: bool
    always_run: bool

    async def run(self, ctx: BootstrapContext) -> str:
        """Do the work; return a one-line detail. Raise AgentError to fail."""
        ...


@dataclass
class StageRecord:
    """A stage as status shows it."""

    name: str
    state: StageState = StageState.PENDING
    started_at: str | None = None
    duration_s: float | None = None
    detail: str | None = None
    error: str | None = None
    fatal: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        data = asdict(self)
        data["state"] = self.state.value
        return data


class Pipeline:
    """Runs its stages once, in order."""

    def __init__(
        self,
        stages: Sequence[Stage],
        journal: Path,
        on_event: EventSink,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stages = list(stages)
        self._journal = journal
        self._on_event = on_event
        self._monotonic = monotonic
        self.records = [StageRecord(stage.name, fatal=stage.fatal) for stage in self._stages]
        self.finished = False

    def fatal_failure(self) -> StageRecord | None:
        """The first fatal stage that failed, if any."""
        return next((r for r in self.records if r.state is StageState.FAILED and r.fatal), None)

    async def run(self, ctx: BootstrapContext) -> bool:
        """Run every stage; True when no fatal stage failed."""
        self._persist()
        for stage, record in zip(self._stages, self.records, strict=True):
            if self.fatal_failure() is not None and not stage.always_run:
                self._set(record, StageState.SKIPPED, detail="skipped: an earlier stage failed")
                continue
            record.started_at = iso_now()
            self._set(record, StageState.RUNNING)
            started = self._monotonic()
            try:
                detail = await stage.run(ctx)
            except asyncio.CancelledError:  # shutdown or drain: the journal must not say "running" forever
                record.duration_s = round(self._monotonic() - started, 3)
                self._set(record, StageState.FAILED, error="cancelled: the agent is stopping or was drained")
                for later in self.records[self.records.index(record) + 1 :]:
                    self._set(later, StageState.SKIPPED, detail="skipped: the bootstrap was cancelled")
                raise
            except Exception as exc:  # every failure is recorded; a bug in a stage must not hang the boot
                if isinstance(exc, StageFailed):
                    reason = exc.reason
                elif isinstance(exc, AgentError):
                    reason = str(exc)
                else:
                    reason = f"internal error: {type(exc).__name__}: {exc}"
                if not isinstance(exc, AgentError):
                    log.exception("stage crashed", stage=stage.name)
                record.duration_s = round(self._monotonic() - started, 3)
                self._set(record, StageState.FAILED, error=reason)
                log.error("stage failed", stage=stage.name, error=reason, fatal=stage.fatal)
                if not stage.fatal:
                    ctx.degraded[f"stage {stage.name}"] = reason
                continue
            record.duration_s = round(self._monotonic() - started, 3)
            self._set(record, StageState.DONE, detail=detail)
            log.info("stage done", stage=stage.name, duration_s=record.duration_s, detail=detail)
        self.finished = True
        self._persist()
        return self.fatal_failure() is None

    def _set(self, record: StageRecord, state: StageState, detail: str | None = None, error: str | None = None) -> None:
        old = record.state
        record.state = state
        if detail is not None:
            record.detail = detail
        if error is not None:
            record.error = error
        event: dict[str, Any] = {
            "type": "stage",
            "stage": record.name,
            "from": old.value,
            "to": state.value,
            "at": iso_now(),
        }
        if error:
            event["reason"] = error
        self._on_event(event)
        self._persist()

    def _persist(self) -> None:
        try:
            write_json_atomic(self._journal, {"finished": self.finished, "stages": [r.to_dict() for r in self.records]})
        except OSError as exc:
            log.warning("cannot write the bootstrap journal", path=str(self._journal), error=str(exc))
