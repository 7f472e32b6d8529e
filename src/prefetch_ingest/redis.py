"""The Redis store: one execution per key across processes and machines.

Install with the ``redis`` extra (``pip install 'prefetch-ingest[redis]'``) and
pass it to the Prefetcher::

    async with Prefetcher(load, store=RedisStore("redis://localhost:6379/0")) as pf:
        stats = await pf.get(("project-1", "run-7"))

How it works, what one hit and one cold load cost, and what is and is not
guaranteed: ``docs/redis.md``. In short:

- a key's result (or failure) is one Redis string, read with one ``MGET``
  (result and lease together), so a hit is one command and one round trip;
- one process at a time runs a key: a lease taken with ``SET NX PX`` and a
  random token, renewed every ``lease / 3`` seconds while the load runs,
  released by compare-and-delete;
- the result is written by a Lua script only while the writer's token is still
  in the lease (fencing);
- other processes wait for a notification on one pub/sub channel per
  namespace, re-reading at least every ``poll_interval`` seconds in case a
  message is lost, and take the lease over when it lapses (its owner died);
- TTLs are Redis expiries (``PX``), so no instance's clock decides them.

The store runs on asyncio only (``redis.asyncio``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Final, Literal, Protocol, TypeVar, cast, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import anyio
import attrs

try:
    import redis as _redis_package
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "prefetch_ingest.redis needs the 'redis' package: pip install 'prefetch-ingest[redis]'"
    ) from _exc
try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"prefetch_ingest.redis needs redis-py 5.3 or later, found "
        f"{getattr(_redis_package, '__version__', 'an unknown version')}: "
        "pip install -U 'prefetch-ingest[redis]'"
    ) from _exc

from . import _log
from ._errors import CodecError, PrefetcherClosed, RemoteLoadError, StoreError
from ._fence import current_fence, fence_var
from ._redis_keys import Names, encode_key, names_for
from ._redis_records import (
    CorruptRecord,
    dump_lease,
    dump_lease_meta,
    dump_notice,
    dump_record,
    parse_lease,
    parse_notice,
    parse_record,
)
from ._redis_scripts import ACQUIRE, COMPLETE, INVALIDATE, RELEASE, RENEW
from ._store import LoadOutcome, StoredEntry
from ._types import Progress, Status
from ._validate import error_text as _error_text

__all__ = ["Codec", "CodecError", "JSONCodec", "RedisStore", "current_fence"]

_T = TypeVar("_T")

_REDIS_ERRORS: Final = (RedisError, OSError)
"""What counts as "Redis unreachable or failing" (``OSError`` covers timeouts and refusals)."""

_PROGRESS_INTERVAL: Final = 0.25
"""At most this often (seconds) a running load's progress is written to Redis."""

_RELEASE_TIMEOUT: Final = 2.0
"""How long a cancelled load may spend (shielded) releasing its lease."""

_CACHE_LIMIT: Final = 4096
"""Names kept for recently used keys (short keys only)."""

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


# ---------------------------------------------------------------------------
# codecs


@runtime_checkable
class Codec(Protocol):
    """How values are turned into bytes for Redis, and back.

    Any object with these two methods will do; for example, with msgspec::

        class MsgpackCodec:
            def encode(self, value: object) -> bytes:
                return msgspec.msgpack.encode(value)

            def decode(self, data: bytes) -> object:
                return msgspec.msgpack.decode(data)

    ``encode`` raises (any exception) for a value it cannot encode: that load
    then fails with :class:`CodecError`. ``decode`` raises for bytes it cannot
    read: the entry is reported as corrupt (logged) and loaded again. A codec
    must never execute code found in the data, which rules out ``pickle`` for
    any Redis that someone else can write to.
    """

    def encode(self, value: Any) -> bytes:
        """The bytes of ``value``."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value of ``data``."""
        ...


@attrs.frozen
class JSONCodec:
    """The default codec: UTF-8 JSON (stdlib :mod:`json`).

    JSON has no tuples and only string keys: a tuple comes back as a list, a
    dict's int keys as strings. Values that JSON cannot represent (sets,
    datetimes, arbitrary objects) fail their load with :class:`CodecError`;
    use another codec for them.
    """

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


# ---------------------------------------------------------------------------
# helpers


def _key_text(key: object) -> str:
    """A key for log events and messages: always a repr (no raw newline), at most 200 characters."""
    text = repr(key)
    return text if len(text) <= 200 else text[:200] + "...(truncated)"


def _redact(url: str) -> str:
    """The URL without its password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparsable url>"


def _duration(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"{name} must be a finite number of seconds, {bound}; got {value!r}")
    return v


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "RedisStore runs on asyncio only (it uses redis.asyncio); this code runs under "
            "another event loop (trio?). Use the in-memory store (store=None) there."
        ) from None


async def _once_more(call: Callable[[], Awaitable[_T]]) -> _T:
    """``call()``, tried a second time after a connection error.

    A pooled connection can be stale after a Redis restart; the application's
    client may have no retry policy of its own. Only for idempotent calls.
    """
    try:
        return await call()
    except RedisConnectionError:
        return await call()


class _Signal:
    """Wake-ups for one key in this process: ``event`` is set, then replaced, per notification."""

    __slots__ = ("event", "users")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.users = 0

    def fire(self) -> None:
        self.event.set()
        self.event = anyio.Event()


class _Ownership:
    """A run of a key in this process that holds (or held) the key's lease."""

    __slots__ = (
        "background",
        "fence",
        "last_progress",
        "lost",
        "renewed",
        "started_at",
        "token",
    )

    def __init__(
        self, token: str, fence: int, started_at: float, background: bool, now: float
    ) -> None:
        self.token = token
        self.fence = fence
        self.started_at = started_at
        self.background = background
        self.renewed = now  # monotonic time of the last confirmed take or renewal
        self.lost = False
        self.last_progress = -math.inf


# ---------------------------------------------------------------------------
# the store


class RedisStore:
    """A shared store on Redis: results survive restarts, each key runs once across processes.

    Args:
        url_or_client: a ``redis://`` (or ``rediss://``, ``unix://``) URL, or a
            :class:`redis.asyncio.Redis` client the application already has.
            A URL's connection is made when the Prefetcher opens the store and
            closed when it closes; an application's client is never closed.
            The client must leave ``decode_responses`` off (values are bytes).
        prefix: namespace of every Redis key and of the notification channel;
            must not contain ``{`` or ``}`` (they would break the Redis Cluster
            hash tag).
        lease: seconds a run's lease lasts without renewal; renewed every
            ``lease / 3`` seconds while the load runs. A process that dies
            holds the key for at most this long.
        codec: how values become bytes (:class:`Codec`); ``None`` is
            :class:`JSONCodec`. ``pickle`` is never used unless you pass it.
        fallback: ``None`` (Redis unreachable → :class:`StoreError`) or
            ``"local"`` (Redis unreachable → logged warning, and the load runs
            in this process, as it would with no shared store).
        poll_interval: how often a waiting process re-reads the key even
            without a notification (a lost message costs at most this much
            latency, and an owner's death is noticed this soon after its lease
            lapses); default ``lease / 10`` clamped to 0.05 … 1 second.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        prefix: str = "prefetch_ingest",
        lease: float = 30.0,
        codec: Codec | None = None,
        fallback: Literal["local"] | None = None,
        poll_interval: float | None = None,
    ) -> None:
        if isinstance(url_or_client, str):
            scheme = urlsplit(url_or_client).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise ValueError(
                    "url_or_client must be a redis://, rediss:// or unix:// URL "
                    f"or a redis.asyncio.Redis client, got the URL {_redact(url_or_client)!r}"
                )
            self._url: str | None = url_or_client
            self._given: aioredis.Redis | None = None
            self._where = _redact(url_or_client)
        elif isinstance(url_or_client, aioredis.Redis):
            kwargs = url_or_client.connection_pool.connection_kwargs
            if kwargs.get("decode_responses"):
                raise ValueError(
                    "url_or_client: the Redis client decodes responses to str "
                    "(decode_responses=True); the store needs bytes: pass a client "
                    "made with decode_responses=False (the default), or a URL"
                )
            self._url = None
            self._given = url_or_client
            host = kwargs.get("host", kwargs.get("path", "?"))
            self._where = f"redis://{host}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"
        else:
            raise TypeError(
                "url_or_client must be a redis:// URL or a redis.asyncio.Redis client, "
                f"got {type(url_or_client).__name__}"
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(
                f"prefix must not contain '{{' or '}}' (Redis Cluster hash tags), got {prefix!r}"
            )
        self._prefix = prefix
        self._lease = _duration("lease", lease, allow_zero=False)
        self._lease_ms = _ms(self._lease)
        if codec is None:
            codec = JSONCodec()
        elif not isinstance(codec, Codec):
            raise TypeError(
                f"codec must have encode(value) -> bytes and decode(bytes) -> value methods, "
                f"got {type(codec).__name__}"
            )
        self._codec: Codec = codec
        if fallback not in (None, "local"):
            raise ValueError(f'fallback must be None or "local", got {fallback!r}')
        self._fallback = fallback
        if poll_interval is None:
            self._poll = min(1.0, max(0.05, self._lease / 10))
        else:
            self._poll = _duration("poll_interval", poll_interval, allow_zero=False)
        self._channel = f"{prefix}:notify"
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._ttl_ms: int | None = None
        self._failure_ttl_ms = 0
        self._names_cache: dict[Hashable, Names] = {}
        self._signals: dict[str, _Signal] = {}
        self._owned: dict[str, _Ownership] = {}
        self._reads: dict[str, asyncio.Task[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._subscribed: anyio.Event | None = None

    def __repr__(self) -> str:
        return (
            f"RedisStore({self._where!r}, prefix={self._prefix!r}, lease={self._lease!r}, "
            f"codec={self._codec!r}, fallback={self._fallback!r})"
        )

    # -- life cycle ----------------------------------------------------------

    async def open(self, *, ttl: float | None, failure_ttl: float) -> None:
        """Connect, check that Redis answers, and remember the expiries to write.

        Raises:
            RuntimeError: not running on asyncio.
            StoreError: Redis does not answer (unless ``fallback="local"``).
        """
        _require_asyncio()
        if self._client is not None:
            raise RuntimeError("this RedisStore is already open; one Prefetcher uses one store")
        if ttl is None:
            self._ttl_ms = None
        else:
            # ttl 0 ("do not keep"): the value stays readable briefly, for the
            # processes that were waiting on that very run
            seconds = _duration("ttl", ttl, allow_zero=True)
            self._ttl_ms = _ms(seconds) if seconds else max(1000, 2 * _ms(self._poll))
        fttl = _duration("failure_ttl", failure_ttl, allow_zero=True)
        self._failure_ttl_ms = 0 if fttl == 0 else _ms(fttl)
        if self._given is not None:
            client = self._given
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
        self._scripts = {
            "acquire": client.register_script(ACQUIRE),
            "complete": client.register_script(COMPLETE),
            "renew": client.register_script(RENEW),
            "release": client.register_script(RELEASE),
            "invalidate": client.register_script(INVALIDATE),
        }
        try:
            await client.ping()
        except _REDIS_ERRORS as exc:
            if self._fallback is None:
                await self._close_client()
                raise self._unavailable("open", exc) from exc
            self._log_fallback("open", exc)
            return
        await self._check_eviction_policy(client)

    async def aclose(self) -> None:
        """Stop listening and disconnect; an application's own client is left open.

        Shared lookups still in flight end here too: a lookup runs as a task of
        its own (so one caller's cancellation does not cancel it for the
        others), and a lookup whose callers all left would otherwise outlive
        the store (with Redis not answering, for as long as the client retries).
        """
        reader, self._reader = self._reader, None
        tasks = {*self._reads.values()}
        if reader is not None:
            tasks.add(reader)
        with anyio.CancelScope(shield=True):
            while tasks:
                # Cancel again until they end: on Python 3.11 a cancellation that
                # lands while redis-py's connection code is inside its own timeout
                # can be swallowed, and one cancel() would then wait forever.
                for task in tasks:
                    task.cancel()
                _, tasks = await asyncio.wait(tasks, timeout=0.1)
        for signal in self._signals.values():
            signal.fire()
        self._subscribed = None
        await self._close_client()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None and client is not self._given:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _check_eviction_policy(self, client: aioredis.Redis) -> None:
        try:
            reply: dict[Any, Any] = await client.config_get("maxmemory-policy")
        except _REDIS_ERRORS:  # CONFIG may be disabled (managed Redis): nothing to check
            return
        raw = reply.get("maxmemory-policy", reply.get(b"maxmemory-policy", b""))
        policy = raw.decode() if isinstance(raw, bytes) else str(raw)
        if policy in _EVICTING_POLICIES:
            _log.logger.warning(
                "prefetch.redis_eviction_policy",
                where=self._where,
                policy=policy,
                hint="Redis may evict leases and results under memory pressure: a key could "
                "run twice; use maxmemory-policy noeviction for the store's database",
            )

    # -- keys ----------------------------------------------------------------

    def check_key(self, key: Hashable) -> None:
        """Raise ``TypeError`` (naming ``key``) for a key Redis cannot hold.

        Any key built from str, int, float, bool, None and tuples of them is
        accepted, whatever its size: it is hashed into a fixed-size Redis name.
        """
        self._names(key)

    def _names(self, key: Hashable) -> Names:
        cache = self._names_cache
        try:
            return cache[key]
        except KeyError:
            pass
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        names = names_for(self._prefix, key)
        if len(encode_key(key)) <= 256:  # never keep large keys alive in the cache
            if len(cache) >= _CACHE_LIMIT:
                cache.pop(next(iter(cache)))
            cache[key] = names
        return names

    # -- reading -------------------------------------------------------------

    def _live_client(self) -> aioredis.Redis:
        client = self._client
        if client is None:
            raise StoreError("the RedisStore is not open (the Prefetcher opens it)")
        return client

    async def lookup(self, key: Hashable) -> StoredEntry | None:
        """The key's state from Redis: one ``MGET`` of its record and its lease.

        Concurrent lookups of one key in this process share one ``MGET`` (a
        stampede of callers on a cold key costs one command, not one each).
        """
        names = self._names(key)
        client = self._live_client()
        read = self._reads.get(names.digest)
        if read is None:
            read = asyncio.get_running_loop().create_task(
                _once_more(lambda: client.mget([names.record, names.lease]))
            )
            self._reads[names.digest] = read
            read.add_done_callback(functools.partial(self._read_done, names.digest))
        try:
            reply = await asyncio.shield(read)
            record, lease = cast("list[bytes | None]", reply)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if read.cancelled() and task is not None and not task.cancelling():
                # not this caller's cancellation: the store closed under it
                raise PrefetcherClosed("the store was closed while this lookup waited") from None
            raise
        except _REDIS_ERRORS as exc:
            if self._fallback is None:
                raise self._unavailable("lookup", exc, key) from exc
            self._log_fallback("lookup", exc, key)
            return None
        return self._entry(key, names, record, lease)

    def _read_done(self, digest: str, read: asyncio.Task[Any]) -> None:
        if self._reads.get(digest) is read:
            del self._reads[digest]
        if not read.cancelled():
            read.exception()  # retrieved here, whoever still awaits it

    def _entry(
        self, key: Hashable, names: Names, record: bytes | None, lease: bytes | None
    ) -> StoredEntry | None:
        failed: StoredEntry | None = None
        if record is not None:
            try:
                header, payload = parse_record(record, names.digest)
                if header.kind == "c":
                    return StoredEntry(
                        status=Status.COMPLETED,
                        value=self._decode(payload),
                        started_at=header.started_at,
                        completed_at=header.completed_at,
                        expires_at=header.expires_at,
                        background=header.background,
                    )
                failed = StoredEntry(
                    status=Status.FAILED,
                    error=header.error,
                    started_at=header.started_at,
                    completed_at=header.completed_at,
                    expires_at=header.expires_at,
                    background=header.background,
                )
            except CorruptRecord as exc:
                self._log_corrupt(key, names, exc)
        if lease is not None:
            try:
                info = parse_lease(lease, names.digest)
            except CorruptRecord as exc:
                self._log_corrupt(key, names, exc)
            else:
                return StoredEntry(
                    status=Status.RUNNING,
                    started_at=info.started_at,
                    background=info.background,
                    progress=info.progress,
                )
        return failed

    def _decode(self, payload: bytes) -> Any:
        try:
            return self._codec.decode(payload)
        except Exception as exc:
            raise CorruptRecord(f"the codec cannot decode the value: {_error_text(exc)}") from exc

    # -- loading -------------------------------------------------------------

    async def load(
        self,
        key: Hashable,
        run: Callable[[], Awaitable[Any]],
        *,
        background: bool,
        force: bool,
    ) -> LoadOutcome:
        """Make sure ``key`` has a result; run ``run`` here only if no other process does.

        See :meth:`prefetch_ingest.SharedStore.load` and ``docs/redis.md``.
        Cold, uncontended, this is two round trips: the acquire script and the
        completion script (plus one renewal per ``lease / 3`` seconds of load).
        """
        names = self._names(key)
        token = secrets.token_hex(16)
        accepted: list[str] = []  # tokens of runs we waited on: their result is ours
        signal: _Signal | None = None
        try:
            while True:
                event = signal.event if signal is not None else None
                try:
                    code, data = await _once_more(
                        functools.partial(self._acquire, names, token, background, force, accepted)
                    )
                except anyio.get_cancelled_exc_class():
                    # the SET NX may have reached Redis: hand the lease back (it
                    # has an expiry in any case)
                    await self._release(key, names, token)
                    raise
                except _REDIS_ERRORS as exc:
                    if self._fallback is None:
                        raise self._unavailable("load", exc, key) from exc
                    self._log_fallback("load", exc, key)
                    return LoadOutcome(await run(), True)
                if code == 0:
                    return await self._own(key, names, token, int(data), run, background)
                if code == 1:
                    try:
                        return self._use_record(names, data)
                    except CorruptRecord as exc:
                        self._log_corrupt(key, names, exc)
                        force = True  # overwrite it
                        bad = data[4:36].decode("ascii", "replace")
                        accepted = [t for t in accepted if t != bad]
                        continue
                if code == 2:
                    raise RemoteLoadError(parse_notice(data)[1])
                # code 3: another process holds the lease
                holder = data[:32].decode("ascii", "replace")
                if holder == token:  # a retried acquire whose first try took the lease
                    fence = parse_lease(data, names.digest).fence
                    return await self._own(key, names, token, fence, run, background)
                try:
                    parse_lease(data, names.digest)
                except CorruptRecord as exc:
                    # not a lease we wrote: drop exactly it, or we would wait for nothing
                    self._log_corrupt(key, names, exc)
                    try:
                        await self._scripts["release"](
                            keys=[names.record, names.lease, names.notice],
                            args=[data[:32], self._channel, f"{names.digest}:r"],
                        )
                    except _REDIS_ERRORS as exc2:
                        if self._fallback is None:
                            raise self._unavailable("load", exc2, key) from exc2
                        self._log_fallback("load", exc2, key)
                        return LoadOutcome(await run(), True)
                    continue
                if holder not in accepted:
                    accepted.append(holder)
                    del accepted[:-16]
                if event is None:
                    # subscribe first, then look again: no notification can slip between
                    signal = self._listen(names.digest)
                    await self._start_reader()
                    continue
                with anyio.move_on_after(self._poll):
                    await event.wait()
        finally:
            if signal is not None:
                self._unlisten(names.digest, signal)

    async def _acquire(
        self, names: Names, token: str, background: bool, force: bool, accepted: list[str]
    ) -> tuple[int, bytes]:
        meta = dump_lease_meta(names.digest, started_at=time.time(), background=background)
        reply = await self._scripts["acquire"](
            keys=[names.record, names.lease, names.notice],
            args=[
                token,
                meta,
                self._lease_ms,
                "1" if force else "0",
                self._channel,
                f"{names.digest}:s",
                *accepted,
            ],
        )
        code, data = reply
        return int(code), bytes(data)

    def _use_record(self, names: Names, data: bytes) -> LoadOutcome:
        header, payload = parse_record(data, names.digest)
        if header.kind == "f":
            raise RemoteLoadError(header.error or "unknown error")
        return LoadOutcome(self._decode(payload), False)

    async def _own(
        self,
        key: Hashable,
        names: Names,
        token: str,
        fence: int,
        run: Callable[[], Awaitable[Any]],
        background: bool,
    ) -> LoadOutcome:
        """We hold the lease: run, renew meanwhile, write the outcome under fencing."""
        own = _Ownership(token, fence, time.time(), background, anyio.current_time())
        self._owned[names.digest] = own
        settled = False  # the lease was handed back by the completion script
        try:
            failure: Exception | None = None
            value: Any = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._renew_loop, key, names, own)
                fence_set = fence_var.set(fence)
                try:
                    value = await run()
                except Exception as exc:  # recorded, then re-raised as is
                    failure = exc
                finally:
                    fence_var.reset(fence_set)
                tg.cancel_scope.cancel()
            if failure is None:
                try:
                    payload = self._codec.encode(value)
                    if not isinstance(payload, bytes | bytearray | memoryview):
                        raise TypeError(f"encode returned {type(payload).__name__}, not bytes")
                except Exception as exc:
                    failure = CodecError(
                        f"the value of the load for key {_key_text(key)} cannot be stored in "
                        f"Redis: {type(self._codec).__name__} cannot encode a "
                        f"{type(value).__name__} ({_error_text(exc)})"
                    )
                    failure.__cause__ = exc
                else:
                    settled = await self._write_value(key, names, own, bytes(payload))
                    return LoadOutcome(value, True)
            settled = await self._write_failure(key, names, own, failure)
            raise failure
        finally:
            if self._owned.get(names.digest) is own:
                del self._owned[names.digest]
            if not settled:
                await self._release(key, names, token)

    async def _renew_loop(self, key: Hashable, names: Names, own: _Ownership) -> None:
        interval = self._lease / 3
        while True:
            await anyio.sleep(interval)
            try:
                with anyio.fail_after(interval):
                    ok = await self._scripts["renew"](
                        keys=[names.record, names.lease, names.notice],
                        args=[own.token, self._lease_ms, b"", self._channel, b""],
                    )
            except (*_REDIS_ERRORS, TimeoutError) as exc:
                _log.logger.warning(
                    "prefetch.redis_renew_failed",
                    key=_key_text(key),
                    digest=names.digest,
                    error=_error_text(exc),
                )
                continue
            if not ok:
                self._lease_lost(key, names, "renewal")
                own.lost = True
                return
            own.renewed = anyio.current_time()

    def _lease_lost(self, key: Hashable, names: Names, when: str) -> None:
        _log.logger.warning(
            "prefetch.redis_lease_lost",
            key=_key_text(key),
            digest=names.digest,
            when=when,
            detail="the lease lapsed (and may belong to another process now): "
            "this run's result will not be stored",
        )

    async def _complete(
        self, key: Hashable, names: Names, own: _Ownership, args: list[Any]
    ) -> bool | None:
        """Run the completion script, retrying while our lease may still be alive.

        True written; False rejected (lease lost); None Redis stayed unreachable
        (then :class:`StoreError` is raised unless the store falls back).
        """
        delay = 0.05
        while True:
            try:
                written = await self._scripts["complete"](
                    keys=[names.record, names.lease, names.notice], args=[own.token, *args]
                )
            except _REDIS_ERRORS as exc:
                if anyio.current_time() - own.renewed < self._lease:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if self._fallback is None:
                    raise self._unavailable("store the result", exc, key) from exc
                self._log_fallback("store the result", exc, key)
                return None
            if written == 2:
                _log.logger.warning(
                    "prefetch.redis_superseded",
                    key=_key_text(key),
                    digest=names.digest,
                    fence=own.fence,
                    detail="a result of a later run (a greater fence) is stored: "
                    "this run's result will not be stored",
                )
                return False
            if not written and not await self._written_by(names, own.token):
                self._lease_lost(key, names, "completion")
                return False
            return True

    async def _written_by(self, names: Names, token: str) -> bool:
        """Whether the record is this run's (a retried completion whose first try landed)."""
        try:
            record = await self._live_client().get(names.record)
        except _REDIS_ERRORS:
            return False
        return isinstance(record, bytes) and record[4:36] == token.encode("ascii")

    def _expires_at(self, now: float, ms: int | None) -> float | None:
        return None if ms is None else now + ms / 1000

    async def _write_value(
        self, key: Hashable, names: Names, own: _Ownership, payload: bytes
    ) -> bool:
        now = time.time()
        record = dump_record(
            "c",
            own.token,
            own.fence,
            names.digest,
            started_at=own.started_at,
            completed_at=now,
            expires_at=self._expires_at(now, self._ttl_ms),
            background=own.background,
            error=None,
            payload=payload,
        )
        ttl = "" if self._ttl_ms is None else str(self._ttl_ms)
        result = await self._complete(
            key, names, own, [record, ttl, "0", b"", 0, self._channel, f"{names.digest}:c"]
        )
        return result is not None

    async def _write_failure(
        self, key: Hashable, names: Names, own: _Ownership, failure: Exception
    ) -> bool:
        now = time.time()
        error = _error_text(failure)
        fttl = self._failure_ttl_ms
        record = dump_record(
            "f",
            own.token,
            own.fence,
            names.digest,
            started_at=own.started_at,
            completed_at=now,
            expires_at=self._expires_at(now, fttl) if fttl else None,
            background=own.background,
            error=error,
            payload=b"",
        )
        try:
            result = await self._complete(
                key,
                names,
                own,
                [
                    record,
                    str(fttl) if fttl else "0",
                    "1",
                    dump_notice(own.token, error),
                    max(fttl, self._lease_ms, 5000),
                    self._channel,
                    f"{names.digest}:f",
                ],
            )
        except StoreError:
            return False  # already logged; the load's own exception matters more
        return result is not None

    async def _release(self, key: Hashable, names: Names, token: str) -> None:
        """Compare-and-delete the lease, shielded and bounded (it expires anyway)."""
        with anyio.move_on_after(_RELEASE_TIMEOUT, shield=True):
            try:
                await self._scripts["release"](
                    keys=[names.record, names.lease, names.notice],
                    args=[token, self._channel, f"{names.digest}:r"],
                )
            except _REDIS_ERRORS as exc:
                _log.logger.warning(
                    "prefetch.redis_release_failed",
                    key=_key_text(key),
                    digest=names.digest,
                    error=_error_text(exc),
                    detail="the lease expires by itself",
                )

    # -- other operations ------------------------------------------------------

    async def invalidate(self, key: Hashable) -> bool:
        """Delete the key's stored result or failure (one script); a running load goes on."""
        names = self._names(key)
        self._live_client()
        try:
            n = await _once_more(
                lambda: self._scripts["invalidate"](
                    keys=[names.record, names.lease, names.notice],
                    args=[self._channel, f"{names.digest}:i"],
                )
            )
        except _REDIS_ERRORS as exc:
            if self._fallback is None:
                raise self._unavailable("invalidate", exc, key) from exc
            self._log_fallback("invalidate", exc, key)
            return False
        return int(n) > 0

    async def publish_progress(self, key: Hashable, progress: Progress) -> None:
        """Write a running load's progress into its lease, at most 4 times a second per key.

        Best effort: nothing happens for a key whose load this process does not
        own, and Redis errors are logged, not raised.
        """
        names = self._names(key)
        own = self._owned.get(names.digest)
        if own is None or own.lost:
            return
        now = anyio.current_time()
        final = progress.total is not None and progress.done >= progress.total
        if now - own.last_progress < _PROGRESS_INTERVAL and not final:
            return
        own.last_progress = now
        value = dump_lease(
            own.token,
            own.fence,
            names.digest,
            started_at=own.started_at,
            background=own.background,
            progress=progress,
        )
        try:
            ok = await self._scripts["renew"](
                keys=[names.record, names.lease, names.notice],
                args=[own.token, self._lease_ms, value, self._channel, f"{names.digest}:p"],
            )
        except _REDIS_ERRORS as exc:
            _log.logger.warning(
                "prefetch.redis_progress_failed", key=_key_text(key), error=_error_text(exc)
            )
            return
        if ok:
            own.renewed = now

    async def wait_change(self, key: Hashable, timeout: float) -> None:
        """Return on the next notification about ``key``, or after ``timeout`` seconds."""
        names = self._names(key)
        signal = self._listen(names.digest)
        try:
            with anyio.move_on_after(timeout):
                await self._start_reader()
                await signal.event.wait()
        finally:
            self._unlisten(names.digest, signal)

    # -- notifications -----------------------------------------------------------

    def _listen(self, digest: str) -> _Signal:
        signal = self._signals.get(digest)
        if signal is None:
            signal = self._signals[digest] = _Signal()
        signal.users += 1
        return signal

    def _unlisten(self, digest: str, signal: _Signal) -> None:
        signal.users -= 1
        if signal.users <= 0 and self._signals.get(digest) is signal:
            del self._signals[digest]

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

    async def _read_notifications(self, client: aioredis.Redis, subscribed: anyio.Event) -> None:
        """The one reader of the namespace's channel in this process (a task until ``aclose``)."""
        while True:
            pubsub = client.pubsub()
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
                            signal = self._signals.get(data[:32].decode("ascii", "replace"))
                            if signal is not None:
                                signal.fire()
                    elif kind == "subscribe":
                        subscribed.set()
                        self._wake_all()  # messages may have been lost while disconnected
            except Exception as exc:  # Redis down, or anything odd: never die silently
                self._wake_all()  # waiters fall back to reading the keys themselves
                if not isinstance(exc, _REDIS_ERRORS):
                    _log.logger.warning(
                        "prefetch.redis_listener_error", where=self._where, error=_error_text(exc)
                    )
            finally:
                with anyio.CancelScope(shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await anyio.sleep(self._poll)

    def _wake_all(self) -> None:
        for signal in list(self._signals.values()):
            signal.fire()

    # -- errors and logs ---------------------------------------------------------

    def _unavailable(self, op: str, exc: BaseException, key: object = None) -> StoreError:
        message = f"Redis at {self._where} is unreachable or failing ({op}): {_error_text(exc)}"
        _log.logger.error(
            "prefetch.redis_unavailable",
            where=self._where,
            operation=op,
            key=None if key is None else _key_text(key),
            error=_error_text(exc),
        )
        return StoreError(message)

    def _log_fallback(self, op: str, exc: BaseException, key: object = None) -> None:
        _log.logger.warning(
            "prefetch.redis_fallback_local",
            where=self._where,
            operation=op,
            key=None if key is None else _key_text(key),
            error=_error_text(exc),
            detail="Redis is unreachable: running in this process only",
        )

    def _log_corrupt(self, key: Hashable, names: Names, exc: BaseException) -> None:
        _log.logger.warning(
            "prefetch.redis_corrupt_entry",
            key=_key_text(key),
            digest=names.digest,
            error=str(exc),
            detail="ignored: the key will be loaded again",
        )
