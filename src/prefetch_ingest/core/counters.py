"""The event counters of one Prefetcher, and the :class:`Stats` they make."""

from __future__ import annotations

from prefetch_ingest._types import Stats

__all__ = ["Counters"]


class Counters:
    """Plain integer and float counters; the core and the shell add to them, nothing else."""

    __slots__ = (
        "cancelled",
        "deduplicated",
        "evictions",
        "expirations",
        "failures",
        "hits",
        "joins",
        "load_seconds",
        "misses",
        "prefetches",
        "saved_seconds",
        "success_seconds",
        "successes",
        "waiting",
    )

    def __init__(self) -> None:
        self.hits = 0
        self.joins = 0
        self.misses = 0
        self.prefetches = 0
        self.deduplicated = 0
        self.successes = 0
        self.failures = 0
        self.cancelled = 0
        self.evictions = 0
        self.expirations = 0
        self.load_seconds = 0.0
        self.success_seconds = 0.0
        self.saved_seconds = 0.0
        self.waiting = 0

    def mean_success(self) -> float | None:
        """Mean duration of the successful loads (the ETA's fallback), or None before one."""
        return self.success_seconds / self.successes if self.successes else None

    def stats(
        self,
        *,
        pending: int,
        running: int,
        completed: int,
        failed: int,
        unclaimed: int,
        wasted_seconds: float,
        watchers: int,
    ) -> Stats:
        return Stats(
            total=pending + running + completed + failed,
            pending=pending,
            running=running,
            completed=completed,
            failed=failed,
            hits=self.hits,
            joins=self.joins,
            misses=self.misses,
            prefetches=self.prefetches,
            deduplicated=self.deduplicated,
            load_successes=self.successes,
            load_failures=self.failures,
            evictions=self.evictions,
            expirations=self.expirations,
            load_seconds=self.load_seconds,
            saved_seconds=self.saved_seconds,
            cancelled=self.cancelled,
            unclaimed=unclaimed,
            wasted_seconds=wasted_seconds,
            waiters=self.waiting,
            watchers=watchers,
        )
