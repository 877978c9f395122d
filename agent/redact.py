"""Redaction of secrets: passwords in URLs, signed query strings, known secret values in log events."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
#: Event keys whose values are always masked, whatever they hold.
SECRET_KEYS = frozenset({"password", "token", "secret", "authorization", "api_key", "redis_url"})


#: Query parameters that carry credentials (redis-py accepts `?password=`).
SECRET_PARAMS = frozenset({"password", "pass", "passwd", "token", "secret", "auth", "access_token"})


def url_secrets(url: str) -> list[str]:
    """The credential values inside a URL: its password and secret query parameters."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else ([parts.username] if parts.username else [])
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=False) if k.lower() in SECRET_PARAMS and v]
    return found


def redact_url(url: str) -> str:
    """Replace a URL's password (or a lone token user) and secret query parameters with ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
    query = urlencode(
        [(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    text = (
        f"{parts.scheme}://{netloc}{parts.path}"
        if "//" in url
        else urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    )
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def redact_source(url: str) -> str:
    """A download URL safe to show: no user info and no query string (presigned URLs carry signatures there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = MASK if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


class SecretMasker:
    """A structlog processor that masks secret keys and any known secret value inside strings."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = {s for s in secrets if len(s) >= 4}

    def add(self, secret: str) -> None:
        """Mask this value from now on (ignored when shorter than 4 characters)."""
        if len(secret) >= 4:
            self._secrets.add(secret)

    def mask(self, text: str) -> str:
        """The text with every known secret value replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def scrub(self, value: Any) -> Any:
        """Mask secrets inside strings, lists, tuples and dicts."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, dict):
            return {k: MASK if str(k).lower() in SECRET_KEYS else self.scrub(v) for k, v in value.items()}
        return value

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if key.lower() in SECRET_KEYS and value is not None:
                event[key] = MASK
            else:
                event[key] = self.scrub(value)
        return event
