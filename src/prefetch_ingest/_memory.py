"""The in-process table: records of keys, their expiry order and their recency.

Pure bookkeeping, no I/O and no awaiting (the engine does that). Three kinds
of record live in the table, one per key:

- :class:`Done`, a completed value. It is deliberately small: the value, the
  monotonic completion time, the load's duration and one flag. Wall-clock
  times and the expiry are derived from these when a snapshot is asked for.
- :class:`Failed`, a failure, kept for ``failure_ttl`` (re-raised) and
  reported by ``status`` until it expires like a value.
- a flight (defined by the engine), a load pending or running.

Expiry: every :class:`Done`/:class:`Failed` expires ``ttl`` seconds after its
completion. ``ttl`` is one number for the whole table, so completion order is
expiry order and a FIFO of records is enough to find the expired ones: the
sweep pops from its head and stops at the first record still fresh, so it
costs O(expired), not O(held). Records replaced or evicted before they expire
stay in the FIFO until it is compacted, which happens when it holds more than
twice as many records as the table (amortised O(1) per insert).

Recency: with ``max_entries`` the table is an ``OrderedDict`` kept in LRU
order (a hit moves its key to the end); eviction takes completed/failed
records from the front and never touches a flight.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from types import TracebackType
from typing import Any

__all__ = ["Done", "Failed", "MemoryTable"]


class Done:
    """A completed value."""

    __slots__ = ("background", "done", "duration", "key", "value")

    def __init__(
        self, key: Hashable, value: Any, done: float, duration: float, background: bool
    ) -> None:
        self.key = key
        self.value = value
        self.done = done
        self.duration = duration
        self.background = background


class Failed:
    """A failure: the exception (with its traceback) and when it happened."""

    __slots__ = ("background", "done", "duration", "error", "key", "tb")

    def __init__(
        self,
        key: Hashable,
        error: BaseException,
        tb: TracebackType | None,
        done: float,
        duration: float,
        background: bool,
    ) -> None:
        self.key = key
        self.error = error
        self.tb = tb
        self.done = done
        self.duration = duration
        self.background = background


Result = Done | Failed


def _release(record: object) -> None:
    """Drop what a forgotten record holds (its value, its exception and traceback).

    A record that left the table may still sit in the expiry FIFO until the
    FIFO is compacted; without this, an evicted value would stay in memory
    until then, and ``max_entries`` would not bound memory.
    """
    cls = record.__class__
    if cls is Done:
        record.value = None  # type: ignore[attr-defined]
    elif cls is Failed:
        record.error = record.tb = None  # type: ignore[attr-defined]


_COMPACT_SLACK = 1024


class MemoryTable:
    """One record per key, with expiry order and (optionally) LRU order.

    ``entries`` is exposed so the engine's hit path can read it directly.
    """

    __slots__ = ("entries", "expires", "expiry", "lru", "max_entries", "n_done", "n_failed", "ttl")

    def __init__(self, *, ttl: float, max_entries: int | None) -> None:
        self.ttl = ttl
        self.expires = ttl != float("inf")  # with no ttl, nothing enters the expiry FIFO
        self.max_entries = max_entries
        self.lru = max_entries is not None
        self.entries: dict[Hashable, Any] = OrderedDict() if self.lru else {}
        self.expiry: deque[Result] = deque()
        self.n_done = 0
        self.n_failed = 0

    def __len__(self) -> int:
        return len(self.entries)

    # -- counting -------------------------------------------------------

    def _count(self, record: object, delta: int) -> None:
        cls = record.__class__
        if cls is Done:
            self.n_done += delta
        elif cls is Failed:
            self.n_failed += delta

    # -- mutation --------------------------------------------------------

    def put(self, key: Hashable, record: object) -> list[Result]:
        """Store ``record`` (a result or a flight) for ``key``; return what was evicted."""
        entries = self.entries
        old = entries.get(key)
        if old is not None:
            self._count(old, -1)
        entries[key] = record
        self._count(record, +1)
        cls = record.__class__
        if (cls is Done or cls is Failed) and self.expires:
            self._remember_expiry(record)  # type: ignore[arg-type]
        if self.lru:
            entries.move_to_end(key)  # type: ignore[attr-defined]
            if len(entries) > self.max_entries:  # type: ignore[operator]
                return self._evict()
        return []

    def pop(self, key: Hashable) -> object | None:
        """Forget ``key``; return its record, or None."""
        record: object | None = self.entries.pop(key, None)
        if record is not None:
            self._count(record, -1)
            _release(record)
        return record

    def remove_if(self, key: Hashable, record: object) -> bool:
        """Forget ``key`` only if ``record`` is still its record."""
        if self.entries.get(key) is record:
            del self.entries[key]
            self._count(record, -1)
            return True
        return False

    def clear(self) -> None:
        self.entries.clear()
        self.expiry.clear()
        self.n_done = self.n_failed = 0

    # -- expiry ---------------------------------------------------------

    def _remember_expiry(self, record: Result) -> None:
        expiry = self.expiry
        expiry.append(record)
        if len(expiry) > 2 * len(self.entries) + _COMPACT_SLACK:
            entries = self.entries
            self.expiry = deque(r for r in expiry if entries.get(r.key) is r)

    def expired(self, now: float) -> list[Result]:
        """Remove and return every record whose ``ttl`` is up, oldest first.

        Costs O(records removed + stale FIFO slots skipped), never a scan of
        the table. The loop is kept free of method calls: it is the sweep's
        whole cost.
        """
        ttl = self.ttl
        expiry = self.expiry
        entries = self.entries
        get = entries.get
        popleft = expiry.popleft
        out: list[Result] = []
        append = out.append
        n_done = 0
        while expiry:
            record = expiry[0]
            key = record.key
            if get(key) is not record:
                popleft()  # replaced, evicted or invalidated meanwhile
                continue
            if now - record.done < ttl:
                break
            popleft()
            del entries[key]
            if record.__class__ is Done:
                n_done += 1
            append(record)
        self.n_done -= n_done
        self.n_failed -= len(out) - n_done
        return out

    # -- eviction -------------------------------------------------------

    def _evict(self) -> list[Result]:
        entries = self.entries
        excess = len(entries) - self.max_entries  # type: ignore[operator]
        victims: list[Result] = []
        for record in entries.values():
            if len(victims) >= excess:
                break
            cls = record.__class__
            if cls is Done or cls is Failed:
                victims.append(record)
        for record in victims:
            del entries[record.key]
            self._count(record, -1)
            _release(record)
        return victims
