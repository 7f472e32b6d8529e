"""``Prefetcher.watch``: an async iterator of a key's snapshots, one per change."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

import anyio
import anyio.abc

from prefetch_ingest._errors import WrongThreadError
from prefetch_ingest._types import Snapshot

if TYPE_CHECKING:
    from .prefetcher import Prefetcher

__all__ = ["Watch", "Watchers"]

K = TypeVar("K", bound=Hashable)


class Watchers:
    """The registry of a Prefetcher's watchers, by key (weakly held: a dropped iterator goes)."""

    __slots__ = ("by_key",)

    def __init__(self) -> None:
        self.by_key: dict[Hashable, set[weakref.ref[Watch[Any]]]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_key)

    def count(self) -> int:
        return sum(len(refs) for refs in self.by_key.values())

    def add(self, key: Hashable, watcher: Watch[Any]) -> weakref.ref[Watch[Any]]:
        def gone(ref: weakref.ref[Watch[Any]]) -> None:
            self.discard(key, ref)

        ref = weakref.ref(watcher, gone)
        self.by_key.setdefault(key, set()).add(ref)
        return ref

    def discard(self, key: Hashable, ref: weakref.ref[Watch[Any]]) -> None:
        refs = self.by_key.get(key)
        if refs is not None:
            refs.discard(ref)
            if not refs:
                del self.by_key[key]

    def of(self, key: Hashable) -> list[Watch[Any]]:
        refs = self.by_key.get(key)
        if not refs:
            return []
        return [w for w in (ref() for ref in list(refs)) if w is not None]

    def close_all(self) -> None:
        for key in list(self.by_key):
            for watcher in self.of(key):
                watcher.push(None)
        self.by_key.clear()


class Watch(Generic[K]):
    """The async iterator returned by :meth:`Prefetcher.watch`.

    It yields the key's snapshot now, then one per change of status or
    progress, and ends after a terminal status or when the Prefetcher
    closes. It always describes the key's *current* state: a load detached
    by ``invalidate`` (or replaced) is never reported. A slow consumer sees
    the latest progress (unread progress updates are coalesced); status
    changes are never dropped, and an unchanged snapshot is never repeated.
    """

    def __init__(self, engine: Prefetcher[K, Any], key: K) -> None:
        self._engine = engine
        self._key = key
        self._queue: deque[Snapshot] = deque()
        self._last: Snapshot | None = None
        self._event: anyio.Event | None = None
        self._started = False
        self._ended = False
        self._ref: weakref.ref[Watch[K]] | None = None

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop watching; the iterator ends. From the event loop's thread only."""
        thread = self._engine._thread
        if thread and threading.get_ident() != thread:
            raise WrongThreadError(
                "a watch must be closed from its Prefetcher's event loop thread; from a "
                "worker thread use anyio.from_thread.run(watch.aclose)"
            )
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._ref is not None:
                self._engine._watchers.discard(self._key, self._ref)
                self._ref = None
        if self._event is not None:
            self._event.set()

    def push(self, snapshot: Snapshot | None) -> None:
        """Called by the engine on every change of the key (None: the Prefetcher closed)."""
        if self._ended:
            return
        if snapshot is None:
            self._end()
            return
        queue = self._queue
        last = queue[-1] if queue else self._last
        if last is not None and last == snapshot:
            return  # nothing changed that a snapshot shows
        if queue and queue[-1].status is snapshot.status and not snapshot.status.terminal:
            queue[-1] = snapshot  # coalesce progress a slow consumer has not read
        else:
            queue.append(snapshot)
        if self._event is not None:
            self._event.set()

    async def __anext__(self) -> Snapshot:
        try:
            snapshot = await self._next()
        except BaseException:
            # Cancelled (or failed) while waiting: this iterator is finished,
            # and unregisters now rather than whenever it is collected.
            self._end()
            raise
        self._last = snapshot
        return snapshot

    async def _next(self) -> Snapshot:
        engine = self._engine
        if not self._started:
            self._started = True
            engine._check_open()
            self._ref = engine._watchers.add(self._key, self)
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
                    last = self._last
                    if last is None or snap != last:
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
