"""Admission: how many *background* loads may run now.

The Prefetcher asks its admission before it starts a background load
(``prefetch``, a ``refresh_after`` reload, a delayed prefetch whose delay has
passed); a load that is not admitted waits as ``PENDING``, first in first
out. Loads demanded by ``get``/``serve`` are never asked about: someone is
waiting for them.

- :class:`FixedAdmission` is ``max_concurrency``: a fixed limit (or none).
- :class:`LagAdmission` measures the event loop's lag and adapts the limit.
- Any object with the :class:`Admission` methods may be passed as
  ``Prefetcher(admission=...)``, e.g. one that reads a quota shared by every
  instance. The limit is per Prefetcher (per process): with a shared store,
  each instance admits its own background loads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import anyio

from ._validate import check_duration, check_limit

__all__ = ["Admission", "FixedAdmission", "LagAdmission"]


@runtime_checkable
class Admission(Protocol):
    """What a Prefetcher asks before it starts a background load, and tells as loads come and go.

    All methods but :meth:`run` are called on the event loop's thread and
    must return at once.
    """

    def limit(self) -> int | None:
        """How many background loads may run at once now (``None``: no limit, 0: pause)."""
        ...

    def load_started(self, background: bool) -> None:
        """A load started running (``background``: not demanded by a caller)."""
        ...

    def load_ended(self, background: bool) -> None:
        """A load that had started has ended (whatever the outcome)."""
        ...

    async def run(self, changed: Callable[[], None]) -> None:
        """Runs while the Prefetcher is open (cancelled on close).

        Call ``changed()`` whenever the limit may have risen, so that waiting
        loads are started; call it on the event loop's thread (from a worker
        thread it raises :class:`~prefetch_ingest.WrongThreadError`: use
        ``anyio.from_thread.run_sync(changed)``). An admission with nothing to
        do returns at once. If ``run`` or a hook raises, the error is logged
        (``prefetch.admission_failed``) and the Prefetcher goes on.
        """
        ...


class FixedAdmission:
    """A fixed limit: what ``max_concurrency`` means (``None``: no limit)."""

    def __init__(self, max_concurrency: int | None = None) -> None:
        self.max_concurrency = check_limit("max_concurrency", max_concurrency)

    def limit(self) -> int | None:
        return self.max_concurrency

    def load_started(self, background: bool) -> None:
        pass

    def load_ended(self, background: bool) -> None:
        pass

    async def run(self, changed: Callable[[], None]) -> None:
        return None

    def __repr__(self) -> str:
        return f"FixedAdmission(max_concurrency={self.max_concurrency!r})"


class LagAdmission:
    """A background limit that follows the event loop's lag (AIMD).

    Every ``interval`` seconds a probe sleeps for ``interval`` and measures how
    late it wakes: that lateness is the loop's lag, the time any foreground
    request would also have waited. The limit then follows an additive
    increase, multiplicative decrease law:

    - lag above ``target_lag``: ``limit = floor(limit * decrease)`` (down to
      ``min_concurrency``, default 0, which pauses background starts; running
      loads are never stopped);
    - lag at most ``target_lag`` *and the limit in use* (as many background
      loads running as it allows): ``limit = limit + increase`` (up to
      ``max_concurrency``), and waiting loads are started;
    - lag at most ``target_lag`` with the limit not in use: unchanged. A quiet
      loop is no evidence that more concurrency is safe (TCP's congestion
      window is validated the same way), so a burst of background starts
      after an idle spell meets the limit the last busy spell found, not
      ``max_concurrency``.

    It starts at ``initial`` (default: ``max_concurrency``; ``initial=1`` is
    a slow start). It cannot see
    work in other processes or threads, nor CPU taken between probes by
    anything but this loop; an ``Admission`` that reads the process's CPU or
    a shared quota can.

    :meth:`observe` is the law itself, with no clock: tests and custom probes
    drive it directly.
    """

    def __init__(
        self,
        max_concurrency: int = 8,
        *,
        target_lag: float = 0.05,
        interval: float = 0.1,
        increase: int = 1,
        decrease: float = 0.5,
        initial: int | None = None,
        min_concurrency: int = 0,
    ) -> None:
        limit = check_limit("max_concurrency", max_concurrency)
        if limit is None:
            raise TypeError("max_concurrency must be an int, got None")
        self.max_concurrency = limit
        self.target_lag = check_duration(
            "target_lag", target_lag, allow_none=False, allow_zero=False
        )
        self.interval = check_duration("interval", interval, allow_none=False, allow_zero=False)
        if isinstance(increase, bool) or not isinstance(increase, int) or increase < 1:
            raise ValueError(f"increase must be an int of at least 1, got {increase!r}")
        if (
            isinstance(decrease, bool)
            or not isinstance(decrease, int | float)
            or not 0 <= decrease < 1
        ):
            raise ValueError(f"decrease must be a number in [0, 1), got {decrease!r}")
        if (
            isinstance(min_concurrency, bool)
            or not isinstance(min_concurrency, int)
            or not 0 <= min_concurrency <= limit
        ):
            raise ValueError(
                f"min_concurrency must be an int from 0 to max_concurrency, got {min_concurrency!r}"
            )
        self.increase = increase
        self.decrease = float(decrease)
        self.min_concurrency = min_concurrency
        start = limit if initial is None else initial
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= limit:
            raise ValueError(f"initial must be an int from 0 to max_concurrency, got {initial!r}")
        self._limit = max(start, min_concurrency)
        self.last_lag: float | None = None
        self.running_background = 0

    def limit(self) -> int | None:
        return self._limit

    def load_started(self, background: bool) -> None:
        if background:
            self.running_background += 1

    def load_ended(self, background: bool) -> None:
        if background:
            self.running_background -= 1

    def observe(self, lag: float, *, in_use: bool = True) -> bool:
        """Apply one measurement of the loop's lag (seconds); True if the limit rose.

        ``in_use``: whether the limit was in use (as many background loads
        running as it allows); the limit grows only then.
        """
        if math.isnan(lag) or lag < 0:
            lag = 0.0
        self.last_lag = lag
        before = self._limit
        if lag > self.target_lag:
            self._limit = max(math.floor(before * self.decrease), self.min_concurrency)
        elif in_use:
            self._limit = min(before + self.increase, self.max_concurrency)
        return self._limit > before

    async def probe(self) -> float:
        """Sleep ``interval`` and return how late the loop woke this task (its lag)."""
        clock = time.perf_counter
        start = clock()
        await anyio.sleep(self.interval)
        return max(clock() - start - self.interval, 0.0)

    async def run(self, changed: Callable[[], None]) -> None:
        while True:
            lag = await self.probe()
            if self.observe(lag, in_use=self.running_background >= self._limit):
                changed()

    def __repr__(self) -> str:
        return (
            f"LagAdmission(max_concurrency={self.max_concurrency}, "
            f"target_lag={self.target_lag}, limit={self._limit})"
        )
