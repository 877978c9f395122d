"""Where a model comes from: `hf://`, `civitai://`, `file://` and http(s) sources resolved to a URL and a
credential that only the allowed hosts may receive."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from agent.errors import ModelPullError
from agent.host.download import Credential, effective_port
from agent.profile import DEFAULT_TOKEN_ENV, ModelSpec, parse_huggingface
from agent.redact import redact_source


@dataclass(frozen=True)
class Endpoints:
    """Base URLs of the convenience schemes (settings; tests point them at loopback)."""

    huggingface: str = "https://huggingface.co"
    civitai: str = "https://civitai.com"


@dataclass(frozen=True)
class Source:
    """A resolved model source. `shown` is safe to print (no user info, no query string)."""

    url: str
    credential: Credential | None
    shown: str

    @property
    def is_file(self) -> bool:
        """True for a local or mounted path."""
        return urlsplit(self.url).scheme == "file"

    @property
    def local_path(self) -> Path:
        """The path of a file:// source."""
        return Path(unquote(urlsplit(self.url).path))


def resolve(spec: ModelSpec, endpoints: Endpoints, environ: Mapping[str, str]) -> Source:
    """The download URL of `spec` and the credential for it, if its token variable is set."""
    parts = urlsplit(spec.url)
    if parts.scheme == "hf":
        url = huggingface_url(spec.url, endpoints.huggingface)
    elif parts.scheme == "civitai":
        url = f"{endpoints.civitai.rstrip('/')}/api/download/models/{parts.netloc}"
    else:
        url = spec.url
    token_env = spec.auth_env or DEFAULT_TOKEN_ENV.get(parts.scheme)
    token = (environ.get(token_env) or "").strip() if token_env else None  # a CRLF env file leaves a \r
    if spec.auth_env and not token:
        raise ModelPullError(f"{redact_source(url)}: the token variable {spec.auth_env} is not set")
    if token and not all(" " < c < "\x7f" for c in token):
        raise ModelPullError(
            f"{redact_source(url)}: the token in {token_env} has spaces, control or non-ASCII characters"
        )
    credential = None
    if token:
        hosts = frozenset(spec.auth_hosts) if spec.auth_hosts else frozenset({_origin_host(url)})
        credential = Credential(token, hosts)
    return Source(url, credential, redact_source(url))


def huggingface_url(source: str, endpoint: str) -> str:
    """`hf://org/repo/path/in/repo[@revision]` -> `<endpoint>/org/repo/resolve/<revision>/path/in/repo`."""
    repo, path, revision = parse_huggingface(source)
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"


def _origin_host(url: str) -> str:
    """host:port of the origin, so the default never covers another port of the same host."""
    return f"{urlsplit(url).hostname}:{effective_port(url)}"
