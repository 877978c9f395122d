"""The ledger of live instances in the state dir, so an agent restarted after a crash (or an upgrade) can adopt
what the previous one left running, and stop what it cannot adopt (never two instances holding one port)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from agent.host.launcher import CREATE_TIME_SLACK_S, TAG_VARIABLE, members_of
from agent.statefile import read_json, write_json_atomic

log = structlog.get_logger(__name__)

SWEEP_GRACE_S = 5.0


@dataclass(frozen=True)
class Survivor:
    """A live instance left by a previous agent, verified by pid, start time and spawn tag."""

    name: str
    pid: int
    create_time: float
    tag: str
    spec_hash: str | None
    port: int | None


class ProcessLedger:
    """instance name -> {pid, create_time, tag, spec_hash, port}; written on every spawn and reap."""

    def __init__(self, path: Path) -> None:
        self._path = path
        loaded = read_json(path)
        self._entries: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}

    def spawned(
        self, name: str, pid: int, tag: str | None = None, spec_hash: str | None = None, port: int | None = None
    ) -> None:
        """Record a new process group leader, the spawn tag its descendants carry, and what it was started as."""
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._entries[name] = {"pid": pid, "create_time": created, "tag": tag, "spec_hash": spec_hash, "port": port}
        self._save()

    def survivor(self, name: str) -> Survivor | None:
        """The instance's process from the ledger when it is still alive and provably the one we recorded:
        same pid, same start time, and no other spawn tag in its environment."""
        entry = self._entries.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("tag"), str):
            return None
        leader = _matching(entry)
        if leader is None:
            return None
        with contextlib.suppress(psutil.AccessDenied):
            # Programs that rewrite their process title (valkey, nginx) overwrite their environment: a missing
            # tag proves nothing, a different one proves a different process; pid + start time decide.
            found = leader.environ().get(TAG_VARIABLE)
            if found is not None and found != entry["tag"]:
                return None
        port = entry.get("port")
        spec_hash = entry.get("spec_hash")
        return Survivor(
            name,
            leader.pid,
            float(entry["create_time"]),
            entry["tag"],
            spec_hash if isinstance(spec_hash, str) else None,
            port if isinstance(port, int) else None,
        )

    def names(self) -> list[str]:
        """Instances recorded (alive or not)."""
        return list(self._entries)

    def reaped(self, name: str) -> None:
        """Forget an instance whose processes are all gone."""
        if self._entries.pop(name, None) is not None:
            self._save()

    def sweep(self, grace_s: float = SWEEP_GRACE_S, keep: Iterable[str] = ()) -> list[str]:
        """Stop the processes a previous agent left behind, except the instances in `keep` (adopted, or started
        by this agent); returns the instance names that were found alive.

        A pid is only signalled when its create time matches the record, so a recycled pid is never hit.
        """
        kept = set(keep)
        leftovers: dict[str, list[psutil.Process]] = {}
        for name, entry in self._entries.items():
            if name in kept:
                continue
            leader = _matching(entry)
            tag = entry.get("tag") if isinstance(entry, dict) else None
            procs = [leader] if leader is not None else []
            with contextlib.suppress(psutil.Error):
                if leader is not None:
                    procs += leader.children(recursive=True)
            pgid = leader.pid if leader is not None else -1
            if isinstance(tag, str) or leader is not None:
                seen = {q.pid for q in procs}
                created = entry.get("create_time") if isinstance(entry.get("create_time"), float) else None
                found = members_of(pgid, tag if isinstance(tag, str) else None, since=created)
                procs += [p for p in found if p.pid not in seen]
            if procs:
                leftovers[name] = procs
        for name, procs in leftovers.items():
            log.warning("killing processes left by a previous agent", instance=name, pids=[p.pid for p in procs])
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.terminate()
        everything = [p for procs in leftovers.values() for p in procs]
        _, alive = psutil.wait_procs(everything, timeout=grace_s) if everything else ([], [])
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if alive:
            psutil.wait_procs(alive, timeout=grace_s)
        self._entries = {name: entry for name, entry in self._entries.items() if name in kept}
        self._save()
        return sorted(leftovers)

    def _save(self) -> None:
        try:
            # No fsync: the ledger describes live processes, which a power loss ends anyway; it sits on the
            # restart path, where an fsync would cost more than the rest of the restart.
            write_json_atomic(self._path, self._entries, durable=False)
        except OSError as exc:
            log.warning("cannot write the process ledger", path=str(self._path), error=str(exc))


def _matching(entry: dict[str, Any]) -> psutil.Process | None:
    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["create_time"])) > CREATE_TIME_SLACK_S:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None
