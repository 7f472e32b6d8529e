"""The decisions: what each request and each outcome does to a key. Synchronous and pure.

:class:`Core` owns the table, the admission queue and the counters, and
answers the engine's questions with no awaiting, no anyio and no logging:

- :meth:`Core.on_get` / :meth:`Core.on_prefetch`: serve, join, start, re-raise
  or ask the shared store;
- :meth:`Core.start`, :meth:`Core.promote`, :meth:`Core.delay_over`,
  :meth:`Core.release_slot`: who runs now and who waits (``PENDING``);
- :meth:`Core.complete`, :meth:`Core.fail`, :meth:`Core.cancel`,
  :meth:`Core.invalidate`: what is stored, restored, dropped or counted.

The engine (:mod:`prefetch_ingest.engine`) performs what these return: it
spawns the flights whose status became ``RUNNING``, wakes waiters, notifies
watchers and logs. A :class:`Listener` hears of expirations and evictions (for
the DEBUG log) without the core knowing what is done with them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Protocol

from prefetch_ingest._errors import LoadCancelled, PrefetcherClosed
from prefetch_ingest._types import Status
from prefetch_ingest._validate import error_text, key_text

from .counters import Counters
from .records import Done, Failed, Flight, Unclaimed
from .table import MemoryTable

__all__ = ["ASK_STORE", "HIT", "JOIN", "RAISE", "START", "Core", "Listener"]

# what on_get decided
HIT = 0  # serve the returned record's value now
JOIN = 1  # await the returned flight
START = 2  # start a load (the returned record, if any, is what it replaces)
RAISE = 3  # re-raise the returned failure's exception (within failure_ttl)
ASK_STORE = 4  # nothing usable here: a shared store may know more

_PENDING = Status.PENDING
_RUNNING = Status.RUNNING
_INF = float("inf")


class Listener(Protocol):
    """What the core tells the engine about records leaving the table by themselves."""

    def expired(self, record: Done | Failed) -> None: ...

    def evicted(self, record: Done | Failed) -> None: ...


class _Silent:
    def expired(self, record: Done | Failed) -> None:
        pass

    def evicted(self, record: Done | Failed) -> None:
        pass


class Core:
    """The state of every key of one Prefetcher, and every transition of it."""

    def __init__(
        self,
        *,
        ttl: float,
        failure_ttl: float,
        refresh_after: float,
        max_entries: int | None,
        limit: Callable[[], int | None],
        local_results: bool = True,
    ) -> None:
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.refresh_after = refresh_after
        self.limit = limit  # how many background loads may run now (None: no limit)
        self.local_results = local_results  # False: results live in a shared store
        self.table = MemoryTable(ttl=ttl, max_entries=max_entries, failure_ttl=failure_ttl)
        self.entries = self.table.entries
        self.counters = Counters()
        self.queue: deque[Flight] = deque()  # admitted-when-possible background flights
        self.live: dict[Flight, None] = {}  # every flight not finished, oldest first
        self.delayed: dict[Flight, None] = {}  # pending flights waiting for their delay
        self.bg_running = 0
        self.n_pending = 0
        self.n_running = 0
        self.fence = 0
        self.listener: Listener = _Silent()

    # -- reading ----------------------------------------------------------

    def current(self, key: Hashable, now: float) -> Any:
        """The key's record, after enforcing expiry on it (and the failure_ttl release)."""
        entry: Any = self.entries.get(key)
        cls = entry.__class__
        if cls is Done or cls is Unclaimed or cls is Failed:
            age = now - entry.done
            if age >= self.ttl:
                self.table.remove_if(key, entry)
                self.counters.expirations += 1
                self.listener.expired(entry)
                return None
            if cls is Failed and entry.error is not None and age >= self.failure_ttl:
                entry.error = entry.tb = None
        return entry

    def is_current(self, flight: Flight) -> bool:
        return self.entries.get(flight.key) is flight

    # -- requests ---------------------------------------------------------

    def on_get(
        self, key: Hashable, now: float, force: bool, *, remote: bool = False
    ) -> tuple[int, Any]:
        """What a ``get``/``serve`` of ``key`` does (counting it), and on what record."""
        entry = self.current(key, now)
        cls = entry.__class__
        if cls is Flight:
            stale = entry.stale
            if stale is not None and not force and now - stale.done < self.ttl:
                self.hit(key, stale, now)  # stale-while-revalidate: the kept value, at once
                return HIT, stale
            self.join(entry, now)
            return JOIN, entry
        if (cls is Done or cls is Unclaimed) and not force:
            self.hit(key, entry, now)
            return HIT, entry
        if (
            cls is Failed
            and not force
            and not remote
            and entry.error is not None
            and now - entry.done < self.failure_ttl
        ):
            return RAISE, entry
        if remote and cls is not Done and cls is not Unclaimed:
            return ASK_STORE, entry
        return START, entry

    def hit(self, key: Hashable, record: Done, now: float) -> None:
        """Count a caller served ``record``; the first one claims a background value."""
        c = self.counters
        c.hits += 1
        c.saved_seconds += record.duration
        if record.__class__ is Unclaimed:
            record.__class__ = Done  # type: ignore[assignment]  # claimed: later hits take the engine's fast path
        if self.table.lru and self.entries.get(key) is record:
            self.entries.move_to_end(key)  # type: ignore[attr-defined]

    def wants_refresh(self, record: Done, now: float) -> bool:
        """Should serving ``record`` start a background reload (``refresh_after``)?"""
        return now - record.done >= self.refresh_after and self.entries.get(record.key) is record

    def join(self, flight: Flight, now: float) -> None:
        """Count a caller awaiting ``flight``; a pending flight is promoted by the engine."""
        c = self.counters
        c.joins += 1
        c.deduplicated += 1
        flight.claimed = True
        if flight.started is not None:
            c.saved_seconds += now - flight.started

    def on_prefetch(self, key: Hashable, now: float) -> tuple[bool, Any]:
        """Should a ``prefetch`` of ``key`` start a load? (and the record it would replace)."""
        entry = self.current(key, now)
        cls = entry.__class__
        if cls is Flight:
            self.counters.deduplicated += 1
            return False, entry
        if cls is Done or cls is Unclaimed:
            if now - entry.done < self.refresh_after:
                self.counters.deduplicated += 1
                return False, entry
            return True, entry
        if cls is Failed and now - entry.done < self.failure_ttl:
            self.counters.deduplicated += 1
            return False, entry
        return True, entry

    # -- starting ------------------------------------------------------------

    def admits(self) -> bool:
        limit = self.limit()
        return limit is None or self.bg_running < limit

    def start(
        self,
        key: Hashable,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        background: bool,
        force: bool,
        prior: Any,
        chain: tuple[tuple[int, Hashable], ...],
        now: float,
        delay: float = 0.0,
    ) -> Flight:
        """A new flight for ``key``, in the table; RUNNING if it may run now, else PENDING.

        A PENDING flight is either queued for admission or, with ``delay``,
        waiting for :meth:`delay_over` (the engine arms the timer).
        """
        cls = prior.__class__
        if not (cls is Done or cls is Unclaimed or cls is Failed):
            prior = None
        admitted = background and delay <= 0 and self.admits()  # decided before any change
        self.fence += 1
        flight = Flight(
            key,
            fn,
            args,
            background=background,
            force=force,
            prior=prior,
            chain=chain,
            now=now,
            fence=self.fence,
        )
        for victim in self.table.put(key, flight):
            self._evicted(victim)
        self.live[flight] = None
        self.n_pending += 1
        if background:
            self.counters.prefetches += 1
        if delay > 0:
            flight.not_before = now + delay
            self.delayed[flight] = None
        elif not background:
            self._run(flight, now, holds_slot=False)
        elif admitted:
            self._run(flight, now, holds_slot=True)
        else:
            self.queue.append(flight)
        return flight

    def _run(self, flight: Flight, now: float, *, holds_slot: bool) -> None:
        flight.status = _RUNNING
        flight.started = now
        flight.holds_slot = holds_slot
        if holds_slot:
            self.bg_running += 1
        self.n_pending -= 1
        self.n_running += 1

    def promote(self, flight: Flight, now: float) -> bool:
        """A caller demands a pending flight: it runs now, outside the limit (True: it was)."""
        self.delayed.pop(flight, None)
        if flight.status is not _PENDING or flight.done is not None:
            return False
        self._run(flight, now, holds_slot=False)  # it stays in the queue; admit_next skips it
        return True

    def delay_over(self, flight: Flight, now: float) -> bool | None:
        """A delayed flight's timer fired: True if it runs now, False if it queues for
        admission (or is gone), None if its delay has not passed on the clock yet."""
        if flight not in self.delayed:
            return False
        if now < flight.not_before:
            return None
        del self.delayed[flight]
        if flight.status is not _PENDING or flight.done is not None:
            return False
        if self.admits():
            self._run(flight, now, holds_slot=True)
            return True
        self.queue.append(flight)
        return False

    def due(self, now: float) -> list[Flight]:
        """Delayed flights whose delay has passed on the clock (their timers may lag)."""
        return [f for f in self.delayed if f.not_before <= now]

    def admit_next(self, now: float) -> list[Flight]:
        """Queued flights that may run now (the limit rose, or a slot was freed)."""
        out: list[Flight] = []
        queue = self.queue
        while queue and self.admits():
            flight = queue.popleft()
            if flight.status is _PENDING and flight.done is None:
                self._run(flight, now, holds_slot=True)
                out.append(flight)
        return out

    def release_slot(self, flight: Flight, now: float) -> list[Flight]:
        """``flight`` no longer runs: free its background slot; return who runs next."""
        if flight.holds_slot:
            flight.holds_slot = False
            self.bg_running -= 1
        return self.admit_next(now)

    # -- outcomes --------------------------------------------------------------

    def _end(self, flight: Flight, now: float) -> float:
        """Common to every outcome: the flight is done; return its duration."""
        flight.done = now
        self.live.pop(flight, None)
        self.delayed.pop(flight, None)
        if flight.detached:
            pass  # no longer counted since invalidate took it out of the table
        elif flight.status is _PENDING:
            self.n_pending -= 1
        else:
            self.n_running -= 1
        started = flight.started if flight.started is not None else now
        flight.fn = None
        flight.args = ()
        return now - started

    def _drop_prior(self, flight: Flight) -> None:
        prior = flight.prior
        flight.prior = None
        if prior is not None and prior.__class__ is Unclaimed:
            self.table.unclaimed += 1
            self.table.wasted += prior.duration

    def _restore_prior(self, flight: Flight, now: float) -> bool:
        """Put back the record ``flight`` replaced, if it is still fresh. True if restored."""
        prior = flight.prior
        if (
            prior is not None
            and now - prior.done < self.ttl
            # with a shared store a value is the store's to keep (it still holds it): a
            # local copy would be served past the store's invalidations
            and (self.local_results or prior.__class__ is Failed)
        ):
            flight.prior = None
            for victim in self.table.put(flight.key, prior):
                self._evicted(victim)
            return True
        self.table.detach(flight.key, flight)
        self._drop_prior(flight)
        return False

    def complete(self, flight: Flight, value: Any, now: float, *, ran_here: bool = True) -> bool:
        """The load returned ``value``. True if the key's visible state changed."""
        if flight.done is not None:
            return False  # already ended (cancelled, or the Prefetcher closed)
        duration = self._end(flight, now)
        flight.value = value
        flight.status = Status.COMPLETED
        flight.ran_here = ran_here
        c = self.counters
        if ran_here:
            c.load_seconds += duration
            c.successes += 1
            c.success_seconds += duration
        elif not flight.background:
            # another instance ran it: the caller that started this flight followed that run
            c.misses -= 1
            c.joins += 1
        if self.entries.get(flight.key) is not flight:
            flight.prior = None
            return False  # detached (invalidate): its waiters get the value, nothing is stored
        self._drop_prior(flight)
        if self.local_results:
            cls = Done if flight.claimed else Unclaimed
            record = cls(flight.key, value, now, duration, flight.background)
            for victim in self.table.put(flight.key, record):
                self._evicted(victim)
        else:
            self.table.detach(flight.key, flight)
        return True

    def fail(
        self,
        flight: Flight,
        error: BaseException,
        tb: TracebackType | None,
        now: float,
        *,
        ran_here: bool = True,
    ) -> bool:
        """The load raised ``error``. True if the key's visible state changed."""
        if flight.done is not None:
            return False
        duration = self._end(flight, now)
        flight.error = error
        flight.tb = tb
        flight.status = Status.FAILED
        flight.ran_here = ran_here
        c = self.counters
        if ran_here:
            c.load_seconds += duration
            c.failures += 1
        elif not flight.background:
            c.misses -= 1
            c.joins += 1
        if self.entries.get(flight.key) is not flight:
            flight.prior = None
            return False
        stale = flight.stale
        if stale is not None and now - stale.done < self.ttl:
            self._restore_prior(flight, now)  # a failed refresh keeps the old value
            return True
        self._drop_prior(flight)
        keep = self.failure_ttl > 0
        record = Failed(
            flight.key,
            error_text(error),
            error if keep else None,
            tb if keep else None,
            now,
            duration,
            flight.background,
        )
        record.token = flight.token
        for victim in self.table.put(flight.key, record):
            self._evicted(victim)
        return True

    def cancel(self, flight: Flight, now: float, *, reason: str) -> bool:
        """End ``flight`` now (``reason`` "cancel" or "close"); restore what it replaced.

        Its waiters get :class:`LoadCancelled` (or :class:`PrefetcherClosed`
        on close); nothing is stored. True if the key's visible state changed.
        """
        if flight.done is not None:
            return False
        was_pending = flight.status is _PENDING
        error: BaseException
        if reason == "close":
            error = PrefetcherClosed("the Prefetcher was closed before this load finished")
        else:
            what = "before it started" if was_pending else "while it ran"
            error = LoadCancelled(f"the load for key {key_text(flight.key)} was cancelled {what}")
        self._end(flight, now)
        flight.cancel_reason = reason
        flight.status = Status.FAILED
        flight.error = error
        self.counters.cancelled += 1
        if self.entries.get(flight.key) is not flight:
            flight.prior = None
            return False
        self._restore_prior(flight, now)
        return True

    def invalidate(self, key: Hashable, now: float) -> tuple[bool, Flight | None]:
        """Forget ``key``: a value or failure is dropped, a flight detached.

        A *pending* flight is dropped with nothing run (returned, so that the
        engine disarms its timer and wakes whoever waits for it); a running
        one goes on for its waiters, but its result will not be stored.
        Returns (whether there was anything to forget, the dropped flight).
        """
        entry: Any = self.entries.get(key)
        if entry is None:
            return False, None
        if entry.__class__ is Flight:
            if entry.status is _PENDING and entry.done is None:
                error = LoadCancelled(
                    f"the load for key {key_text(key)} was dropped by invalidate before it started"
                )
                self.table.detach(key, entry)
                self._drop_prior(entry)
                self._end(entry, now)
                entry.status = Status.FAILED
                entry.cancel_reason = "invalidate"
                entry.error = error
                return True, entry
            self.detach(entry)
            return True, None
        self.table.pop(key)
        return True, None

    def detach(self, flight: Flight) -> bool:
        """Take a running flight out of the table: it runs on for its waiters, but
        is no key's state and its result is not stored. False if it was not current."""
        if flight.done is not None or not self.table.detach(flight.key, flight):
            return False
        self._drop_prior(flight)
        flight.detached = True
        self.n_running -= 1
        return True

    # -- time ---------------------------------------------------------------------

    def sweep(self, now: float) -> list[Done | Failed]:
        """Remove what has expired and release failures past ``failure_ttl``."""
        self.table.release_failures(now)
        removed = self.table.expired(now)
        self.counters.expirations += len(removed)
        return removed

    def _evicted(self, record: Done | Failed) -> None:
        self.counters.evictions += 1
        self.listener.evicted(record)

    def clear(self) -> None:
        self.queue.clear()
        self.delayed.clear()
        self.table.clear()

    # -- numbers ---------------------------------------------------------------------

    def stats(self, *, watchers: int) -> Any:
        t = self.table
        return self.counters.stats(
            pending=self.n_pending,
            running=self.n_running,
            completed=t.n_done,
            failed=t.n_failed,
            unclaimed=t.unclaimed,
            wasted_seconds=t.wasted,
            watchers=watchers,
        )
