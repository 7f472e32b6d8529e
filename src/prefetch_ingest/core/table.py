"""The in-process table: one record per key, its expiry order, its recency.

Pure bookkeeping, no I/O and no awaiting. Three kinds of record live here
(see :mod:`.records`): completed values (:class:`Done`, :class:`Unclaimed`),
failures (:class:`Failed`) and loads in flight (:class:`Flight`).

Expiry: every value or failure expires ``ttl`` seconds after completion.
``ttl`` is one number for the whole table, so completion order is expiry
order and a FIFO is enough: the sweep pops from its head and stops at the
first record still fresh, so it costs O(expired), not O(held). Records
replaced or evicted before they expire stay in the FIFO until it is
compacted (when it holds more than twice the table), amortised O(1).

Failures: ``failure_ttl`` is one number too, so a second FIFO says when a
failure's exception object and traceback are let go (:meth:`release_failures`);
the text stays until ``ttl``.

Recency and bounds: with ``max_entries`` the table is an ``OrderedDict`` in
LRU order (a hit moves its key to the end). ``max_entries`` bounds the
results held (values and failures); loads in flight are not counted and never
evicted, and only storing a result can evict one. Eviction takes failures
first (oldest first), then the least recently used values.

Accounting: a value that leaves the table still :class:`Unclaimed` (expired,
evicted, invalidated, replaced) is counted in ``unclaimed`` / ``wasted``.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any

from .records import Done, Failed, Unclaimed

__all__ = ["MemoryTable"]

_COMPACT_SLACK = 1024
_INF = float("inf")

Result = Done | Failed


def _release(record: object) -> None:
    """Drop what a forgotten record holds, even while it still sits in a FIFO."""
    cls = record.__class__
    if cls is Done or cls is Unclaimed:
        record.value = None  # type: ignore[attr-defined]
    elif cls is Failed:
        record.error = record.tb = None  # type: ignore[attr-defined]


class MemoryTable:
    """One record per key, with expiry order, failure release order and (optionally) LRU order.

    ``entries`` is exposed so that the engine's hit path reads it directly.
    """

    __slots__ = (
        "entries",
        "expires",
        "expiry",
        "failed_keys",
        "failure_ttl",
        "held_failures",
        "lru",
        "max_entries",
        "n_done",
        "n_failed",
        "ttl",
        "unclaimed",
        "wasted",
    )

    def __init__(self, *, ttl: float, max_entries: int | None, failure_ttl: float = 0.0) -> None:
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.expires = ttl != _INF  # with no ttl, nothing enters the expiry FIFO
        self.max_entries = max_entries
        self.lru = max_entries is not None
        self.entries: dict[Hashable, Any] = OrderedDict() if self.lru else {}
        self.expiry: deque[Result] = deque()
        self.held_failures: deque[Failed] = deque()  # failures still holding their exception
        self.failed_keys: dict[Hashable, None] = {}  # keys holding a failure, oldest first
        self.n_done = 0
        self.n_failed = 0
        self.unclaimed = 0
        self.wasted = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    # -- counting -------------------------------------------------------

    def _gone(self, record: object) -> None:
        """``record`` left the table (not by expiry's own loop): count it, release it."""
        cls = record.__class__
        if cls is Done:
            self.n_done -= 1
        elif cls is Unclaimed:
            self.n_done -= 1
            self.unclaimed += 1
            self.wasted += record.duration  # type: ignore[attr-defined]
        elif cls is Failed:
            self.n_failed -= 1
            self.failed_keys.pop(record.key, None)  # type: ignore[attr-defined]
        else:
            return
        _release(record)

    # -- mutation --------------------------------------------------------

    def put(self, key: Hashable, record: object) -> list[Result]:
        """Store ``record`` (a result or a flight) for ``key``; return what was evicted.

        The record it replaces is forgotten (and counted if unclaimed), unless
        it is a flight: a flight's replaced record is the flight's own business.
        """
        entries = self.entries
        old = entries.get(key)
        if old is not None:
            self._gone_replaced(old, record)
        entries[key] = record
        cls = record.__class__
        if cls is Done or cls is Unclaimed:
            self.n_done += 1
            if self.expires:
                self._remember_expiry(record)  # type: ignore[arg-type]
        elif cls is Failed:
            self.n_failed += 1
            self.failed_keys[key] = None
            if self.expires:
                self._remember_expiry(record)  # type: ignore[arg-type]
            if record.error is not None:  # type: ignore[attr-defined]
                self.held_failures.append(record)  # type: ignore[arg-type]
        if self.lru:
            entries.move_to_end(key)  # type: ignore[attr-defined]
            # Only a result can push a result out: a load that starts (and may
            # fail or be cancelled) never costs a value its place.
            if self.n_done + self.n_failed > self.max_entries and (  # type: ignore[operator]
                cls is Done or cls is Unclaimed or cls is Failed
            ):
                return self._evict()
        return []

    def _gone_replaced(self, old: object, new: object) -> None:
        cls = old.__class__
        if cls is Done or cls is Unclaimed or cls is Failed:
            if getattr(new, "prior", None) is old:
                # A flight replacing the record it may restore (cancel) or
                # serve (refresh): counts move, the record is kept intact.
                if cls is Failed:
                    self.n_failed -= 1
                    self.failed_keys.pop(old.key, None)  # type: ignore[union-attr]
                else:
                    self.n_done -= 1
                return
            self._gone(old)

    def pop(self, key: Hashable) -> object | None:
        """Forget ``key``; return its record, or None."""
        record: object | None = self.entries.pop(key, None)
        if record is not None:
            self._gone(record)
        return record

    def remove_if(self, key: Hashable, record: object) -> bool:
        """Forget ``key`` only if ``record`` is still its record."""
        if self.entries.get(key) is record:
            del self.entries[key]
            self._gone(record)
            return True
        return False

    def detach(self, key: Hashable, record: object) -> bool:
        """Take ``record`` (a flight) out of the table without counting it as a result."""
        if self.entries.get(key) is record:
            del self.entries[key]
            return True
        return False

    def clear(self) -> None:
        self.entries.clear()
        self.expiry.clear()
        self.held_failures.clear()
        self.failed_keys.clear()
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
            cls = record.__class__
            if cls is Done:
                n_done += 1
            elif cls is Unclaimed:
                n_done += 1
                self.unclaimed += 1
                self.wasted += record.duration
            else:
                self.failed_keys.pop(key, None)
            append(record)
        self.n_done -= n_done
        self.n_failed -= len(out) - n_done
        return out

    def release_failures(self, now: float) -> int:
        """Let go of the exception objects of failures past ``failure_ttl``; return how many."""
        held = self.held_failures
        failure_ttl = self.failure_ttl
        n = 0
        while held:
            record = held[0]
            if record.error is not None and now - record.done < failure_ttl:
                break
            held.popleft()
            record.error = record.tb = None
            n += 1
        return n

    def next_failure_release(self) -> float:
        """When the oldest failure still holding its exception must let go of it (or inf)."""
        held = self.held_failures
        while held and held[0].error is None:
            held.popleft()
        return held[0].done + self.failure_ttl if held else _INF

    # -- eviction -------------------------------------------------------

    def _evict(self) -> list[Result]:
        entries = self.entries
        excess = self.n_done + self.n_failed - self.max_entries  # type: ignore[operator]
        victims: list[Result] = []
        failed_keys = self.failed_keys
        while failed_keys and len(victims) < excess:
            key = next(iter(failed_keys))
            record = entries[key]
            victims.append(record)
            del entries[key]
            self._gone(record)
        if len(victims) < excess:
            values: list[Result] = []
            for record in entries.values():
                if len(victims) + len(values) >= excess:
                    break
                cls = record.__class__
                if cls is Done or cls is Unclaimed:
                    values.append(record)
            for record in values:
                del entries[record.key]
                self._gone(record)
            victims.extend(values)
        return victims
