"""The engine: :class:`Prefetcher`, a single-flight loader with background starts.

Shape: the bookkeeping is synchronous (the table in :mod:`._memory`, the
counters, the pending queue); awaiting happens only in thin places (a caller
waiting for a flight's event, a flight's task awaiting the load). A load runs
in a task of the Prefetcher's own task group, never in the caller's task, so
a caller that is cancelled or times out leaves the load running for everyone
else.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime
from types import CoroutineType, TracebackType
from typing import Any, Generic, Self, TypeVar, cast, overload

import anyio
import anyio.abc

from . import _log
from ._errors import PrefetcherClosed, PrefetchError, ReentrantLoadError, RemoteLoadError
from ._memory import Done, Failed, MemoryTable
from ._progress import current_sink
from ._store import SharedStore, StoredEntry
from ._types import Progress, Snapshot, Stats, Status

__all__ = ["Prefetcher"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_INF = math.inf
_PENDING = Status.PENDING
_RUNNING = Status.RUNNING
_COMPLETED = Status.COMPLETED
_FAILED = Status.FAILED


# ---------------------------------------------------------------------------
# argument checks


def _check_duration(name: str, value: object, *, allow_none: bool, allow_zero: bool) -> float:
    """A duration in seconds, as a float; ``inf`` stands for None where None is allowed."""
    if value is None:
        if allow_none:
            return _INF
        raise TypeError(f"{name} must be a number of seconds, not None")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        hint = " (use None for no limit)" if allow_none else ""
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}{hint}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    return float(value)


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value!r}")
    return value


def _is_coroutine_function(fn: object) -> bool:
    """True for ``async def`` functions, methods, partials of them, and async ``__call__``."""
    seen = 0
    while seen < 16:
        seen += 1
        if inspect.iscoroutinefunction(fn):
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            fn = wrapped
            continue
        call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's own __call__
        if call is not None and not inspect.isfunction(fn) and not inspect.ismethod(fn):
            return inspect.iscoroutinefunction(call)
        return False
    return False


def _reject_fn(name: str, fn: object) -> None:
    """Raise the TypeError for a bad ``fn``/``loader``; close a coroutine object first."""
    if isinstance(fn, CoroutineType):
        fn.close()  # so that no "coroutine ... was never awaited" warning escapes
        raise TypeError(
            f"{name} must be a coroutine function (async def), got a coroutine object; "
            f"pass the function and its arguments instead, e.g. get(key, fetch, arg) "
            f"rather than get(key, fetch(arg))"
        )
    if inspect.isawaitable(fn):
        raise TypeError(f"{name} must be a coroutine function, got an awaitable object {fn!r}")
    if not callable(fn):
        raise TypeError(f"{name} must be a coroutine function, got {type(fn).__name__}")
    raise TypeError(
        f"{name} must be a coroutine function (async def), got the plain callable {fn!r}"
    )


def _check_fn(name: str, fn: object) -> None:
    if not _is_coroutine_function(fn):
        _reject_fn(name, fn)


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------
# a load in flight


class _Flight:
    """One load of one key, pending or running, and what its waiters need."""

    __slots__ = (
        "__weakref__",
        "args",
        "background",
        "chain",
        "done",
        "engine",
        "error",
        "event",
        "fn",
        "force",
        "holds_slot",
        "key",
        "p_done",
        "p_message",
        "p_total",
        "publishing",
        "queued",
        "stale",
        "started",
        "status",
        "tb",
        "value",
    )

    def __init__(
        self,
        engine: Prefetcher[Any, Any],
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        background: bool,
        force: bool,
        stale: Done | None,
        chain: tuple[tuple[int, Hashable], ...],
        now: float,
    ) -> None:
        self.engine = engine
        self.key = key
        self.fn = fn
        self.args = args
        self.background = background
        self.force = force
        self.stale = stale
        self.chain = chain
        self.status = _PENDING
        self.queued = now
        self.started: float | None = None
        self.done: float | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.tb: TracebackType | None = None
        self.event: anyio.Event | None = None
        self.holds_slot = False
        self.p_done: float | None = None
        self.p_total: float | None = None
        self.p_message: str | None = None
        self.publishing = False

    # ProgressSink
    def progress(self, done: float, total: float | None, message: str | None) -> None:
        if self.done is not None:
            return
        self.p_done, self.p_total, self.p_message = done, total, message
        self.engine._on_progress(self)


# ---------------------------------------------------------------------------
# watch()


class _Watch(Generic[K]):
    """The async iterator returned by :meth:`Prefetcher.watch`."""

    def __init__(self, engine: Prefetcher[K, Any], key: K) -> None:
        self._engine = engine
        self._key = key
        self._queue: deque[Snapshot] = deque()
        self._event: anyio.Event | None = None
        self._started = False
        self._ended = False
        self._ref: weakref.ref[_Watch[K]] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop watching; the iterator ends."""
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._ref is not None:
                self._engine._unwatch(self._key, self._ref)
                self._ref = None
        if self._event is not None:
            self._event.set()

    def _push(self, snapshot: Snapshot | None) -> None:
        """Called by the engine on every change (None: the Prefetcher closed)."""
        if self._ended:
            return
        if snapshot is None:
            self._end()
            return
        queue = self._queue
        if queue and queue[-1].status is snapshot.status and not snapshot.status.terminal:
            queue[-1] = snapshot  # coalesce progress updates a slow consumer has not read
        else:
            queue.append(snapshot)
        if self._event is not None:
            self._event.set()

    async def __anext__(self) -> Snapshot:
        try:
            return await self._next()
        except BaseException:
            # Cancelled (or failed) while waiting: this iterator is finished,
            # and unregisters now rather than whenever it is collected.
            self._end()
            raise

    async def _next(self) -> Snapshot:
        engine = self._engine
        if not self._started:
            self._started = True
            engine._check_open()
            self._ref = engine._watch(self._key, self)
            first = await engine.status(self._key)
            if first.status.terminal:
                self._end()
            return first
        while not self._queue:
            if self._ended:
                raise StopAsyncIteration
            if engine._remote is not None and not engine._has_flight(self._key):
                # No local flight: the key's changes happen elsewhere. Wait for
                # the store's notification (or a local start), then re-read.
                self._event = anyio.Event()
                with anyio.move_on_after(1.0):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._wait_remote, tg)
                        await self._event.wait()
                        tg.cancel_scope.cancel()
                if not self._queue and not self._ended:
                    snap = await engine.status(self._key)
                    self._queue.append(snap)
                continue
            self._event = anyio.Event()
            await self._event.wait()
        snapshot = self._queue.popleft()
        if snapshot.status.terminal:
            self._end()
        return snapshot

    async def _wait_remote(self, tg: anyio.abc.TaskGroup) -> None:
        remote = self._engine._remote
        assert remote is not None
        await remote.wait_change(self._key, 1.0)
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# the Prefetcher


class Prefetcher(Generic[K, V]):
    """Runs one load per key at a time, in the background or on demand, and serves the results.

    Args:
        loader: the default coroutine function ``async (key) -> value``. Every
            call may pass its own ``fn, *args`` instead.
        ttl: seconds a completed value (and a failure's record) is kept after
            completion; ``None`` keeps it until invalidated or evicted.
        failure_ttl: seconds a failure is re-raised by ``get`` without running
            the load again; 0 (the default) retries on the next ``get``.
        refresh_after: age in seconds after which a completed value is still
            served at once but reloaded in the background
            (stale-while-revalidate); ``None`` never.
        max_entries: bound on the entries held; the least recently used
            completed/failed entries are evicted first, in-flight loads never.
        max_concurrency: at most this many *background* loads (``prefetch`` and
            refreshes) run at once; the rest wait as ``PENDING``, first in first
            out. Loads demanded by ``get`` are never held back.
        cleanup_interval: seconds between sweeps of expired entries.
        store: ``None`` for the in-process store, or a shared store such as
            :class:`prefetch_ingest.redis.RedisStore`.
        clock: the monotonic clock, in seconds (injectable for tests).

    Use it as ``async with Prefetcher(...) as pf:``. Leaving the block cancels
    every load still running and waits until they are all gone; every waiter
    of those loads gets :class:`PrefetcherClosed`.

    .. versionadded:: 0.1.0
    """

    @overload
    def __init__(
        self: Prefetcher[Any, Any],
        loader: None = None,
        *,
        ttl: float | None = 86400.0,
        failure_ttl: float = 0.0,
        refresh_after: float | None = None,
        max_entries: int | None = None,
        max_concurrency: int | None = None,
        cleanup_interval: float = 3600.0,
        store: SharedStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None: ...

    @overload
    def __init__(
        self,
        loader: Callable[[K], Awaitable[V]],
        *,
        ttl: float | None = 86400.0,
        failure_ttl: float = 0.0,
        refresh_after: float | None = None,
        max_entries: int | None = None,
        max_concurrency: int | None = None,
        cleanup_interval: float = 3600.0,
        store: SharedStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None: ...

    def __init__(
        self,
        loader: Callable[[K], Awaitable[V]] | None = None,
        *,
        ttl: float | None = 86400.0,
        failure_ttl: float = 0.0,
        refresh_after: float | None = None,
        max_entries: int | None = None,
        max_concurrency: int | None = None,
        cleanup_interval: float = 3600.0,
        store: SharedStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if loader is not None:
            _check_fn("loader", loader)
        self._loader = loader
        self._ttl = _check_duration("ttl", ttl, allow_none=True, allow_zero=True)
        self._failure_ttl = _check_duration(
            "failure_ttl", failure_ttl, allow_none=False, allow_zero=True
        )
        self._refresh_after = _check_duration(
            "refresh_after", refresh_after, allow_none=True, allow_zero=False
        )
        self._max_entries = _check_limit("max_entries", max_entries)
        self._max_concurrency = _check_limit("max_concurrency", max_concurrency)
        self._cleanup_interval = _check_duration(
            "cleanup_interval", cleanup_interval, allow_none=False, allow_zero=False
        )
        if store is not None and not isinstance(store, SharedStore):
            raise TypeError(
                f"store must be None or a shared store such as RedisStore, "
                f"got {type(store).__name__}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._remote = store
        self._clock = clock
        self._wall_offset = time.time() - clock()

        self._table = MemoryTable(ttl=self._ttl, max_entries=self._max_entries)
        self._entries = self._table.entries  # read directly on the hit path
        self._lru = self._table.lru
        self._queue: deque[_Flight] = deque()  # background flights waiting for a slot
        self._live: set[_Flight] = set()  # every flight not finished yet
        self._bg_running = 0
        self._watchers: dict[Hashable, set[weakref.ref[_Watch[Any]]]] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._state = "new"  # new -> open -> closing -> closed
        self._log_hits = False
        self._log_info = True
        self._log_warning = True
        self._hit_extras = False

        # counters
        self._hits = 0
        self._joins = 0
        self._misses = 0
        self._prefetches = 0
        self._deduplicated = 0
        self._successes = 0
        self._failures = 0
        self._evictions = 0
        self._expirations = 0
        self._load_seconds = 0.0
        self._saved_seconds = 0.0
        self._waiting = 0
        self._n_pending = 0
        self._n_running = 0

    # -- life cycle --------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise PrefetcherClosed(
                "a Prefetcher can be entered only once; create a new one"
                if self._state == "open"
                else "the Prefetcher is closed; create a new one"
            )
        lv = _log.levels()
        self._log_hits = lv.debug
        self._log_info = lv.info
        self._log_warning = lv.warning
        self._hit_extras = self._lru or self._refresh_after != _INF or self._log_hits
        if self._remote is not None:
            await self._remote.open(
                ttl=None if self._ttl == _INF else self._ttl, failure_ttl=self._failure_ttl
            )
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = "open"
        tg.start_soon(self._sweeper, name="prefetch_ingest sweeper")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        self._state = "closing"
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            self._state = "closed"
            closed = PrefetcherClosed("the Prefetcher was closed before this load finished")
            for flight in list(self._live):
                self._finish(flight, None, closed, None)
            self._queue.clear()
            self._table.clear()
            for key in list(self._watchers):
                for ref in list(self._watchers.get(key, ())):
                    w = ref()
                    if w is not None:
                        w._push(None)
            self._watchers.clear()
            if self._remote is not None:
                with anyio.CancelScope(shield=True):
                    await self._remote.aclose()

    def _check_open(self) -> None:
        if self._state != "open":
            if self._state == "new":
                raise PrefetcherClosed(
                    "the Prefetcher is not open: use it inside `async with Prefetcher(...) as pf:`"
                )
            raise PrefetcherClosed()

    async def _sweeper(self) -> None:
        while True:
            await anyio.sleep(self._cleanup_interval)
            self.sweep()

    # -- the hit path ----------------------------------------------------

    async def get(
        self,
        key: K,
        fn: Callable[..., Awaitable[V]] | None = None,
        *args: Any,
        force_refresh: bool = False,
        timeout: float | None = None,
    ) -> V:
        """The value for ``key``: at once if completed, else from the load in flight or a new one.

        Args:
            key: any hashable key.
            fn: the coroutine function to run on a miss (default: ``loader``
                called with ``key``).
            *args: the arguments for ``fn``.
            force_refresh: ignore a completed value and run the load again
                (joining a load already in flight rather than starting a second).
            timeout: seconds this caller waits; on expiry it gets
                ``TimeoutError`` and the load goes on.

        Raises:
            Exception: whatever the load raised, the same object for every waiter.
            TimeoutError: ``timeout`` elapsed (for this caller only).
            PrefetcherClosed: the Prefetcher is not open, or closed meanwhile.
            TypeError: a bad ``key`` or ``fn``.
            ValueError: a bad ``timeout``.
            PrefetchError: a miss with neither ``fn`` nor ``loader``.
        """
        try:
            entry = self._entries[key]
        except KeyError:
            entry = None  # (not awaiting in here: the KeyError would become __context__)
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        if entry.__class__ is Done and not force_refresh:
            age = self._clock() - entry.done
            if age < self._ttl:
                if fn is not None and not callable(fn):
                    _reject_fn("fn", fn)  # type: ignore[unreachable]  # typed callers never get here
                self._hits += 1
                self._saved_seconds += entry.duration
                if self._hit_extras:
                    self._after_hit(key, entry, age, fn, args)
                return entry.value  # type: ignore[no-any-return]  # (no cast(): a call costs)
        return await self._get_slow(key, fn, args, force_refresh, timeout)

    # -- everything else of get ------------------------------------------

    def _after_hit(
        self,
        key: Hashable,
        entry: Done,
        age: float,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
    ) -> None:
        """The optional parts of a hit: LRU order, stale-while-revalidate, the DEBUG event."""
        if self._lru:
            self._entries.move_to_end(key)  # type: ignore[attr-defined]
        if age >= self._refresh_after:
            self._refresh(key, entry, fn, args)
        if self._log_hits:
            _log.logger.debug("prefetch.hit", key=_log.key_for_log(key), age_s=age)

    def _resolve_fn(
        self, key: Hashable, fn: Callable[..., Awaitable[Any]] | None, args: tuple[Any, ...]
    ) -> tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]:
        if fn is not None:
            return fn, args
        if self._loader is None:
            raise PrefetchError(
                f"no load for key {key!r}: pass fn (a coroutine function) to this call, "
                "or give the Prefetcher a default loader"
            )
        if args:
            raise TypeError("extra positional arguments were given without fn")
        return self._loader, (key,)

    def _check_call(
        self, key: Hashable, fn: object, timeout: object = None
    ) -> tuple[float | None, tuple[tuple[int, Hashable], ...]]:
        self._check_open()
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        if self._remote is not None:
            self._remote.check_key(key)
        if fn is not None:
            _check_fn("fn", fn)
        t = None
        if timeout is not None:
            t = _check_duration("timeout", timeout, allow_none=False, allow_zero=True)
        sink = current_sink.get()
        chain: tuple[tuple[int, Hashable], ...] = ()
        if isinstance(sink, _Flight):
            chain = sink.chain
        return t, chain

    async def _get_slow(
        self,
        key: K,
        fn: Callable[..., Awaitable[V]] | None,
        args: tuple[Any, ...],
        force: bool,
        timeout: float | None,
    ) -> V:
        t, chain = self._check_call(key, fn, timeout)
        if (id(self), key) in chain:
            raise ReentrantLoadError(key)
        entry = self._current(key)
        now = self._clock()
        cls = entry.__class__
        flight: _Flight
        if cls is _Flight:
            stale = entry.stale
            if stale is not None and not force and now - stale.done < self._ttl:
                self._hits += 1
                self._saved_seconds += stale.duration
                return cast(V, stale.value)
            flight = entry
            self._join(flight, now)
        elif cls is Done and not force:  # the fast path declined: a race on the clock
            self._hits += 1
            self._saved_seconds += entry.duration
            return cast(V, entry.value)
        elif (
            cls is Failed
            and not force
            and now - entry.done < self._failure_ttl
            and self._remote is None  # with a shared store, the store decides (below)
        ):
            raise entry.error.with_traceback(entry.tb)
        else:
            joined: _Flight | None = None
            if self._remote is not None and entry.__class__ is not Done:
                # Nothing usable here (or a local failure past failure_ttl): ask
                # the shared store, which may hold another process's result.
                local_failure = entry if entry.__class__ is Failed else None
                stored = await self._remote.lookup(key)
                entry = self._current(key)  # a local flight may have started meanwhile
                if entry.__class__ is _Flight:
                    joined = entry
                    self._join(entry, self._clock())
                elif stored is not None and not force:
                    if stored.status is _COMPLETED:
                        if local_failure is not None:  # a newer result stands
                            self._table.remove_if(key, local_failure)
                        self._hits += 1
                        self._refresh_remote(key, stored, fn, args)
                        return cast(V, stored.value)
                    if stored.status is _FAILED:
                        if (
                            local_failure is not None
                            and entry is local_failure
                            and stored.error == _error_text(local_failure.error)
                        ):
                            # the same failure as a load run (or followed) here:
                            # the exception object itself, not its remote summary
                            raise local_failure.error.with_traceback(local_failure.tb)
                        raise RemoteLoadError(stored.error or "unknown error")
            if joined is not None:
                flight = joined
            else:
                stale = entry if entry.__class__ is Done else None
                flight = self._start(key, fn, args, background=False, force=force, stale=stale)
                self._misses += 1
        # Wait for the flight here rather than through _await_flight (its twin,
        # used by wait()): with thousands of waiters on one key, every coroutine
        # frame less is time saved.
        if flight.done is None:
            event = flight.event
            if event is None:
                event = flight.event = anyio.Event()
            self._waiting += 1
            try:
                if t is None:
                    await event.wait()
                else:
                    with anyio.fail_after(t):
                        await event.wait()
            finally:
                self._waiting -= 1
        error = flight.error
        if error is not None:
            raise error.with_traceback(flight.tb)
        return cast(V, flight.value)

    def _refresh_remote(
        self,
        key: Hashable,
        stored: StoredEntry,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
    ) -> None:
        """Stale-while-revalidate with a shared store: reload an old stored value in the background.

        The stored value's age comes from its wall-clock completion time;
        while the reload runs, local callers are served that value.
        """
        if self._refresh_after == _INF or stored.completed_at is None:
            return
        if fn is None and self._loader is None:
            return
        age = max(time.time() - stored.completed_at, 0.0)
        if age < self._refresh_after or self._entries.get(key) is not None:
            return
        stale = Done(key, stored.value, self._clock() - age, 0.0, stored.background)
        self._start(key, fn, args, background=True, force=True, stale=stale)

    def _current(self, key: Hashable) -> Any:
        """The key's record, after enforcing expiry on it."""
        entry: Any = self._entries.get(key)
        cls = entry.__class__
        if (cls is Done or cls is Failed) and self._clock() - entry.done >= self._ttl:
            self._table.remove_if(key, entry)
            self._expired(entry)
            return None
        return entry

    def _join(self, flight: _Flight, now: float) -> None:
        """Count a caller joining ``flight``; a pending flight is started at once."""
        self._joins += 1
        self._deduplicated += 1
        if flight.started is not None:
            self._saved_seconds += now - flight.started
        if flight.status is _PENDING:
            self._promote(flight)
        if self._log_hits:
            _log.logger.debug("prefetch.joined", key=_log.key_for_log(flight.key))

    async def _await_flight(self, flight: _Flight, timeout: float | None) -> None:
        if flight.done is None:
            event = flight.event
            if event is None:
                event = flight.event = anyio.Event()
            self._waiting += 1
            try:
                if timeout is None:
                    await event.wait()
                else:
                    with anyio.fail_after(timeout):
                        await event.wait()
            finally:
                self._waiting -= 1

    # -- starting loads ----------------------------------------------------

    def prefetch(self, key: K, fn: Callable[..., Awaitable[V]] | None = None, *args: Any) -> bool:
        """Start a background load of ``key`` unless it is fresh or already in flight.

        Never blocks and never raises because of the load; raises only for
        misuse (closed, bad arguments).

        Returns:
            True when a load was started (or queued behind ``max_concurrency``).
        """
        _, chain = self._check_call(key, fn)
        entry = self._current(key)
        cls = entry.__class__
        if cls is _Flight:
            self._deduplicated += 1
            return False
        if cls is Done:
            if self._clock() - entry.done < self._refresh_after:
                self._deduplicated += 1
                return False
            self._start(key, fn, args, background=True, force=False, stale=entry, chain=chain)
            return True
        if cls is Failed and self._clock() - entry.done < self._failure_ttl:
            self._deduplicated += 1
            return False
        self._start(key, fn, args, background=True, force=False, stale=None, chain=chain)
        return True

    def _refresh(
        self,
        key: Hashable,
        entry: Done,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
    ) -> None:
        """Start the background reload of a stale value (from the hit path)."""
        if fn is None and self._loader is None:
            return  # nothing to reload with; the value is served until it expires
        sink = current_sink.get()
        chain = sink.chain if isinstance(sink, _Flight) else ()
        self._start(key, fn, args, background=True, force=False, stale=entry, chain=chain)

    def _start(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
        *,
        background: bool,
        force: bool,
        stale: Done | None,
        chain: tuple[tuple[int, Hashable], ...] | None = None,
    ) -> _Flight:
        run_fn, run_args = self._resolve_fn(key, fn, args)
        if chain is None:
            sink = current_sink.get()
            chain = sink.chain if isinstance(sink, _Flight) else ()
        flight = _Flight(
            self,
            key,
            run_fn,
            run_args,
            background=background,
            force=force,
            stale=stale,
            chain=(*chain, (id(self), key)),
            now=self._clock(),
        )
        self._put(key, flight)
        self._live.add(flight)
        if background:
            self._prefetches += 1
        limit = self._max_concurrency
        if background and limit is not None and self._bg_running >= limit:
            self._n_pending += 1
            self._queue.append(flight)
            self._notify(flight)
        else:
            self._n_pending += 1  # _launch moves it to running
            self._launch(flight, holds_slot=background and limit is not None)
        return flight

    def _launch(self, flight: _Flight, *, holds_slot: bool) -> None:
        assert self._tg is not None
        flight.status = _RUNNING
        flight.started = self._clock()
        flight.holds_slot = holds_slot
        if holds_slot:
            self._bg_running += 1
        self._n_pending -= 1
        self._n_running += 1
        self._tg.start_soon(self._run, flight, name="prefetch_ingest load")
        if self._log_info:
            _log.logger.info(
                "prefetch.started",
                key=_log.key_for_log(flight.key),
                background=flight.background,
                queued_s=flight.started - flight.queued,
            )
        self._notify(flight)

    def _promote(self, flight: _Flight) -> None:
        """A caller demands a pending background load: start it now, outside the limit."""
        # It stays in the queue; _launch_next skips flights that are no longer pending.
        self._launch(flight, holds_slot=False)

    def _launch_next(self) -> None:
        limit = self._max_concurrency
        queue = self._queue
        while queue and limit is not None and self._bg_running < limit:
            flight = queue.popleft()
            if flight.status is _PENDING and flight.done is None:
                self._launch(flight, holds_slot=True)

    # -- running loads -----------------------------------------------------

    async def _invoke(self, flight: _Flight) -> Any:
        awaitable = flight.fn(*flight.args)
        if not inspect.isawaitable(awaitable):
            raise TypeError(
                f"the load for key {flight.key!r} returned {type(awaitable).__name__}, "
                "not an awaitable: pass a coroutine function"
            )
        return await awaitable

    async def _run(self, flight: _Flight) -> None:
        if flight.done is not None:
            return
        token = current_sink.set(flight)
        try:
            if self._remote is not None:
                outcome = await self._remote.load(
                    flight.key,
                    functools.partial(self._invoke, flight),
                    background=flight.background,
                    force=flight.force,
                )
                ran_here = outcome.ran_here
                value = outcome.value
            else:
                value = await self._invoke(flight)
                ran_here = True
        except anyio.get_cancelled_exc_class():
            reason = (
                PrefetcherClosed("the Prefetcher was closed before this load finished")
                if self._state != "open"
                else PrefetchError(f"the load for key {flight.key!r} was cancelled")
            )
            self._finish(flight, None, reason, None)
            raise
        except BaseException as exc:  # handed to every waiter
            self._finish(
                flight, None, exc, exc.__traceback__, ran_here=not isinstance(exc, RemoteLoadError)
            )
            if not isinstance(exc, Exception):
                raise
        else:
            self._finish(flight, value, None, None, ran_here=ran_here)
        finally:
            current_sink.reset(token)
            if flight.holds_slot:
                flight.holds_slot = False
                self._bg_running -= 1
                if self._state == "open":
                    self._launch_next()

    def _finish(
        self,
        flight: _Flight,
        value: Any,
        error: BaseException | None,
        tb: TracebackType | None,
        *,
        ran_here: bool = True,
    ) -> None:
        """Record a flight's outcome, store it if the flight is still current, wake its waiters."""
        if flight.done is not None:
            return
        now = self._clock()
        flight.done = now
        flight.value = value
        flight.error = error
        flight.tb = tb
        key = flight.key
        self._live.discard(flight)
        if flight.status is _PENDING:
            self._n_pending -= 1
        else:
            self._n_running -= 1
        started = flight.started if flight.started is not None else now
        duration = now - started
        closing = isinstance(error, PrefetcherClosed)
        if ran_here and not closing:
            self._load_seconds += duration
            if error is None:
                self._successes += 1
            else:
                self._failures += 1
        flight.status = _COMPLETED if error is None else _FAILED
        current = self._entries.get(key) is flight
        if not ran_here and not flight.background and not closing:
            # The value (or failure) came from another process's run: the
            # caller that started this flight joined that run.
            self._misses -= 1
            self._joins += 1
        if current and not closing:
            if self._remote is not None:
                # Results live in the shared store; a failure is also kept here,
                # so that status can report it and failure_ttl can be honoured.
                if error is not None and flight.stale is None:
                    failed = Failed(key, error, tb, now, duration, flight.background)
                    self._put(key, failed)
                else:
                    self._table.remove_if(key, flight)
            elif error is None:
                record = Done(key, value, now, duration, flight.background)
                self._put(key, record)
            else:
                stale = flight.stale
                if stale is not None and now - stale.done < self._ttl:
                    # a failed refresh keeps the old value
                    self._put(key, stale)
                else:
                    record_f = Failed(key, error, tb, now, duration, flight.background)
                    self._put(key, record_f)
        elif current:
            self._table.remove_if(key, flight)
        flight.fn = _finished_fn
        flight.args = ()
        flight.stale = None
        if flight.event is not None:
            flight.event.set()
        if not closing:
            if error is None:
                if self._log_info:
                    _log.logger.info(
                        "prefetch.completed",
                        key=_log.key_for_log(key),
                        duration_s=duration,
                        background=flight.background,
                    )
            elif self._log_warning:
                _log.logger.warning(
                    "prefetch.failed",
                    key=_log.key_for_log(key),
                    duration_s=duration,
                    background=flight.background,
                    error=_error_text(error),
                    exc_info=error,
                )
        if current:
            self._notify(flight)

    def _on_progress(self, flight: _Flight) -> None:
        self._notify(flight)
        remote = self._remote
        if remote is not None and not flight.publishing and self._tg is not None:
            flight.publishing = True
            self._tg.start_soon(self._publish_progress, flight)

    async def _publish_progress(self, flight: _Flight) -> None:
        remote = self._remote
        assert remote is not None
        try:
            progress = self._progress_of(flight, self._clock())
            if progress is not None:
                await remote.publish_progress(flight.key, progress)
        except Exception as exc:  # best effort: progress must never break a load
            if self._log_warning:
                _log.logger.warning(
                    "prefetch.progress_not_shared",
                    key=_log.key_for_log(flight.key),
                    error=_error_text(exc),
                )
        finally:
            flight.publishing = False

    # -- expiry, eviction ----------------------------------------------------

    def sweep(self) -> int:
        """Remove every entry whose ``ttl`` is up, now; return how many.

        Runs by itself every ``cleanup_interval`` seconds. Costs O(entries
        removed), not O(entries held).
        """
        removed = self._table.expired(self._clock())
        if self._log_hits or self._watchers:
            for record in removed:
                self._expired(record)
        else:
            self._expirations += len(removed)
        return len(removed)

    def _expired(self, record: Done | Failed) -> None:
        self._expirations += 1
        if self._log_hits:
            _log.logger.debug("prefetch.expired", key=_log.key_for_log(record.key))
        self._notify_key(record.key)

    def _put(self, key: Hashable, record: object) -> None:
        """Store a record (or a flight) for ``key``, and account for what it evicted."""
        for victim in self._table.put(key, record):
            self._evicted(victim)

    def _evicted(self, record: Done | Failed) -> None:
        self._evictions += 1
        if self._log_hits:
            _log.logger.debug("prefetch.evicted", key=_log.key_for_log(record.key))

    # -- queries -------------------------------------------------------------

    async def wait(self, key: K, timeout: float | None = None) -> Snapshot:
        """Wait until ``key`` is neither pending nor running; return its snapshot.

        Never raises the load's exception (it is in the snapshot). Raises
        ``TimeoutError`` when ``timeout`` elapses, and
        :class:`PrefetcherClosed` if the Prefetcher closes meanwhile.
        """
        t, _ = self._check_call(key, None, timeout)
        entry = self._current(key)
        if entry.__class__ is _Flight:
            await self._await_flight(entry, t)
            if isinstance(entry.error, PrefetcherClosed):
                raise PrefetcherClosed()
            return self._snapshot_of_flight(entry)
        return await self.status(key)

    async def status(self, key: K) -> Snapshot:
        """The snapshot of ``key`` now; ``NOT_STARTED`` for a key nobody has asked for."""
        self._check_call(key, None)
        entry = self._current(key)
        cls = entry.__class__
        if cls is _Flight:
            return self._snapshot_of_flight(entry)
        if self._remote is not None:
            # The store knows better than a local failure record whether another
            # process has completed the key since.
            stored = await self._remote.lookup(key)
            if stored is not None:
                return self._snapshot_of_stored(key, stored)
            entry = self._current(key)
            if entry.__class__ is _Flight:
                return self._snapshot_of_flight(entry)
            if entry.__class__ is Failed and self._clock() - entry.done < self._failure_ttl:
                # The store keeps a failure for failure_ttl: if it no longer has
                # this one, another instance invalidated it, and so do we.
                self._table.remove_if(key, entry)
                entry = None
        if entry.__class__ is Done or entry.__class__ is Failed:
            return self._snapshot_of_record(entry)
        return Snapshot(key=key, status=Status.NOT_STARTED)

    async def invalidate(self, key: K) -> bool:
        """Forget ``key``'s completed or failed entry; True if there was something to forget.

        A load in flight is detached: its waiters still get its result, but
        the result is not stored, and the next ``get`` starts a fresh load.
        """
        self._check_call(key, None)
        record = self._table.pop(key)
        forgotten = record is not None
        if self._remote is not None:
            forgotten = await self._remote.invalidate(key) or forgotten
        if forgotten:
            self._notify_key(key)
        return forgotten

    def stats(self) -> Stats:
        """The counters now (see :class:`Stats`)."""
        table = self._table
        return Stats(
            total=self._n_pending + self._n_running + table.n_done + table.n_failed,
            pending=self._n_pending,
            running=self._n_running,
            completed=table.n_done,
            failed=table.n_failed,
            hits=self._hits,
            joins=self._joins,
            misses=self._misses,
            prefetches=self._prefetches,
            deduplicated=self._deduplicated,
            load_successes=self._successes,
            load_failures=self._failures,
            evictions=self._evictions,
            expirations=self._expirations,
            load_seconds=self._load_seconds,
            saved_seconds=self._saved_seconds,
            waiters=self._waiting,
            watchers=sum(len(refs) for refs in self._watchers.values()),
        )

    def watch(self, key: K) -> _Watch[K]:
        """An async iterator of ``key``'s snapshots, one per change of status or progress.

        It yields the current snapshot first, then one per change, and ends
        after a terminal status (``COMPLETED`` or ``FAILED``), or when the
        Prefetcher closes. A key that has not started yields ``NOT_STARTED``
        and then waits for it to start (what a server-push endpoint opened
        before the load was started needs); bound it with a timeout if the
        key may never start. Progress updates a slow consumer has not read yet
        are coalesced (it sees the latest); status changes are never dropped.
        Breaking out of the loop, or ``aclose()``, unregisters it.
        """
        self._check_call(key, None)
        return _Watch(self, key)

    # -- snapshots ------------------------------------------------------------

    def _wall(self, mono: float | None) -> datetime | None:
        if mono is None or mono == _INF:
            return None
        return datetime.fromtimestamp(mono + self._wall_offset, UTC)

    def _expires(self, done: float) -> datetime | None:
        return None if self._ttl == _INF else self._wall(done + self._ttl)

    def _mean_duration(self) -> float | None:
        loads = self._successes
        return self._load_seconds / loads if loads else None

    def _progress_of(self, flight: _Flight, now: float) -> Progress | None:
        if flight.p_done is None:
            return None
        done, total = flight.p_done, flight.p_total
        eta: float | None = None
        if flight.done is not None:
            eta = 0.0
        elif flight.started is not None:
            elapsed = max(now - flight.started, 0.0)
            if total is not None and done > 0 and elapsed > 0:
                eta = (total - done) * elapsed / done
            else:
                mean = self._mean_duration()
                if mean is not None:
                    eta = max(mean - elapsed, 0.0)
        return Progress(done=done, total=total, message=flight.p_message, eta=eta)

    def _snapshot_of_flight(self, flight: _Flight) -> Snapshot:
        now = self._clock()
        error = flight.error
        done = flight.done
        return Snapshot(
            key=flight.key,
            status=flight.status,
            started_at=self._wall(flight.started),
            completed_at=self._wall(done),
            result=flight.value if error is None else None,
            error=None if error is None else _error_text(error),
            exception=error,
            progress=self._progress_of(flight, now),
            background=flight.background,
            expires_at=None if done is None else self._expires(done),
        )

    def _snapshot_of_record(self, record: Done | Failed) -> Snapshot:
        if isinstance(record, Done):
            return Snapshot(
                key=record.key,
                status=_COMPLETED,
                started_at=self._wall(record.done - record.duration),
                completed_at=self._wall(record.done),
                result=record.value,
                background=record.background,
                expires_at=self._expires(record.done),
            )
        return Snapshot(
            key=record.key,
            status=_FAILED,
            started_at=self._wall(record.done - record.duration),
            completed_at=self._wall(record.done),
            error=_error_text(record.error),
            exception=record.error,
            background=record.background,
            expires_at=self._expires(record.done),
        )

    @staticmethod
    def _snapshot_of_stored(key: Hashable, stored: StoredEntry) -> Snapshot:
        def wall(t: float | None) -> datetime | None:
            return None if t is None else datetime.fromtimestamp(t, UTC)

        return Snapshot(
            key=key,
            status=stored.status,
            started_at=wall(stored.started_at),
            completed_at=wall(stored.completed_at),
            result=stored.value if stored.status is _COMPLETED else None,
            error=stored.error,
            progress=stored.progress,
            background=stored.background,
            expires_at=wall(stored.expires_at),
        )

    # -- watchers ---------------------------------------------------------------

    def _has_flight(self, key: Hashable) -> bool:
        return self._entries.get(key).__class__ is _Flight

    def _watch(self, key: Hashable, watcher: _Watch[Any]) -> weakref.ref[_Watch[Any]]:
        def gone(ref: weakref.ref[_Watch[Any]]) -> None:
            self._unwatch(key, ref)

        ref = weakref.ref(watcher, gone)
        self._watchers.setdefault(key, set()).add(ref)
        return ref

    def _unwatch(self, key: Hashable, ref: weakref.ref[_Watch[Any]]) -> None:
        refs = self._watchers.get(key)
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self._watchers[key]

    def _notify(self, flight: _Flight) -> None:
        if not self._watchers:
            return
        refs = self._watchers.get(flight.key)
        if refs:
            snapshot = self._snapshot_of_flight(flight)
            for ref in list(refs):
                watcher = ref()
                if watcher is not None:
                    watcher._push(snapshot)

    def _notify_key(self, key: Hashable) -> None:
        """Tell watchers of ``key`` its state changed by something other than a flight."""
        if not self._watchers:
            return
        refs = self._watchers.get(key)
        if refs:
            entry: Any = self._entries.get(key)
            cls = entry.__class__
            if cls is _Flight:
                snapshot = self._snapshot_of_flight(entry)
            elif cls is Done or cls is Failed:
                snapshot = self._snapshot_of_record(entry)
            else:
                snapshot = Snapshot(key=key, status=Status.NOT_STARTED)
            for ref in list(refs):
                watcher = ref()
                if watcher is not None:
                    watcher._push(snapshot)

    # -- introspection for tests and debugging -------------------------------------

    def _debug_counts(self) -> dict[str, int]:
        """Internal structures' sizes (the leak checks of the test suite read them)."""
        return {
            "live_flights": len(self._live),
            "queued": len(self._queue),
            "waiters": self._waiting,
            "watchers": sum(len(r) for r in self._watchers.values()),
            "entries": len(self._entries),
            "bg_running": self._bg_running,
        }


async def _finished_fn(*_: Any) -> None:  # pragma: no cover - never called
    """Placeholder that releases a finished flight's function and arguments."""
