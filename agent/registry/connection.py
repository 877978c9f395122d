"""Connecting to the registry's Redis in any of its deployment forms: one server (TCP, TLS, unix socket), Sentinel,
or Cluster, chosen by the URL's scheme."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from agent.errors import RegistryError
from agent.registryurl import SCHEMES, TlsFiles, hosts_of

TIMEOUT_S = 5.0


def open_client(url: str, tls: TlsFiles | None = None) -> Any:
    """A redis-py asyncio client (Redis, or RedisCluster) for the URL; nothing is connected yet.

    redis+sentinel://[user:pass@]host:port,host:port/<master name>[/db] follows the master Sentinel names;
    redis+cluster://[user:pass@]host:port[,host:port] discovers the cluster from those nodes; the rediss+
    forms use TLS to every node.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise RegistryError(f"unsupported registry URL scheme {scheme!r}")
    secure = scheme.startswith("rediss")
    common: dict[str, Any] = {
        "socket_timeout": TIMEOUT_S,
        "socket_connect_timeout": TIMEOUT_S,
        "decode_responses": True,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }
    tls_args = (tls or TlsFiles()).kwargs() if secure else {}
    if scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, decode_responses=True, **tls_args
        )
    nodes = hosts_of(parts.netloc)
    if scheme.endswith("+cluster"):
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes], ssl=secure, **common, **tls_args
        )
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise RegistryError("a redis+sentinel:// URL needs the master's name as its path")
    db = int(path[1]) if len(path) > 1 and path[1].isdigit() else 0
    sentinel_kwargs = {
        "socket_timeout": TIMEOUT_S,
        "socket_connect_timeout": TIMEOUT_S,
        "ssl": secure,
        "username": common["username"],
        "password": common["password"],  # sentinels usually share the master's credentials
        **tls_args,
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        nodes, sentinel_kwargs=sentinel_kwargs, ssl=secure, db=db, **common, **tls_args
    )
    return sentinel.master_for(path[0])


def translate(shown: str, exc: BaseException) -> RegistryError:
    """A redis-py or socket error as our RegistryError: the redacted URL, the error, and a hint where one helps."""
    message = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if "certificate verify failed" in message.lower():
        message += " (is redis_ca_file the CA that signed the server's certificate?)"
    if "noperm" in message.lower() or "permission" in message.lower():
        message += " (the Redis ACL user needs ~emp:* keys, &emp:* &machine:status:* channels, FCALL and FUNCTION)"
    return RegistryError(f"{shown}: {type(exc).__name__}: {message}")
