"""Stage prepare: the profile's preparation commands, each once, skipped when what it `creates` exists."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from agent.bootstrap.context import BootstrapContext
from agent.errors import SpawnError, StageFailed
from agent.host.launcher import ProcessLauncher
from agent.host.logpipes import LogPipe, LogSpec
from agent.supervisor.instances import declared_env

TAIL_LINES = 5


class Prepare:
    """Runs steps in declaration order; output goes to <log_dir>/prepare-<step>.log."""

    name = "prepare"
    fatal = True
    always_run = False

    def __init__(self, launcher: ProcessLauncher | None = None) -> None:
        self._launcher = launcher or ProcessLauncher()

    async def run(self, ctx: BootstrapContext) -> str:
        values = {
            "model_root": str(ctx.paths.model_root),
            "state_dir": str(ctx.paths.state_dir),
            "log_dir": str(ctx.paths.log_dir),
            "python": sys.executable,
            "machine_id": ctx.machine_id,
        }
        ran, skipped = 0, 0
        for name, step in ctx.profile.prepare.items():
            creates = Path(step.creates.format_map(values)) if step.creates else None
            if creates is not None and await asyncio.to_thread(creates.exists):
                skipped += 1
                continue
            env = declared_env(ctx.paths, ctx.profile.env, step.env, values)
            log_path = ctx.paths.log_dir / f"prepare-{name}.log"
            argv = [arg.format_map(values) for arg in step.command]
            cwd = step.cwd.format_map(values) if step.cwd else None
            try:
                output = await self._launcher.open_log(LogSpec(log_path))
            except SpawnError as exc:
                raise StageFailed(self.name, f"step {name}: {exc}") from None
            try:
                code = await self._run_step(name, output, argv, env, cwd, step.timeout_s)
            finally:
                await asyncio.shield(output.close())  # every line of the step is in the file before we read it
            if code != 0:
                raise StageFailed(self.name, f"step {name}: exited with {code}; {_tail(log_path)}")
            if creates is not None and not await asyncio.to_thread(creates.exists):
                raise StageFailed(self.name, f"step {name}: succeeded but did not create {step.creates}")
            ran += 1
        return f"{ran} step(s) run, {skipped} already done"

    async def _run_step(
        self, name: str, output: LogPipe, argv: list[str], env: dict[str, str], cwd: str | None, timeout_s: float
    ) -> int:
        output.write_line(f"=== emp-agent: prepare step {name}")
        try:
            child = await self._launcher.spawn(argv, env, cwd, output)
        except SpawnError as exc:
            raise StageFailed(self.name, f"step {name}: {exc}") from None
        try:
            return await asyncio.wait_for(child.wait(), timeout_s)
        except TimeoutError:
            child.kill_tree()
            await child.wait()
            raise StageFailed(self.name, f"step {name}: timed out after {timeout_s:g}s") from None
        except asyncio.CancelledError:  # shutdown during the step: leave nothing running
            child.kill_tree()
            await asyncio.shield(child.wait())
            raise


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-TAIL_LINES:]
    except OSError:
        return f"see {path}"
    return f"last output: {' | '.join(lines)} (full log: {path})" if lines else f"no output ({path})"
