"""How the Redis store connects: URLs, the clients it accepts, and how it names them.

Three deployments, one store (``docs/deployment.md``):

- one Redis: ``redis://``, ``rediss://``, ``unix://`` URLs, or a
  :class:`redis.asyncio.Redis` client;
- Redis Sentinel: ``redis+sentinel://host:port[,host:port...]/service_name[/db]``,
  or a client from :meth:`redis.asyncio.sentinel.Sentinel.master_for`;
- Redis Cluster: ``redis+cluster://host:port[,host:port...]``, or a
  :class:`redis.asyncio.RedisCluster` client.

``describe`` gives the real address of any of them for ``repr``, errors and
logs, with no secret in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

__all__ = [
    "MULTI_SCHEMES",
    "Target",
    "cluster_client",
    "describe",
    "parse_multi",
    "sentinel_client",
]

MULTI_SCHEMES: Final = ("redis+sentinel", "redis+cluster")

_DEFAULT_PORT: Final = {"redis+sentinel": 26379, "redis+cluster": 6379}

_FLOAT_OPTIONS: Final = frozenset({"socket_timeout", "socket_connect_timeout"})
_INT_OPTIONS: Final = frozenset({"max_connections"})
_STR_OPTIONS: Final = frozenset({"sentinel_username", "sentinel_password"})


@dataclass
class Target:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL."""

    scheme: str
    hosts: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    service: str = ""
    db: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def _host_port(text: str, default: int, url: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        raise ValueError(f"bad port {port_text!r} in {url!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port} in {url!r}")
    return host, port


def parse_multi(url: str, shown: str) -> Target:
    """Parse a Sentinel or Cluster URL (``shown``: the URL redacted, for errors)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in MULTI_SCHEMES:
        raise ValueError(f"not a Sentinel or Cluster URL: {shown!r}")
    userinfo, _, hosts_text = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    hosts = [
        _host_port(h, _DEFAULT_PORT[scheme], shown) for h in hosts_text.split(",") if h.strip()
    ]
    if not hosts:
        raise ValueError(f"no host:port in {shown!r}")
    target = Target(scheme, hosts, username, password)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if scheme == "redis+sentinel":
        if not segments or len(segments) > 2:
            raise ValueError(
                "a Sentinel URL is redis+sentinel://host:port[,host:port...]/service_name[/db], "
                f"got {shown!r}"
            )
        target.service = segments[0]
        if len(segments) == 2:
            try:
                target.db = int(segments[1])
            except ValueError:
                raise ValueError(f"bad database number {segments[1]!r} in {shown!r}") from None
    elif segments:
        raise ValueError(
            "a Cluster URL is redis+cluster://host:port[,host:port...] (a cluster has "
            f"database 0 only, and no path), got {shown!r}"
        )
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _FLOAT_OPTIONS:
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not math.isfinite(seconds) or seconds <= 0:
                raise ValueError(f"{name} must be a positive number of seconds in {shown!r}")
            target.options[name] = seconds
        elif name in _INT_OPTIONS:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer in {shown!r}")
            target.options[name] = int(value)
        elif name in _STR_OPTIONS and scheme == "redis+sentinel":
            target.options[name] = value
        else:
            known = sorted(_FLOAT_OPTIONS | _INT_OPTIONS)
            if scheme == "redis+sentinel":
                known += sorted(_STR_OPTIONS)
            raise ValueError(
                f"unknown option {name!r} in {shown!r} (known: {', '.join(known)}); pass a "
                "client you built yourself for anything else"
            )
    return target


def _retry() -> Retry:
    # a pooled connection may be stale after a restart or a failover: a few quick retries;
    # the store's own back-off rides out anything longer
    return Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.01), 3)


def cluster_client(target: Target) -> RedisCluster:
    """A cluster client for a ``redis+cluster://`` URL (nothing connects until first used)."""
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        username=target.username,
        password=target.password,
        socket_connect_timeout=target.options.get("socket_connect_timeout", 5.0),
        socket_timeout=target.options.get("socket_timeout", 10.0),
        max_connections=target.options.get("max_connections", 64),
        retry=_retry(),
    )


def sentinel_client(target: Target) -> tuple[Sentinel, aioredis.Redis]:
    """The sentinels and a master client for a ``redis+sentinel://`` URL."""
    timeouts = {
        "socket_connect_timeout": target.options.get("socket_connect_timeout", 5.0),
        "socket_timeout": target.options.get("socket_timeout", 10.0),
    }
    # a sentinel that does not answer is skipped at once (the next one is asked): its
    # client does not retry, or an unreachable set of sentinels took 16 s to report
    sentinel_kwargs: dict[str, Any] = {**timeouts, "retry": Retry(NoBackoff(), 0)}
    if "sentinel_username" in target.options:
        sentinel_kwargs["username"] = target.options["sentinel_username"]
    if "sentinel_password" in target.options:
        sentinel_kwargs["password"] = target.options["sentinel_password"]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        target.hosts, sentinel_kwargs=sentinel_kwargs, **timeouts
    )
    master: aioredis.Redis = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        max_connections=target.options.get("max_connections", 64),
        retry=_retry(),
        **timeouts,
    )
    return sentinel, master


def _join(hosts: list[tuple[str, int]]) -> str:
    return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)


def describe(client: aioredis.Redis | RedisCluster) -> str:
    """The client's address as a URL, with no secret: what ``repr`` and errors show."""
    if isinstance(client, RedisCluster):
        nodes = client.nodes_manager.startup_nodes.values()
        return "redis+cluster://" + _join([(n.host, int(n.port)) for n in nodes])
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        sentinels = []
        for s in pool.sentinel_manager.sentinels:
            k = s.connection_pool.connection_kwargs
            sentinels.append((str(k.get("host", "localhost")), int(k.get("port", 26379))))
        return f"redis+sentinel://{_join(sentinels)}/{pool.service_name}/{kwargs.get('db', 0)}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host = str(kwargs.get("host", "localhost"))
    if ":" in host:
        host = f"[{host}]"
    return f"redis://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
