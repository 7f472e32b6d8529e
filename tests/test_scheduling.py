"""Scheduling and freshness (docs/contract.md): the background limit with demand promotion,
stale-while-revalidate, the LRU bound."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from hypothesis import given, settings
from hypothesis import strategies as st

from prefetch_ingest import Prefetcher, Status

from .helpers import FakeClock, GatedLoader

pytestmark = pytest.mark.anyio


class PerKeyGates:
    """A loader whose every key waits on its own gate; tracks concurrency and start order."""

    def __init__(self) -> None:
        self.gates: dict[Any, anyio.Event] = {}
        self.order: list[Any] = []
        self.running = 0
        self.max_running = 0

    def gate(self, key: Any) -> anyio.Event:
        return self.gates.setdefault(key, anyio.Event())

    async def __call__(self, key: Any) -> Any:
        self.order.append(key)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.gate(key).wait()
        finally:
            self.running -= 1
        return key


async def test_max_concurrency_holds_background_loads_as_pending_fifo() -> None:
    loader = PerKeyGates()
    async with Prefetcher(loader, max_concurrency=2) as pf:
        for k in range(1, 6):
            assert pf.prefetch(k) is True
        await wait_all_tasks_blocked()
        assert sorted(loader.order) == [1, 2] and loader.running == 2
        statuses = [(await pf.status(k)).status for k in range(1, 6)]
        assert statuses == [Status.RUNNING] * 2 + [Status.PENDING] * 3
        pending = await pf.status(3)
        assert pending.started_at is None
        stats = pf.stats()
        assert (stats.running, stats.pending, stats.total) == (2, 3, 5)
        for k in range(1, 6):
            loader.gate(k).set()
            await pf.wait(k, timeout=5)
        assert loader.order[2:] == [3, 4, 5]
    assert loader.max_running == 2


async def test_a_get_of_a_pending_key_starts_it_at_once_outside_the_limit() -> None:
    loader = PerKeyGates()
    async with Prefetcher(loader, max_concurrency=2) as pf:
        for k in range(1, 6):
            pf.prefetch(k)
        await wait_all_tasks_blocked()
        got: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def demand() -> None:
                got.append(await pf.get(5))

            tg.start_soon(demand)
            await wait_all_tasks_blocked()
            # 5 started before 3 and 4, while 1 and 2 still hold both slots
            assert sorted(loader.order[:2]) == [1, 2] and loader.order[2:] == [5]
            assert loader.running == 3
            assert (await pf.status(5)).status is Status.RUNNING
            assert (await pf.status(3)).status is Status.PENDING
            loader.gate(5).set()
        assert got == [5]
        # the promoted load did not take a slot: finishing 1 starts exactly 3
        loader.gate(1).set()
        await pf.wait(1, timeout=5)
        await wait_all_tasks_blocked()
        assert loader.order[2:] == [5, 3]
        for k in (2, 3, 4):
            loader.gate(k).set()
        for k in (2, 3, 4):
            await pf.wait(k, timeout=5)
    assert loader.max_running == 3


async def test_demanded_loads_are_never_held_back() -> None:
    loader = PerKeyGates()
    async with Prefetcher(loader, max_concurrency=1) as pf:
        pf.prefetch("bg")
        await wait_all_tasks_blocked()
        async with anyio.create_task_group() as tg:
            for k in ("a", "b", "c"):
                tg.start_soon(pf.get, k)
            await wait_all_tasks_blocked()
            assert loader.running == 4
            for k in ("a", "b", "c", "bg"):
                loader.gate(k).set()


async def test_refresh_after_serves_the_old_value_and_reloads_once_in_the_background() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=100, refresh_after=10, clock=clock) as pf:
        assert await pf.get("k") == ("value", "k", 1)
        clock.advance(11)
        loader.gate = anyio.Event()
        loader.started = anyio.Event()
        # stale: served at once, one background reload started
        assert await pf.get("k") == ("value", "k", 1)
        assert await pf.get("k") == ("value", "k", 1)
        await loader.started.wait()
        snap = await pf.status("k")
        assert snap.status is Status.RUNNING and snap.background
        assert loader.calls == {"k": 2}
        loader.release()
        await pf.wait("k", timeout=5)
        assert await pf.get("k") == ("value", "k", 2)
    assert loader.calls == {"k": 2}
    assert pf.stats().prefetches == 1


async def test_a_failed_refresh_keeps_the_old_value() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=100, refresh_after=10, clock=clock) as pf:
        await pf.get("k")
        clock.advance(11)
        loader.fail = RuntimeError("refresh failed")
        assert await pf.get("k") == ("value", "k", 1)
        snap = await pf.wait("k", timeout=5)
        assert snap.status is Status.COMPLETED  # the key's state: the old value stays
        assert snap.result == ("value", "k", 1)
        after = await pf.status("k")
        assert after.status is Status.COMPLETED
        assert await pf.get("k") == ("value", "k", 1)
        assert pf.stats().load_failures == 1


async def test_prefetch_of_a_stale_key_starts_a_refresh() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=100, refresh_after=10, clock=clock) as pf:
        await pf.get("k")
        assert pf.prefetch("k") is False  # fresh
        clock.advance(11)
        assert pf.prefetch("k") is True  # stale: refreshed in the background
        await pf.wait("k", timeout=5)
        assert await pf.get("k") == ("value", "k", 2)


async def test_max_entries_evicts_the_least_recently_used_first() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, max_entries=3) as pf:
        for k in ("a", "b", "c"):
            await pf.get(k)
        await pf.get("a")  # a is now the most recent
        await pf.get("d")  # evicts b
        assert (await pf.status("b")).status is Status.NOT_STARTED
        for k in ("a", "c", "d"):
            assert (await pf.status(k)).status is Status.COMPLETED
        assert pf.stats().evictions == 1 and pf.stats().total == 3


async def test_in_flight_loads_are_never_evicted() -> None:
    loader = PerKeyGates()
    async with Prefetcher(loader, max_entries=2) as pf:
        for k in ("x", "y", "z"):
            pf.prefetch(k)
        await wait_all_tasks_blocked()
        assert pf.stats().running == 3 and pf.stats().evictions == 0
        for k in ("x", "y", "z"):
            loader.gate(k).set()
            await pf.wait(k, timeout=5)
        assert pf.stats().total == 2 and pf.stats().evictions == 1


@settings(max_examples=25, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["prefetch", "get", "finish"]), st.integers(0, 7)),
        max_size=40,
    ),
    limit=st.integers(1, 4),
)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_eviction_never_drops_an_in_flight_key(
    backend: str, ops: list[tuple[str, int]], limit: int
) -> None:
    async def scenario() -> None:
        loader = PerKeyGates()
        async with Prefetcher(loader, max_entries=limit) as pf:
            in_flight: set[int] = set()
            async with anyio.create_task_group() as tg:
                for op, k in ops:
                    if op == "prefetch":
                        if pf.prefetch(k):
                            in_flight.add(k)
                    elif op == "get":
                        if (await pf.status(k)).status is not Status.COMPLETED:
                            in_flight.add(k)
                            tg.start_soon(pf.get, k)
                    elif k in in_flight:
                        loader.gate(k).set()
                        await pf.wait(k, timeout=5)
                        in_flight.discard(k)
                        loader.gates.pop(k)
                    await wait_all_tasks_blocked()
                    for key in in_flight:
                        assert (await pf.status(key)).status is Status.RUNNING
                    stats = pf.stats()
                    # max_entries bounds the results held; loads in flight are not counted
                    assert stats.completed + stats.failed <= limit
                    assert stats.running + stats.pending == len(in_flight)
                for key in in_flight:
                    loader.gate(key).set()

    anyio.run(scenario, backend=backend)
