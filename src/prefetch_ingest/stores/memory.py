"""The in-memory shared store: the reference implementation of the backend primitives.

Several Prefetchers in one process, each with its own :class:`MemoryStore` on
one :class:`MemoryServer`, behave as several instances on one shared store:
one run per key, followers, takeovers, fences, notifications, expiries by the
server's clock. It is the fast fake of the engine's multi-instance tests and
the reference of the contract suite (:mod:`prefetch_ingest.stores.testing`)
that every backend passes; it runs on asyncio and on trio.

Faults are switched on by tests: ``server.down = True`` makes every operation
raise :class:`MemoryStoreDown` (a ``ConnectionError``), as a stopped server
would; ``server.lose_everything()`` is a restart without persistence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import anyio
import attrs

from prefetch_ingest._types import Progress

from .codec import Codec
from .interface import Acquired, Completion, Outcome, Read, Run
from .lease import LeasedStore

__all__ = ["MemoryBackend", "MemoryServer", "MemoryStore", "MemoryStoreDown"]


_NOTE_KEEP = 30.0
"""How long a failure note stays for the followers of the run (seconds)."""


class MemoryStoreDown(ConnectionError):
    """The in-memory server is switched off (``MemoryServer.down``)."""


@attrs.define
class _Slot:
    value: object
    until: float | None  # server-clock time it expires at; None: never


class _Entry:
    __slots__ = ("cancelled", "outcome", "run")

    def __init__(self) -> None:
        self.outcome: _Slot | None = None
        self.run: _Slot | None = None
        self.cancelled: _Slot | None = None


class MemoryServer:
    """The shared state of every :class:`MemoryBackend` connected to it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.down = False
        self.entries: dict[str, _Entry] = {}
        self.listeners: set[MemoryBackend] = set()
        self.epoch_floor = 0  # fences handed out survive lose_everything()
        self.operations = 0
        self._stall: anyio.Event | None = None

    def stall(self) -> None:
        """A partition: every operation from now on waits (no answer, no error) until
        :meth:`resume`."""
        if self._stall is None:
            self._stall = anyio.Event()

    def resume(self) -> None:
        """End a :meth:`stall`: the operations that waited go on."""
        stalled, self._stall = self._stall, None
        if stalled is not None:
            stalled.set()

    def lose_everything(self) -> None:
        """A restart with no persistence: every entry is gone (fences still grow)."""
        self.entries.clear()
        self.notify_all()

    def check(self) -> None:
        if self.down:
            raise MemoryStoreDown("the in-memory store is down")
        self.operations += 1

    def live(self, slot: _Slot | None) -> object | None:
        if slot is None:
            return None
        if slot.until is not None and self.clock() >= slot.until:
            return None
        return slot.value

    def until(self, seconds: float | None) -> float | None:
        return None if seconds is None else self.clock() + seconds

    def read(self, digest: str) -> Read:
        e = self.entries.get(digest)
        if e is None:
            return Read()
        outcome = self.live(e.outcome)
        run = self.live(e.run)
        note = self.live(e.cancelled)
        if outcome is None and run is None and note is None:
            del self.entries[digest]
            return Read()
        assert outcome is None or isinstance(outcome, Outcome)
        assert run is None or isinstance(run, Run)
        cancelled = note if isinstance(note, str) else None
        failed = note if isinstance(note, Outcome) else None
        return Read(outcome, run, cancelled, failed)

    def next_fence(self, prev: Outcome | None) -> int:
        # the clock's floor survives a loss of every entry, as a server's clock would
        fence = max(int(time.time() * 1_000_000), self.epoch_floor + 1)
        if prev is not None and prev.fence >= fence:
            fence = prev.fence + 1
        self.epoch_floor = fence
        return fence

    def notify(self, digest: str, event: str) -> None:
        for backend in list(self.listeners):
            backend.wake(digest, event)

    def notify_all(self) -> None:
        for backend in list(self.listeners):
            if backend.on_notice is not None:
                backend.on_notice(None, "i")
            backend.wake_all()


class MemoryBackend:
    """The primitives of :class:`~prefetch_ingest.stores.interface.Backend`, in memory."""

    errors: tuple[type[BaseException], ...] = (MemoryStoreDown,)

    def __init__(self, server: MemoryServer) -> None:
        self.server = server
        self._events: dict[str, anyio.Event] = {}
        self.on_notice: Callable[[str | None, str], None] | None = None

    @property
    def where(self) -> str:
        return f"memory:{id(self.server):x}"

    def debug_counts(self) -> dict[str, int]:
        return {"connected": int(self in self.server.listeners), "listeners": len(self._events)}

    async def open(self) -> None:
        self.server.check()
        self.server.listeners.add(self)

    async def aclose(self) -> None:
        self.server.listeners.discard(self)
        self.wake_all()

    def wake(self, digest: str, what: str) -> None:
        if self.on_notice is not None:
            self.on_notice(digest, what)
        event = self._events.pop(digest, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    async def _op(self) -> None:
        await anyio.lowlevel.checkpoint()  # a round trip yields, as a network call would
        stalled = self.server._stall
        if stalled is not None:
            await stalled.wait()
        self.server.check()

    async def read(self, digest: str, *, outcome_only: bool = False) -> Read:
        await self._op()
        return self.server.read(digest)

    async def acquire(
        self, digest: str, run: Run, lease: float, *, force: bool, accept: frozenset[str]
    ) -> Acquired:
        await self._op()
        s = self.server
        read = s.read(digest)
        o = read.outcome
        if o is not None and ((o.ok and not force) or o.token in accept):
            return Acquired(None, read)
        if read.cancelled is not None and read.cancelled in accept:
            return Acquired(None, read)
        if read.failed is not None and read.failed.token in accept:
            return Acquired(None, read)
        if read.run is not None:
            return Acquired(None, read)
        fence = s.next_fence(o)
        e = s.entries.setdefault(digest, _Entry())
        e.run = _Slot(attrs.evolve(run, fence=fence), s.until(lease))
        s.notify(digest, "s")
        return Acquired(fence)

    async def renew(self, digest: str, token: str, lease: float, progress: Progress | None) -> bool:
        await self._op()
        s = self.server
        run = s.read(digest).run
        if run is None or run.token != token:
            return False
        e = s.entries[digest]
        value = run if progress is None else attrs.evolve(run, progress=progress)
        e.run = _Slot(value, s.until(lease))
        if progress is not None:
            s.notify(digest, "p")
        return True

    async def complete(self, digest: str, outcome: Outcome, keep: float | None) -> Completion:
        await self._op()
        s = self.server
        read = s.read(digest)
        run = read.run
        if run is None or run.token != outcome.token:
            return Completion.LOST
        e = s.entries[digest]
        e.run = None
        theirs = read.outcome
        if theirs is not None and theirs.fence > run.fence:
            s.notify(digest, "r")
            return Completion.SUPERSEDED
        if outcome.ok or theirs is None or not theirs.ok:
            e.outcome = _Slot(outcome, s.until(keep))
        else:  # a failure never replaces a value: a note for the run's followers
            e.cancelled = _Slot(outcome, s.until(_NOTE_KEEP))
        s.notify(digest, "c" if outcome.ok else "f")
        return Completion.WRITTEN

    async def release(self, digest: str, token: str) -> bool:
        await self._op()
        s = self.server
        run = s.read(digest).run
        if run is None or run.token != token:
            return False
        s.entries[digest].run = None
        s.notify(digest, "r")
        return True

    async def invalidate(self, digest: str) -> bool:
        await self._op()
        s = self.server
        read = s.read(digest)
        e = s.entries.pop(digest, None)
        if e is None:
            return False
        s.notify(digest, "i")
        return read.outcome is not None

    async def cancel(self, digest: str, keep: float) -> str | None:
        await self._op()
        s = self.server
        run = s.read(digest).run
        if run is None:
            return None
        e = s.entries[digest]
        e.run = None
        e.cancelled = _Slot(run.token, s.until(keep))
        s.notify(digest, "x")
        return run.token

    async def wait_change(self, digest: str, timeout: float) -> None:
        event = self._events.get(digest)
        if event is None:
            event = self._events[digest] = anyio.Event()
        with anyio.move_on_after(timeout):
            await event.wait()


class MemoryStore(LeasedStore):
    """A shared store in memory: instances sharing one :class:`MemoryServer` share runs.

    For tests and for trying the multi-instance behaviour without a server::

        server = MemoryServer()
        async with Prefetcher(load, store=MemoryStore(server)) as a, \\
                   Prefetcher(load, store=MemoryStore(server)) as b:
            ...
    """

    kind = "memory store"

    def __init__(
        self,
        server: MemoryServer | None = None,
        *,
        lease: float = 30.0,
        codec: Codec | None = None,
        fallback: Literal["local"] | None = None,
        poll_interval: float | None = None,
        progress_interval: float = 0.25,
    ) -> None:
        self.server = MemoryServer() if server is None else server
        super().__init__(
            MemoryBackend(self.server),
            lease=lease,
            codec=codec,
            fallback=fallback,
            poll_interval=poll_interval,
            progress_interval=progress_interval,
        )
