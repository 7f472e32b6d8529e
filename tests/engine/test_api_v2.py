"""The v2 verbs of the Prefetcher: serve, cancel, in_flight, wrap, shutdown_grace, name,
delay, admission, and the counters of speculation (cancelled, unclaimed, wasted_seconds)."""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

import anyio
import pytest
import structlog
from anyio import wait_all_tasks_blocked

from prefetch_ingest import (
    LagAdmission,
    LoadCancelled,
    Prefetcher,
    PrefetcherClosed,
    PrefetchError,
    Served,
    Source,
    Status,
    WrongThreadError,
)
from tests.helpers import FakeClock, GatedLoader

pytestmark = pytest.mark.anyio


async def _value(key: str) -> str:
    return f"v-{key}"


async def test_serve_says_ran_then_hit() -> None:
    async with Prefetcher(_value) as pf:
        first = await pf.serve("k")
        second = await pf.serve("k")
    assert first == Served("v-k", Source.RAN)
    assert second == Served("v-k", Source.HIT)
    assert [s.value for s in Source] == ["hit", "joined", "ran"]


async def test_serve_of_a_load_in_flight_is_joined_for_every_caller_but_the_starter() -> None:
    loader = GatedLoader()
    sources: list[Source] = []
    async with Prefetcher(loader) as pf:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    sources.append((await pf.serve("k")).source)

                for _ in range(5):
                    tg.start_soon(call)
                await wait_all_tasks_blocked()
                loader.release()
    assert sorted(sources) == [Source.JOINED] * 4 + [Source.RAN]


async def test_serve_of_a_prefetched_load_is_joined() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        pf.prefetch("k")
        await loader.started.wait()
        async with anyio.create_task_group() as tg:
            result: list[Served[Any]] = []

            async def call() -> None:
                result.append(await pf.serve("k"))

            tg.start_soon(call)
            await wait_all_tasks_blocked()
            loader.release()
    assert result[0].source is Source.JOINED


async def test_cancel_of_a_running_load_fails_its_waiters_with_load_cancelled() -> None:
    loader = GatedLoader()
    errors: list[BaseException] = []
    async with Prefetcher(loader) as pf:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def call() -> None:
                    try:
                        await pf.get("k")
                    except LoadCancelled as exc:
                        errors.append(exc)

                for _ in range(3):
                    tg.start_soon(call)
                await loader.started.wait()
                await wait_all_tasks_blocked()
                assert await pf.cancel("k") is True
            assert await pf.cancel("k") is False
            snap = await pf.status("k")
            stats = pf.stats()
            loader.release()
            assert await pf.get("k") == ("value", "k", 2)  # a new load runs
    assert len(errors) == 3 and all(isinstance(e, PrefetchError) for e in errors)
    assert snap.status is Status.NOT_STARTED
    assert stats.cancelled == 1 and stats.running == 0


async def test_cancel_of_a_refresh_keeps_the_old_value() -> None:
    clock = FakeClock()
    gate = anyio.Event()
    calls = 0

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await gate.wait()
        return f"v{calls}"

    async with Prefetcher(load, refresh_after=5, clock=clock) as pf:
        assert await pf.get("k") == "v1"
        clock.advance(6)
        assert await pf.get("k") == "v1"  # starts the reload
        await wait_all_tasks_blocked()
        assert (await pf.status("k")).status is Status.RUNNING
        assert await pf.cancel("k") is True
        snap = await pf.status("k")
        assert snap.status is Status.COMPLETED and snap.result == "v1"
        assert await pf.get("k") == "v1"
        gate.set()


async def test_cancel_of_a_pending_load_runs_nothing() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader, max_concurrency=1) as pf:
        pf.prefetch("a")
        pf.prefetch("b")
        assert (await pf.status("b")).status is Status.PENDING
        assert await pf.cancel("b") is True
        loader.release()
        await pf.wait("a")
        await wait_all_tasks_blocked()
    assert "b" not in loader.calls


async def test_in_flight_lists_pending_and_running_keys_oldest_first() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader, max_concurrency=1) as pf:
        pf.prefetch("a")
        pf.prefetch("b")
        pf.prefetch("c")
        await pf.invalidate("c")  # dropped
        listed = pf.in_flight()
        loader.release()
    assert [(s.key, s.status) for s in listed] == [("a", Status.RUNNING), ("b", Status.PENDING)]


async def test_wrap_runs_one_load_per_distinct_arguments() -> None:
    calls: list[tuple[Any, ...]] = []
    async with Prefetcher() as pf:

        @pf.wrap
        async def add(a: int, b: int = 0) -> int:
            """Adds."""
            calls.append((a, b))
            return a + b

        assert await add(1, 2) == 3
        assert await add(1, 2) == 3
        assert await add(1, b=5) == 6
        assert add.__name__ == "add" and add.__doc__ == "Adds."
        assert (await add.status(1, 2)).status is Status.COMPLETED
        assert (await pf.status((1, 2))).result == 3
        assert (await add.serve(1, 2)).source is Source.HIT
        assert await add.invalidate(1, 2) is True
        assert add.prefetch(1, 2) is True
        assert await add(1, 2) == 3
        assert await add.cancel(9, 9) is False

        @pf.wrap(key=lambda args, kwargs: args[0])
        async def first(a: int, b: int) -> int:
            return a * 10 + b

        assert await first(1, 2) == 12
        assert await first(1, 3) == 12  # the same key
    assert calls == [(1, 2), (1, 5), (1, 2)]


async def test_wrap_rejects_what_is_not_a_coroutine_function() -> None:
    async with Prefetcher() as pf:
        with pytest.raises(TypeError, match="fn"):
            pf.wrap(lambda: 1)  # type: ignore[arg-type, return-value]
        with pytest.raises(TypeError, match="key"):
            pf.wrap(key=3)  # type: ignore[call-overload]


async def test_shutdown_grace_lets_a_running_load_finish_and_store() -> None:
    gate = anyio.Event()
    finished: list[str] = []

    async def load(key: str) -> str:
        await gate.wait()
        finished.append(key)
        return key

    async with Prefetcher(load, shutdown_grace=5) as pf:
        pf.prefetch("k")
        await wait_all_tasks_blocked()
        gate.set()  # completes during the grace
    assert finished == ["k"]
    assert pf.stats().load_successes == 1 and pf.stats().cancelled == 0


async def test_a_load_that_outlives_the_grace_is_cancelled_and_logged() -> None:
    events: list[dict[str, Any]] = []

    def capture(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        events.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[capture])

    async def hang(key: str) -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    waiter_error: list[BaseException] = []
    with anyio.fail_after(5):
        async with Prefetcher(hang, shutdown_grace=0.01, name="svc") as pf:
            pf.prefetch("k")
            pf.prefetch("pending", hang, "pending", delay=60)
            await wait_all_tasks_blocked()
    cancelled = [e for e in events if e["event"] == "prefetch.cancelled"]
    assert {e["key"] for e in cancelled} == {"k", "pending"}
    assert all(e["reason"] == "close" and e["name"] == "svc" for e in cancelled)
    assert all(e.get("name") == "svc" for e in events)
    assert pf.stats().cancelled == 2
    assert waiter_error == []


async def test_waiters_of_a_load_cancelled_by_close_get_prefetcher_closed() -> None:
    loader = GatedLoader()
    errors: list[BaseException] = []
    async with anyio.create_task_group() as outer, Prefetcher(loader) as pf:

        async def call() -> None:
            try:
                await pf.get("k")
            except PrefetcherClosed as exc:
                errors.append(exc)

        outer.start_soon(call)
        await loader.started.wait()
        await wait_all_tasks_blocked()
    assert len(errors) == 1


async def test_a_delayed_prefetch_is_pending_until_a_get_promotes_it() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        assert pf.prefetch("k", delay=3600) is True
        assert (await pf.status("k")).status is Status.PENDING
        assert pf.prefetch("k", delay=3600) is False
        with anyio.fail_after(5):
            assert await pf.get("k") == ("value", "k", 1)


async def test_a_delayed_prefetch_starts_after_its_delay() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        pf.prefetch("k", delay=0.01)
        with anyio.fail_after(5):
            await loader.started.wait()
            snap = await pf.wait("k")
    assert snap.status is Status.COMPLETED and snap.background


async def test_a_delayed_prefetch_cancelled_or_invalidated_runs_nothing() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        pf.prefetch("a", delay=0.01)
        pf.prefetch("b", delay=0.01)
        assert await pf.cancel("a") is True
        assert await pf.invalidate("b") is True
        pf.prefetch("c", delay=0.02)
        with anyio.fail_after(5):
            await pf.wait("c")
    assert loader.calls == {"c": 1}


async def test_unclaimed_counts_background_values_nobody_was_served() -> None:
    clock = FakeClock()
    async with Prefetcher(_value, ttl=10, clock=clock) as pf:
        pf.prefetch("used")
        pf.prefetch("unused")
        await pf.wait("used")
        await pf.wait("unused")
        assert await pf.get("used") == "v-used"  # claimed by a hit
        clock.advance(11)
        pf.sweep()
        stats = pf.stats()
    assert stats.unclaimed == 1
    assert stats.wasted_seconds == 0.0  # (the fake clock did not move during the load)
    assert stats.expirations == 2


async def test_a_joined_background_value_is_claimed() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader) as pf:
        pf.prefetch("k")
        await loader.started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pf.get, "k")
            await wait_all_tasks_blocked()
            loader.release()
        await pf.invalidate("k")
        pf.prefetch("j")
        await pf.wait("j")
        await pf.invalidate("j")  # never served
        assert pf.stats().unclaimed == 1


async def test_lag_admission_follows_its_law() -> None:
    adm = LagAdmission(max_concurrency=8, target_lag=0.05)
    assert adm.limit() == 8
    assert adm.observe(0.2) is False and adm.limit() == 4
    adm.observe(0.2)
    adm.observe(0.2)
    adm.observe(0.2)
    assert adm.limit() == 0  # background starts paused
    assert adm.observe(0.0) is True and adm.limit() == 1
    for _ in range(20):
        adm.observe(0.01)
    assert adm.limit() == 8


async def test_lag_admission_paused_holds_back_background_loads_never_demanded_ones() -> None:
    adm = LagAdmission(max_concurrency=2, target_lag=0.05, interval=3600)
    for _ in range(4):
        adm.observe(1.0)
    assert adm.limit() == 0
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, admission=adm) as pf:
        pf.prefetch("bg")
        assert (await pf.status("bg")).status is Status.PENDING
        with anyio.fail_after(5):
            assert await pf.get("fg") == ("value", "fg", 1)
        assert (await pf.status("bg")).status is Status.PENDING
        adm.observe(0.0)
        pf._admission_changed()  # what LagAdmission.run does after a rise
        with anyio.fail_after(5):
            assert (await pf.wait("bg")).status is Status.COMPLETED


def test_admission_and_max_concurrency_together_are_a_type_error() -> None:
    with pytest.raises(TypeError, match="admission"):
        Prefetcher(max_concurrency=2, admission=LagAdmission())
    with pytest.raises(TypeError, match="admission"):
        Prefetcher(admission=object())  # type: ignore[call-overload]


async def test_every_verb_called_from_a_worker_thread_raises_wrong_thread_and_leaves_no_trace() -> (
    None
):
    async with Prefetcher(_value) as pf:

        def from_thread() -> list[str]:
            failed: list[str] = []
            calls: list[tuple[str, Callable[[], object]]] = [
                ("prefetch", lambda: pf.prefetch("k")),
                ("in_flight", pf.in_flight),
            ]
            for name, call in calls:
                try:
                    call()
                except WrongThreadError:
                    failed.append(name)
            return failed

        assert await anyio.to_thread.run_sync(from_thread) == ["prefetch", "in_flight"]
        assert pf.stats().total == 0 and pf.stats().prefetches == 0


async def test_a_bad_timeout_is_rejected_on_a_hit_as_on_a_miss() -> None:
    async with Prefetcher(_value) as pf:
        await pf.get("k")
        with pytest.raises(ValueError, match="timeout"):
            await pf.get("k", timeout=-1)
        with pytest.raises(ValueError, match="timeout"):
            await pf.get("cold", timeout=-1)
        with pytest.raises(TypeError, match="fn"):
            await pf.get("k", lambda k: k)
        assert pf.stats().hits == 0


async def test_keys_are_logged_escaped_and_truncated() -> None:
    events: list[dict[str, Any]] = []

    def capture(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        events.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[capture])

    async def bad(key: str) -> str:
        raise ValueError("x")

    async with Prefetcher(bad) as pf:
        with pytest.raises(ValueError):
            await pf.get("a\nb\x1b[31m" + "z" * 1000)
    keys = [e["key"] for e in events if "key" in e]
    assert keys and all(isinstance(k, str) and k.isprintable() and len(k) <= 200 for k in keys)


async def test_a_delayed_prefetch_follows_the_injected_clock() -> None:
    clock = FakeClock()
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader, clock=clock) as pf:
        assert pf.prefetch("k", delay=3600) is True
        clock.advance(3599)
        assert (await pf.status("k")).status is Status.PENDING
        assert [s.key for s in pf.in_flight()] == ["k"]
        clock.advance(2)  # the delay has passed on the Prefetcher's clock
        assert (await pf.status("k")).status is Status.RUNNING
        with anyio.fail_after(5):
            assert (await pf.wait("k")).status is Status.COMPLETED
    assert loader.calls == {"k": 1}


async def test_lag_admission_probe_measures_a_blocked_loop_and_the_limit_falls() -> None:
    adm = LagAdmission(max_concurrency=4, target_lag=0.02, interval=0.005)

    def block() -> None:
        time.sleep(0.1)  # a CPU-bound handler holding the loop (deliberately blocking)

    async with anyio.create_task_group() as tg:

        async def blocker() -> None:
            await anyio.lowlevel.checkpoint()
            block()

        tg.start_soon(blocker)
        lag = await adm.probe()
    assert lag >= 0.05
    assert adm.observe(lag) is False and adm.limit() == 2
    assert adm.observe(await adm.probe(), in_use=True) in (True, False)


async def test_lag_admission_grows_only_while_its_limit_is_in_use() -> None:
    adm = LagAdmission(max_concurrency=8, target_lag=0.05, initial=2)
    assert adm.observe(0.0, in_use=False) is False and adm.limit() == 2
    assert adm.observe(0.0, in_use=True) is True and adm.limit() == 3
    loader = GatedLoader()
    async with Prefetcher(loader, admission=adm) as pf:
        for key in "abcd":
            pf.prefetch(key)
        assert [s.status for s in pf.in_flight()] == [Status.RUNNING] * 3 + [Status.PENDING]
        assert adm.running_background == 3
        loader.release()
        with anyio.fail_after(5):
            for key in "abcd":
                await pf.wait(key)
    assert adm.running_background == 0


@pytest.mark.parametrize("max_entries", [None, 10])
async def test_during_the_grace_a_running_load_is_served_hits_with_or_without_lru(
    max_entries: int | None,
) -> None:
    got: list[str] = []
    leaving = anyio.Event()
    box: list[Prefetcher[Any, Any]] = []

    async def load(key: str) -> str:
        if key == "late":
            await leaving.wait()
            got.append(await box[0].get("warm"))  # a hit while the block is being left
        return f"v-{key}"

    with anyio.fail_after(5):
        async with Prefetcher(load, max_entries=max_entries, shutdown_grace=5) as pf:
            box.append(pf)
            await pf.get("warm")
            pf.prefetch("late")
            await wait_all_tasks_blocked()
            leaving.set()  # the load goes on during the grace
    assert got == ["v-warm"]


async def test_a_load_admitted_when_invalidate_drops_a_pending_one_is_started() -> None:
    adm = LagAdmission(max_concurrency=4, initial=1)
    loader = GatedLoader()
    async with Prefetcher(loader, admission=adm) as pf:
        for key in "abc":
            pf.prefetch(key)
        assert [s.status for s in pf.in_flight()] == [Status.RUNNING] + [Status.PENDING] * 2
        adm.observe(0.0, in_use=True)  # the limit rose; its probe has not told the Prefetcher
        assert await pf.invalidate("b") is True  # ... and this frees the queue for "c"
        loader.release()
        with anyio.fail_after(5):
            assert (await pf.wait("c")).status is Status.COMPLETED
    assert loader.calls == {"a": 1, "c": 1}


async def test_an_unhashable_async_callable_is_served_on_a_hit_as_on_a_miss() -> None:
    class Loader:
        __hash__ = None  # type: ignore[assignment]  # e.g. an attrs class with eq=True

        async def __call__(self, key: str) -> str:
            return f"v-{key}"

    load = Loader()
    async with Prefetcher() as pf:
        assert await pf.get("k", load, "k") == "v-k"  # a miss
        assert await pf.get("k", load, "k") == "v-k"  # a hit, the same fn
        assert (await pf.serve("k", load, "k")).source is Source.HIT
        assert pf.stats().hits == 2
