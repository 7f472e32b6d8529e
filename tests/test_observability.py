"""Progress with ETA, watch(), counters and structured log events (docs/contract.md)."""

from __future__ import annotations

import gc
from typing import Any

import anyio
import pytest
import structlog
from anyio import wait_all_tasks_blocked
from structlog.testing import capture_logs

from prefetch_ingest import Prefetcher, Snapshot, Status, report_progress

from .helpers import FakeClock, GatedLoader

pytestmark = pytest.mark.anyio


class SteppedLoad:
    """A load that reports progress in steps the test releases one by one."""

    def __init__(self, clock: FakeClock | None = None, steps: int = 3) -> None:
        self.clock = clock
        self.steps = steps
        self.step = anyio.Event()
        self.at_step = anyio.Event()

    async def __call__(self, key: Any) -> str:
        for i in range(1, self.steps + 1):
            await self.step.wait()
            self.step = anyio.Event()
            if self.clock is not None:
                self.clock.advance(1.0)
            report_progress(i, self.steps, f"step {i}")
            self.at_step.set()
        return f"done {key}"

    async def advance(self) -> None:
        self.at_step = anyio.Event()
        self.step.set()
        await self.at_step.wait()


async def test_progress_reports_done_total_message_and_eta_from_the_rate() -> None:
    clock = FakeClock()
    load = SteppedLoad(clock, steps=4)
    async with Prefetcher(load, clock=clock) as pf:
        pf.prefetch("k")
        await wait_all_tasks_blocked()
        assert (await pf.status("k")).progress is None
        await load.advance()  # 1 of 4 after 1 s: 3 more at 1 s each
        progress = (await pf.status("k")).progress
        assert progress is not None
        assert (progress.done, progress.total, progress.message) == (1, 4, "step 1")
        assert progress.eta == pytest.approx(3.0)
        await load.advance()
        progress = (await pf.status("k")).progress
        assert progress is not None and progress.eta == pytest.approx(2.0)
        for _ in range(2):
            await load.advance()
        final = await pf.wait("k", timeout=5)
        assert final.status is Status.COMPLETED


async def test_eta_falls_back_on_the_mean_duration_of_past_loads() -> None:
    clock = FakeClock()

    async def timed(key: str, seconds: float) -> str:
        clock.advance(seconds)
        return key

    async def unknown_total(key: str) -> str:
        report_progress(5)  # no total: the rate says nothing about the end
        await gate.wait()
        return key

    gate = anyio.Event()
    async with Prefetcher(clock=clock) as pf:
        await pf.get("a", timed, "a", 10.0)
        await pf.get("b", timed, "b", 20.0)  # mean duration: 15 s
        pf.prefetch("c", unknown_total, "c")
        await wait_all_tasks_blocked()
        clock.advance(4)
        progress = (await pf.status("c")).progress
        assert progress is not None and progress.total is None
        assert progress.eta == pytest.approx(11.0)
        gate.set()


async def test_watch_sees_pending_running_progress_completed_in_order() -> None:
    blocker = GatedLoader()
    load = SteppedLoad(steps=2)
    seen: list[tuple[Status, Any]] = []
    async with Prefetcher(max_concurrency=1) as pf:
        pf.prefetch("first", blocker, "first")
        pf.prefetch("k", load, "k")
        async with anyio.create_task_group() as tg:

            async def watcher() -> None:
                async for snap in pf.watch("k"):
                    seen.append((snap.status, snap.progress and snap.progress.done))

            tg.start_soon(watcher)
            await wait_all_tasks_blocked()
            blocker.release()  # frees the slot: k goes PENDING -> RUNNING
            await wait_all_tasks_blocked()
            await load.advance()
            await wait_all_tasks_blocked()
            await load.advance()
    assert seen == [
        (Status.PENDING, None),
        (Status.RUNNING, None),
        (Status.RUNNING, 1),
        (Status.RUNNING, 2),
        (Status.COMPLETED, None),  # the key's snapshot: a completed value has no progress
    ]


async def test_watch_of_a_key_not_started_yields_not_started_then_waits() -> None:
    loader = GatedLoader(gated=False)
    seen: list[Snapshot] = []
    async with Prefetcher(loader) as pf, anyio.create_task_group() as tg:

        async def watcher() -> None:
            async for snap in pf.watch("k"):
                seen.append(snap)

        tg.start_soon(watcher)
        await wait_all_tasks_blocked()
        assert [s.status for s in seen] == [Status.NOT_STARTED]
        await pf.get("k")
    assert [s.status for s in seen] == [Status.NOT_STARTED, Status.RUNNING, Status.COMPLETED]
    assert seen[-1].result == ("value", "k", 1)


async def test_watch_of_a_completed_key_yields_once_and_ends() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        await pf.get("k")
        snaps = [s async for s in pf.watch("k")]
    assert [s.status for s in snaps] == [Status.COMPLETED]


async def test_a_watcher_that_stops_early_or_is_cancelled_leaves_nothing_behind() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        pf.prefetch("k")
        async for _snap in pf.watch("k"):
            break
        gc.collect()
        assert pf.stats().watchers == 0
        with anyio.move_on_after(0.01):
            async for _snap in pf.watch("k"):
                pass
        gc.collect()
        assert pf.stats().watchers == 0
        async with pf.watch("k") as w:
            await w.__anext__()
            assert pf.stats().watchers == 1
        assert pf.stats().watchers == 0
        loader.release()
    assert pf._debug_counts()["watchers"] == 0


async def test_many_watchers_of_one_key_each_get_every_change() -> None:
    loader = GatedLoader()
    results: list[list[Status]] = []
    async with Prefetcher(loader) as pf, anyio.create_task_group() as tg:

        async def watcher() -> None:
            results.append([s.status async for s in pf.watch("k")])

        for _ in range(20):
            tg.start_soon(watcher)
        await wait_all_tasks_blocked()
        pf.prefetch("k")
        await wait_all_tasks_blocked()
        loader.release()
    assert results == [[Status.NOT_STARTED, Status.RUNNING, Status.COMPLETED]] * 20


async def test_watchers_end_when_the_prefetcher_closes() -> None:
    ended = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with Prefetcher(GatedLoader()) as pf:

            async def watcher() -> None:
                async for _ in pf.watch("never"):
                    pass
                ended.set()

            tg.start_soon(watcher)
            await wait_all_tasks_blocked()
        with anyio.fail_after(5):
            await ended.wait()


async def test_stats_count_hits_joins_misses_and_saved_time() -> None:
    clock = FakeClock()

    async def slow(key: str) -> str:
        clock.advance(3.0)
        await gate.wait()
        return key

    gate = anyio.Event()
    async with Prefetcher(slow, clock=clock) as pf:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pf.get, "k")  # miss
            await wait_all_tasks_blocked()
            tg.start_soon(pf.get, "k")  # join 3 s into the load
            await wait_all_tasks_blocked()
            gate.set()
        await pf.get("k")  # hit: saves the whole 3 s
        await pf.get("k")
        stats = pf.stats()
    assert (stats.misses, stats.joins, stats.hits) == (1, 1, 2)
    assert stats.load_seconds == pytest.approx(3.0)
    assert stats.saved_seconds == pytest.approx(3.0 + 3.0 + 3.0)
    assert stats.hit_ratio == pytest.approx(3 / 4)
    assert stats.as_dict()["active_handles"] == 0


async def test_every_transition_is_a_structured_event() -> None:
    loader = GatedLoader(gated=False)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        with capture_logs() as logs:
            async with Prefetcher(loader, max_entries=1) as pf:
                await pf.get("a")
                await pf.get("a")
                loader.fail = ValueError("nope")
                with pytest.raises(ValueError):
                    await pf.get("b")
    finally:
        structlog.reset_defaults()
    events = [e["event"] for e in logs]
    assert events == [
        "prefetch.started",
        "prefetch.completed",
        "prefetch.hit",
        "prefetch.started",  # a load starting evicts nothing (v2) ...
        "prefetch.evicted",  # ... storing its failure does: failures go before values
        "prefetch.failed",
    ]
    assert logs[4]["key"] == "b"
    completed = logs[1]
    assert completed["key"] == "a" and completed["duration_s"] >= 0
    failed = logs[-1]
    assert failed["error"] == "ValueError: nope" and isinstance(failed["exc_info"], ValueError)


async def test_expired_and_joined_events() -> None:
    clock = FakeClock()
    loader = GatedLoader()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        with capture_logs() as logs:
            async with Prefetcher(loader, ttl=1, clock=clock) as pf:
                pf.prefetch("k")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pf.get, "k")
                    await wait_all_tasks_blocked()
                    loader.release()
                clock.advance(2)
                pf.sweep()
    finally:
        structlog.reset_defaults()
    events = [e["event"] for e in logs]
    assert "prefetch.joined" in events and events[-1] == "prefetch.expired"


async def test_the_hit_path_emits_nothing_at_the_default_level() -> None:
    loader = GatedLoader(gated=False)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(20))  # INFO
    try:
        async with Prefetcher(loader) as pf:
            await pf.get("k")
            with capture_logs() as logs:
                for _ in range(10):
                    await pf.get("k")
    finally:
        structlog.reset_defaults()
    assert logs == []


async def test_a_key_with_a_newline_is_logged_escaped() -> None:
    async def load(key: str) -> str:
        return key

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        with capture_logs() as logs:
            async with Prefetcher(load) as pf:
                await pf.get("x\n[CRITICAL] forged")
    finally:
        structlog.reset_defaults()
    assert logs[0]["key"] == repr("x\n[CRITICAL] forged")


async def test_a_failure_is_logged_when_only_warnings_are_enabled() -> None:
    async def boom(key: str) -> str:
        raise RuntimeError(key)

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # WARNING
    try:
        with capture_logs() as logs:
            async with Prefetcher(boom) as pf:
                with pytest.raises(RuntimeError):
                    await pf.get("k")
    finally:
        structlog.reset_defaults()
    assert [e["event"] for e in logs] == ["prefetch.failed"]
