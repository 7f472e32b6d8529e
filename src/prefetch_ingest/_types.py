"""Value types of the public API: Status, Snapshot, Progress, Stats.

All are immutable: they describe the state of a key, or of the whole
Prefetcher, at the moment they were taken.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, Generic, TypeVar

import attrs

V = TypeVar("V")

__all__ = ["Progress", "Served", "Snapshot", "Source", "Stats", "Status"]


class Status(enum.StrEnum):
    """Where a key is in its life cycle.

    The string values are the ones used in JSON (``"not_started"`` ...).
    """

    NOT_STARTED = "not_started"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def in_flight(self) -> bool:
        """True for ``PENDING`` and ``RUNNING``: a load exists and has not ended."""
        return self is Status.PENDING or self is Status.RUNNING

    @property
    def terminal(self) -> bool:
        """True for ``COMPLETED`` and ``FAILED``: the load has ended."""
        return self is Status.COMPLETED or self is Status.FAILED


class Source(enum.StrEnum):
    """How a call of :meth:`~prefetch_ingest.Prefetcher.serve` was served.

    The string values are ``"hit"``, ``"joined"`` and ``"ran"``.
    """

    HIT = "hit"
    """A completed value, served without waiting: a fresh one, a stale one
    served while a ``refresh_after`` reload runs, or one found in a shared store."""
    JOINED = "joined"
    """The call awaited a load already in flight (here or in another instance)."""
    RAN = "ran"
    """The call started the load it awaited."""


@attrs.frozen
class Served(Generic[V]):
    """What :meth:`~prefetch_ingest.Prefetcher.serve` returns: the value and how it was served.

    Attributes:
        value: exactly what ``get`` would have returned.
        source: see :class:`Source`.
    """

    value: V
    source: Source


@attrs.frozen
class Progress:
    """Progress of a running load, as reported with :func:`report_progress`.

    Attributes:
        done: units of work done so far.
        total: units of work in all, when known.
        message: free text from the load, if any.
        eta: estimated seconds until the load completes, or ``None`` when
            nothing allows an estimate yet. Estimated from the observed rate
            (``done`` over the time since the load started) when ``total`` is
            known, otherwise from the mean duration of past loads.
    """

    done: float
    total: float | None = None
    message: str | None = None
    eta: float | None = None


@attrs.frozen
class Snapshot:
    """The state of one key at one moment.

    Attributes:
        key: the key.
        status: see :class:`Status`.
        started_at: when the load started running (aware UTC), or ``None``.
        completed_at: when it completed or failed (aware UTC), or ``None``.
        result: the value, when ``COMPLETED``.
        error: ``"TypeName: message"`` when ``FAILED``.
        exception: the exception object itself, when it was raised in this
            process (``None`` for a failure read back from a remote store).
        progress: the last progress reported by a running load.
        background: True when the load was started by ``prefetch`` (or by a
            background refresh) rather than by a caller of ``get``.
        expires_at: when the entry will be forgotten (aware UTC), or ``None``.
    """

    key: Any
    status: Status
    started_at: datetime | None = None
    completed_at: datetime | None = None
    result: Any = None
    error: str | None = None
    exception: BaseException | None = attrs.field(default=None, eq=False, repr=False)
    progress: Progress | None = None
    background: bool = False
    expires_at: datetime | None = None


@attrs.frozen
class Stats:
    """Counters of one Prefetcher, taken at one moment.

    The first five are the number of entries by status *now*; the others
    count events since the Prefetcher was created.

    Attributes:
        total: entries held (pending + running + completed + failed).
        pending: background loads queued behind ``max_concurrency``.
        running: loads running.
        completed: completed values held.
        failed: failures held.
        hits: ``get`` calls served a completed value.
        joins: ``get`` calls that awaited a load already in flight.
        misses: ``get`` calls that had to start a load.
        prefetches: background loads started by ``prefetch`` or a refresh.
        deduplicated: ``prefetch``/``get`` calls that started nothing
            because a load for the key already existed.
        load_successes: loads that returned a value.
        load_failures: loads that raised.
        evictions: entries dropped to respect ``max_entries``.
        expirations: entries dropped because their time was up.
        load_seconds: total time spent in loads.
        saved_seconds: load time callers did not have to wait, thanks to a
            hit (the whole load's duration) or a join (the part of the load
            that had already run when they joined).
        cancelled: loads ended by :meth:`~prefetch_ingest.Prefetcher.cancel`
            or by leaving the ``async with`` block before they finished.
        unclaimed: background loads that completed but whose value no caller
            was ever served (by a hit, a join or ``serve``) before it expired,
            was evicted, invalidated or replaced: speculative work nobody used.
        wasted_seconds: the load time of those ``unclaimed`` loads.
        waiters: callers awaiting a load right now.
        watchers: ``watch`` iterators registered right now.
    """

    total: int = 0
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    hits: int = 0
    joins: int = 0
    misses: int = 0
    prefetches: int = 0
    deduplicated: int = 0
    load_successes: int = 0
    load_failures: int = 0
    evictions: int = 0
    expirations: int = 0
    load_seconds: float = 0.0
    saved_seconds: float = 0.0
    cancelled: int = 0
    unclaimed: int = 0
    wasted_seconds: float = 0.0
    waiters: int = 0
    watchers: int = 0

    @property
    def hit_ratio(self) -> float:
        """Share of ``get`` calls answered without starting a load: (hits + joins) / all gets.

        0.0 before the first ``get``.
        """
        calls = self.hits + self.joins + self.misses
        return (self.hits + self.joins) / calls if calls else 0.0

    @property
    def active_handles(self) -> int:
        """Loads in flight (pending + running), the origin service's name for them."""
        return self.pending + self.running

    def as_dict(self) -> dict[str, float | int]:
        """All counters, ``hit_ratio`` and ``active_handles`` included, for logging or JSON."""
        data: dict[str, float | int] = attrs.asdict(self)
        data["hit_ratio"] = self.hit_ratio
        data["active_handles"] = self.active_handles
        return data
