"""Host profiles: TOML files with `extends`, validated into frozen pydantic models."""

from __future__ import annotations

import re
import signal
import string
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError, Problem

#: Placeholders a service or preparation step may use; they are filled per instance.
PLACEHOLDERS = frozenset(
    {
        "port",
        "gpu",
        "gpu_uuid",
        "slot",
        "instance",
        "service",
        "model_root",
        "state_dir",
        "log_dir",
        "python",
        "machine_id",
    }
)
GPU_PLACEHOLDERS = frozenset({"gpu", "gpu_uuid"})
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RestartPolicy(StrEnum):
    """When an exited service is started again."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class ProbeKind(StrEnum):
    """How readiness of a service instance is decided."""

    HTTP = "http"
    TCP = "tcp"
    UNIX = "unix"
    COMMAND = "command"
    NONE = "none"


class RestartSpec(_Frozen):
    """Restart policy: backoff, crash-loop limit and recovery from FATAL."""

    policy: RestartPolicy = RestartPolicy.ALWAYS
    expected_exit_codes: list[int] = Field(default_factory=lambda: [0])
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    backoff_factor: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.2, ge=0, le=1)
    crash_loop_limit: int = Field(default=8, ge=1, description="Consecutive failures before FATAL.")
    fatal_retry_s: float | None = Field(default=300.0, gt=0, description="Retry FATAL after this; None: never.")
    healthy_reset_s: float = Field(default=30.0, ge=0, description="Ready this long resets the failure count.")


class ReadinessSpec(_Frozen):
    """Readiness probe; the instance is RUNNING only once it passes."""

    kind: ProbeKind = ProbeKind.NONE
    path: str = "/"
    url: str | None = None
    socket: str | None = None
    command: list[str] | None = None
    expect_status: list[int] = Field(default_factory=lambda: [200])
    interval_s: float = Field(default=0.5, gt=0)
    timeout_s: float = Field(default=120.0, gt=0, description="Start timeout: ready within this or failed.")
    start_seconds: float = Field(default=1.0, ge=0, description="For kind none: alive this long means ready.")

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ReadinessSpec:
        if self.kind is ProbeKind.UNIX and not self.socket:
            raise ValueError("kind 'unix' needs 'socket'")
        if self.kind is ProbeKind.COMMAND and not self.command:
            raise ValueError("kind 'command' needs 'command'")
        return self


class ServiceSpec(_Frozen):
    """A supervised service; expanded into one instance per GPU (or CPU slot) when per_gpu is set."""

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    inherit_env: list[str] = Field(default_factory=list, description="Agent variables passed through by name.")
    cwd: str | None = None
    per_gpu: bool = False
    instances: int = Field(default=1, ge=1, le=64, description="Instances (per GPU when per_gpu).")
    port: int | None = Field(default=None, ge=1, le=65535, description="Base port; instance i asks for port+i.")
    readiness: ReadinessSpec = Field(default_factory=ReadinessSpec)
    restart: RestartSpec = Field(default_factory=RestartSpec)
    stop_signal: str = "SIGTERM"
    stop_timeout_s: float = Field(default=30.0, gt=0)
    capabilities: list[str] = Field(default_factory=list, description="Job-facing service names.")
    depends_on: list[str] = Field(default_factory=list)
    required: bool = Field(default=True, description="A required service that is down makes the host degraded.")

    @field_validator("stop_signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        if name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {value!r}")
        return name


class ModelSpec(_Frozen):
    """A model file to place under the model root, pinned by sha256."""

    url: str
    dest: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(default=None, ge=0)

    @field_validator("url")
    @classmethod
    def _supported_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in {"http", "https", "file"}:
            raise ValueError("scheme must be http, https or file")
        return value

    @field_validator("dest")
    @classmethod
    def _relative_dest(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not value.strip():
            raise ValueError("must be a relative path inside the model root (no '..')")
        return value


class PrepareStep(_Frozen):
    """A command run once before services start; skipped when `creates` already exists."""

    command: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=1800.0, gt=0)
    creates: str | None = None


class GpuRequirement(_Frozen):
    """What the host must have for this profile to be fully served."""

    min_count: int = Field(default=0, ge=0)
    min_memory_mib: int = Field(default=0, ge=0)


class Profile(_Frozen):
    """A whole host profile after `extends` has been applied."""

    name: str
    source: str = Field(description="The file this profile was loaded from.")
    description: str = ""
    env: dict[str, str] = Field(default_factory=dict, description="Environment shared by every service.")
    gpu: GpuRequirement = Field(default_factory=GpuRequirement)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    prepare: dict[str, PrepareStep] = Field(default_factory=dict)
    services: dict[str, ServiceSpec] = Field(default_factory=dict)


def resolve_profile_path(ref: str, profiles_dir: Path) -> Path:
    """A profile reference is a path (contains '/' or ends in .toml) or a name in profiles_dir."""
    if "/" in ref or ref.endswith(".toml"):
        return Path(ref).expanduser().resolve()
    return profiles_dir / f"{ref}.toml"


def load_profile(ref: str, profiles_dir: Path) -> Profile:
    """Load a profile and everything it extends; raise ConfigError naming file and field for each fault."""
    path = resolve_profile_path(ref, profiles_dir)
    problems: list[Problem] = []
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    chain = _load_chain(path, problems)
    for file, data in chain:
        _merge(merged, data, (), origin, str(file))
    if problems:
        raise ConfigError(problems)
    merged.pop("extends", None)
    merged["name"] = path.stem
    merged["source"] = str(path)
    problems.extend(_missing_files(merged, origin, str(path)))
    problems.extend(_service_graph_problems(merged, origin, str(path)))
    try:
        profile = Profile.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(problems + _problems_from(exc, origin, str(path))) from None
    problems.extend(_placeholder_problems(profile, origin, str(path)))
    if problems:
        raise ConfigError(problems)
    return profile


def _load_chain(path: Path, problems: list[Problem]) -> list[tuple[Path, dict[str, Any]]]:
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    current: Path | None = path
    referrer: tuple[str, str] | None = None
    while current is not None:
        if current in seen:
            problems.append(Problem(str(seen[-1]), "extends", f"cycle: {current} is already in the chain"))
            break
        seen.append(current)
        data = _read_toml(current, problems, referrer)
        if data is None:
            break
        _absolutise(data, current.parent)
        chain.append((current, data))
        parent = data.get("extends")
        if parent is None:
            break
        if not isinstance(parent, str):
            problems.append(Problem(str(current), "extends", "must be a profile name or path"))
            break
        referrer = (str(current), "extends")
        current = (current.parent / (parent if parent.endswith(".toml") else f"{parent}.toml")).resolve()
    chain.reverse()
    return chain


def _read_toml(path: Path, problems: list[Problem], referrer: tuple[str, str] | None) -> dict[str, Any] | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if referrer is not None:
            problems.append(Problem(referrer[0], referrer[1], f"profile file not found: {path}"))
        else:
            problems.append(Problem(str(path), "", "profile file not found"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(str(path), "", f"cannot read: {exc}"))
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem(str(path), "", f"invalid TOML: {exc}"))
    return None


def _absolutise(data: dict[str, Any], base: Path) -> None:
    """Make `file:` model sources and relative working directories relative to the file that names them."""
    for model in (data.get("models") or {}).values():
        if isinstance(model, dict) and isinstance(model.get("url"), str):
            url = model["url"]
            if url.startswith("file:") and not url.startswith("file:/"):
                model["url"] = (base / url[len("file:") :]).resolve().as_uri()
    for table in ("services", "prepare"):
        for entry in (data.get(table) or {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("cwd"), str):
                cwd = entry["cwd"]
                if not cwd.startswith("/") and "{" not in cwd:
                    entry["cwd"] = str((base / cwd).resolve())


def _merge(
    into: dict[str, Any], new: dict[str, Any], prefix: tuple[str, ...], origin: dict[tuple[str, ...], str], file: str
) -> None:
    for key, value in new.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            origin[path] = file
            _merge(into[key], value, path, origin, file)
            continue
        into[key] = _copy(value)
        for known in [p for p in origin if p[: len(path)] == path]:
            del origin[known]
        _record(value, path, origin, file)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _record(value: Any, path: tuple[str, ...], origin: dict[tuple[str, ...], str], file: str) -> None:
    origin[path] = file
    if isinstance(value, dict):
        for key, child in value.items():
            _record(child, (*path, key), origin, file)


def _source_of(loc: tuple[str, ...], origin: dict[tuple[str, ...], str], default: str) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origin:
            return origin[loc[:end]]
    return default


def _problems_from(exc: ValidationError, origin: dict[tuple[str, ...], str], default: str) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (typo?)"
        problems.append(Problem(_source_of(loc, origin, default), ".".join(loc), message))
    return problems


def _service_graph_problems(merged: dict[str, Any], origin: dict[tuple[str, ...], str], default: str) -> list[Problem]:
    """Service names and `depends_on` (unknown names, cycles), checked on the raw data so that every problem is
    reported together with the field errors."""
    services = merged.get("services")
    if not isinstance(services, dict):
        return []
    problems = []

    def report(loc: tuple[str, ...], message: str) -> None:
        problems.append(Problem(_source_of(loc, origin, default), ".".join(loc), message))

    graph: dict[str, list[str]] = {}
    for name, spec in services.items():
        if not re.match(NAME_PATTERN, name):
            report(("services", name), f"service name must match {NAME_PATTERN}")
        deps = spec.get("depends_on", []) if isinstance(spec, dict) else []
        deps = [d for d in deps if isinstance(d, str)] if isinstance(deps, list) else []
        for dep in deps:
            if dep not in services:
                report(("services", name, "depends_on"), f"no service named {dep!r}")
        graph[name] = [d for d in deps if d in services]
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*trail[trail.index(name) :], name]
            report(("services", name, "depends_on"), "dependency cycle: " + " -> ".join(cycle))
            return
        state[name] = 1
        for dep in graph[name]:
            visit(dep, [*trail, name])
        state[name] = 2

    for name in graph:
        visit(name, [])
    return problems


def _missing_files(merged: dict[str, Any], origin: dict[tuple[str, ...], str], default: str) -> list[Problem]:
    """`file:` model sources that do not exist (checked before validation so they are reported together)."""
    problems = []
    models = merged.get("models")
    for name, model in models.items() if isinstance(models, dict) else []:
        url = model.get("url") if isinstance(model, dict) else None
        if not isinstance(url, str):
            continue
        parts = urlsplit(url)
        if parts.scheme == "file" and not Path(unquote(parts.path)).is_file():
            loc = ("models", name, "url")
            problems.append(Problem(_source_of(loc, origin, default), ".".join(loc), f"file not found: {parts.path}"))
    return problems


def placeholders_in(text: str) -> set[str]:
    """Names of `{placeholder}` fields in a template string (`{{` escapes a brace)."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError:
        return {"<unbalanced brace>"}


def _placeholder_problems(profile: Profile, origin: dict[tuple[str, ...], str], default: str) -> list[Problem]:
    problems = []

    def check(loc: tuple[str, ...], text: str, spec: ServiceSpec | None) -> None:
        for field in placeholders_in(text):
            message = None
            if field not in PLACEHOLDERS:
                message = f"unknown placeholder {{{field}}} (known: {', '.join(sorted(PLACEHOLDERS))})"
            elif spec is not None and field == "port" and spec.port is None:
                message = "{port} is used but the service has no 'port'"
            elif spec is None and field in GPU_PLACEHOLDERS | {"port", "slot", "instance"}:
                message = f"{{{field}}} is only available to services"
            if message:
                problems.append(Problem(_source_of(loc, origin, default), ".".join(loc), message))

    for name, service in profile.services.items():
        base = ("services", name)
        for i, arg in enumerate(service.command):
            check((*base, "command", str(i)), arg, service)
        for key, value in service.env.items():
            check((*base, "env", key), value, service)
        if service.cwd:
            check((*base, "cwd"), service.cwd, service)
        for field in ("url", "socket"):
            value = getattr(service.readiness, field)
            if value:
                check((*base, "readiness", field), value, service)
        for i, arg in enumerate(service.readiness.command or []):
            check((*base, "readiness", "command", str(i)), arg, service)
    for name, step in profile.prepare.items():
        for i, arg in enumerate(step.command):
            check(("prepare", name, "command", str(i)), arg, None)
        for key, value in step.env.items():
            check(("prepare", name, "env", key), value, None)
    return problems
