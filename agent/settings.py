"""Agent settings: one pydantic Settings class fed by EMP_AGENT_* variables and an optional TOML file."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from agent.errors import ConfigError, Problem
from agent.identity import IdSource
from agent.redact import redact_url
from agent.registryurl import SCHEMES as REDIS_SCHEMES
from agent.registryurl import TlsFiles, hosts_of

ENV_PREFIX = "EMP_AGENT_"
DEFAULT_CONFIG_PATH = Path("/etc/emp-agent/agent.toml")
CONFIG_PATH_VARIABLE = "EMP_AGENT_CONFIG"
#: Linux limits unix socket paths to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class LogFormat(StrEnum):
    """How the agent writes its own log lines."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"
    JOURNALD = "journald"


class CustomerIsolation(StrEnum):
    """How a worker separates customers, in the original job matcher's terms."""

    STRICT = "strict"
    LOOSE = "loose"
    NONE = "none"


class Location(BaseModel):
    """Where the machine is, for jobs with data-residency needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str = Field(min_length=1)
    country: str | None = None
    compliance_zones: list[str] = Field(default_factory=list)
    data_residency_requirements: list[str] = Field(default_factory=list)


class Cost(BaseModel):
    """What a job on this machine costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: str = Field(min_length=1)
    rate_per_hour: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    rate_per_job: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    minimum_charge: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Matching(BaseModel):
    """What each slot's capabilities file tells the job matcher beyond the hardware (the `[matching]` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_isolation: CustomerIsolation = CustomerIsolation.LOOSE
    allowed_customers: list[str] = Field(default_factory=list)
    denied_customers: list[str] = Field(default_factory=list)
    max_concurrent_customers: int = Field(default=10, ge=1)
    concurrent_jobs: int = Field(default=1, ge=1)
    quality_levels: list[str] = Field(default_factory=lambda: ["fast", "balanced", "quality"])
    max_processing_time_minutes: int = Field(default=60, ge=1)
    location: Location | None = None
    cost: Cost | None = None


class Settings(BaseSettings):
    """Every knob of the agent. Environment variables win over the TOML file; the file over defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    machine_id: str | None = Field(
        default=None,
        description="Stable machine id; derived from /etc/machine-id and persisted in the state dir when unset.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    )
    machine_id_source: IdSource = Field(
        default=IdSource.MACHINE_ID,
        description="What a derived machine id comes from: machine-id (/etc/machine-id) or cloud-init (its instance "
        "id, which changes when the VM is replaced).",
    )
    profile: str | None = Field(
        default=None, description="Profile name (looked up in profiles_dir) or path to a profile TOML file."
    )
    profiles_dir: Path = Field(default=Path("/etc/emp-agent/profiles"), description="Where named profiles live.")
    state_dir: Path = Field(default=Path("/var/lib/emp-agent"), description="Persistent agent state.")
    runtime_dir: Path = Field(default=Path("/run/emp-agent"), description="Control socket directory.")
    log_dir: Path = Field(default=Path("/var/log/emp-agent"), description="Per-service output logs.")
    model_root: Path = Field(default=Path("/var/lib/emp-agent/models"), description="Where models are placed.")
    redis_url: SecretStr | None = Field(
        default=None,
        description="redis://, rediss:// or unix:// URL; unset starts an embedded server in the state dir.",
    )
    http_listen: str | None = Field(
        default=None,
        description="host:port for a read-only HTTP listener (/healthz /readyz /status /metrics /events); unset: none.",
    )
    redis_ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) that signed the Redis TLS certificate."
    )
    redis_cert_file: Path | None = Field(default=None, description="Client certificate (PEM) for Redis TLS.")
    redis_key_file: Path | None = Field(default=None, description="Client key (PEM) for Redis TLS.")
    http_token_file: Path | None = Field(
        default=None,
        description="File holding a bearer token (16+ characters) that allows control on the http_listen address; "
        "unset: control only on the unix socket.",
    )
    heartbeat_interval_s: float = Field(default=10.0, gt=0.05, le=600, description="Seconds between beats.")
    gpu_probe_timeout_s: float = Field(default=20.0, gt=0, le=600, description="Deadline of one NVML probe.")
    gpu_reprobe_interval_s: float = Field(
        default=60.0, ge=0, le=86400, description="Seconds between GPU health and usage probes; 0 turns them off."
    )
    matching: Matching = Field(default_factory=Matching, description="Job-matcher facts for the slot files.")
    ca_bundle: Path | None = Field(default=None, description="Extra CA bundle (PEM) for model downloads.")
    pull_files: int = Field(default=4, ge=1, le=64, description="Model files downloaded at once.")
    pull_connections: int = Field(default=16, ge=1, le=256, description="HTTP connections of a pull, in all.")
    pull_connections_per_host: int = Field(default=8, ge=1, le=64, description="HTTP connections to one host.")
    pull_chunk_mib: int = Field(default=32, ge=1, le=4096, description="Size of one range request.")
    pull_ranged_min_mib: int = Field(default=64, ge=1, description="Files at least this big use parallel ranges.")
    pull_parallel_below_mbps: float = Field(
        default=200.0, ge=0, description="One connection first; the others join when it moves less (MB/s)."
    )
    pull_connect_timeout_s: float = Field(default=10.0, gt=0, le=600, description="TCP/TLS connect timeout.")
    pull_stall_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="A stream with no byte for this long is retried."
    )
    pull_deadline_s: float = Field(default=21600.0, gt=0, description="Overall deadline of one model file.")
    pull_attempts: int = Field(default=8, ge=1, le=100, description="Failures in a row without progress, per file.")
    pull_retry_wait_s: float = Field(default=1.0, ge=0, le=300, description="First wait between retries.")
    pull_disk_margin_mib: int = Field(default=1024, ge=0, description="Free space kept beyond what a pull needs.")
    hf_endpoint: str = Field(default="https://huggingface.co", pattern=r"^https?://[^/?#]+(/[^?#]*)?$")
    civitai_endpoint: str = Field(default="https://civitai.com", pattern=r"^https?://[^/?#]+(/[^?#]*)?$")
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    log_format: LogFormat = Field(
        default=LogFormat.AUTO, description="auto: journald fields under systemd, console on a terminal, else JSON."
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(f"must start with one of {', '.join(s + '://' for s in sorted(REDIS_SCHEMES))}")
        if "+" in parts.scheme:
            try:
                hosts_of(parts.netloc)
            except ValueError as exc:
                raise ValueError(f"the hosts must be host:port,host:port: {exc}") from None
            path = [p for p in parts.path.split("/") if p]
            if parts.query:
                raise ValueError("Sentinel and Cluster URLs take no ?options (put credentials before the hosts)")
            if parts.scheme.endswith("+sentinel"):
                if not path:
                    raise ValueError("a redis+sentinel:// URL needs the master's name as its path")
                if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
                    raise ValueError("a redis+sentinel:// URL is .../<master name>[/<db number>]")
            elif path:
                raise ValueError("a Redis Cluster has only database 0: no path in a redis+cluster:// URL")
            return value
        try:
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ValueError("the port is not a number (is a '/' or '@' in the password not %-encoded?)") from None
        return value

    @field_validator("http_listen")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63})[:]([0-9]{1,5})", value)
        if match is None:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9090 or [::1]:9090")
        if not 1 <= int(match.group(2)) <= 65535:
            raise ValueError("the port must be between 1 and 65535")
        return value

    @model_validator(mode="after")
    def _socket_paths_fit(self) -> Settings:
        sockets = [("runtime_dir", self.control_socket)]
        if self.redis_url is None:
            sockets.append(("state_dir", self.registry_socket))
        for field, path in sockets:
            if len(str(path.absolute())) > MAX_SOCKET_PATH:
                raise ValueError(f"{field} is too long for the unix socket {path} ({MAX_SOCKET_PATH} bytes at most)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment (systemd EnvironmentFile, cloud-init) overrides the TOML file passed as init data.
        return (env_settings, init_settings)

    @property
    def http_address(self) -> tuple[str, int] | None:
        """`http_listen` split into host and port."""
        if self.http_listen is None:
            return None
        host, port = self.http_listen.rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def control_socket(self) -> Path:
        """Unix socket of the local API."""
        return self.runtime_dir / "agent.sock"

    @property
    def registry_socket(self) -> Path:
        """Unix socket of the embedded registry server (used when no redis_url is set)."""
        return self.state_dir.absolute() / "registry" / "redis.sock"

    def make_dirs(self, *fields: str) -> None:
        """Create these directory settings (state_dir, runtime_dir, log_dir, model_root); raises ConfigError naming
        each variable whose directory cannot be made."""
        problems = []
        for field in fields:
            path = getattr(self, field)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                problems.append(
                    Problem("settings", ENV_PREFIX + field.upper(), f"cannot create {path}: {exc.strerror}")
                )
        if problems:
            raise ConfigError(problems)

    def http_token(self) -> str | None:
        """The TCP control token, read now; raises ConfigError naming the file when it is unusable."""
        if self.http_token_file is None:
            return None
        try:
            token = self.http_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([Problem(str(self.http_token_file), "http_token_file", f"cannot read: {exc}")]) from None
        if len(token) < 16 or any(c.isspace() for c in token):
            problem = Problem(
                str(self.http_token_file), "http_token_file", "the token must be 16+ characters, no spaces"
            )
            raise ConfigError([problem])
        return token

    @property
    def redis_tls(self) -> TlsFiles:
        """The TLS files for rediss:// URLs."""
        return TlsFiles(self.redis_ca_file, self.redis_cert_file, self.redis_key_file)

    @property
    def redis_url_redacted(self) -> str | None:
        """The Redis URL with any password replaced, safe for logs and status."""
        if self.redis_url is None:
            return None
        return redact_url(self.redis_url.get_secret_value())


def load_settings(config_path: Path | None = None) -> Settings:
    """Build Settings from the TOML file (explicit path, EMP_AGENT_CONFIG, or the default) and the environment.

    Raises ConfigError with one Problem per fault, each naming the file or variable and the field.
    """
    env = os.environ
    explicit = config_path is not None or CONFIG_PATH_VARIABLE in env
    path = config_path or Path(env.get(CONFIG_PATH_VARIABLE, str(DEFAULT_CONFIG_PATH)))
    problems: list[Problem] = []
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(str(path), "", f"cannot read: {exc}"))
        except tomllib.TOMLDecodeError as exc:
            problems.append(Problem(str(path), "", f"invalid TOML: {exc}"))
    elif explicit:
        problems.append(Problem(str(path), "", "config file does not exist"))
    problems.extend(_unknown_variables(env))
    for name in list(data):
        if ENV_PREFIX + name.upper() in env:
            del data[name]  # the variable replaces the file's value (a table as a whole, not field by field)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems.extend(_problems_from(exc, path, env))
    except SettingsError as exc:  # a variable holding a table (EMP_AGENT_MATCHING) that is not JSON
        field = str(exc).split('"')[1] if '"' in str(exc) else ""
        problems.append(Problem("environment", ENV_PREFIX + field.upper(), "not valid JSON (a table is given as JSON)"))
    if problems:
        raise ConfigError(problems)
    return settings


def _unknown_variables(env: Mapping[str, str]) -> list[Problem]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {CONFIG_PATH_VARIABLE}
    return [
        Problem("environment", name, "unknown setting (typo?)")
        for name in sorted(env)
        if name.startswith(ENV_PREFIX) and name not in known
    ]


def _problems_from(exc: ValidationError, path: Path, env: Mapping[str, str]) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"])
        variable = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else ""
        message = "unknown setting (typo?)" if error["type"] == "extra_forbidden" else error["msg"]
        message = message.removeprefix("Value error, ")
        if variable in env:
            inner = ".".join(str(part) for part in error["loc"][1:])
            problems.append(Problem("environment", variable, f"{inner}: {message}" if inner else message))
        else:
            problems.append(Problem(str(path), field, message))
    return problems


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them (comments, blank lines, quoted values); raises
    ConfigError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(str(path), "", f"cannot read: {exc}")]) from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ConfigError([Problem(str(path), f"line {number}", "not KEY=value")])
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values
