"""The model pull as a child process: the agent never holds the HTTP client, the transfer buffers or the hashing
threads, a stalled transfer is ended by killing the child, and hashing never competes with the event loop.

The agent's side is `PullWorker`. The child (`python -m agent.pull.worker`) reads one JSON request on stdin and
writes JSON lines on stdout: `{"event": …}` and `{"live": …}` as the pull goes, `{"progress": …}` twice a second,
then `{"result": …}` or `{"error": …}`. Its log lines go to the agent's stderr (the journal under systemd). This
module imports nothing heavy until the child runs `main`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import ModelPullError
from agent.pull.status import ModelStatus

if TYPE_CHECKING:
    from agent.profile import ModelSpec
    from agent.settings import Settings

log = structlog.get_logger(__name__)
EventSink = Callable[[dict[str, Any]], None]
#: The settings the pull reads; only these travel to the child (no Redis URL, no token file).
PULL_SETTINGS = frozenset({"ca_bundle", "model_root", "state_dir", "hf_endpoint", "civitai_endpoint"})
#: How often the child reports its progress.
PROGRESS_INTERVAL_S = 0.5
#: After SIGTERM the child stops its transfers at their next chunk; past this (a read the server holds back) it
#: is killed, which the partials are made to survive.
STOP_TIMEOUT_S = 3.0
#: The longest line the child may write (a result for thousands of models).
LINE_LIMIT = 16 * 1024 * 1024
PR_SET_PDEATHSIG = 1


class RemoteProgress:
    """The last progress the child reported: what `emp-agent status` and the start-timeout extension read."""

    def __init__(self) -> None:
        self._snapshot: dict[str, Any] | None = None

    @property
    def planned_yet(self) -> bool:
        """True once the child has planned the pull."""
        return self._snapshot is not None

    def snapshot(self) -> dict[str, Any]:
        """Bytes and items done and total, rate, finished (as `PullProgress.snapshot`)."""
        assert self._snapshot is not None, "no progress before the plan"
        return dict(self._snapshot)

    def update(self, snapshot: dict[str, Any]) -> None:
        """A report from the child."""
        self._snapshot = snapshot


class PullWorker:
    """Runs one pull at a time in a child process and relays what it says. `sink` gets lifecycle events, `live`
    the progress ticks; both are called on the event loop."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        sink: EventSink | None = None,
        live: EventSink | None = None,
        context: Mapping[str, str] | None = None,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        self._settings = settings
        self._environ = dict(environ)
        self._sink = sink
        self._live = live
        self._context = dict(context or {})
        self._stop_timeout_s = stop_timeout_s
        self.progress = RemoteProgress()
        self.pid: int | None = None

    def request(self, models: Mapping[str, ModelSpec]) -> dict[str, Any]:
        """What the child is sent: the pull's settings, the models, how to log."""
        fields = {name for name in type(self._settings).model_fields if name.startswith("pull_")} | PULL_SETTINGS
        return {
            "settings": self._settings.model_dump(mode="json", include=fields),
            "models": {name: spec.model_dump(mode="json") for name, spec in models.items()},
            "log": {"level": self._settings.log_level, "format": self._settings.log_format.value},
            "context": self._context,
        }

    async def pull(self, models: Mapping[str, ModelSpec]) -> dict[str, ModelStatus]:
        """Every model present and verified, or the reason it is not. Raises ModelPullError when the pull as a
        whole cannot run (no disk space for the plan, the child died). Cancelling stops the child (SIGTERM, then
        SIGKILL after the stop timeout); partials stay for the next run."""
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "agent.pull.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=self._environ,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise ModelPullError(f"cannot start the pull worker: {exc.strerror or exc}") from None
        self.pid = child.pid
        try:
            return await self._converse(child, json.dumps(self.request(models)).encode())
        except BaseException:
            await self._stop(child)
            raise
        finally:
            self.pid = None

    async def _converse(self, child: asyncio.subprocess.Process, request: bytes) -> dict[str, ModelStatus]:
        assert child.stdin is not None
        assert child.stdout is not None
        with contextlib.suppress(ConnectionError):
            child.stdin.write(request)
            await child.stdin.drain()
            child.stdin.close()
        answer: dict[str, ModelStatus] | None = None
        error: str | None = None
        async for raw in child.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                log.warning("pull worker wrote a line that is not JSON", line=raw[:200].decode(errors="replace"))
                continue
            if "event" in message and self._sink is not None:
                self._sink(message["event"])
            elif "live" in message and self._live is not None:
                self._live(message["live"])
            elif "progress" in message:
                self.progress.update(message["progress"])
            elif "result" in message:
                answer = {name: ModelStatus.from_dict(status) for name, status in message["result"].items()}
            elif "error" in message:
                error = str(message["error"])
        code = await child.wait()
        if error is not None:
            raise ModelPullError(error)
        if answer is None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
            raise ModelPullError(f"the pull worker {how} before it answered (see the agent's log)")
        return answer

    async def _stop(self, child: asyncio.subprocess.Process) -> None:
        """SIGTERM, then SIGKILL at the stop timeout, or at once when this wait is itself cancelled."""
        if child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(child.wait()), self._stop_timeout_s)
            return
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            raise
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


def main() -> int:
    """The child: one pull, as the request on stdin says."""
    from agent.logconfig import configure_logging
    from agent.profile import ModelSpec, token_env_names
    from agent.pull.puller import open_puller
    from agent.redact import SecretMasker, url_secrets
    from agent.settings import Settings

    _die_with_parent()
    request = json.load(sys.stdin)
    settings = Settings.model_validate(request["settings"])
    models = {name: ModelSpec.model_validate(spec) for name, spec in request["models"].items()}
    masker = SecretMasker()
    for spec in models.values():
        for secret in url_secrets(spec.url):
            masker.add(secret)
    for name in token_env_names(models):
        if os.environ.get(name):
            masker.add(os.environ[name])
    configure_logging(request["log"]["level"], request["log"]["format"], masker)
    structlog.contextvars.bind_contextvars(**request.get("context", {}))

    out = threading.Lock()
    gone = threading.Event()  # the agent stopped reading: stop too

    def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            return
        try:
            with out:
                sys.stdout.write(json.dumps(message) + "\n")
                sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            gone.set()
            puller.cancel()

    puller, transport = open_puller(
        settings, os.environ, sink=lambda event: send({"event": event}), live=lambda event: send({"live": event})
    )
    signal.signal(signal.SIGTERM, lambda *_: puller.cancel())
    done = threading.Event()

    def report() -> None:
        while not done.wait(PROGRESS_INTERVAL_S):
            if puller.progress.planned_yet:
                send({"progress": puller.progress.snapshot()})

    reporter = threading.Thread(target=report, name="emp-pull-progress", daemon=True)
    reporter.start()
    try:
        statuses = puller.pull(models)
    except ModelPullError as exc:
        send({"error": str(exc)})
        return 1
    finally:
        done.set()
        reporter.join()
        transport.close()
    if puller.progress.planned_yet:
        send({"progress": puller.progress.snapshot()})
    send({"result": {name: status.to_dict() for name, status in statuses.items()}})
    return 1 if gone.is_set() else 0


def _die_with_parent() -> None:
    """SIGKILL this child when the agent dies (a crash, kill -9): a restarted agent starts its own pull, and an
    orphan would hold the partials' locks until its transfers time out."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before the request above took effect
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
