"""OpenTelemetry metrics for a Prefetcher (extra ``otel``: ``opentelemetry-api`` only).

::

    from prefetch_ingest.otel import instrument

    async with Prefetcher(load, name="ingest") as pf:
        instrument(pf)  # the global MeterProvider, or meter_provider=...

Every :class:`~prefetch_ingest.Stats` field becomes an observable instrument, read
when the SDK collects (never on the hit path): the running totals (hits, joins,
misses, load successes ...) are observable counters, the counts of now (pending,
running, waiters ...) observable gauges; and every load run here is recorded in
the histogram ``prefetch.load.duration`` (seconds), with ``outcome`` = ``success``
or ``failure``. Every point carries ``prefetch.name``: the Prefetcher's ``name``.
Several workers each report their own series; a dashboard sums them by name.

The application installs the SDK and an exporter (Prometheus, OTLP ...); this module
needs only the API.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Final

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "prefetch_ingest.otel needs opentelemetry-api: pip install 'prefetch-ingest[otel]'"
    ) from _exc

from ._types import Stats
from .engine import Prefetcher

__all__ = ["instrument"]

DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
"""Bucket bounds of ``prefetch.load.duration`` in seconds: from a cache fill to an
ingest of minutes."""

_TOTALS: Final = {
    "hits": ("{call}", "calls served a completed value at once"),
    "joins": ("{call}", "calls that awaited a load already in flight"),
    "misses": ("{call}", "calls that started a load"),
    "prefetches": ("{call}", "prefetch calls that started a background load"),
    "deduplicated": ("{call}", "prefetch calls that found the key in flight or fresh"),
    "load_successes": ("{load}", "loads run here that returned"),
    "load_failures": ("{load}", "loads run here that raised"),
    "evictions": ("{entry}", "entries evicted by max_entries"),
    "expirations": ("{entry}", "entries removed at ttl"),
    "cancelled": ("{load}", "loads ended by cancel or close"),
    "unclaimed": ("{load}", "background loads whose value nobody was served"),
    "load_seconds": ("s", "seconds spent in loads run here"),
    "saved_seconds": ("s", "seconds of loading that hits and joins did not wait for"),
    "wasted_seconds": ("s", "seconds of background loads nobody used"),
}
_NOW: Final = {
    "total": ("{entry}", "entries held now"),
    "pending": ("{load}", "loads pending now"),
    "running": ("{load}", "loads running now"),
    "completed": ("{entry}", "completed entries held now"),
    "failed": ("{entry}", "failed entries held now"),
    "waiters": ("{call}", "callers awaiting a load now"),
    "watchers": ("{watch}", "watch iterators open now"),
}


class _Instruments:
    """The instruments of one MeterProvider, shared by every Prefetcher reported there
    (an SDK keeps one instrument per name: a second registration would be dropped)."""

    def __init__(self, meter: Any) -> None:
        self.prefetchers: list[weakref.ref[Prefetcher[Any, Any]]] = []
        for field, (unit, text) in _TOTALS.items():
            meter.create_observable_counter(
                f"prefetch.{field}", callbacks=[self._reader(field)], unit=unit, description=text
            )
        for field, (unit, text) in _NOW.items():
            meter.create_observable_gauge(
                f"prefetch.{field}", callbacks=[self._reader(field)], unit=unit, description=text
            )
        self.durations = meter.create_histogram(
            "prefetch.load.duration",
            unit="s",
            description="duration of the loads run here",
            # the SDK's default buckets (0, 5, 10, 25 ... 10000) are made for
            # milliseconds: every load of under 5 s would fall in one bucket
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def _reader(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for ref in list(self.prefetchers):
                pf = ref()
                if pf is None:
                    self.prefetchers.remove(ref)
                    continue
                stats: Stats = pf.stats()  # from the exporter's thread: reads only
                out.append(Observation(getattr(stats, field), {"prefetch.name": pf.name}))
            return out

        return observe


_BY_PROVIDER: dict[int, tuple[Any, _Instruments]] = {}
_LOCK = threading.Lock()


def instrument(pf: Prefetcher[Any, Any], *, meter_provider: Any = None) -> None:
    """Report ``pf``'s counters and load durations as OpenTelemetry metrics.

    Args:
        pf: the Prefetcher (open or not yet entered).
        meter_provider: an ``opentelemetry.metrics.MeterProvider``; ``None`` is the
            global one (``metrics.get_meter_provider()``).

    Raises:
        TypeError: ``pf`` is not a Prefetcher.
    """
    if not isinstance(pf, Prefetcher):
        raise TypeError(f"pf must be a Prefetcher, got {type(pf).__name__}")
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    with _LOCK:
        known = _BY_PROVIDER.get(id(provider))
        if known is None or known[0] is not provider:
            known = (provider, _Instruments(provider.get_meter("prefetch_ingest")))
            _BY_PROVIDER[id(provider)] = known
        instruments = known[1]
        if any(ref() is pf for ref in instruments.prefetchers):
            return  # already reported there
        instruments.prefetchers.append(weakref.ref(pf))
    success = {"prefetch.name": pf.name, "outcome": "success"}
    failure = {"prefetch.name": pf.name, "outcome": "failure"}
    durations = instruments.durations

    def record(seconds: float, ok: bool) -> None:
        durations.record(seconds, success if ok else failure)

    pf._load_observers.append(record)
