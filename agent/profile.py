"""Host profiles: TOML files with `extends`, validated into frozen pydantic models."""

from __future__ import annotations

import os
import re
import signal
import string
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

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
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
#: Service names the agent uses for its own instances.
RESERVED_PREFIX = "emp-"


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        if not re.match(ENV_NAME_PATTERN, key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
        if "\0" in value:
            raise ValueError(f"{key}: value contains a NUL byte")
    return env


def _check_argv(argv: list[str]) -> list[str]:
    if argv and not argv[0].strip():
        raise ValueError("the program (first element) must not be empty")
    if any("\0" in arg for arg in argv):
        raise ValueError("an argument contains a NUL byte")
    return argv


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
    LOG = "log"
    NOTIFY = "notify"
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
    pattern: str | None = Field(default=None, description="kind log: a regex matched against new output lines.")
    expect_status: list[int] = Field(default_factory=lambda: [200])
    interval_s: float = Field(default=0.5, gt=0)
    timeout_s: float = Field(default=120.0, gt=0, description="Start timeout: ready within this or failed.")
    start_seconds: float = Field(default=1.0, ge=0, description="For kind none: alive this long means ready.")
    liveness_interval_s: float | None = Field(
        default=None, gt=0, description="Repeat the probe this often while RUNNING (http, tcp, unix, command)."
    )
    liveness_failures: StrictInt = Field(default=3, ge=1, description="Failed liveness probes in a row = hung.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _fields_for_kind(self) -> ReadinessSpec:
        if self.kind is ProbeKind.UNIX and not self.socket:
            raise ValueError("kind 'unix' needs 'socket'")
        if self.kind is ProbeKind.COMMAND and not self.command:
            raise ValueError("kind 'command' needs 'command'")
        if self.kind is ProbeKind.LOG:
            if not self.pattern:
                raise ValueError("kind 'log' needs 'pattern'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        return self


class ServiceSpec(_Frozen):
    """A supervised service; expanded into one instance per GPU (or CPU slot) when per_gpu is set."""

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    inherit_env: list[str] = Field(default_factory=list, description="Agent variables passed through by name.")
    cwd: str | None = None
    per_gpu: StrictBool = False
    instances: StrictInt = Field(default=1, ge=1, le=64, description="Instances (per GPU when per_gpu).")
    port: StrictInt | None = Field(default=None, ge=1, le=65535, description="Base port; instance i asks port+i.")
    readiness: ReadinessSpec = Field(default_factory=ReadinessSpec)
    restart: RestartSpec = Field(default_factory=RestartSpec)
    stop_signal: str = "SIGTERM"
    stop_timeout_s: float = Field(default=30.0, gt=0)
    memory_limit_mib: StrictInt | None = Field(
        default=None, ge=1, description="RSS of the whole process tree; above it the instance is restarted."
    )
    gpu_memory_limit_mib: StrictInt | None = Field(
        default=None,
        ge=1,
        description="GPU memory NVML attributes to the process tree, checked at each GPU re-probe; above it the "
        "instance is restarted.",
    )
    resource_interval_s: float = Field(default=2.0, ge=0.1, le=60, description="How often limits are checked.")
    log_max_mib: StrictInt = Field(default=50, ge=0, description="Rotate the output log past this; 0: never.")
    log_backups: StrictInt = Field(default=5, ge=0, le=100, description="Rotated files kept (.1 newest).")
    capabilities: list[str] = Field(default_factory=list, description="Job-facing service names.")
    depends_on: list[str] = Field(default_factory=list)
    required: StrictBool = Field(default=True, description="A required service that is down degrades the host.")

    _env = field_validator("env")(_check_env)
    _argv = field_validator("command")(_check_argv)

    @field_validator("inherit_env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.match(ENV_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return names

    @model_validator(mode="after")
    def _port_range(self) -> ServiceSpec:
        if self.port is not None and self.port + self.instances - 1 > 65535:
            raise ValueError(f"ports {self.port}..{self.port + self.instances - 1} go past 65535")
        if self.readiness.kind in (ProbeKind.HTTP, ProbeKind.TCP) and self.port is None and not self.readiness.url:
            raise ValueError(f"readiness kind '{self.readiness.kind.value}' needs the service's 'port' (or a url)")
        return self

    @field_validator("stop_signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        if name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {value!r}")
        return name


#: Token variables used for the convenience schemes when the manifest names none (and the variable is set).
DEFAULT_TOKEN_ENV = {"hf": "HF_TOKEN", "civitai": "CIVITAI_API_TOKEN"}


def token_env_names(models: Mapping[str, ModelSpec]) -> set[str]:
    """Every environment variable whose value may be sent as a model source's token: a secret to mask."""
    return {m.auth_env for m in models.values() if m.auth_env} | set(DEFAULT_TOKEN_ENV.values())


def parse_huggingface(source: str) -> tuple[str, str, str]:
    """`hf://[datasets/|spaces/]org/repo/path/in/repo[@revision]` -> (repo id, path, revision). The revision is
    what follows the last `@` (a branch, tag, commit or `refs/pr/N`); a path containing `@` needs an explicit
    `@revision`. Raises ValueError with what is wrong."""
    if not source.startswith("hf://"):
        raise ValueError("must start with hf://")
    rest, revision = source[len("hf://") :], "main"
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        if not revision or revision.startswith("/") or revision.endswith("/") or "//" in revision:
            raise ValueError("the revision after '@' is empty or malformed")
    parts = rest.split("/")
    kind = parts.pop(0) + "/" if parts and parts[0] in ("datasets", "spaces") else ""
    if len(parts) < 3 or any(not p or p in (".", "..") for p in parts) or ":" in parts[0]:
        raise ValueError("must look like hf://org/repo/path/in/repo[@revision]")
    return f"{kind}{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision


#: The model root's cache directory (objects, partial downloads, locks); no destination may live in it.
CACHE_DIR = ".emp-cache"
#: Longest destination file name: the temp link next to it adds 14 bytes to a 255-byte limit.
MAX_NAME_BYTES = 240


class ModelSpec(_Frozen):
    """A model file to place under the model root, pinned by sha256."""

    url: str
    dest: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int | None = Field(default=None, ge=0, strict=True)
    auth_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    auth_hosts: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _supported_scheme(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            port = parts.port if parts.scheme in {"http", "https"} else None
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("must not contain spaces or control characters (percent-encode them)")
        if parts.scheme not in {"http", "https", "file", "hf", "civitai"}:
            raise ValueError("scheme must be https, http, file, hf or civitai")
        if parts.scheme in {"http", "https"} and not parts.hostname:
            raise ValueError("must name a host")
        if port == 0:
            raise ValueError("port 0 is not a port")
        if parts.scheme == "hf":
            parse_huggingface(value)
        if parts.scheme == "civitai" and not (parts.netloc.isdigit() and parts.path in ("", "/") and not parts.query):
            raise ValueError("must look like civitai://<model version id>")
        return value

    @field_validator("auth_hosts")
    @classmethod
    def _plain_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host or "/" in host or "@" in host or host != host.strip():
                raise ValueError(f"{host!r} is not a host name (or host:port)")
        return value

    @field_validator("dest")
    @classmethod
    def _relative_dest(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not value.strip():
            raise ValueError("must be a relative path inside the model root (no '..')")
        if value.endswith("/") or path.name in ("", ".") or "\0" in value:
            raise ValueError("must name a file, e.g. checkpoints/model.safetensors")
        if any(ord(c) < 32 or c == "\\" for c in value) or any(p != p.strip() for p in path.parts):
            raise ValueError("must not contain control characters, backslashes or names with outer spaces")
        if path.parts[0] == CACHE_DIR:
            raise ValueError(f"{CACHE_DIR}/ is the agent's cache, not a destination")
        if any(len(p.encode()) > MAX_NAME_BYTES for p in path.parts):
            raise ValueError(f"a path component longer than {MAX_NAME_BYTES} bytes cannot be placed atomically")
        return value


class PrepareStep(_Frozen):
    """A command run once before services start; skipped when `creates` already exists."""

    command: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(default=1800.0, gt=0)
    creates: str | None = None

    _env = field_validator("env")(_check_env)
    _argv = field_validator("command")(_check_argv)


class GpuRequirement(_Frozen):
    """What the host must have for this profile to be fully served."""

    min_count: int = Field(default=0, ge=0, description="GPUs the host must have (healthy, matching the rest).")
    min_memory_mib: int = Field(default=0, ge=0, description="Memory each of those GPUs must have.")
    product: str | None = Field(
        default=None, min_length=1, description='Shell-style pattern the product name must match, e.g. "*H100*".'
    )
    select: list[str] = Field(
        default_factory=list,
        description="Only these GPUs (NVML indexes or UUIDs) are this agent's; empty: all that CUDA_VISIBLE_DEVICES "
        "allows.",
    )

    @field_validator("select", mode="before")
    @classmethod
    def _gpu_refs(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        refs = []
        for item in value:
            ref = str(item).strip() if isinstance(item, int | str) and not isinstance(item, bool) else None
            if ref is None or not (
                (ref.isascii() and ref.isdigit()) or (ref.startswith(("GPU-", "MIG-")) and len(ref) > 4)
            ):
                raise ValueError(f"{item!r} is neither an NVML index nor a GPU-/MIG- UUID")
            refs.append(ref)
        return refs

    @model_validator(mode="after")
    def _count_for_the_rest(self) -> GpuRequirement:
        if self.min_count == 0 and (self.product is not None or self.min_memory_mib):
            raise ValueError("product and min_memory_mib need min_count >= 1 (how many GPUs must match)")
        return self


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

    _env = field_validator("env")(_check_env)


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
    for key in ("name", "source"):
        if key in merged:
            problems.append(
                Problem(origin.get((key,), str(path)), key, "unknown field (a profile is named by its file)")
            )
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
    models = data.get("models")
    for model in models.values() if isinstance(models, dict) else []:
        if isinstance(model, dict) and isinstance(model.get("url"), str):
            url = model["url"]
            if url.startswith("file:") and not url.startswith("file:/"):
                model["url"] = (base / url[len("file:") :]).resolve().as_uri()
    for table in ("services", "prepare"):
        entries = data.get(table)
        for entry in entries.values() if isinstance(entries, dict) else []:
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
    """Names of services, steps and models, and `depends_on` (unknown names, cycles), checked on the raw data so
    that every problem is reported together with the field errors."""
    problems = []

    def report(loc: tuple[str, ...], message: str) -> None:
        problems.append(Problem(_source_of(loc, origin, default), ".".join(loc), message))

    models = merged.get("models")
    dests: dict[str, tuple[str, object]] = {}
    for name, model in models.items() if isinstance(models, dict) else []:
        dest = model.get("dest") if isinstance(model, dict) else None
        if isinstance(dest, str):
            key = os.path.normpath(dest)
            if key in dests and dests[key][1] != model.get("sha256"):
                report(("models", name, "dest"), f"same destination as models.{dests[key][0]} with another sha256")
            dests.setdefault(key, (name, model.get("sha256")))
    for key, (name, _) in dests.items():
        parent = os.path.dirname(key)
        while parent and parent != os.path.dirname(parent):
            if parent in dests:
                report(
                    ("models", name, "dest"), f"inside {parent}, which is the destination of models.{dests[parent][0]}"
                )
                break
            parent = os.path.dirname(parent)
    for table in ("prepare", "models"):
        entries = merged.get(table)
        for name in entries if isinstance(entries, dict) else []:
            if not re.match(NAME_PATTERN, name):
                report((table, name), f"name must match {NAME_PATTERN}")
    services = merged.get("services")
    if not isinstance(services, dict):
        return problems

    graph: dict[str, list[str]] = {}
    multi = {n for n, s in services.items() if isinstance(s, dict) and (s.get("per_gpu") or s.get("instances", 1) != 1)}
    for name, spec in services.items():
        if not re.match(NAME_PATTERN, name):
            report(("services", name), f"service name must match {NAME_PATTERN}")
        elif name.startswith(RESERVED_PREFIX):
            report(("services", name), f"names starting with {RESERVED_PREFIX!r} are reserved for the agent")
        base, _, number = name.rpartition("-")
        if base in multi and number.isdigit():
            report(("services", name), f"clashes with instance {number} of service {base!r}")
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
    """Names of `{placeholder}` fields in a template string (`{{` escapes a brace); a format spec or conversion
    (`{port:d}`, `{slot!r}`) is returned whole, so it is reported as unknown."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return {"<unbalanced brace>"}
    fields = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        fields.add(field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else ""))
    return fields


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
        for field in ("cwd", "creates"):
            value = getattr(step, field)
            if value:
                check(("prepare", name, field), value, None)
    for key, value in profile.env.items():
        check(("env", key), value, None)
    return problems
