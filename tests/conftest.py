"""Shared fixtures: every async test runs on asyncio and on trio, and every test
is followed by a leak check of every Prefetcher it closed."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from prefetch_ingest import Prefetcher


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that configures structlog does not leak its configuration into the next."""
    yield
    structlog.reset_defaults()


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After each test: every Prefetcher the test closed holds no flight, queued load,
    waiter, watcher or background slot, and its watchers' iterators are gone."""
    created: list[Prefetcher[Any, Any]] = []
    original = Prefetcher.__init__

    def recording_init(self: Prefetcher[Any, Any], *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(Prefetcher, "__init__", recording_init)
    yield
    gc.collect()
    for pf in created:
        if pf._state != "closed":
            continue  # never entered, or closed by another fixture's teardown later
        counts = pf._debug_counts()
        left = {
            name: counts[name]
            for name in ("live_flights", "queued", "waiters", "watchers", "bg_running")
            if counts[name]
        }
        assert not left, f"a closed Prefetcher still holds {left}"
