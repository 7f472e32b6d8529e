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
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

__all__ = [
    "MULTI_SCHEMES",
    "Target",
    "cluster_client",
    "describe",
    "parse_multi",
    "safe_view",
    "sentinel_client",
    "spilled",
    "unsplittable",
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


_MAX_DB: Final = 2**31 - 1
"""The largest database number (Redis's ``databases`` is an int)."""


def _ascii_int(text: str) -> int | None:
    """``text`` as an int if it is ASCII digits only (no sign, space, ``_`` or ``²``)."""
    if not text or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def unsplittable(url: str) -> bool:
    """Whether the URL's user part may have spilled into its path, query or fragment.

    A password with an unencoded ``/``, ``?`` or ``#`` ends the network location early
    (``u:se/cret@h:1``: host ``u``, port ``se``, path ``/cret@h:1``): nothing after the
    scheme can then be shown without showing a piece of the password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    rest = url[len(parts.scheme) + 3 :] if "://" in url else url
    return "@" not in parts.netloc and "@" in rest


def spilled(url: str) -> bool:
    """Whether the URL's user part surely spilled past its network location: an ``@``
    in its path, its fragment, or an option's name (an ``@`` in an option's value may
    be right: ``?sentinel_password=p@ss``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if "@" in parts.netloc:
        return False
    names = (pair.partition("=")[0] for pair in parts.query.split("&"))
    return "@" in parts.path or "@" in parts.fragment or any("@" in n for n in names)


def safe_view(url: str) -> str:
    """The URL as errors may show it: no user part (``***@``) and no query values; or,
    when the URL cannot be split reliably (:func:`unsplittable`), its scheme only."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the URL"
    scheme = parts.scheme.lower() or "?"
    if unsplittable(url):
        return f"the {scheme}:// URL"
    _, at, hosts = parts.netloc.rpartition("@")
    names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    query = "?" + "&".join(f"{n}=..." for n in names) if names else ""
    return repr(f"{scheme}://{'***@' if at else ''}{hosts}{parts.path}{query}")


def _host_port(text: str, default: int, view: str, number: int, plain: bool) -> tuple[str, int]:
    """One ``host[:port]`` of a host list; ``plain``: the text may be shown in errors."""
    shown = f"{text.strip()!r}" if plain else f"number {number}"
    text = text.strip()
    if text.startswith("["):  # [::1]:6379
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host {shown} in {view}: an IPv6 host is [address]:port")
        port_text = rest.removeprefix(":")
    elif text.count(":") > 1:
        raise ValueError(
            f"bad host {shown} in {view}: an IPv6 host must be in brackets, [address]:port"
        )
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"no host in host {shown} of {view}")
    if ":" in text and not text.startswith("[") and not port_text:
        raise ValueError(f"no port after ':' in host {shown} of {view}")
    port = _ascii_int(port_text) if port_text else default
    if port is None or not 0 < port < 65536:
        raise ValueError(f"bad port in host {shown} of {view}: a port is 1 to 65535")
    return host, port


def parse_multi(url: str, shown: str | None = None) -> Target:
    """Parse a Sentinel or Cluster URL.

    Errors show :func:`safe_view` of the URL, never its user part or its query values
    (``shown``, the redacted URL callers used to pass, is no longer used)."""
    del shown
    view = safe_view(url)
    plain = not unsplittable(url)
    hint = (
        ""
        if plain
        else " (if the password holds '/', '?', '#' or '@', percent-encode it: "
        "urllib.parse.quote(password, safe=''))"
    )
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"cannot parse {view}{hint}") from None
    scheme = parts.scheme.lower()
    if scheme not in MULTI_SCHEMES:
        raise ValueError(f"not a Sentinel or Cluster URL: {view}")
    userinfo, _, hosts_text = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    try:
        hosts = [
            _host_port(h, _DEFAULT_PORT[scheme], view, n, plain)
            for n, h in enumerate(hosts_text.split(","), 1)
            if h.strip()
        ]
        if not hosts:
            raise ValueError(f"no host:port in {view}")
        target = Target(scheme, hosts, username, password)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        if scheme == "redis+sentinel":
            if not segments or len(segments) > 2:
                raise ValueError(
                    "a Sentinel URL is redis+sentinel://host:port[,host:port...]/service_name"
                    f"[/db], got {view}"
                )
            target.service = segments[0]
            if len(segments) == 2:
                db = _ascii_int(segments[1])
                if db is None or db > _MAX_DB:
                    raise ValueError(f"bad database number in {view}: a database is 0 to {_MAX_DB}")
                target.db = db
        elif segments:
            raise ValueError(
                "a Cluster URL is redis+cluster://host:port[,host:port...] (a cluster has "
                f"database 0 only, and no path), got {view}"
            )
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            _option(target, scheme, name, value, view, plain)
    except ValueError as exc:
        raise ValueError(f"{exc}{hint}") from None
    return target


def _option(target: Target, scheme: str, name: str, value: str, view: str, plain: bool) -> None:
    if name in _FLOAT_OPTIONS:
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"{name} must be a positive number of seconds in {view}")
        target.options[name] = seconds
    elif name in _INT_OPTIONS:
        number = _ascii_int(value)
        if number is None or not 1 <= number <= _MAX_DB:
            raise ValueError(f"{name} must be a positive integer in {view}")
        target.options[name] = number
    elif name in _STR_OPTIONS and scheme == "redis+sentinel":
        target.options[name] = value
    else:
        known = sorted(_FLOAT_OPTIONS | _INT_OPTIONS)
        if scheme == "redis+sentinel":
            known += sorted(_STR_OPTIONS)
        # an option's name is shown only if it looks like one (a name spilled from a
        # password, or a secret value in the name's place, is not)
        what = repr(name) if plain and name.isascii() and name.isidentifier() else "an option"
        raise ValueError(
            f"unknown option {what} in {view} (known: {', '.join(known)}); pass a "
            "client you built yourself for anything else"
        )


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
    connection_class = getattr(pool, "connection_class", None)
    tls = isinstance(connection_class, type) and issubclass(connection_class, SSLConnection)
    scheme = "rediss" if tls else "redis"
    return f"{scheme}://{host}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
