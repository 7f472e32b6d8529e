"""Core semantics of the Prefetcher (docs/contract.md): single flight, failures, refresh, timeout,
cancellation, shutdown, invalidation, re-entrancy, expiry."""

from __future__ import annotations

import gc
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from prefetch_ingest import (
    Prefetcher,
    PrefetcherClosed,
    PrefetchError,
    ReentrantLoadError,
    Status,
)
from prefetch_ingest._memory import Done

from .helpers import FakeClock, GatedLoader

pytestmark = pytest.mark.anyio


async def test_concurrent_gets_of_a_cold_key_run_one_execution() -> None:
    loader = GatedLoader()
    results: list[Any] = []
    async with Prefetcher(loader) as pf:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def caller() -> None:
                    results.append(await pf.get("k"))

                for _ in range(50):
                    tg.start_soon(caller)
                await wait_all_tasks_blocked()
                assert pf.stats().waiters == 50
                loader.release()
    assert loader.calls == {"k": 1}
    assert results == [("value", "k", 1)] * 50
    stats = pf.stats()
    assert (stats.misses, stats.joins, stats.load_successes) == (1, 49, 1)


async def test_prefetch_then_get_runs_one_execution() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        assert pf.prefetch("k") is True
        assert pf.prefetch("k") is False  # in flight: deduplicated
        await loader.started.wait()
        loader.release()
        with anyio.fail_after(5):
            assert await pf.get("k") == ("value", "k", 1)
            assert await pf.get("k") == ("value", "k", 1)
        snap = await pf.status("k")
    assert loader.calls == {"k": 1}
    assert snap.status is Status.COMPLETED and snap.background is True
    assert pf.stats().prefetches == 1 and pf.stats().deduplicated >= 1


async def test_a_completed_fresh_value_is_served_without_suspending() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        await pf.get("k")
        coro = pf.get("k")
        with pytest.raises(StopIteration) as stop:
            coro.send(None)  # one step: no await on the event loop was needed
        assert stop.value.value == ("value", "k", 1)
        assert pf.stats().hits == 1


async def test_the_loads_exception_reaches_every_waiter() -> None:
    loader = GatedLoader()
    loader.fail = ValueError("boom")
    errors: list[BaseException] = []
    async with Prefetcher(loader) as pf:
        async with anyio.create_task_group() as tg:

            async def caller() -> None:
                try:
                    await pf.get("k")
                except ValueError as exc:
                    errors.append(exc)

            for _ in range(10):
                tg.start_soon(caller)
            await wait_all_tasks_blocked()
            loader.release()
        snap = await pf.status("k")
    assert len(errors) == 10 and all(e is errors[0] for e in errors)
    assert loader.calls == {"k": 1}
    assert snap.status is Status.FAILED and snap.error == "ValueError: boom"
    assert pf.stats().load_failures == 1


async def test_failure_ttl_zero_retries_on_the_next_get() -> None:
    loader = GatedLoader(gated=False)
    loader.fail = ValueError("first")
    async with Prefetcher(loader) as pf:
        with pytest.raises(ValueError, match="first"):
            await pf.get("k")
        loader.fail = None
        assert await pf.get("k") == ("value", "k", 2)
    assert loader.calls == {"k": 2}


async def test_failure_ttl_remembers_the_failure_until_it_elapses() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    loader.fail = ValueError("down")
    async with Prefetcher(loader, failure_ttl=30, clock=clock) as pf:
        with pytest.raises(ValueError, match="down"):
            await pf.get("k")
        loader.fail = None
        clock.advance(29)
        with pytest.raises(ValueError, match="down"):
            await pf.get("k")
        assert pf.prefetch("k") is False
        assert loader.calls == {"k": 1}
        clock.advance(2)
        assert await pf.get("k") == ("value", "k", 2)
    assert loader.calls == {"k": 2}


async def test_force_refresh_runs_a_completed_key_again() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        assert await pf.get("k") == ("value", "k", 1)
        assert await pf.get("k", force_refresh=True) == ("value", "k", 2)
        assert await pf.get("k") == ("value", "k", 2)
    assert loader.calls == {"k": 2}


async def test_concurrent_force_refreshes_coalesce_into_one_run() -> None:
    loader = GatedLoader(gated=False)
    results: list[Any] = []
    async with Prefetcher(loader) as pf:
        await pf.get("k")
        loader.gate = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def refresher() -> None:
                results.append(await pf.get("k", force_refresh=True))

            for _ in range(5):
                tg.start_soon(refresher)
            await wait_all_tasks_blocked()
            # a plain get meanwhile is still served the completed value at once
            assert await pf.get("k") == ("value", "k", 1)
            loader.release()
    assert loader.calls == {"k": 2}
    assert results == [("value", "k", 2)] * 5


async def test_timeout_ends_that_caller_only_and_the_load_goes_on() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        other: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def patient() -> None:
                other.append(await pf.get("k"))

            tg.start_soon(patient)
            await loader.started.wait()
            with pytest.raises(TimeoutError):
                await pf.get("k", timeout=0.01)
            assert (await pf.status("k")).status is Status.RUNNING
            loader.release()
        assert other == [("value", "k", 1)]
    assert loader.calls == {"k": 1}


async def test_cancelling_the_caller_that_started_the_load_does_not_cancel_it() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        got: list[Any] = []
        async with anyio.create_task_group() as tg:
            starter_scope = anyio.CancelScope()

            async def starter() -> None:
                with starter_scope:
                    await pf.get("k")
                    raise AssertionError("the starter should have been cancelled")

            async def other() -> None:
                got.append(await pf.get("k"))

            tg.start_soon(starter)
            await loader.started.wait()
            tg.start_soon(other)
            await wait_all_tasks_blocked()
            starter_scope.cancel()
            await wait_all_tasks_blocked()
            assert (await pf.status("k")).status is Status.RUNNING
            loader.release()
        assert got == [("value", "k", 1)]
        assert pf.stats().waiters == 0
    assert loader.calls == {"k": 1}


async def test_when_every_waiter_is_cancelled_the_load_finishes_and_is_stored() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        with anyio.move_on_after(0.01):
            await pf.get("k")
        assert (await pf.status("k")).status is Status.RUNNING
        loader.release()
        snap = await pf.wait("k")
        assert snap.status is Status.COMPLETED
        assert await pf.get("k") == ("value", "k", 1)
    assert loader.calls == {"k": 1}


async def test_leaving_the_block_cancels_loads_and_ends_every_waiter() -> None:
    loader = GatedLoader()  # never released
    outcomes: list[str] = []
    cancelled = anyio.Event()

    async def load_until_cancelled(key: str) -> str:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return key  # pragma: no cover - never reached

    async with anyio.create_task_group() as outer:
        async with Prefetcher(loader) as pf:

            async def waiter(key: str) -> None:
                try:
                    await pf.get(key)
                except PrefetcherClosed:
                    outcomes.append(key)

            outer.start_soon(waiter, "a")
            outer.start_soon(waiter, "a")
            pf.prefetch("b", load_until_cancelled, "b")
            outer.start_soon(waiter, "b")
            await wait_all_tasks_blocked()
            assert pf.stats().running == 2
        # the block has been left: loads cancelled, nothing left running
        assert cancelled.is_set()
        assert pf._debug_counts()["live_flights"] == 0
    assert sorted(outcomes) == ["a", "a", "b"]
    with pytest.raises(PrefetcherClosed):
        await pf.get("a")
    with pytest.raises(PrefetcherClosed):
        pf.prefetch("a")
    with pytest.raises(PrefetcherClosed):
        await pf.status("a")


async def test_a_prefetcher_cannot_be_used_before_it_is_entered() -> None:
    pf: Prefetcher[str, Any] = Prefetcher(GatedLoader())
    with pytest.raises(PrefetcherClosed, match="async with"):
        await pf.get("k")
    with pytest.raises(PrefetcherClosed):
        pf.prefetch("k")


async def test_invalidate_of_an_inflight_key_keeps_its_waiters_but_not_its_result() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        got: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                got.append(await pf.get("k"))

            tg.start_soon(waiter)
            await loader.started.wait()
            assert await pf.invalidate("k") is True
            assert (await pf.status("k")).status is Status.NOT_STARTED
            loader.release()
        assert got == [("value", "k", 1)]
        # the stale completion was not stored: the next get runs a fresh load
        assert (await pf.status("k")).status is Status.NOT_STARTED
        assert await pf.get("k") == ("value", "k", 2)
    assert loader.calls == {"k": 2}


async def test_a_stale_completion_never_overwrites_a_newer_load() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        pf.prefetch("k")
        await loader.started.wait()
        await pf.invalidate("k")
        second = GatedLoader()
        async with anyio.create_task_group() as tg:

            async def newer() -> None:
                assert await pf.get("k", second, "k") == ("value", "k", 1)

            tg.start_soon(newer)
            await second.started.wait()
            loader.release()  # the old load completes first ...
            await wait_all_tasks_blocked()
            assert (await pf.status("k")).status is Status.RUNNING  # ... and is not stored
            second.release()
        assert (await pf.status("k")).result == ("value", "k", 1)


async def test_invalidate_forgets_a_completed_or_failed_entry() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, failure_ttl=60) as pf:
        await pf.get("ok")
        loader.fail = RuntimeError("x")
        with pytest.raises(RuntimeError):
            await pf.get("bad")
        assert await pf.invalidate("ok") is True
        assert await pf.invalidate("bad") is True
        assert await pf.invalidate("never") is False
        loader.fail = None
        assert await pf.get("bad") == ("value", "bad", 2)
        assert pf.stats().completed == 1


async def test_a_load_that_gets_its_own_key_fails_at_once() -> None:
    async def recursive(key: str) -> str:
        return str(await pf.get(key))

    async with Prefetcher(recursive) as pf:
        with anyio.fail_after(5), pytest.raises(ReentrantLoadError, match="'k'"):
            await pf.get("k")


async def test_a_cycle_through_another_key_fails_at_once() -> None:
    async def a(key: str) -> str:
        return str(await pf.get("b", b, "b"))

    async def b(key: str) -> str:
        return str(await pf.get("a", a, "a"))

    async with Prefetcher() as pf:
        with anyio.fail_after(5), pytest.raises(ReentrantLoadError):
            await pf.get("a", a, "a")


async def test_expiry_is_enforced_on_access() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=10, clock=clock) as pf:
        await pf.get("k")
        clock.advance(9.9)
        assert await pf.get("k") == ("value", "k", 1)
        clock.advance(0.2)
        assert (await pf.status("k")).status is Status.NOT_STARTED
        assert await pf.get("k") == ("value", "k", 2)
        assert pf.stats().expirations == 1


async def test_the_sweep_removes_only_expired_entries() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=10, clock=clock) as pf:
        for i in range(5):
            await pf.get(i)
        clock.advance(5)
        for i in range(5, 8):
            await pf.get(i)
        clock.advance(6)  # the first five are 11 s old, the others 6 s
        assert pf.sweep() == 5
        assert pf.stats().completed == 3 and pf.stats().expirations == 5
        assert pf.sweep() == 0


async def test_the_periodic_sweep_runs_every_cleanup_interval() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=1, cleanup_interval=0.01, clock=clock) as pf:
        await pf.get("k")
        clock.advance(2)
        with anyio.fail_after(5):
            while pf.stats().expirations == 0:  # noqa: ASYNC110 - the sweeper has no event to await
                await anyio.sleep(0.01)
        assert pf.stats().completed == 0


async def test_ttl_none_keeps_values_until_invalidated() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, ttl=None, clock=clock) as pf:
        await pf.get("k")
        clock.advance(10**9)
        assert await pf.get("k") == ("value", "k", 1)
        assert (await pf.status("k")).expires_at is None


async def test_completed_entries_hold_no_event_or_task() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        await pf.get("k")
        record = pf._entries["k"]
        assert type(record) is Done
        assert not hasattr(record, "__dict__")
        assert set(Done.__slots__) == {"background", "done", "duration", "key", "value"}
        gc.collect()
        assert pf._debug_counts()["live_flights"] == 0


async def test_a_default_loader_or_a_per_call_function() -> None:
    async def double(x: int) -> int:
        return 2 * x

    async def add(x: int, y: int) -> int:
        return x + y

    async with Prefetcher(double) as pf:
        assert await pf.get(4) == 8
        assert await pf.get(5, add, 2, 3) == 5
    pf2: Prefetcher[str, Any]
    async with Prefetcher() as pf2:
        with pytest.raises(PrefetchError, match="fn") as info:
            await pf2.get("k")
        assert "loader" in str(info.value)


async def test_status_reports_every_stage() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        assert (await pf.status("k")).status is Status.NOT_STARTED
        pf.prefetch("k")
        running = await pf.status("k")
        assert running.status is Status.RUNNING and running.started_at is not None
        assert running.started_at.tzinfo is not None and running.completed_at is None
        loader.release()
        done = await pf.wait("k")
        assert done.status is Status.COMPLETED
        assert done.completed_at is not None and done.started_at is not None
        assert done.completed_at >= done.started_at
        assert done.expires_at is not None and done.expires_at > done.completed_at
        assert await pf.status("k") == done


async def test_wait_returns_a_failed_snapshot_without_raising() -> None:
    loader = GatedLoader()
    loader.fail = KeyError("missing")
    async with Prefetcher(loader) as pf:
        pf.prefetch("k")
        loader.release()
        snap = await pf.wait("k", timeout=5)
    assert snap.status is Status.FAILED
    assert snap.error == "KeyError: 'missing'"
    assert snap.exception is None  # failure_ttl=0: the record keeps no exception object
