"""The systems under test, each behind one shape: ``open(loader, options) -> get``.

A *system* turns a loader ``async (key) -> value`` into a getter
``async (key) -> value`` that serves repeated keys from memory. Every
scenario drives every system through that getter only, with the same keys,
the same loader and the same loop, so the figures differ only by what each
system does per call.

Each peer is configured the way its documentation suggests for "cache this
coroutine, one load per key at a time, expire after ttl":

- ``floor``: a ``dict`` lookup inside an awaited ``async def`` (no dedup, no
  expiry, no bound): the least work any in-memory cache can do per hit.
- ``prefetch_ingest``: ``Prefetcher(loader, ttl=...)``; ``get`` is ``pf.get``.
- ``async-lru``: ``alru_cache(maxsize, ttl)`` (dedup through a shared task;
  expiry through one ``loop.call_later`` timer per entry).
- ``anyio lru_cache``: ``anyio.functools.lru_cache(maxsize, ttl)`` (dedup
  through a per-key lock; expiry checked on access only).
- ``aiocache``: ``cached_stampede(ttl, lease)`` over ``SimpleMemoryCache``
  (dedup through its lease lock; expiry through one timer per entry;
  unbounded).
- ``cashews``: ``Cache().setup("mem://?size=N")`` and ``@cache(ttl)``, whose
  default ``protected=True`` deduplicates in-process; ``@cache.early`` when a
  refresh age is asked for (its stale-while-revalidate).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import anyio.functools

Loader = Callable[[str], Coroutine[Any, Any, str]]
Getter = Callable[[str], Awaitable[str]]

__all__ = ["SYSTEMS", "Getter", "Loader", "Options", "System", "available_systems"]


@dataclass(frozen=True)
class Options:
    """What a scenario asks of every system (each honours what it can)."""

    ttl: float | None = 3600.0
    max_entries: int | None = None
    refresh_after: float | None = None
    #: prefetch_ingest only: an injectable monotonic clock.
    clock: Callable[[], float] | None = None
    #: False: turn off a peer's periodic full-scan expiry task (cashews'
    #: check_interval), which rescans every entry each second while it fills.
    background_scan: bool = True


@dataclass(frozen=True)
class System:
    """One system under test and what it can do."""

    name: str
    role: str  # "floor", "ours" or "peer"
    dedup: str | None  # how it runs one load per key, None: it does not
    expiry: str | None  # how entries expire, None: never
    bounded: bool  # honours max_entries (LRU)
    refresh: bool  # serves stale while reloading in the background
    opener: Callable[[Loader, Options], AbstractAsyncContextManager[Getter]] = field(repr=False)

    def open(self, loader: Loader, options: Options) -> AbstractAsyncContextManager[Getter]:
        return self.opener(loader, options)


# ---------------------------------------------------------------------------
# floor


@asynccontextmanager
async def _open_floor(loader: Loader, options: Options) -> AsyncIterator[Getter]:
    table: dict[str, str] = {}

    async def get(key: str) -> str:
        try:
            return table[key]
        except KeyError:
            value = await loader(key)
            table[key] = value
            return value

    yield get


# ---------------------------------------------------------------------------
# prefetch_ingest


@asynccontextmanager
async def _open_ours(loader: Loader, options: Options) -> AsyncIterator[Getter]:
    from prefetch_ingest import Prefetcher

    kwargs: dict[str, Any] = {
        "ttl": options.ttl,
        "refresh_after": options.refresh_after,
        "max_entries": options.max_entries,
    }
    if options.clock is not None:
        kwargs["clock"] = options.clock
    async with Prefetcher(loader, **kwargs) as pf:
        yield pf.get


# ---------------------------------------------------------------------------
# peers


@asynccontextmanager
async def _open_async_lru(loader: Loader, options: Options) -> AsyncIterator[Getter]:
    from async_lru import alru_cache

    wrapped = alru_cache(maxsize=options.max_entries, ttl=options.ttl)(loader)
    try:
        yield cast(Getter, wrapped)
    finally:
        await wrapped.cache_close()
        wrapped.cache_clear()


@asynccontextmanager
async def _open_anyio_lru(loader: Loader, options: Options) -> AsyncIterator[Getter]:
    # anyio types ttl as int; a float works the same (current_time() + ttl).
    ttl = cast(int | None, options.ttl)
    wrapped = anyio.functools.lru_cache(maxsize=options.max_entries, ttl=ttl)(loader)
    try:
        yield wrapped
    finally:
        wrapped.cache_clear()


@asynccontextmanager
async def _open_aiocache(loader: Loader, options: Options) -> AsyncIterator[Getter]:
    from aiocache import cached_stampede

    ttl = options.ttl if options.ttl is not None else None
    wrapped: Any = cached_stampede(ttl=ttl, lease=60)(loader)
    try:
        yield cast(Getter, wrapped)
    finally:
        await wrapped.cache.clear()
        await wrapped.cache.close()


@asynccontextmanager
async def _open_cashews(loader: Loader, options: Options) -> AsyncIterator[Getter]:
    from cashews import Cache

    cache = Cache()
    size = options.max_entries if options.max_entries is not None else 10**9
    interval = "" if options.background_scan else "&check_interval=0"
    cache.setup(f"mem://?size={size}{interval}")
    ttl = options.ttl if options.ttl is not None else 10.0**9
    if options.refresh_after is not None and options.ttl is not None:
        wrapped = cache.early(ttl=ttl, early_ttl=options.refresh_after)(loader)
    else:
        wrapped = cache(ttl=ttl)(loader)
    try:
        yield wrapped
    finally:
        await cache.clear()
        await cache.close()


SYSTEMS: tuple[System, ...] = (
    System("floor (dict)", "floor", None, None, False, False, _open_floor),
    System(
        "prefetch_ingest",
        "ours",
        "one flight per key, waiters on its event",
        "on access + sweep of the expired only",
        True,
        True,
        _open_ours,
    ),
    System(
        "async-lru",
        "peer",
        "shared task + shield",
        "one call_later timer per entry",
        True,
        False,
        _open_async_lru,
    ),
    System(
        "anyio lru_cache",
        "peer",
        "per-key lock, re-check",
        "on access only (no sweep)",
        True,
        False,
        _open_anyio_lru,
    ),
    System(
        "aiocache",
        "peer",
        "cached_stampede lease lock",
        "one call_later timer per entry",
        False,
        False,
        _open_aiocache,
    ),
    System(
        "cashews",
        "peer",
        "protected=True (shared task)",
        "on access + full scan every second",
        True,
        True,
        _open_cashews,
    ),
)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_MODULES = {
    "prefetch_ingest": "prefetch_ingest",
    "async-lru": "async_lru",
    "aiocache": "aiocache",
    "cashews": "cashews",
}


def available_systems() -> tuple[list[System], list[str]]:
    """The systems whose modules import here, and the names of those missing."""
    found: list[System] = []
    missing: list[str] = []
    for system in SYSTEMS:
        module = _MODULES.get(system.name)
        if module is None or _importable(module):
            found.append(system)
        else:
            missing.append(system.name)
    return found, missing


def finite(value: float | None) -> float:
    """``None`` (no limit) as infinity, for comparisons."""
    return math.inf if value is None else value
