"""Churn and mass cancellation: memory stays bounded and returns to its baseline
(tracemalloc), and nothing is left behind (issue 6)."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import tracemalloc
from typing import Any

import anyio
import pytest
import structlog
from anyio import wait_all_tasks_blocked

from prefetch_ingest import Prefetcher, Status

pytestmark = pytest.mark.anyio

_OUR_CODE = tracemalloc.Filter(True, "*/prefetch_ingest/*", all_frames=True)


def _ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated from a call stack that passes through the library."""
    return sum(stat.size for stat in snapshot.filter_traces([_OUR_CODE]).statistics("filename"))


async def test_churn_of_many_keys_half_failing_stays_bounded() -> None:
    async def load(key: int) -> bytes:
        if key % 2:
            raise ValueError(f"odd key {key}")
        return b"x" * 200

    # 50,000 failures would print 50,000 warnings through structlog's default
    # configuration; the conftest fixture restores the defaults afterwards.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    async with Prefetcher(load, max_entries=1000) as pf:

        async def churn(start: int, stop: int) -> None:
            for key in range(start, stop):
                with contextlib.suppress(ValueError):
                    await pf.get(key)

        # Live memory blocks (sys.getallocatedblocks) after each round of 10,000
        # keys: as exact as tracemalloc for a leak of objects, and cheap enough
        # for 100,000 loads.
        sizes = []
        for round_ in range(10):
            await churn(round_ * 10_000, (round_ + 1) * 10_000)
            gc.collect()
            sizes.append(sys.getallocatedblocks())
        stats = pf.stats()
        assert stats.total == 1000
        assert stats.load_failures == 50_000
        assert stats.evictions == 99_000
        # Once the table is full, memory stays within the same band whatever the
        # number of keys that went through (the expiry FIFO's compaction cycle
        # makes it oscillate a little; it never grows with the keys): a leak of
        # one object per key would add 80,000 blocks.
        assert max(sizes[2:]) - sizes[1] < 20_000, sizes
        assert pf._debug_counts()["entries"] == 1000
        assert len(pf._table.expiry) <= 2 * 1000 + 1024


async def test_ten_thousand_cancelled_waiters_leave_nothing_behind() -> None:
    gate = anyio.Event()

    async def long_load(key: str) -> str:
        await gate.wait()
        return key

    async def cancel_ten_thousand_waiters(pf: Prefetcher[str, str]) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(10_000):
                tg.start_soon(pf.get, "k")
            await wait_all_tasks_blocked()
            assert pf.stats().waiters == 10_000
            tg.cancel_scope.cancel()

    async with Prefetcher(long_load) as pf:
        pf.prefetch("k")
        await wait_all_tasks_blocked()
        tracemalloc.start(12)
        try:
            # The first round grows free lists (the event's deque, the allocator)
            # that later rounds reuse; it is measured as the baseline.
            await cancel_ten_thousand_waiters(pf)
            gc.collect()
            before = _ours(tracemalloc.take_snapshot())
            await cancel_ten_thousand_waiters(pf)
            gc.collect()
            after = _ours(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
        assert pf.stats().waiters == 0
        assert (await pf.status("k")).status is Status.RUNNING  # the load goes on
        # What our code allocated for 10,000 more waiters is gone again: the bound
        # is under 2 bytes a waiter, where one object kept per waiter would take
        # at least 160 KiB.
        assert after - before < 16 * 1024, (before, after)
        gate.set()
        snap = await pf.wait("k", timeout=5)
        assert snap.status is Status.COMPLETED


async def test_ten_thousand_concurrent_callers_of_a_cold_key_run_it_once() -> None:
    calls = 0
    gate = anyio.Event()

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return key

    results: list[Any] = []
    async with Prefetcher(load) as pf, anyio.create_task_group() as tg:

        async def caller() -> None:
            results.append(await pf.get("cold"))

        for _ in range(10_000):
            tg.start_soon(caller)
        await wait_all_tasks_blocked()
        gate.set()
    assert calls == 1
    assert results == ["cold"] * 10_000
