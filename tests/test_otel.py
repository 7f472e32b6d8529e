"""prefetch_ingest.otel with the real OpenTelemetry SDK's in-memory reader (issue 16):
every Stats field as an instrument, load durations apart for successes and failures,
all labelled with the Prefetcher's name; from the SDK's collection, never the hit path."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from prefetch_ingest import Prefetcher, Stats
from prefetch_ingest.otel import instrument

pytestmark = pytest.mark.anyio


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


async def test_every_stats_field_is_reported_with_the_prefetchers_name() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def load(key: Hashable) -> str:
        if key == "bad":
            raise ValueError("bad")
        return "v"

    async with Prefetcher(load, name="ingest-a") as pf:
        instrument(pf, meter_provider=provider)
        await pf.get("k")
        await pf.get("k")
        with pytest.raises(ValueError):
            await pf.get("bad")
        points = _points(reader)
        stats = pf.stats()
    for field in Stats.__attrs_attrs__:
        name = f"prefetch.{field.name}"
        assert name in points, name
        (point,) = points[name]
        assert point.attributes == {"prefetch.name": "ingest-a"}
        assert point.value == getattr(stats, field.name), name
    assert stats.hits == 1 and stats.load_successes == 1 and stats.load_failures == 1
    durations = {point.attributes["outcome"]: point for point in points["prefetch.load.duration"]}
    assert set(durations) == {"success", "failure"}
    assert durations["success"].count == 1 and durations["failure"].count == 1
    assert all(p.attributes["prefetch.name"] == "ingest-a" for p in durations.values())
    provider.shutdown()


async def test_two_prefetchers_report_apart_by_name() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def load(key: Hashable) -> str:
        return "v"

    async with Prefetcher(load, name="one") as a, Prefetcher(load, name="two") as b:
        instrument(a, meter_provider=provider)
        instrument(b, meter_provider=provider)
        await a.get("x")
        await b.get("x")
        await b.get("x")
        points = _points(reader)
    hits = {p.attributes["prefetch.name"]: p.value for p in points["prefetch.hits"]}
    assert hits == {"one": 0, "two": 1}
    provider.shutdown()


def test_instrument_refuses_what_is_not_a_prefetcher() -> None:
    with pytest.raises(TypeError, match="pf"):
        instrument(object())  # type: ignore[arg-type]


async def test_a_prometheus_scrape_reads_the_counters_and_the_histogram() -> None:
    """Through the Prometheus exporter: its reader, a registry, the text exposition a
    Prometheus server scrapes (what a /metrics endpoint serves: the example's test
    scrapes it over HTTP), parsed by prometheus_client's parser."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader])

    async def load(key: Hashable) -> str:
        return "v"

    async with Prefetcher(load, name="ingest") as pf:
        instrument(pf, meter_provider=provider)
        await pf.get("k")
        await pf.get("k")
        await pf.get("j")
        scraped = generate_latest(registry).decode()
    provider.shutdown()
    samples = {
        (
            s.name,
            tuple(sorted((k, v) for k, v in s.labels.items() if not k.startswith("otel_"))),
        ): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }
    name = (("prefetch_name", "ingest"),)
    assert samples[("prefetch_hits_total", name)] == 1
    assert samples[("prefetch_misses_total", name)] == 2
    assert samples[("prefetch_load_successes_total", name)] == 2
    success = (("outcome", "success"), ("prefetch_name", "ingest"))
    assert samples[("prefetch_load_duration_seconds_count", success)] == 2
    # buckets in seconds: both loads (instant) are in the first, sub-second bucket
    first = (("le", "0.005"), *success)
    assert samples[("prefetch_load_duration_seconds_bucket", first)] == 2
