"""Redaction of secrets: passwords in URLs, signed query strings, known secret values in log events."""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
#: Event keys whose values are always masked, whatever they hold.
SECRET_KEYS = frozenset({"password", "token", "secret", "authorization", "api_key", "redis_url"})


def redact_url(url: str) -> str:
    """Replace a URL's password (or a lone token user) with ***; drop nothing else."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    userinfo = f"{parts.username}:{MASK}" if parts.password is not None else MASK
    return urlunsplit((parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


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

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if key.lower() in SECRET_KEYS and value is not None:
                event[key] = MASK
            elif isinstance(value, str):
                event[key] = self.mask(value)
        return event
