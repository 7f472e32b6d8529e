"""Snapshots: what a key's record (or a shared store's entry) looks like from outside.

Pure: built from a record, the clock reading and the clock's offset to wall
time; nothing is stored that can be derived.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any

from prefetch_ingest._store import StoredEntry
from prefetch_ingest._types import Progress, Snapshot, Status
from prefetch_ingest._validate import error_text

from .counters import Counters
from .records import Done, Failed, Flight, Unclaimed

__all__ = ["Snapshots"]

_INF = float("inf")
_COMPLETED = Status.COMPLETED
_FAILED = Status.FAILED


def _datetime(t: float) -> datetime | None:
    """Epoch seconds as an aware datetime; None for a time no datetime can hold (an
    expiry of a ttl of 1e15 s, say: in effect never)."""
    try:
        return datetime.fromtimestamp(t, UTC)
    except (OverflowError, OSError, ValueError):
        return None


class Snapshots:
    """Makes the :class:`Snapshot` of a key from its record."""

    __slots__ = ("clock", "counters", "ttl", "wall_offset")

    def __init__(
        self, *, clock: Callable[[], float], wall_offset: float, ttl: float, counters: Counters
    ) -> None:
        self.clock = clock
        self.wall_offset = wall_offset
        self.ttl = ttl
        self.counters = counters

    def wall(self, mono: float | None) -> datetime | None:
        if mono is None or mono == _INF:
            return None
        return _datetime(mono + self.wall_offset)

    def expires(self, done: float) -> datetime | None:
        return None if self.ttl == _INF else self.wall(done + self.ttl)

    def progress(self, flight: Flight, now: float) -> Progress | None:
        """A flight's progress; the ETA from the rate so far, else from past successes."""
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
                mean = self.counters.mean_success()
                if mean is not None:
                    eta = max(mean - elapsed, 0.0)
        return Progress(done=done, total=total, message=flight.p_message, eta=eta)

    def of_flight(self, flight: Flight) -> Snapshot:
        remote = flight.remote
        if remote is not None and flight.done is None:
            # following a run in another instance: that run, as its owner recorded it
            return self.of_stored(flight.key, remote)
        return Snapshot(
            key=flight.key,
            status=flight.status,
            started_at=self.wall(flight.started),
            progress=self.progress(flight, self.clock()),
            background=flight.background,
        )

    def of_ended(self, flight: Flight) -> Snapshot:
        """The snapshot of a flight that just ended the key's run, whose result lives in a
        shared store: the run's own start and origin when it followed another instance."""
        remote = flight.remote
        started = self.wall(flight.started)
        background = flight.background
        if remote is not None and remote.started_at is not None:
            started = _datetime(remote.started_at)
            background = remote.background
        failed = flight.status is _FAILED
        error = flight.error
        return Snapshot(
            key=flight.key,
            status=flight.status,
            started_at=started,
            completed_at=self.wall(flight.done),
            result=None if failed else flight.value,
            error=error_text(error) if failed and error is not None else None,
            exception=error if failed else None,
            background=background,
            expires_at=None if flight.done is None else self.expires(flight.done),
        )

    def of_key(self, key: Hashable, entry: Any) -> Snapshot:
        """The snapshot of ``key`` whose record is ``entry`` (None: nothing known)."""
        cls = entry.__class__
        if cls is Flight:
            return self.of_flight(entry)
        if cls is Done or cls is Unclaimed:
            return Snapshot(
                key=key,
                status=_COMPLETED,
                started_at=self.wall(entry.done - entry.duration),
                completed_at=self.wall(entry.done),
                result=entry.value,
                background=entry.background,
                expires_at=self.expires(entry.done),
            )
        if cls is Failed:
            return Snapshot(
                key=key,
                status=_FAILED,
                started_at=self.wall(entry.done - entry.duration),
                completed_at=self.wall(entry.done),
                error=entry.text,
                exception=entry.error,
                background=entry.background,
                expires_at=self.expires(entry.done),
            )
        return Snapshot(key=key, status=Status.NOT_STARTED)

    @staticmethod
    def of_stored(key: Hashable, stored: StoredEntry) -> Snapshot:
        """The snapshot of what a shared store holds for ``key`` (wall-clock times)."""

        def wall(t: float | None) -> datetime | None:
            return None if t is None else _datetime(t)

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
