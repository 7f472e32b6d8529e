"""The shell: :class:`Prefetcher` asks the core what to do, then does the awaiting.

It owns the tasks that run loads, wakes waiters, notifies watchers and
logs; every decision about a key is the core's (:mod:`prefetch_ingest.core`).
The hit path is the one exception, kept inline for speed: one dict read and
a class check, then the value (see :meth:`Prefetcher.get`).

Tasks. On asyncio a load runs in a plain ``asyncio`` task (about 8 µs to
start, against about 65 µs through an anyio task group): that start is the
whole cost of a cold key. On trio, and for loads through a shared store, a
load runs in the Prefetcher's anyio task group under a cancel scope of its
own. Either way no load raises into anything: the task catches what the load
raised and hands it to the load's waiters (:meth:`Prefetcher._run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from types import CoroutineType, TracebackType
from typing import Any, Generic, Self, TypeVar, cast, overload

import anyio
import anyio.abc
import attrs

from prefetch_ingest import _log
from prefetch_ingest._errors import (
    LoadCancelled,
    PrefetcherClosed,
    PrefetchError,
    ReentrantLoadError,
    RemoteLoadError,
    StoreError,
    WrongThreadError,
)
from prefetch_ingest._progress import current_sink
from prefetch_ingest._store import SharedStore, StoredEntry
from prefetch_ingest._types import Served, Snapshot, Source, Stats, Status
from prefetch_ingest._validate import check_duration, check_fn, check_limit, error_text
from prefetch_ingest.admission import Admission, FixedAdmission
from prefetch_ingest.core import ASK_STORE, HIT, JOIN, RAISE, Core, Done, Failed, Flight
from prefetch_ingest.core.snapshots import Snapshots

from .watch import Watch, Watchers
from .wrap import Wrapped, make_wrapper

__all__ = ["Prefetcher"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

_INF = math.inf
_PENDING = Status.PENDING
_RUNNING = Status.RUNNING
_COMPLETED = Status.COMPLETED
_KEPT_LIMIT = 10_000  # values kept during a store outage (fallback="local"), at most
_FAILED = Status.FAILED
_HIT = Source.HIT
_JOINED = Source.JOINED
_RAN = Source.RAN
_FATAL = (KeyboardInterrupt, SystemExit)
_GOOD_FNS_MAX = 1024


class _LogListener:
    """Hears the core's expirations and evictions: DEBUG events, and watchers told."""

    def __init__(self, engine: Prefetcher[Any, Any]) -> None:
        self.engine = engine

    def expired(self, record: Done | Failed) -> None:
        engine = self.engine
        if engine._log_debug:
            _log.logger.debug(
                "prefetch.expired", name=engine._name, key=_log.key_for_log(record.key)
            )
        if engine._watchers:
            engine._notify_key(record.key)

    def evicted(self, record: Done | Failed) -> None:
        engine = self.engine
        if engine._log_debug:
            _log.logger.debug(
                "prefetch.evicted", name=engine._name, key=_log.key_for_log(record.key)
            )


class Prefetcher(Generic[K, V]):
    """Runs one load per key at a time, in the background or on demand, and serves the results.

    Args:
        loader: the default coroutine function ``async (key) -> value``. Every
            call may pass its own ``fn, *args`` instead.
        ttl: seconds a completed value (and a failure's record) is kept after
            completion; ``None`` keeps it until invalidated or evicted.
        failure_ttl: seconds during which ``get`` re-raises a failure (the same
            exception object) without running the load again; 0 (the
            default) runs it again on the next ``get``. A failure is
            *reported* by ``status`` until the next load of the key starts, it
            is invalidated, or ``ttl`` passes; past ``failure_ttl`` the record
            keeps only the error's type and message.
        refresh_after: age in seconds after which a completed value is still
            served at once but reloaded in the background
            (stale-while-revalidate); ``None`` never.
        max_entries: bound on the entries held; failures are evicted first,
            then the least recently used values; in-flight loads never.
        max_concurrency: at most this many *background* loads run at once;
            the rest wait as ``PENDING``, first in first out. Loads demanded
            by ``get`` are never held back.
        admission: an :class:`~prefetch_ingest.Admission` deciding that limit
            instead (e.g. :class:`~prefetch_ingest.LagAdmission`); give
            ``admission`` or ``max_concurrency``, not both.
        cleanup_interval: seconds between sweeps of expired entries.
        shutdown_grace: seconds that leaving the ``async with`` block gives
            running loads to finish (their results are stored) before they
            are cancelled. Pending loads never start once the block is left.
        store: ``None`` for the in-process store, or a shared store such as
            :class:`prefetch_ingest.redis.RedisStore`.
        name: a label carried by every log event (and metric) of this
            Prefetcher; default ``"default"``.
        clock: the monotonic clock, in seconds (injectable for tests).

    Use it as ``async with Prefetcher(...) as pf:``. Leaving the block cancels
    every load still running (after ``shutdown_grace``) and returns when they
    are all gone; their waiters get :class:`PrefetcherClosed`. Nothing a load
    does breaks the block: an exception of the body leaves it as itself.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.2.0
       ``admission``, ``shutdown_grace``, ``name``; ``serve``, ``cancel``,
       ``in_flight``, ``wrap``; the life-cycle guarantees.
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
        admission: Admission | None = None,
        cleanup_interval: float = 3600.0,
        shutdown_grace: float = 0.0,
        store: SharedStore | None = None,
        name: str | None = None,
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
        admission: Admission | None = None,
        cleanup_interval: float = 3600.0,
        shutdown_grace: float = 0.0,
        store: SharedStore | None = None,
        name: str | None = None,
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
        admission: Admission | None = None,
        cleanup_interval: float = 3600.0,
        shutdown_grace: float = 0.0,
        store: SharedStore | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if loader is not None:
            check_fn("loader", loader)
        self._loader = loader
        self._ttl = check_duration("ttl", ttl, allow_none=True, allow_zero=True)
        self._failure_ttl = check_duration(
            "failure_ttl", failure_ttl, allow_none=False, allow_zero=True
        )
        self._refresh_after = check_duration(
            "refresh_after", refresh_after, allow_none=True, allow_zero=False
        )
        max_entries = check_limit("max_entries", max_entries)
        limit = check_limit("max_concurrency", max_concurrency)
        if admission is not None:
            if limit is not None:
                raise TypeError(
                    "give admission or max_concurrency, not both "
                    "(LagAdmission(max_concurrency=...) takes the upper bound)"
                )
            if not isinstance(admission, Admission):
                raise TypeError(
                    f"admission must have the Admission methods (limit, load_started, "
                    f"load_ended, run), got {type(admission).__name__}"
                )
        self._admission: Admission = admission if admission is not None else FixedAdmission(limit)
        self._cleanup_interval = check_duration(
            "cleanup_interval", cleanup_interval, allow_none=False, allow_zero=False
        )
        self._shutdown_grace = check_duration(
            "shutdown_grace", shutdown_grace, allow_none=False, allow_zero=True
        )
        if store is not None and not isinstance(store, SharedStore):
            raise TypeError(
                f"store must be None or a shared store such as RedisStore, "
                f"got {type(store).__name__}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {type(name).__name__}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self._name = "default" if name is None else name
        self._remote = store
        self._fallback_local = getattr(store, "fallback", None) == "local"
        self._kept: dict[Hashable, Done] = {}  # fallback="local": values of an outage
        if store is not None and hasattr(store, "on_reachable"):
            store.on_reachable = self._store_reachable
        self._clock = clock
        self._wall_offset = time.time() - clock()

        self._core = core = Core(
            ttl=self._ttl,
            failure_ttl=self._failure_ttl,
            refresh_after=self._refresh_after,
            max_entries=max_entries,
            limit=self._safe_limit,
            local_results=store is None,
        )
        core.listener = _LogListener(self)
        self._snap = Snapshots(
            clock=clock, wall_offset=self._wall_offset, ttl=self._ttl, counters=core.counters
        )
        self._counters = core.counters
        self._table = core.table
        self._entries = core.entries  # read directly on the hit path
        self._lru = core.table.lru
        self._watchers = Watchers()
        self._tg: anyio.abc.TaskGroup | None = None
        self._state = "new"  # new -> open -> closing -> closed
        self._thread = 0
        self._aio = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancelled_exc: type[BaseException] = BaseException
        self._fatal: BaseException | None = None
        self._idle: anyio.Event | None = None
        self._wake_sweeper: anyio.Event | None = None
        self._good_fns: set[object] = set()
        # called with (seconds, succeeded) when a load run here ends (metrics: otel)
        self._load_observers: list[Callable[[float, bool], None]] = []
        self._admission_logged = -math.inf
        self._log_debug = False
        self._log_info = True
        self._log_warning = True
        self._hit_extras = False

    def _safe_limit(self) -> int | None:
        """The admission's limit; a failing or nonsensical one pauses background starts."""
        try:
            limit = self._admission.limit()
            if limit is None or (
                isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0
            ):
                return limit
            problem = f"limit() returned {limit!r}, not an int >= 0 or None"
        except Exception as exc:
            problem = f"limit() raised {error_text(exc)}"
        self._admission_failed(problem, "background loads wait until the admission answers")
        return 0

    def _admission_failed(self, problem: str, detail: str) -> None:
        """Log ``prefetch.admission_failed`` (at most once a minute): the admission's
        bug is the application's to see, never an unrelated caller's exception."""
        now = time.monotonic()
        if now - self._admission_logged >= 60.0:
            self._admission_logged = now
            _log.logger.error(
                "prefetch.admission_failed", name=self._name, error=problem, detail=detail
            )

    def _tell_admission(self, started: bool, background: bool) -> bool:
        """``load_started`` / ``load_ended``; one that raises is logged, never raised
        (the load goes on, its slot is freed all the same). True if it returned."""
        admission = self._admission
        try:
            if started:
                admission.load_started(background)
            else:
                admission.load_ended(background)
        except Exception as exc:
            hook = "load_started" if started else "load_ended"
            self._admission_failed(f"{hook}() raised {error_text(exc)}", "the load goes on")
            return False
        return True

    @property
    def name(self) -> str:
        """The label of this Prefetcher in log events and metrics."""
        return self._name

    # -- life cycle --------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise PrefetcherClosed(
                "a Prefetcher can be entered only once; create a new one"
                if self._state == "open"
                else "the Prefetcher is closed; create a new one"
            )
        lv = _log.levels()
        self._log_debug = lv.debug
        self._log_info = lv.info
        self._log_warning = lv.warning
        self._hit_extras = self._lru or self._refresh_after != _INF or self._log_debug
        self._cancelled_exc = anyio.get_cancelled_exc_class()
        self._thread = threading.get_ident()
        try:
            self._loop = asyncio.get_running_loop()
            self._aio = asyncio.current_task() is not None
        except RuntimeError:
            self._loop = None
            self._aio = False
        if self._remote is not None:
            await self._remote.open(
                ttl=None if self._ttl == _INF else self._ttl, failure_ttl=self._failure_ttl
            )
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._state = "open"
        tg.start_soon(self._sweeper, name="prefetch_ingest sweeper")
        tg.start_soon(self._run_admission, name="prefetch_ingest admission")
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
        # The task group sees the body's exception only if it is a cancellation
        # (so that it can swallow its own); anything else leaves as itself.
        passed = exc if isinstance(exc, self._cancelled_exc) else None
        suppressed: bool | None = False
        try:
            with anyio.CancelScope(shield=True):
                await self._close_loads()
        finally:
            tg.cancel_scope.cancel()
            try:
                suppressed = await tg.__aexit__(
                    None if passed is None else type(passed),
                    passed,
                    None if passed is None else passed.__traceback__,
                )
            except BaseExceptionGroup as group:
                fatal = self._fatal or _first_fatal(group)
                if fatal is not None:
                    raise fatal from None
                if exc is None:
                    raise
                _log.logger.error(
                    "prefetch.internal_error", name=self._name, error=error_text(group)
                )
            finally:
                self._state = "closed"
                self._core.clear()
                self._watchers.close_all()
                if self._remote is not None:
                    with anyio.CancelScope(shield=True):
                        await self._remote.aclose()
        if self._fatal is not None:
            raise self._fatal from None
        return bool(suppressed) if passed is not None else False

    async def _close_loads(self) -> None:
        """Pending loads never start; running ones get ``shutdown_grace``, then are cancelled."""
        core = self._core
        for flight in list(core.live):
            if flight.status is _PENDING:
                self._cancel_flight(flight, "close")
        if self._shutdown_grace > 0 and core.live and self._fatal is None:
            self._idle = anyio.Event()
            with anyio.move_on_after(self._shutdown_grace):
                await self._idle.wait()
        for flight in list(core.live):
            self._cancel_flight(flight, "close")
        await self._drain()

    async def _drain(self) -> None:
        """Wait until every load task has ended (a load that goes on after its
        cancellation is cancelled again every 5 seconds)."""
        tasks = self._tasks
        while tasks:
            await asyncio.wait(list(tasks), timeout=5.0)
            for task in list(tasks):
                task.cancel()

    def _check_open(self) -> None:
        if self._state != "open":
            if self._state == "new":
                raise PrefetcherClosed(
                    "the Prefetcher is not open: use it inside `async with Prefetcher(...) as pf:`"
                )
            raise PrefetcherClosed()
        if threading.get_ident() != self._thread:
            raise WrongThreadError(
                "a Prefetcher must be called from its event loop's thread; from a worker "
                "thread use anyio.from_thread.run_sync(pf.prefetch, key) (or .run for get)"
            )

    async def _sweeper(self) -> None:
        wake = self._wake_sweeper = anyio.Event()
        next_sweep = self._clock() + self._cleanup_interval
        while True:
            now = self._clock()
            deadline = min(next_sweep, self._table.next_failure_release())
            with anyio.move_on_after(max(deadline - now, 0.0)):
                await wake.wait()
            if wake.is_set():
                wake = self._wake_sweeper = anyio.Event()
            now = self._clock()
            try:
                if now >= next_sweep:
                    next_sweep = now + self._cleanup_interval
                    self._sweep_now()
                else:
                    self._table.release_failures(now)
            except Exception as exc:  # the sweeper must outlive anything a watcher does
                _log.logger.error("prefetch.sweep_failed", name=self._name, error=error_text(exc))

    async def _run_admission(self) -> None:
        try:
            await self._admission.run(self._admission_changed)
        except (self._cancelled_exc, *_FATAL):
            raise
        except BaseException as exc:  # the admission's bug must not break the block
            _log.logger.error(
                "prefetch.admission_failed", name=self._name, error=error_text(exc), exc_info=exc
            )

    def _admission_changed(self) -> None:
        if threading.get_ident() != self._thread:
            raise WrongThreadError(
                "changed() must be called from the event loop's thread; from a worker "
                "thread use anyio.from_thread.run_sync(changed)"
            )
        if self._state == "open":
            self._launch_all(self._core.admit_next(self._clock()))

    # -- get: the hit path ---------------------------------------------------

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
            LoadCancelled: the load was cancelled by :meth:`cancel`.
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
                if fn is not None or args or timeout is not None:
                    self._check_args(fn, args, timeout)
                counters = self._counters
                counters.hits += 1
                counters.saved_seconds += entry.duration
                if self._hit_extras:
                    self._after_hit(key, entry, age, fn, args)
                return entry.value  # type: ignore[no-any-return]  # (no cast(): a call costs)
        return (await self._slow(key, fn, args, force_refresh, timeout))[0]  # type: ignore[no-any-return]

    async def serve(
        self,
        key: K,
        fn: Callable[..., Awaitable[V]] | None = None,
        *args: Any,
        force_refresh: bool = False,
        timeout: float | None = None,
    ) -> Served[V]:
        """Exactly :meth:`get`, and how the call was served: ``Served(value, source)``.

        ``source`` is :attr:`Source.HIT` (a completed value served without
        waiting, the stale one a ``refresh_after`` reload replaces included),
        :attr:`Source.JOINED` (awaited a load already in flight) or
        :attr:`Source.RAN` (this call started the load it awaited).
        Counted like ``get``.
        """
        try:
            entry = self._entries[key]
        except KeyError:
            entry = None
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        if entry.__class__ is Done and not force_refresh:
            age = self._clock() - entry.done
            if age < self._ttl:
                if fn is not None or args or timeout is not None:
                    self._check_args(fn, args, timeout)
                counters = self._counters
                counters.hits += 1
                counters.saved_seconds += entry.duration
                if self._hit_extras:
                    self._after_hit(key, entry, age, fn, args)
                return Served(entry.value, _HIT)
        value, source = await self._slow(key, fn, args, force_refresh, timeout)
        return Served(value, source)

    def _check_args(self, fn: object, args: tuple[Any, ...], timeout: object) -> float | None:
        """The checks of ``fn``, ``args`` and ``timeout``: one piece of code for every path,
        the hit path included; returns the timeout in seconds.

        A function that passed is remembered (a small set, cleared at 1,024), so
        a hit with ``fn`` costs one set lookup; an unhashable one is checked
        every time.
        """
        if fn is not None:
            good = self._good_fns
            try:
                known = fn in good
            except TypeError:  # unhashable: fine as a function, just not cacheable
                known = False
            if not known:
                check_fn("fn", fn)
                if len(good) >= _GOOD_FNS_MAX:
                    good.clear()
                with contextlib.suppress(TypeError):
                    good.add(fn)
        elif args:
            raise TypeError("extra positional arguments were given without fn")
        if timeout is None:
            return None
        return check_duration("timeout", timeout, allow_none=False, allow_zero=True)

    def _after_hit(
        self,
        key: Hashable,
        entry: Done,
        age: float,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
    ) -> None:
        """The optional parts of a hit: LRU order, stale-while-revalidate, the DEBUG event."""
        if threading.get_ident() != self._thread:
            counters = self._counters  # this call fails: it leaves no trace
            counters.hits -= 1
            counters.saved_seconds -= entry.duration
            self._check_open()  # raises WrongThreadError (or PrefetcherClosed)
        # (while closing, a hit is served like any plain hit; _refresh starts nothing)
        if self._lru:
            self._entries.move_to_end(key)  # type: ignore[attr-defined]
        if age >= self._refresh_after:
            self._refresh(key, entry, fn, args)
        if self._log_debug:
            _log.logger.debug("prefetch.hit", name=self._name, key=_log.key_for_log(key), age_s=age)

    # -- get: everything else ----------------------------------------------------

    def _check_call(
        self, key: Hashable, fn: object, timeout: object = None, args: tuple[Any, ...] = ()
    ) -> tuple[float | None, tuple[tuple[int, Hashable], ...]]:
        """Every argument check, before anything is touched (a failed call leaves no trace)."""
        self._check_open()
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable, got {type(key).__name__}") from None
        if self._remote is not None:
            self._remote.check_key(key)
        t = self._check_args(fn, args, timeout)
        sink = current_sink.get()
        chain: tuple[tuple[int, Hashable], ...] = ()
        if isinstance(sink, Flight):
            chain = sink.chain
        return t, chain

    def _resolve_fn(
        self, key: Hashable, fn: Callable[..., Awaitable[Any]] | None, args: tuple[Any, ...]
    ) -> tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]:
        if fn is not None:
            return fn, args
        if self._loader is None:
            raise PrefetchError(
                f"no load for key {_log.key_for_log(key)!r}: pass fn (a coroutine function) "
                "to this call, or give the Prefetcher a default loader"
            )
        return self._loader, (key,)  # (args without fn were refused by _check_args)

    async def _slow(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
        force: bool,
        timeout: float | None,
    ) -> tuple[Any, Source]:
        t, chain = self._check_call(key, fn, timeout, args)
        if (id(self), key) in chain:
            raise ReentrantLoadError(key)
        core = self._core
        now = self._clock()
        remote = self._remote is not None
        action, record = core.on_get(key, now, force, remote=remote)
        flight: Flight
        source = _JOINED
        if action is HIT:
            if core.wants_refresh(record, now):
                self._refresh(key, record, fn, args)
            if self._log_debug:
                _log.logger.debug("prefetch.hit", name=self._name, key=_log.key_for_log(key))
            return record.value, _HIT
        if action is RAISE:
            raise record.error.with_traceback(record.tb)
        if action is JOIN:
            flight = record
            self._joined(flight)
        elif action is ASK_STORE:
            found, source = await self._ask_store(key, record, fn, args, force, chain)
            if source is _HIT:
                return found, _HIT
            flight = found
        else:
            run_fn, run_args = self._resolve_fn(key, fn, args)
            flight = self._start(
                key, run_fn, run_args, background=False, force=force, prior=record, chain=chain
            )
            self._counters.misses += 1
            source = _RAN
        if flight.done is None:
            event = flight.event
            if event is None:
                event = flight.event = self._new_event()
            counters = self._counters
            counters.waiting += 1
            try:
                if t is None:
                    await event.wait()
                else:
                    with anyio.fail_after(t):
                        await event.wait()
            finally:
                counters.waiting -= 1
        error = flight.error
        if error is not None:
            raise error.with_traceback(flight.tb)
        if source is _RAN and not flight.ran_here:
            source = _JOINED  # another instance ran it; this call followed that run
        return flight.value, source

    async def _ask_store(
        self,
        key: Hashable,
        local: Any,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
        force: bool,
        chain: tuple[tuple[int, Hashable], ...],
    ) -> tuple[Any, Source]:
        """With a shared store and nothing usable here: the stored value, or a flight to await."""
        remote = self._remote
        assert remote is not None
        core = self._core
        local_failure = local if local.__class__ is Failed else None
        stored = await remote.lookup(key, for_get=True)  # the truth as soon as it answers
        now = self._clock()
        entry = core.current(key, now)  # a local flight may have started meanwhile
        if entry.__class__ is Flight:
            core.join(entry, now)
            self._joined(entry)
            return entry, _JOINED
        if stored is None and not getattr(remote, "reachable", True):
            # the store is unreachable (fallback="local"): as with no shared store
            kept = self._kept_value(key)
            if kept is not None and not force:
                core.hit(key, kept, now)
                return kept.value, _HIT
            if (
                entry.__class__ is Failed
                and entry.error is not None
                and not force
                and now - entry.done < self._failure_ttl
            ):
                raise entry.error.with_traceback(entry.tb)
        if (
            stored is not None
            and stored.has_value
            and stored.value_at is not None
            and time.time() - stored.value_at >= self._ttl
        ):
            # older than this Prefetcher's ttl (with ttl=0 the store keeps a value a
            # moment, for the waiters of that very run): not served, loaded again
            stored, force = None, True
        if stored is not None and not force:
            if stored.has_value:
                if local_failure is not None:  # a newer result stands
                    core.table.remove_if(key, local_failure)
                c = self._counters
                c.hits += 1
                c.saved_seconds += stored.value_duration
                self._refresh_remote(key, stored, fn, args)
                return stored.value, _HIT
            if (
                stored.status is _FAILED
                and stored.completed_at is not None
                # an age by the writer's clock: one "in the future" (a writer whose
                # clock runs ahead) is not trusted to extend failure_ttl
                and 0.0 <= time.time() - stored.completed_at < self._failure_ttl
            ):
                # within failure_ttl: the failure again, without running anything —
                # the exception object itself where that very run ran (same token)
                if (
                    local_failure is not None
                    and entry is local_failure
                    and local_failure.error is not None
                    and local_failure.token is not None
                    and local_failure.token == stored.token
                ):
                    raise local_failure.error.with_traceback(local_failure.tb)
                raise RemoteLoadError(
                    stored.error or "unknown error",
                    error_type=stored.error_type,
                    message=stored.error_message,
                )
        run_fn, run_args = self._resolve_fn(key, fn, args)
        flight = self._start(
            key, run_fn, run_args, background=False, force=force, prior=entry, chain=chain
        )
        self._counters.misses += 1
        return flight, _RAN

    def _joined(self, flight: Flight) -> None:
        if flight.status is _PENDING:
            self._promote(flight)
        if self._log_debug:
            _log.logger.debug("prefetch.joined", name=self._name, key=_log.key_for_log(flight.key))

    def _new_event(self) -> Any:
        return asyncio.Event() if self._aio else anyio.Event()

    def _refresh_remote(
        self,
        key: Hashable,
        stored: StoredEntry,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
    ) -> None:
        """Stale-while-revalidate with a shared store: reload an old stored value."""
        if self._refresh_after == _INF or stored.completed_at is None:
            return
        if fn is None and self._loader is None:
            return
        age = max(time.time() - stored.completed_at, 0.0)
        if age < self._refresh_after or self._entries.get(key) is not None:
            return
        stale = Done(key, stored.value, self._clock() - age, 0.0, stored.background)
        run_fn, run_args = self._resolve_fn(key, fn, args)
        flight = self._start(
            key, run_fn, run_args, background=True, force=True, prior=None, chain=()
        )
        flight.prior = stale  # served locally while the reload runs; never stored here

    # -- starting loads ----------------------------------------------------

    def prefetch(
        self,
        key: K,
        fn: Callable[..., Awaitable[V]] | None = None,
        *args: Any,
        delay: float = 0.0,
    ) -> bool:
        """Start a background load of ``key`` unless it is fresh or already in flight.

        Synchronous; never blocks and never raises because of the load, only
        for misuse (closed, bad arguments, called off the event loop's thread).

        Args:
            delay: seconds the load stays ``PENDING`` before it competes for
                admission; a ``get`` starts it at once, ``cancel`` or
                ``invalidate`` drops it with nothing run.

        Returns:
            True when a load was started (or queued, or delayed).
        """
        _, chain = self._check_call(key, fn, None, args)
        d = check_duration("delay", delay, allow_none=False, allow_zero=True)
        core = self._core
        if core.delayed:
            self._check_delays()
        now = self._clock()
        start, record = core.on_prefetch(key, now)
        if not start:
            return False
        remote = self._remote
        force = False
        if remote is not None:
            plan = remote.worth_starting(key, self._refresh_after)
            if plan == "no":
                # known fresh in the shared store, or the store is down with no
                # fallback: starting would only read the stored value (or fail)
                core.counters.deduplicated += 1
                return False
            force = plan == "reload"  # past refresh_after: a reload, as with no store
        run_fn, run_args = self._resolve_fn(key, fn, args)
        self._start(
            key,
            run_fn,
            run_args,
            background=True,
            force=force,
            prior=record,
            chain=chain,
            delay=d,
        )
        return True

    def _refresh(
        self,
        key: Hashable,
        entry: Done,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
    ) -> None:
        """Start the background reload of a stale value (from a hit)."""
        if fn is None and self._loader is None:
            return  # nothing to reload with; the value is served until it expires
        if self._state != "open":
            return  # closing: nothing new starts (the value is still served)
        sink = current_sink.get()
        chain = sink.chain if isinstance(sink, Flight) else ()
        run_fn, run_args = self._resolve_fn(key, fn, args)
        self._start(key, run_fn, run_args, background=True, force=False, prior=entry, chain=chain)

    def _start(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        background: bool,
        force: bool,
        prior: Any,
        chain: tuple[tuple[int, Hashable], ...],
        delay: float = 0.0,
    ) -> Flight:
        core = self._core
        now = self._clock()
        flight = core.start(
            key,
            fn,
            args,
            background=background,
            force=force,
            prior=prior,
            chain=(*chain, (id(self), key)),
            now=now,
            delay=delay,
        )
        flight.on_progress = self._on_progress
        if flight.status is _RUNNING:
            self._launch(flight)
        elif delay > 0:
            self._arm_delay(flight, delay)
        if self._watchers:
            self._notify_key(key)
        return flight

    def _launch(self, flight: Flight) -> None:
        """Start the task of a flight the core has just made RUNNING."""
        # (load_ended is owed only for a load_started that returned)
        flight.counted = self._tell_admission(True, flight.background)
        if self._aio and self._remote is None:
            assert self._loop is not None
            task = self._loop.create_task(self._run(flight), name="prefetch_ingest load")
            flight.handle = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            assert self._tg is not None
            flight.handle = scope = anyio.CancelScope()
            self._tg.start_soon(self._run_scoped, flight, scope, name="prefetch_ingest load")
        if self._log_info:
            _log.logger.info(
                "prefetch.started",
                name=self._name,
                key=_log.key_for_log(flight.key),
                background=flight.background,
                queued_s=(flight.started or 0.0) - flight.queued,
            )

    def _launch_all(self, flights: list[Flight]) -> None:
        for flight in flights:
            self._launch(flight)
            if self._watchers:
                self._notify_key(flight.key)

    def _promote(self, flight: Flight) -> None:
        """A caller demands a pending load: it starts now, outside the limit."""
        timer = flight.handle
        if self._core.promote(flight, self._clock()):
            if timer is not None:
                timer.cancel()
            self._launch(flight)
            if self._watchers:
                self._notify_key(flight.key)

    def _arm_delay(self, flight: Flight, delay: float) -> None:
        if self._aio:
            assert self._loop is not None
            flight.handle = self._loop.call_later(delay, self._delay_over, flight)
        else:
            assert self._tg is not None
            flight.handle = scope = anyio.CancelScope()
            self._tg.start_soon(
                self._delay_task, flight, scope, delay, name="prefetch_ingest delay"
            )

    async def _delay_task(self, flight: Flight, scope: anyio.CancelScope, delay: float) -> None:
        with scope:
            await anyio.sleep(delay)
        if not scope.cancel_called:
            if flight.handle is scope:
                flight.handle = None
            self._delay_over(flight)

    def _delay_over(self, flight: Flight) -> None:
        """A delayed prefetch's timer fired (or its delay passed on the clock)."""
        if self._state != "open":
            return
        now = self._clock()
        started = self._core.delay_over(flight, now)
        if started is None:  # the injected clock is behind the timer: wait for it
            remaining = max(flight.not_before - now, 0.0)
            self._arm_delay(flight, min(remaining, 1.0) if remaining > 0 else 0.05)
            return
        handle = flight.handle
        flight.handle = None
        if handle is not None:
            handle.cancel()
        if started:
            self._launch(flight)
        if self._watchers and self._core.is_current(flight):
            self._notify_key(flight.key)

    def _check_delays(self) -> None:
        """Admit the delayed prefetches whose delay has passed on the (injectable) clock."""
        for flight in self._core.due(self._clock()):
            self._delay_over(flight)

    # -- running loads -----------------------------------------------------

    async def _run_scoped(self, flight: Flight, scope: anyio.CancelScope) -> None:
        with scope:
            await self._run(flight)

    async def _run(self, flight: Flight) -> None:
        """The body of a load's task. Nothing the load does escapes from here."""
        flight.entered = True
        if flight.done is not None:
            self._ended(flight)  # cancelled before its task ran
            return
        fn = flight.fn
        assert fn is not None
        token = current_sink.set(flight)
        try:
            remote = self._remote
            if remote is not None:
                outcome = await remote.load(
                    flight.key,
                    lambda: self._invoke(flight),
                    background=flight.background,
                    force=flight.force,
                    started_at=(flight.started or self._clock()) + self._wall_offset,
                    follow=lambda entry: self._following(flight, entry),
                    deliver=lambda v: self._completed(flight, v, True, keep=True),
                    lost=lambda cancelled: self._lease_lost(flight, cancelled),
                    took=lambda token: self._took(flight, token),
                    wanted=lambda: flight.claimed,
                )
                value, ran_here = outcome.value, outcome.ran_here
                if not ran_here:
                    self._counters.saved_seconds += outcome.duration
                elif not outcome.stored:
                    self._completed(flight, value, True, keep=True)
            else:
                awaitable = fn(*flight.args)
                if awaitable.__class__ is not CoroutineType and not inspect.isawaitable(awaitable):
                    raise TypeError(
                        f"the load for key {_log.key_for_log(flight.key)!r} returned "
                        f"{type(awaitable).__name__}, not an awaitable: pass a coroutine function"
                    )
                value = await awaitable
                ran_here = True
        except BaseException as exc:
            self._raised(flight, exc)
        else:
            self._completed(flight, value, ran_here)
        finally:
            current_sink.reset(token)
            self._ended(flight)

    async def _invoke(self, flight: Flight) -> Any:
        fn = flight.fn
        if fn is None:  # pragma: no cover - a store calls run() once, while the flight lives
            raise PrefetchError("the load ended before the store ran it")
        awaitable = fn(*flight.args)
        if not inspect.isawaitable(awaitable):
            raise TypeError(
                f"the load for key {_log.key_for_log(flight.key)!r} returned "
                f"{type(awaitable).__name__}, not an awaitable: pass a coroutine function"
            )
        return await awaitable

    def _raised(self, flight: Flight, exc: BaseException) -> None:
        if flight.done is not None:
            return  # ended already (cancel, close): this is the echo of that cancellation
        if isinstance(exc, self._cancelled_exc) and self._state != "open":
            self._cancel_flight(flight, "close")
            return
        if (
            isinstance(exc, LoadCancelled)
            and flight.remote is not None
            and getattr(exc, "cancelled_run", None) is not None
        ):
            # the run this flight followed was cancelled in another instance: a cancel
            # here too (the key is as it was before that run), not a failure
            self._cancel_flight(flight, "cancel")
            return
        if isinstance(exc, _FATAL):
            # The one exception: every load is cancelled, and it leaves the block.
            if self._fatal is None:
                self._fatal = exc
            self._cancel_flight(flight, "close")
            for other in list(self._core.live):
                self._cancel_flight(other, "close")
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
            return
        ran_here = not isinstance(exc, RemoteLoadError)
        changed = self._core.fail(flight, exc, exc.__traceback__, self._clock(), ran_here=ran_here)
        self._wake(flight)
        if ran_here and self._load_observers:
            self._observe_load(flight, False)
        if self._log_warning:
            started = flight.started if flight.started is not None else flight.done
            _log.logger.warning(
                "prefetch.failed",
                name=self._name,
                key=_log.key_for_log(flight.key),
                duration_s=(flight.done or 0.0) - (started or 0.0),
                background=flight.background,
                error=error_text(exc),
                exc_info=exc,
            )
        if changed and self._watchers:
            self._notify_key(flight.key, flight)
        if changed and self._failure_ttl > 0 and self._wake_sweeper is not None:
            self._wake_sweeper.set()  # it must let go of this exception at failure_ttl

    def _completed(self, flight: Flight, value: Any, ran_here: bool, keep: bool = False) -> None:
        if flight.done is not None:
            return  # ended already (cancel, close): its value goes nowhere, as in _raised
        now = self._clock()
        started = flight.started if flight.started is not None else now
        changed = self._core.complete(flight, value, now, ran_here=ran_here)
        if ran_here and self._load_observers:
            self._observe_load(flight, True)
        if keep and changed and self._fallback_local:
            # the shared store could not take the value: with fallback="local" it is
            # kept and served here, as with no shared store, until the store answers
            # (beside the table, off the hit path: every get asks whether it does)
            kept = self._kept
            if len(kept) >= _KEPT_LIMIT:
                kept.pop(next(iter(kept)))
            kept[flight.key] = Done(flight.key, value, now, now - started, flight.background)
        self._wake(flight)
        if self._log_info:
            _log.logger.info(
                "prefetch.completed",
                name=self._name,
                key=_log.key_for_log(flight.key),
                duration_s=now - started,
                background=flight.background,
            )
        if changed and self._watchers:
            self._notify_key(flight.key, flight)

    def _observe_load(self, flight: Flight, ok: bool) -> None:
        started, done = flight.started, flight.done
        if started is None or done is None:
            return
        for observe in list(self._load_observers):
            try:
                observe(max(done - started, 0.0), ok)
            except Exception as exc:  # a metrics hook must never break a load
                _log.logger.warning(
                    "prefetch.observer_failed", name=self._name, error=error_text(exc)
                )

    def _following(self, flight: Flight, entry: StoredEntry) -> None:
        """A shared store read the run this flight follows in another instance."""
        if flight.done is not None:
            return
        flight.remote = entry
        if self._watchers and self._core.is_current(flight):
            self._notify_key(flight.key)

    def _took(self, flight: Flight, token: str) -> None:
        """This flight's load took the key's lease: it is the run now, not a follower."""
        flight.token = token
        flight.remote = None
        if self._watchers and self._core.is_current(flight):
            self._notify_key(flight.key)

    def _lease_lost(self, flight: Flight, cancelled: bool) -> None:
        """Another instance took this run's lease away: ``cancel`` (True) or ``invalidate``."""
        if cancelled:
            self._cancel_flight(flight, "cancel")
            return
        if self._core.detach(flight) and self._watchers:
            self._notify_key(flight.key)

    def _store_reachable(self) -> None:
        """The shared store answers again: values kept here during the outage step aside."""
        self._kept.clear()

    def _kept_value(self, key: Hashable) -> Done | None:
        """A value kept here while the store was unreachable (fallback="local"), if fresh."""
        kept = self._kept.get(key)
        if kept is not None and self._clock() - kept.done >= self._ttl:
            del self._kept[key]
            return None
        return kept

    def _ended(self, flight: Flight) -> None:
        """The load's task is over: free its slot, start who was waiting for one."""
        if flight.counted:
            flight.counted = False
            self._tell_admission(False, flight.background)
        nxt = self._core.release_slot(flight, self._clock())
        if self._state == "open":
            self._launch_all(nxt)
        idle = self._idle
        if idle is not None and not self._core.live:
            idle.set()

    def _wake(self, flight: Flight) -> None:
        event = flight.event
        if event is not None:
            event.set()

    def _cancel_flight(self, flight: Flight, reason: str) -> bool:
        """End a flight now (``cancel`` or close); its task is cancelled, its waiters woken."""
        if flight.done is not None:
            return False
        changed = self._core.cancel(flight, self._clock(), reason=reason)
        self._stop(flight)
        if self._log_info or reason == "cancel":
            _log.logger.info(
                "prefetch.cancelled",
                name=self._name,
                key=_log.key_for_log(flight.key),
                reason=reason,
                background=flight.background,
                started=flight.started is not None,
            )
        if changed and self._watchers:
            self._notify_key(flight.key)
        return True

    def _stop(self, flight: Flight) -> None:
        """After the core ended ``flight`` (cancel, close, or invalidate of a pending one):
        stop its task or timer, wake its waiters, and free what it held."""
        handle = flight.handle
        flight.handle = None
        if handle is not None:
            handle.cancel()
        self._wake(flight)
        if not flight.entered:
            # Its task has not begun (or there is none: pending): an asyncio
            # task cancelled now never runs its body, so nothing else would
            # free what it holds. (On trio the body runs and returns at once.)
            self._ended(flight)
        # A running load keeps its background slot until its task has really
        # ended (its cleanup may still run): "at most N run at once" holds.

    def _on_progress(self, flight: Flight) -> None:
        if not self._core.is_current(flight):
            return  # detached or replaced: never reported
        if self._watchers:
            self._notify_key(flight.key)
        remote = self._remote
        if remote is not None and not flight.publishing and self._tg is not None:
            flight.publishing = True
            self._tg.start_soon(self._publish_progress, flight)

    async def _publish_progress(self, flight: Flight) -> None:
        remote = self._remote
        assert remote is not None
        try:
            # the store writes at most once per its rate limit (waiting out the rest of
            # it): send again until what it has is the latest, so none is lost
            sent: tuple[Any, ...] | None = None
            while flight.done is None and self._core.is_current(flight):
                latest = (flight.p_done, flight.p_total, flight.p_message)
                if latest == sent:
                    break
                sent = latest
                progress = self._snap.progress(flight, self._clock())
                if progress is None:
                    break
                await remote.publish_progress(flight.key, progress)
        except Exception as exc:  # best effort: progress must never break a load
            if self._log_warning:
                _log.logger.warning(
                    "prefetch.progress_not_shared",
                    name=self._name,
                    key=_log.key_for_log(flight.key),
                    error=error_text(exc),
                )
        finally:
            flight.publishing = False

    # -- cancel, invalidate, expiry ---------------------------------------------

    async def cancel(self, key: K) -> bool:
        """Cancel ``key``'s pending or running load; True if there was one.

        Its waiters get :class:`~prefetch_ingest.LoadCancelled`; nothing is
        stored; the key is left as it was before that load (a value kept by
        a ``refresh_after`` reload stays). The load's task is cancelled.
        """
        self._check_call(key, None)
        entry = self._entries.get(key)
        remote = self._remote
        if remote is not None and (entry.__class__ is not Flight or entry.status is not _PENDING):
            # whichever instance runs it: the store ends that run's lease and tells
            # every instance following it (their waiters get LoadCancelled too)
            cancelled_there = await remote.cancel(key)
            entry = self._entries.get(key)
            if entry.__class__ is not Flight:
                return cancelled_there
            self._cancel_flight(entry, "cancel")
            return True
        if entry.__class__ is not Flight:
            await anyio.lowlevel.checkpoint()
            return False
        self._cancel_flight(entry, "cancel")
        await anyio.lowlevel.checkpoint()
        return True

    async def invalidate(self, key: K) -> bool:
        """Forget ``key``'s completed or failed entry; True if there was something to forget.

        A running load is detached: its waiters still get its result, but it
        is not stored, it is never reported again (``status``, ``watch``), and
        the next ``get`` starts a fresh load. A pending load is dropped with
        nothing run.
        """
        self._check_call(key, None)
        remote = self._remote
        entry = self._entries.get(key)
        if (
            remote is not None
            and entry.__class__ is Flight
            and entry.token is None
            and entry.remote is not None
            and entry.done is None
        ):
            # This instance's callers follow a run of another instance. That run is
            # detached (in its owner) by the store; its value can never reach them, so
            # their flight stays the key's and runs it afresh (a get now joins that).
            forgotten = await remote.invalidate(key)
            if self._watchers:
                self._notify_key(key)
            return True
        # the store first: if it fails (StoreError), nothing here has changed either
        forgotten_there = remote is not None and await remote.invalidate(key)
        forgotten, dropped = self._core.invalidate(key, self._clock())
        if dropped is not None:
            self._stop(dropped)
        forgotten = forgotten_there or forgotten
        if forgotten and self._watchers:
            self._notify_key(key)
        return forgotten

    def sweep(self) -> int:
        """Remove every entry whose ``ttl`` is up, now; return how many.

        Runs by itself every ``cleanup_interval`` seconds. Costs O(entries
        removed), not O(entries held). Also lets go of the exception objects
        of failures past ``failure_ttl``.
        """
        self._check_open()
        return self._sweep_now()

    def _sweep_now(self) -> int:
        if self._core.delayed:
            self._check_delays()
        removed = self._core.sweep(self._clock())
        if removed and (self._log_debug or self._watchers):
            for record in removed:
                if self._log_debug:
                    _log.logger.debug(
                        "prefetch.expired", name=self._name, key=_log.key_for_log(record.key)
                    )
                if self._watchers:
                    self._notify_key(record.key)
        return len(removed)

    # -- queries -------------------------------------------------------------

    async def wait(self, key: K, timeout: float | None = None) -> Snapshot:
        """Wait until ``key`` is neither pending nor running; return the key's snapshot then.

        The key's, not the finished load's: after a failed refresh that kept
        the old value it is ``COMPLETED``. Never raises the load's exception.
        Raises ``TimeoutError`` when ``timeout`` elapses, and
        :class:`PrefetcherClosed` if the Prefetcher closes meanwhile.
        """
        t, _ = self._check_call(key, None, timeout)
        remote = self._remote
        live_until = -_INF  # a lease seen running elsewhere may live until then
        backoff = 0.02
        with anyio.fail_after(t) if t is not None else _NO_SCOPE:
            while True:
                entry = self._core.current(key, self._clock())
                if entry.__class__ is Flight:
                    if entry.done is None:
                        event = entry.event
                        if event is None:
                            event = entry.event = self._new_event()
                        self._counters.waiting += 1
                        try:
                            await event.wait()
                        finally:
                            self._counters.waiting -= 1
                    if isinstance(entry.error, PrefetcherClosed) or self._state != "open":
                        raise PrefetcherClosed()
                    continue
                try:
                    snap = await self.status(key)
                except StoreError:
                    # while another instance may hold a live lease, ride the outage out
                    if remote is None or anyio.current_time() >= live_until:
                        raise
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                if remote is None or snap.status is not Status.RUNNING:
                    return snap
                live_until = anyio.current_time() + getattr(remote, "lease", 30.0)
                backoff = 0.02
                if self._core.current(key, self._clock()).__class__ is Flight:
                    continue  # a load of the key began here meanwhile: await it
                # another instance runs the key: its end is the store's to tell
                await remote.wait_change(key, 1.0)
                if self._state != "open":
                    raise PrefetcherClosed()

    async def status(self, key: K) -> Snapshot:
        """The snapshot of ``key`` now; ``NOT_STARTED`` for a key nobody has asked for."""
        self._check_call(key, None)
        core = self._core
        if core.delayed:
            self._check_delays()
        entry = core.current(key, self._clock())
        cls = entry.__class__
        if cls is Flight:
            if (
                self._remote is not None
                and entry.done is None
                and (entry.remote is not None or (entry.token is None and entry.status is _RUNNING))
            ):
                # following a run of another instance, or not yet known to be the run
                # or a follower: the store's word on the run, fresh
                stored = await self._remote.lookup(key)
                if stored is not None and stored.status is Status.RUNNING:
                    if entry.remote is not None:
                        entry.remote = stored
                    return self._snap.of_stored(key, stored)
            return self._snap.of_flight(entry)
        if self._remote is not None:
            # The store knows better than a local failure record whether another
            # process has completed the key since.
            stored = await self._remote.lookup(key)
            if stored is not None:
                local = core.current(key, self._clock())
                if (
                    stored.status is _FAILED
                    and local.__class__ is Failed
                    and local.token is not None
                    and local.token == stored.token
                ):
                    # the very failure that ran here: the store's record (the same on
                    # every instance), carrying the exception (within failure_ttl)
                    snap = self._snap.of_stored(key, stored)
                    return attrs.evolve(snap, exception=local.error)
                return self._snap.of_stored(key, stored)
            entry = core.current(key, self._clock())
            if entry.__class__ is Flight:
                return self._snap.of_flight(entry)
            if not getattr(self._remote, "reachable", True):
                kept = self._kept_value(key)
                if kept is not None:
                    return self._snap.of_key(key, kept)
            if entry.__class__ is Failed and getattr(self._remote, "reachable", True):
                # The store records every failure as long as a value: if it no longer
                # has this one, it was invalidated (or replaced, or expired) there.
                core.table.remove_if(key, entry)
                entry = None
        return self._snap.of_key(key, entry)

    def in_flight(self) -> list[Snapshot]:
        """Snapshots of the keys pending or running in this process, oldest first."""
        self._check_open()
        core = self._core
        if core.delayed:
            self._check_delays()
        return [self._snap.of_flight(f) for f in core.live if core.is_current(f)]

    def stats(self) -> Stats:
        """The counters now (see :class:`Stats`).

        Called on the event loop's thread it first removes what has expired
        (O(expired)), so that the counts by status are those of now; from
        another thread (a metrics exporter's) it reads the counts as of the
        last sweep or access, and changes nothing.
        """
        if self._state == "open" and threading.get_ident() == self._thread:
            self._sweep_now()
        return cast(Stats, self._core.stats(watchers=self._watchers.count()))

    def watch(self, key: K) -> Watch[K]:
        """An async iterator of ``key``'s snapshots, one per change of status or progress.

        It yields the current snapshot first, then one per change, and ends
        after a terminal status (``COMPLETED`` or ``FAILED``), or when the
        Prefetcher closes. A key that has not started yields ``NOT_STARTED``
        and then waits for it to start (what a server-push endpoint opened
        before the load was started needs); bound it with a timeout if the
        key may never start. A load detached by ``invalidate`` is never
        reported. Progress updates a slow consumer has not read yet are
        coalesced (it sees the latest); status changes are never dropped.
        Breaking out of the loop, or ``aclose()``, unregisters it.
        """
        self._check_call(key, None)
        return Watch(self, key)

    @overload
    def wrap(
        self,
        fn: Callable[..., Awaitable[T]],
        *,
        key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable] | None = None,
    ) -> Wrapped[T]: ...

    @overload
    def wrap(
        self,
        fn: None = None,
        *,
        key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable] | None = None,
    ) -> Callable[[Callable[..., Awaitable[T]]], Wrapped[T]]: ...

    def wrap(
        self,
        fn: Callable[..., Awaitable[T]] | None = None,
        *,
        key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable] | None = None,
    ) -> Wrapped[T] | Callable[[Callable[..., Awaitable[T]]], Wrapped[T]]:
        """Decorate a coroutine function so that its calls go through :meth:`get`.

        ``@pf.wrap`` or ``@pf.wrap(key=...)``: one load per distinct
        arguments. ``key(args, kwargs)`` makes the key (default: the
        positional arguments followed by the sorted keyword items, as one
        tuple). The wrapper has ``.prefetch``, ``.serve``, ``.status``,
        ``.invalidate`` and ``.cancel`` taking the same arguments.
        """
        if key is not None and not callable(key):
            raise TypeError(
                f"key must be a callable (args, kwargs) -> key, got {type(key).__name__}"
            )
        if fn is None:

            def decorate(f: Callable[..., Awaitable[T]]) -> Wrapped[T]:
                return make_wrapper(self, f, key)

            return decorate
        return make_wrapper(self, fn, key)

    # -- watchers ---------------------------------------------------------------

    def _has_flight(self, key: Hashable) -> bool:
        return self._entries.get(key).__class__ is Flight

    def _notify_key(self, key: Hashable, ended: Flight | None = None) -> None:
        """Tell the watchers of ``key`` its current state (never a detached load's).

        With a shared store: a running flight that is not yet known to be the run or a
        follower of another instance's run is not shown (its own start would be
        wrong); ``ended`` is the flight that just ended the key's run (its result lives
        in the store, not in the table, so the table alone would say NOT_STARTED).
        """
        watchers = self._watchers.of(key)
        if not watchers:
            return
        entry = self._entries.get(key)
        if self._remote is not None:
            if (
                entry.__class__ is Flight
                and entry.status is _RUNNING
                and entry.token is None
                and entry.remote is None
            ):
                return  # the store has not said yet whose run this is
            if entry is None and ended is not None:
                snapshot = self._snap.of_ended(ended)
                for watcher in watchers:
                    watcher.push(snapshot)
                return
        snapshot = self._snap.of_key(key, entry)
        for watcher in watchers:
            watcher.push(snapshot)

    # -- introspection for tests and debugging -------------------------------------

    def _debug_counts(self) -> dict[str, int]:
        """Internal structures' sizes (the leak checks of the test suite read them)."""
        core = self._core
        return {
            "live_flights": len(core.live),
            "queued": len(core.queue),
            "waiters": self._counters.waiting,
            "watchers": self._watchers.count(),
            "entries": len(self._entries),
            "bg_running": core.bg_running,
            "tasks": len(self._tasks),
        }


class _NoScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SCOPE = _NoScope()


def _first_fatal(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_fatal(exc)
            if found is not None:
                return found
        elif isinstance(exc, _FATAL):
            return exc
    return None
