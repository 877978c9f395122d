"""One pull of a profile's models: plan everything first (present, cached, to fetch, disk space), then fetch with
bounded concurrency, verify, ingest and publish."""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from agent.errors import ModelPullError
from agent.host.download import HttpTransport, Transport
from agent.host.facts import existing_ancestor
from agent.profile import ModelSpec
from agent.pull.partial import Partial
from agent.pull.progress import EventSink, PullProgress
from agent.pull.source import Endpoints, Source, resolve
from agent.pull.status import ModelStatus
from agent.pull.store import ModelStore
from agent.pull.transfer import ConnectionLimits, Transfer, TransferConfig, probe_with_retries
from agent.redact import redact_source
from agent.settings import Settings

log = structlog.get_logger(__name__)
MIB = 1024 * 1024


@dataclass(frozen=True)
class PullConfig:
    """Concurrency, chunking, retries and disk margin of a pull (from settings)."""

    files: int = 4
    connections_total: int = 16
    connections_per_host: int = 8
    transfer: TransferConfig = field(default_factory=TransferConfig)
    disk_margin_bytes: int = 1024 * MIB
    endpoints: Endpoints = field(default_factory=Endpoints)

    @classmethod
    def from_settings(cls, settings: Settings) -> PullConfig:
        """The pull_* settings."""
        return cls(
            files=settings.pull_files,
            connections_total=settings.pull_connections,
            connections_per_host=settings.pull_connections_per_host,
            transfer=TransferConfig(
                connections=settings.pull_connections_per_host,
                chunk_bytes=settings.pull_chunk_mib * MIB,
                ranged_min_bytes=settings.pull_ranged_min_mib * MIB,
                attempts=settings.pull_attempts,
                retry_wait_s=settings.pull_retry_wait_s,
                deadline_s=settings.pull_deadline_s,
                parallel_below_bps=settings.pull_parallel_below_mbps * 1e6,
            ),
            disk_margin_bytes=settings.pull_disk_margin_mib * MIB,
            endpoints=Endpoints(settings.hf_endpoint, settings.civitai_endpoint),
        )


@dataclass
class PlanItem:
    """One model and what must happen to it."""

    name: str
    spec: ModelSpec
    source: Source | None
    action: str  # "present", "cached", "fetch", "failed"
    size: int | None = None
    have: int = 0
    error: str | None = None


class ModelPuller:
    """Owns the connection limits and the progress of pulls; `cancel()` stops them at the next chunk."""

    def __init__(
        self,
        store: ModelStore,
        transport: Transport,
        config: PullConfig,
        environ: Mapping[str, str],
        sink: EventSink | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        live: EventSink | None = None,
    ) -> None:
        self.store = store
        self._transport = transport
        self._config = config
        self._environ = environ
        self._sink = sink
        self._monotonic = monotonic
        self._limits = ConnectionLimits(config.connections_total, config.connections_per_host)
        self._cancel = threading.Event()
        self.progress = PullProgress(sink, monotonic, live)

    def cancel(self) -> None:
        """Stop every transfer at its next chunk (partials are kept for the next run)."""
        self._cancel.set()

    def plan(self, models: Mapping[str, ModelSpec]) -> list[PlanItem]:
        """Resolve every item and decide what to do with it, before any model byte moves. An unusable item (a 404,
        an unset token variable) is planned as failed; a disk that cannot hold the plan fails the whole pull."""
        items = []
        for name, spec in models.items():
            try:
                items.append(self._plan_item(name, spec))
            except (ModelPullError, OSError) as exc:  # this item fails; the others are still fetched
                reason = str(exc) if isinstance(exc, ModelPullError) else _os_reason(spec.dest, exc)
                items.append(PlanItem(name, spec, None, "failed", error=reason))
                self.progress.ended(name, "failed", dest=spec.dest, error=reason)
        fetch = [i for i in items if i.action == "fetch"]
        needed = sum((i.size or 0) - i.have for i in fetch)
        free = shutil.disk_usage(existing_ancestor(self.store.root)).free
        if fetch and needed + self._config.disk_margin_bytes > free:
            raise ModelPullError(
                f"not enough disk space under {self.store.root}: {len(fetch)} file(s) need {needed // MIB} MiB "
                f"more (+{self._config.disk_margin_bytes // MIB} MiB margin), {free // MIB} MiB free; "
                "nothing was downloaded"
            )
        self.progress.planned(
            {i.name: (i.size or 0, i.have) for i in fetch}, skipped=len(items) - len(fetch), free_bytes=free
        )
        return items

    def _plan_item(self, name: str, spec: ModelSpec) -> PlanItem:
        source = resolve(spec, self._config.endpoints, self._environ)
        self.store.destination(spec.dest)
        self.store.clean_temp_links(spec.dest)
        if self.store.is_placed(spec.dest, spec.sha256, spec.size):
            return PlanItem(name, spec, source, "present", spec.size)
        if self.store.has_object(spec.sha256, spec.size):
            return PlanItem(name, spec, source, "cached", spec.size)
        size = spec.size
        if size is None and source.is_file:
            try:
                size = source.local_path.stat().st_size
            except OSError as exc:
                raise ModelPullError(f"{source.shown}: {exc.strerror or exc}") from None
        elif size is None:
            size = probe_with_retries(self._transport, source, self._limits, self._config.transfer, self._cancel).size
        partial = Partial(self.store.partial_dir, spec.sha256, source.shown)
        have = partial.covered() if partial.validator and partial.validator.size == size else 0
        partial.close()
        return PlanItem(name, spec, source, "fetch", size, have)

    def pull(self, models: Mapping[str, ModelSpec]) -> dict[str, ModelStatus]:
        """Plan, then put every model in place; one status per model (failed ones carry the reason)."""
        started = self._monotonic()
        items = self.plan(models)
        results: dict[str, ModelStatus] = {}
        todo: queue.Queue[PlanItem] = queue.Queue()
        for item in sorted(items, key=lambda i: -(i.size or 0)):  # the largest first: no long tail at the end
            todo.put(item)

        def worker() -> None:
            while True:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                results[item.name] = self._pull_one(item)

        threads = [
            threading.Thread(target=worker, name="emp-pull-file", daemon=True)
            for _ in range(max(1, min(self._config.files, len(items))))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pulled = sum(1 for r in results.values() if r.state == "pulled")
        failed = sum(1 for r in results.values() if r.state == "failed")
        self.progress.close(pulled, failed, round(self._monotonic() - started, 3))
        return {name: results[name] for name in models}

    def _pull_one(self, item: PlanItem) -> ModelStatus:
        spec = item.spec
        shown = item.source.shown if item.source else redact_source(spec.url)
        status = ModelStatus(item.name, spec.dest, spec.sha256, spec.size, "verified", shown)
        if item.action == "present":
            return status
        if item.source is None:
            status.state, status.error = "failed", item.error
            return status
        started = self._monotonic()
        try:
            with self.store.lock(spec.sha256, self._cancel.wait):
                if self.store.is_placed(spec.dest, spec.sha256, spec.size):
                    status.state = "verified"
                elif self.store.has_object(spec.sha256, spec.size):
                    self.store.publish(spec.sha256, spec.dest)
                    status.state = "cached"
                else:
                    status.bytes_fetched = self._fetch(item, item.source)
                    self.store.publish(spec.sha256, spec.dest)
                    status.state = "pulled"
        except ModelPullError as exc:
            status.state, status.error = "failed", str(exc)
        except OSError as exc:  # read-only root, a file where a directory must be, a planted symlink...
            status.state, status.error = "failed", _os_reason(spec.dest, exc)
        except Exception as exc:  # a bug or an unexpected OS error must fail this item, not hang the pull
            log.exception("model pull crashed", model=item.name)
            status.state, status.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        status.duration_s = round(self._monotonic() - started, 3)
        if item.action == "fetch" or status.state == "failed":
            fields = {"error": status.error} if status.error else {"bytes": status.bytes_fetched}
            self.progress.ended(item.name, status.state, dest=spec.dest, duration_s=status.duration_s, **fields)
        return status

    def _fetch(self, item: PlanItem, source: Source) -> int:
        """Download into the partial, verify, ingest into the cache; the bytes that moved."""
        spec = item.spec
        for fresh_retry in (False, True):
            partial = Partial(self.store.partial_dir, spec.sha256, source.shown, self._monotonic)
            counter = _Counter(item.name, self.progress)
            transfer = Transfer(
                self._transport,
                source,
                partial,
                self._limits,
                self._config.transfer,
                spec.size or item.size,
                self._cancel,
                counter.add,
                counter.retry,
                self._monotonic,
            )
            self.progress.started(item.name, source.shown, partial.covered())
            try:
                digest = transfer.run()
            except BaseException:
                partial.close()
                if partial.covered() == 0:
                    partial.remove()  # nothing worth resuming: leave no empty part file behind
                raise
            partial.close()
            if digest == spec.sha256:
                self.store.ingest(partial.path, spec.sha256)
                partial.remove()
                return counter.bytes
            partial.remove()
            if transfer.resumed_bytes and not fresh_retry:
                log.warning("verification failed after a resume; downloading once more from byte 0", model=item.name)
                continue
            raise ModelPullError(
                f"{source.shown}: sha256 mismatch: expected {spec.sha256}, got {digest} "
                f"({transfer.size} bytes); nothing was placed"
            )
        raise AssertionError("unreachable")


class _Counter:
    """Bytes moved by one transfer, forwarded to the pull's progress."""

    def __init__(self, name: str, progress: PullProgress) -> None:
        self._name = name
        self._progress = progress
        self._lock = threading.Lock()
        self.bytes = 0

    def add(self, n: int) -> None:
        with self._lock:  # called from every range thread
            self.bytes += n
        self._progress.advance(self._name, n)

    def retry(self, reason: str, attempt: int) -> None:
        self._progress.retry(self._name, reason, attempt)


def open_puller(
    settings: Settings,
    environ: Mapping[str, str],
    sink: EventSink | None = None,
    live: EventSink | None = None,
) -> tuple[ModelPuller, HttpTransport]:
    """A puller wired to the real network and disk as the settings say; close the transport when done. The
    sinks are called from the pull's threads."""
    transport = HttpTransport(
        settings.ca_bundle,
        connect_timeout_s=settings.pull_connect_timeout_s,
        stall_timeout_s=settings.pull_stall_timeout_s,
        max_connections=settings.pull_connections,
    )
    store = ModelStore(settings.model_root, settings.state_dir / "models.json")
    config = PullConfig.from_settings(settings)
    return ModelPuller(store, transport, config, environ, sink, live=live), transport


def _os_reason(dest: str, exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{dest}: cannot write under the model root: {exc.strerror or exc}{where}"
