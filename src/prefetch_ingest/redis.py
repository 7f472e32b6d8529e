"""The Redis store: one execution per key across processes and machines.

Install with the ``redis`` extra (``pip install 'prefetch-ingest[redis]'``) and
pass it to the Prefetcher::

    async with Prefetcher(load, store=RedisStore("redis://localhost:6379/0")) as pf:
        stats = await pf.get(("project-1", "run-7"))

How it works, what one hit and one cold load cost, and what is and is not
guaranteed: ``docs/redis.md``. This module holds only the primitives of the
shared-store interface (:mod:`prefetch_ingest.stores.interface`) on Redis; the
lease algorithm they serve is :mod:`prefetch_ingest.stores.lease`, shared by
every backend. In short:

- a key's outcome, lease and cancel note are three Redis strings in one hash
  slot (``{digest}``); a hit is one ``GET`` of the outcome: one round trip;
- the primitives that must be atomic (acquire, renew, fenced completion,
  compare-and-delete release, invalidate, cancel) are Lua scripts;
- notifications go over one pub/sub channel per namespace; TTLs are Redis
  expiries (``PX``), so no instance's clock decides them.

The store runs on asyncio only (``redis.asyncio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

try:
    import redis as _redis_package
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "prefetch_ingest.redis needs the 'redis' package: pip install 'prefetch-ingest[redis]'"
    ) from _exc
try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import Sentinel
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisClusterException, RedisError
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"prefetch_ingest.redis needs redis-py 5.3 or later, found "
        f"{getattr(_redis_package, '__version__', 'an unknown version')}: "
        "pip install -U 'prefetch-ingest[redis]'"
    ) from _exc

from . import _log
from ._errors import CodecError
from ._fence import current_fence
from ._redis_connect import (
    MULTI_SCHEMES,
    cluster_client,
    describe,
    parse_multi,
    sentinel_client,
    spilled,
    unsplittable,
)
from ._redis_records import (
    CorruptRecord,
    dump_failure_note,
    dump_lease_meta,
    dump_outcome,
    dump_progress,
    parse_lease,
    parse_note,
    parse_outcome,
)
from ._redis_scripts import ACQUIRE, CANCEL, COMPLETE, INVALIDATE, RELEASE, RENEW
from ._types import Progress
from ._validate import error_text
from .stores.codec import Codec, JSONCodec
from .stores.interface import Acquired, Completion, Outcome, Read, Run
from .stores.lease import LeasedStore, check_duration, poll_for
from .stores.signals import Signals, require_asyncio

__all__ = ["Codec", "CodecError", "JSONCodec", "RedisStore", "current_fence"]

_REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)
"""What counts as "Redis unreachable or failing" (``OSError`` covers timeouts and refusals;
``RedisClusterException``, not a ``RedisError``, a slot no node serves during a failover)."""

Client = aioredis.Redis | RedisCluster
"""The clients the store accepts (a Sentinel master client is an ``aioredis.Redis``)."""

_SECRET_PARAMS: Final = frozenset({"password", "pass", "passwd", "pwd", "secret", "token", "auth"})

_EVICTING_POLICIES: Final = frozenset(
    {
        "allkeys-lru",
        "allkeys-lfu",
        "allkeys-random",
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
        "volatile-ttl",
    }
)

_NAMES_KEPT: Final = 4096

_WAIT_MAX: Final = 2**31 - 1
"""The largest replica count and timeout (ms) the store passes to ``WAIT`` (Redis takes
64-bit ones; the store keeps well within them)."""

_WAIT_MARGIN: Final = 0.05
"""The least time (s) a completion keeps after its WAIT for the answer to come back."""

_NOTE_MS: Final = 30_000
"""How long a failure note stays for the followers of a failed refresh (ms)."""


def redact(url: str) -> str:
    """The URL with no secret in it: the user part's password and secret query values."""
    try:
        parts = urlsplit(url)
        if unsplittable(url):  # a password with an unencoded '/', '?' or '#': show no part
            return f"{parts.scheme.lower()}://<the rest hidden: it may hold the password>"
        netloc = parts.netloc
        userinfo, at, hosts = netloc.rpartition("@")
        if at and ":" in userinfo:  # also for the host lists of Sentinel and Cluster URLs
            netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if _secret(k) else v) for k, v in pairs], safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<unparsable url>"


def _secret(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_PARAMS or name.endswith("password")


_P = ParamSpec("_P")
_T = TypeVar("_T")

_REDIS_PY_DIR: Final = os.path.dirname(_redis_package.__file__)


def _guarded(
    method: Callable[_P, Coroutine[Any, Any, _T]],
) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """A primitive whose redis-py bugs count as Redis errors.

    During a cluster failover, redis-py's asyncio client can fail inside itself on a
    connection closed under it (seen: ``AttributeError: 'NoneType' object has no
    attribute 'writelines'``). Such an error, raised from redis-py's own code, is a
    connection error for the store (ridden out, retried, or a ``StoreError``), not a
    failure of the caller's load."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is None or not tb.tb_frame.f_code.co_filename.startswith(_REDIS_PY_DIR):
                raise
            raise RedisConnectionError(
                f"redis-py failed inside itself ({type(exc).__name__}: {exc}); "
                "taken as a lost connection"
            ) from exc

    return wrapper


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisBackend:
    """The shared-store primitives on Redis (see :mod:`prefetch_ingest.stores.interface`)."""

    errors: tuple[type[BaseException], ...] = _REDIS_ERRORS

    def __init__(
        self,
        url: str | None,
        client: Client | None,
        *,
        prefix: str,
        poll: float,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self._url = url
        self._given = client
        self._prefix = prefix
        self._poll = poll
        self._replicas = replicas
        self._replica_timeout = replica_timeout
        self._channel = f"{prefix}:notify"
        if client is not None:
            self._where = describe(client)
        else:
            assert url is not None
            self._where = redact(url)
        self._client: Client | None = None
        self._sentinel: Sentinel | None = None
        self._reader_node = 0  # the cluster node the notification reader tries next
        self._node_clients: dict[str, aioredis.Redis] = {}  # cluster node -> client (WAIT)
        self.scripts: dict[str, Any] = {}
        self._names: dict[str, list[str]] = {}
        self._signals = Signals()
        self._reader: asyncio.Task[None] | None = None
        self._subscribed: anyio.Event | None = None
        self.on_notice: Callable[[str | None, str], None] | None = None

    @property
    def where(self) -> str:
        return self._where

    # -- life cycle ----------------------------------------------------------

    async def open(self) -> None:
        require_asyncio("RedisStore", "it uses redis.asyncio")
        client: Client
        if self._given is not None:
            client = self._given
        elif urlsplit(self._url or "").scheme.lower() in MULTI_SCHEMES:
            assert self._url is not None
            target = parse_multi(self._url, self._where)
            if target.scheme == "redis+cluster":
                client = cluster_client(target)
            else:
                self._sentinel, client = sentinel_client(target)
        else:
            assert self._url is not None
            # A blocking pool: a burst of calls waits for a connection rather
            # than failing with "Too many connections". URL options
            # (?max_connections=...&socket_timeout=...) take precedence.
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=64,
                timeout=20.0,
                socket_connect_timeout=5.0,
                socket_timeout=10.0,
                # a pooled connection may be stale after a Redis restart
                retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.01), 3),
            )
            client = aioredis.Redis.from_pool(pool)
        self._client = client
        self.scripts = {
            "acquire": client.register_script(ACQUIRE),
            "complete": client.register_script(COMPLETE),
            "renew": client.register_script(RENEW),
            "release": client.register_script(RELEASE),
            "invalidate": client.register_script(INVALIDATE),
            "cancel": client.register_script(CANCEL),
        }
        try:
            try:
                await client.ping()
            except RedisClusterException as exc:
                if "cluster mode is not enabled" not in str(exc).lower():
                    raise
                raise ValueError(
                    f"{self._where} is not a Redis Cluster (cluster mode is not enabled on "
                    "that server): use a redis://host:port/db URL (or rediss://) for one "
                    "Redis, redis+sentinel:// for a Sentinel deployment"
                ) from None
            if isinstance(client, aioredis.Redis):
                await self._check_a_data_server(client)
        except ValueError:
            await self.aclose()  # the connection this store made, not the caller's
            raise
        await self._check_eviction_policy(client)
        await self._start_reader()  # notifications from the start (fresh marks, wake-ups)

    async def aclose(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with anyio.CancelScope(shield=True):
                # Cancel again until it ends: on Python 3.11 a cancellation that
                # lands inside redis-py's own timeout handling can be swallowed.
                while not reader.done():
                    reader.cancel()
                    await asyncio.wait({reader}, timeout=0.1)
        self._signals.fire_all()
        self._subscribed = None
        client, self._client = self._client, None
        sentinel, self._sentinel = self._sentinel, None
        node_clients, self._node_clients = self._node_clients, {}
        self.scripts = {}
        with anyio.CancelScope(shield=True):
            for plain in node_clients.values():
                await plain.aclose()
        if client is not None and client is not self._given:
            with anyio.CancelScope(shield=True):
                await client.aclose()
                if sentinel is not None:
                    await sentinel.aclose()

    async def _check_a_data_server(self, client: aioredis.Redis) -> None:
        """A ``redis://`` URL (or a plain client) must reach a Redis that holds data.

        To a sentinel, it opens (``PING`` and ``SUBSCRIBE`` work there) and fails every
        get with "unknown command 'GET'"; to one node of a Redis Cluster, it fails every
        key of another node's slots with ``MOVED``: both are refused at once, clearly."""
        try:
            server: dict[str, Any] = await client.info("server")
        except _REDIS_ERRORS:  # INFO may be disabled: the first command will tell
            server = {}
        if str(server.get("redis_mode", "")) == "sentinel":
            raise ValueError(
                f"{self._where} is a Redis Sentinel, not a Redis that holds data: use a "
                "redis+sentinel://host:port[,host:port...]/service_name[/db] URL, or a "
                "client from Sentinel.master_for"
            )
        await self._check_not_a_cluster_node(client)

    async def _check_not_a_cluster_node(self, client: aioredis.Redis) -> None:
        """A plain client to one node of a Redis Cluster would fail every key of another
        node's slots with ``MOVED``: refuse it at once, clearly."""
        try:
            info: dict[str, Any] = await client.info("cluster")
        except _REDIS_ERRORS:  # INFO may be disabled: the first MOVED will tell
            return
        if str(info.get("cluster_enabled", "0")) == "1":
            raise ValueError(
                f"{self._where} is a node of a Redis Cluster: a plain client reaches only "
                "that node's slots; use a redis+cluster://host:port[,host:port...] URL or "
                "a redis.asyncio.RedisCluster client"
            )

    async def _check_eviction_policy(self, client: Client) -> None:
        """Warn of an evicting ``maxmemory-policy``: on the one Redis, or on any master of
        a cluster (a cluster client's ``CONFIG GET`` asks only one node unless told)."""
        try:
            if isinstance(client, RedisCluster):
                reply: Any = await client.config_get(
                    "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
                )
            else:
                reply = await client.config_get("maxmemory-policy")
        except _REDIS_ERRORS:  # CONFIG may be disabled (managed Redis): nothing to check
            return
        # several nodes asked: {node name: reply}; one node: its reply
        replies: list[tuple[str | None, Any]]
        if isinstance(reply, dict) and reply and all(isinstance(r, dict) for r in reply.values()):
            replies = [(str(name), one) for name, one in reply.items()]
        else:
            replies = [(None, reply)]
        for node, one in replies:
            if not isinstance(one, dict):
                continue
            raw = one.get("maxmemory-policy", one.get(b"maxmemory-policy", b""))
            policy = raw.decode() if isinstance(raw, bytes) else str(raw)
            if policy in _EVICTING_POLICIES:
                _log.logger.warning(
                    "prefetch.redis_eviction_policy",
                    where=self._where,
                    node=node,
                    policy=policy,
                    hint="Redis may evict leases and results under memory pressure: a key "
                    "could run twice; use maxmemory-policy noeviction for the store's "
                    "database (on every master of a cluster)",
                )

    def debug_counts(self) -> dict[str, int]:
        return {
            "client": int(self._client is not None),
            "notification reader": int(self._reader is not None),
            "listeners": len(self._signals),
        }

    # -- names -----------------------------------------------------------------

    def names(self, digest: str) -> list[str]:
        """The entry's Redis names: outcome, lease, cancel note (one hash slot)."""
        names = self._names.get(digest)
        if names is None:
            base = f"{self._prefix}:{{{digest}}}:"
            names = [base + "r", base + "l", base + "n"]
            if len(self._names) >= _NAMES_KEPT:
                self._names.clear()
            self._names[digest] = names
        return names

    def _live(self) -> Client:
        client = self._client
        if client is None:
            raise RedisConnectionError("the RedisStore is not open (the Prefetcher opens it)")
        return client

    # -- the primitives ------------------------------------------------------------

    @_guarded
    async def read(self, digest: str, *, outcome_only: bool = False) -> Read:
        client = self._live()
        names = self.names(digest)
        if outcome_only:  # a get's lookup: one GET, as cheap as a bare GET
            try:
                outcome = await client.get(names[0])
            except RedisConnectionError:  # a pooled connection may be stale: once more
                outcome = await client.get(names[0])
            return self._parse(digest, cast("bytes | None", outcome), None, None)
        try:
            reply = await client.mget(names)
        except RedisConnectionError:
            reply = await client.mget(names)
        outcome, lease, note = cast("list[bytes | None]", reply)
        return self._parse(digest, outcome, lease, note)

    def _parse(
        self, digest: str, outcome: bytes | None, lease: bytes | None, note: bytes | None
    ) -> Read:
        """Each part on its own: a corrupt outcome does not hide a live lease beside it."""
        o = r = n = None
        for raw, parse, what in (
            (outcome, parse_outcome, "outcome"),
            (lease, parse_lease, "lease"),
            (note, parse_note, "note"),
        ):
            if not raw:
                continue
            try:
                parsed: Any = parse(raw)
            except CorruptRecord as exc:
                _log.logger.warning(
                    "prefetch.redis_corrupt_entry",
                    digest=digest,
                    part=what,
                    error=str(exc),
                    detail="ignored: the key will be loaded again",
                )
                continue
            if what == "outcome":
                o = parsed
            elif what == "lease":
                r = parsed
            else:
                n = parsed
        cancelled = n if isinstance(n, str) else None
        failed = n if isinstance(n, Outcome) else None
        return Read(o, r, cancelled, failed)

    @_guarded
    async def acquire(
        self, digest: str, run: Run, lease: float, *, force: bool, accept: frozenset[str]
    ) -> Acquired:
        self._live()
        reply = await self.scripts["acquire"](
            keys=self.names(digest),
            args=[
                run.token,
                dump_lease_meta(run),
                _ms(lease),
                "1" if force else "0",
                self._channel,
                f"{digest}:s",
                *accept,
            ],
        )
        if int(reply[0]) == 0:
            return Acquired(int(reply[1]))
        return Acquired(None, self._parse(digest, reply[1], reply[2], reply[3]))

    @_guarded
    async def renew(self, digest: str, token: str, lease: float, progress: Progress | None) -> bool:
        self._live()
        ok = await self.scripts["renew"](
            keys=self.names(digest),
            args=[
                token,
                _ms(lease),
                b"" if progress is None else dump_progress(progress),
                "0" if progress is None else "1",
                self._channel,
                f"{digest}:p",
            ],
        )
        return bool(ok)

    @_guarded
    async def complete(self, digest: str, outcome: Outcome, keep: float | None) -> Completion:
        client = self._live()
        names = self.names(digest)
        args = [
            outcome.token,
            dump_outcome(outcome),
            "" if keep is None else _ms(keep),
            "0" if outcome.ok else "1",
            self._channel,
            f"{digest}:{'c' if outcome.ok else 'f'}",
            b"" if outcome.ok else dump_failure_note(outcome),
            _NOTE_MS,
        ]
        if not self._replicas:
            answer = await self.scripts["complete"](keys=names, args=args)
            return Completion(int(answer))
        # WAIT counts the replicas that have this connection's writes: one connection
        plain = client if isinstance(client, aioredis.Redis) else self._node_client(names[0])
        one = plain.client()
        try:
            try:
                answer = await self.scripts["complete"](keys=names, args=args, client=one)
            except _REDIS_ERRORS:
                if isinstance(client, RedisCluster):
                    await self._forget_node(client, plain)
                raise
            if int(answer) != 1:
                return Completion(int(answer))
            acked, error, timeout = await self._wait_for_replicas(one)
        finally:
            # the connection goes back to the pool even when the completion is cut (its
            # deadline, a cancellation): redis-py's own __aexit__ shields the release with
            # asyncio.shield, which a still-cancelled anyio scope interrupts: a leak per cut
            with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                await one.aclose()
        if acked < self._replicas:
            _log.logger.warning(
                "prefetch.redis_replication_short",
                where=self._where,
                digest=digest,
                replicas=self._replicas,
                acknowledged=acked,
                timeout=round(timeout, 3),
                error=error,
                detail="the result is stored on the master, but fewer replicas than asked "
                "for acknowledged it in time: a failover now could lose it (and the key "
                "would run again)",
            )
        return Completion(int(answer))

    async def _wait_for_replicas(self, one: aioredis.Redis) -> tuple[int, str | None, float]:
        """``WAIT`` on the completion's connection: (replicas acknowledged, error, timeout).

        The timeout is ``replica_timeout``, cut to fit the time the completion has left
        (its deadline, ``lease / 3``, less a margin for the answer): a WAIT outlasting it
        would be cut by that deadline, and a healthy Redis taken for an outage."""
        timeout = self._replica_timeout
        deadline = anyio.current_effective_deadline()
        if math.isfinite(deadline):
            left = deadline - anyio.current_time()
            timeout = min(timeout, left - max(_WAIT_MARGIN, left / 5))
        if timeout < 0.001:
            return 0, "no time left for WAIT before the completion's deadline (lease / 3)", 0.0
        try:
            acked = int(
                await one.execute_command(  # type: ignore[no-untyped-call]
                    "WAIT", self._replicas, _ms(timeout)
                )
            )
        except _REDIS_ERRORS as exc:
            # the completion landed; only its replication is unknown (a master turned
            # into a replica meanwhile unblocks WAIT with an error): said, not retried
            return 0, error_text(exc), timeout
        return acked, None, timeout

    async def _forget_node(self, client: RedisCluster, plain: aioredis.Redis) -> None:
        """The node did not take the completion (moved slot, failover): drop its client and
        refresh the cluster's map of slots, which nothing else does while a completion is
        retried (the renewals have stopped)."""
        for name, known in list(self._node_clients.items()):
            if known is plain:
                del self._node_clients[name]
                with anyio.CancelScope(shield=True):
                    await plain.aclose()
        with contextlib.suppress(*_REDIS_ERRORS):
            await client.nodes_manager.initialize()

    def _node_client(self, name: str) -> aioredis.Redis:
        """A plain client of the cluster node that serves ``name``'s slot (for ``WAIT``)."""
        client = self._live()
        assert isinstance(client, RedisCluster)
        node = client.get_node_from_key(name)
        if node is None:
            raise RedisClusterException(f"no cluster node serves the slot of {name!r}")
        plain = self._node_clients.get(node.name)
        if plain is None:
            pool = aioredis.ConnectionPool(
                connection_class=node.connection_class, max_connections=64, **node.connection_kwargs
            )
            plain = self._node_clients[node.name] = aioredis.Redis.from_pool(pool)
        return plain

    @_guarded
    async def release(self, digest: str, token: str) -> bool:
        self._live()
        n = await self.scripts["release"](
            keys=self.names(digest), args=[token, self._channel, f"{digest}:r"]
        )
        return bool(n)

    @_guarded
    async def invalidate(self, digest: str) -> bool:
        self._live()
        n = await self.scripts["invalidate"](
            keys=self.names(digest), args=[self._channel, f"{digest}:i"]
        )
        return int(n) > 0

    @_guarded
    async def cancel(self, digest: str, keep: float) -> str | None:
        self._live()
        token = await self.scripts["cancel"](
            keys=self.names(digest), args=[_ms(keep), self._channel, f"{digest}:x"]
        )
        return token.decode("ascii", "replace") if token else None  # the run's token

    async def wait_change(self, digest: str, timeout: float) -> None:
        await self._signals.wait(digest, timeout, self._start_reader)

    # -- notifications -----------------------------------------------------------

    async def _start_reader(self) -> None:
        """Make sure this process listens to the namespace's channel; wait (bounded) for it."""
        if self._client is None:
            return
        if self._reader is None:
            self._subscribed = anyio.Event()
            self._reader = asyncio.get_running_loop().create_task(
                self._read_notifications(self._client, self._subscribed),
                name=f"prefetch_ingest redis notifications {self._prefix}",
            )
        subscribed = self._subscribed
        if subscribed is not None and not subscribed.is_set():
            with anyio.move_on_after(self._poll):
                await subscribed.wait()

    def _subscriber(self, client: Client) -> tuple[aioredis.Redis | None, Any]:
        """A pub/sub connection for the reader (and a client to close after it, if made).

        On a cluster, a ``PUBLISH`` (in the scripts) reaches every node over the cluster
        bus, so the reader listens on one node, a plain connection, and moves to the next
        node when that one fails."""
        if not isinstance(client, RedisCluster):
            return None, client.pubsub()
        nodes = client.get_nodes()
        if not nodes:  # not initialised yet: the cluster client's own (first) node
            return None, client.pubsub()
        node = nodes[self._reader_node % len(nodes)]
        self._reader_node += 1
        pool = aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
        )
        plain = aioredis.Redis.from_pool(pool)
        return plain, plain.pubsub()

    async def _read_notifications(self, client: Client, subscribed: anyio.Event) -> None:
        """The one reader of the namespace's channel in this process (a task until ``aclose``)."""
        while True:
            plain, pubsub = self._subscriber(client)
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    kind = message.get("type")
                    if kind == "message":
                        data = message.get("data")
                        if isinstance(data, bytes):
                            digest = data[:32].decode("ascii", "replace")
                            if self.on_notice is not None:
                                self.on_notice(digest, data[33:34].decode("ascii", "replace"))
                            self._signals.fire(digest)
                    elif kind == "subscribe":
                        subscribed.set()
                        if self.on_notice is not None:
                            self.on_notice(None, "i")  # messages may have been lost meanwhile
                        self._wake_all()  # messages may have been lost while disconnected
            except Exception as exc:  # Redis down, or anything odd: never die silently
                self._wake_all()  # waiters fall back to reading the keys themselves
                if not isinstance(exc, _REDIS_ERRORS):
                    _log.logger.warning(
                        "prefetch.redis_listener_error", where=self._where, error=error_text(exc)
                    )
            finally:
                with anyio.CancelScope(shield=True):
                    await pubsub.aclose()
                    if plain is not None:
                        await plain.aclose()
            await anyio.sleep(self._poll)

    def _wake_all(self) -> None:
        self._signals.fire_all()


class RedisStore(LeasedStore):
    """A shared store on Redis: results survive restarts, each key runs once across processes.

    Args:
        url_or_client: a ``redis://`` (or ``rediss://``, ``unix://``) URL; a
            ``redis+sentinel://host:port[,host:port...]/service_name[/db]`` or
            ``redis+cluster://host:port[,host:port...]`` URL; or a client the
            application already has: :class:`redis.asyncio.Redis` (also one from
            ``Sentinel.master_for``) or :class:`redis.asyncio.RedisCluster`.
            A URL's connection is made when the Prefetcher opens the store and
            closed when it closes; an application's client is never closed.
            The client must leave ``decode_responses`` off (values are bytes).
        prefix: namespace of every Redis key and of the notification channel;
            must not contain ``{`` or ``}`` (they would break the Redis Cluster
            hash tag).
        lease: seconds a run's lease lasts without renewal; renewed every
            ``lease / 3`` seconds while the load runs. A process that dies
            holds the key for at most this long; waiters ride out a Redis
            outage for up to this long while the owner's lease may live.
        codec: how values become bytes (:class:`Codec`); ``None`` is
            :class:`JSONCodec`. ``pickle`` is never used unless you pass it.
        fallback: ``None`` (Redis unreachable → :class:`StoreError`) or
            ``"local"`` (Redis unreachable → logged warning, and the Prefetcher
            works as one instance with no shared store until Redis answers).
        poll_interval: how often a waiting process re-reads the key even
            without a notification; default ``lease / 10`` clamped to 0.05 … 1 s.
        replicas: after each stored completion, ``WAIT`` for this many replicas
            to acknowledge it (``0``, the default: do not wait; at most 2**31 - 1). A shortfall is
            logged (``prefetch.redis_replication_short``) and the result kept:
            the master has it; a failover before the replicas do could lose it.
        replica_timeout: how long one ``WAIT`` may take, in seconds; cut to fit the
            completion's own budget (``lease / 3``, less a margin for the answer);
            at most 2**31 - 1 milliseconds.
    """

    kind = "Redis"

    def __init__(
        self,
        url_or_client: str | aioredis.Redis | RedisCluster,
        *,
        prefix: str = "prefetch_ingest",
        lease: float = 30.0,
        codec: Codec | None = None,
        fallback: Literal["local"] | None = None,
        poll_interval: float | None = None,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        url: str | None = None
        client: Client | None = None
        if isinstance(url_or_client, str):
            try:
                scheme = urlsplit(url_or_client).scheme.lower()
            except ValueError as exc:  # "Invalid IPv6 URL": no part of the URL in it
                raise ValueError(f"url_or_client: cannot parse the URL ({exc})") from None
            if spilled(url_or_client):
                raise ValueError(
                    f"url_or_client: the {scheme}:// URL's user part seems to hold an "
                    "unencoded '/', '?' or '#' (the host would be read from the password): "
                    "percent-encode the password, urllib.parse.quote(password, safe='')"
                )
            if scheme not in ("redis", "rediss", "unix", *MULTI_SCHEMES):
                raise ValueError(
                    "url_or_client must be a redis://, rediss://, unix://, redis+sentinel:// "
                    "or redis+cluster:// URL, or a redis.asyncio.Redis or RedisCluster client, "
                    f"got the URL {redact(url_or_client)!r}"
                )
            if scheme in MULTI_SCHEMES:
                parse_multi(url_or_client, redact(url_or_client))  # a bad URL fails here
            url = url_or_client
        elif isinstance(url_or_client, RedisCluster):
            if url_or_client.get_encoder().decode_responses:
                raise ValueError(
                    "url_or_client: the RedisCluster client decodes responses to str "
                    "(decode_responses=True); the store needs bytes: pass a client "
                    "made with decode_responses=False (the default), or a URL"
                )
            client = url_or_client
        elif isinstance(url_or_client, aioredis.Redis):
            kwargs = url_or_client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise ValueError(
                    "url_or_client: the Redis client decodes responses to str "
                    "(decode_responses=True); the store needs bytes: pass a client "
                    "made with decode_responses=False (the default), or a URL"
                )
            client = url_or_client
        else:
            raise TypeError(
                "url_or_client must be a redis:// (or redis+sentinel://, redis+cluster://) URL, "
                "or a redis.asyncio.Redis or redis.asyncio.RedisCluster client, "
                f"got {type(url_or_client).__name__}"
            )
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be a non-negative int, got {replicas!r}")
        if replicas > _WAIT_MAX:
            raise ValueError(
                f"replicas must be at most {_WAIT_MAX} (a count for WAIT), got {replicas!r}"
            )
        replica_timeout = check_duration("replica_timeout", replica_timeout, allow_zero=False)
        if _ms(replica_timeout) > _WAIT_MAX:
            raise ValueError(
                f"replica_timeout must be at most {_WAIT_MAX / 1000} seconds (WAIT's timeout "
                f"is in milliseconds), got {replica_timeout!r}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix must not contain '{{' or '}}' (Redis Cluster hash tags), got {prefix!r}"
            )
        self._prefix = prefix
        self._replicas = replicas
        self._redis = RedisBackend(
            url,
            client,
            prefix=prefix,
            poll=poll_for(lease, poll_interval),
            replicas=replicas,
            replica_timeout=replica_timeout,
        )
        super().__init__(
            self._redis, lease=lease, codec=codec, fallback=fallback, poll_interval=poll_interval
        )

    def __repr__(self) -> str:
        more = f", replicas={self._replicas!r}" if self._replicas else ""
        return (
            f"RedisStore({self._redis.where!r}, prefix={self._prefix!r}, lease={self._lease!r}, "
            f"codec={self._codec!r}, fallback={self._fallback!r}{more})"
        )

    async def open(self, *, ttl: float | None, failure_ttl: float) -> None:
        """Connect, check that Redis answers, and remember the expiries to write.

        Raises:
            RuntimeError: not running on asyncio.
            StoreError: Redis does not answer (unless ``fallback="local"``).
        """
        require_asyncio("RedisStore", "it uses redis.asyncio")
        await super().open(ttl=ttl, failure_ttl=failure_ttl)

    # for tests that wrap a script to inject a fault
    @property
    def _scripts(self) -> dict[str, Any]:
        return self._redis.scripts
