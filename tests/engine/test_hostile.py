"""Adversarial tests of the engine v2 contract (docs/contract.md).

Each test is named after the behaviour the contract promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from prefetch_ingest import (
    CodecError,
    LoadCancelled,
    Prefetcher,
    PrefetcherClosed,
    ReentrantLoadError,
    Source,
    Status,
    WrongThreadError,
    report_progress,
)
from prefetch_ingest.ingest import IngestPrefetcher
from tests.helpers import FakeClock, GatedLoader

pytestmark = pytest.mark.anyio


async def _value(key: Any) -> Any:
    return ("v", key)


def _check_stats_match(pf: Prefetcher[Any, Any], statuses: dict[Any, Status]) -> None:
    s = pf.stats()
    by = {st: sum(1 for v in statuses.values() if v is st) for st in Status}
    assert (s.pending, s.running, s.completed, s.failed) == (
        by[Status.PENDING],
        by[Status.RUNNING],
        by[Status.COMPLETED],
        by[Status.FAILED],
    ), (s, statuses)
    assert s.total == s.pending + s.running + s.completed + s.failed


async def _statuses(pf: Prefetcher[Any, Any], keys: list[Any]) -> dict[Any, Status]:
    return {k: (await pf.status(k)).status for k in keys}


# -- stats consistency --------------------------------------------------------------


async def test_stats_running_matches_status_after_invalidate_detaches_a_running_load() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            pf.prefetch("a")
            await loader.started.wait()
            assert await pf.invalidate("a") is True
            assert (await pf.status("a")).status is Status.NOT_STARTED
            assert pf.in_flight() == []
            _check_stats_match(pf, await _statuses(pf, ["a"]))
            assert pf.stats().total == len(pf.in_flight())
            loader.release()


async def test_stats_count_one_running_load_per_key_after_invalidate_and_restart() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            pf.prefetch("a")
            await loader.started.wait()
            await pf.invalidate("a")
            assert pf.prefetch("a") is True
            await wait_all_tasks_blocked()
            assert loader.calls["a"] == 2
            assert [s.key for s in pf.in_flight()] == ["a"]
            _check_stats_match(pf, await _statuses(pf, ["a"]))
            loader.release()
            snap = await pf.wait("a")
            assert snap.status is Status.COMPLETED
            _check_stats_match(pf, await _statuses(pf, ["a"]))


async def test_stats_say_nothing_completed_once_the_ttl_has_passed() -> None:
    clock = FakeClock()
    with anyio.fail_after(5):
        async with Prefetcher(_value, ttl=10, clock=clock) as pf:
            await pf.get("a")
            assert pf.stats().completed == 1
            clock.advance(11)
            # entries by status now: the status of "a" now is NOT_STARTED
            statuses_now = {"a": Status.NOT_STARTED}
            _check_stats_match(pf, statuses_now)


async def test_stats_match_statuses_through_cancel_fail_complete_and_queue() -> None:
    loader = GatedLoader()

    async def boom(key: str) -> str:
        raise ValueError(key)

    keys = ["a", "b", "c", "d", "e"]
    with anyio.fail_after(5):
        async with Prefetcher(loader, max_concurrency=1, failure_ttl=60) as pf:
            pf.prefetch("a")
            pf.prefetch("b")
            pf.prefetch("c", delay=100)
            with pytest.raises(ValueError):
                await pf.get("d", boom, "d")
            await loader.started.wait()
            _check_stats_match(pf, await _statuses(pf, keys))
            assert await pf.cancel("a") is True
            await wait_all_tasks_blocked()
            _check_stats_match(pf, await _statuses(pf, keys))
            assert await pf.cancel("c") is True
            loader.release()
            await pf.wait("b")
            await pf.get("e")
            st = await _statuses(pf, keys)
            assert st == {
                "a": Status.NOT_STARTED,
                "b": Status.COMPLETED,
                "c": Status.NOT_STARTED,
                "d": Status.FAILED,
                "e": Status.COMPLETED,
            }
            _check_stats_match(pf, st)
            assert pf.stats().cancelled == 2
            assert loader.calls == {"a": 1, "b": 1, "e": 1}


# -- bad input on every path ---------------------------------------------------------


async def test_extra_args_without_fn_are_a_type_error_on_a_hit_as_on_a_miss() -> None:
    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            with pytest.raises(TypeError):
                await pf.get("cold", None, "extra")
            await pf.get("k")
            before = pf.stats()
            with pytest.raises(TypeError):
                await pf.get("k", None, "extra")
            with pytest.raises(TypeError):
                await pf.serve("k", None, "extra")
            after = pf.stats()
            assert after.hits == before.hits


async def test_prefetch_with_extra_args_without_fn_is_a_type_error_even_when_fresh() -> None:
    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            with pytest.raises(TypeError):
                pf.prefetch("cold", None, "extra")
            assert (await pf.status("cold")).status is Status.NOT_STARTED
            await pf.get("k")
            before = pf.stats()
            with pytest.raises(TypeError):
                pf.prefetch("k", None, "extra")
            assert pf.stats().deduplicated == before.deduplicated


async def test_a_failed_call_leaves_no_trace() -> None:
    async def coro_fn(key: str) -> str:
        return key

    with anyio.fail_after(5):
        async with Prefetcher() as pf:
            with pytest.raises(TypeError, match="hashable"):
                await pf.get(["unhashable"], coro_fn)
            with pytest.raises(TypeError, match="fn"):
                await pf.get("k", coro_fn("k"))  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="fn"):
                pf.prefetch("k", lambda k: k)
            with pytest.raises(ValueError, match="delay"):
                pf.prefetch("k", coro_fn, "k", delay=-1)
            with pytest.raises(ValueError, match="delay"):
                pf.prefetch("k", coro_fn, "k", delay=float("nan"))
            with pytest.raises(Exception, match="fn"):
                await pf.get("k")  # neither fn nor loader
            with pytest.raises(Exception, match="fn"):
                pf.prefetch("k")
            with pytest.raises(ValueError, match="timeout"):
                await pf.wait("k", timeout=float("inf"))
            with pytest.raises(TypeError, match="timeout"):
                await pf.get("k", coro_fn, "k", timeout="1")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="hashable"):
                await pf.cancel({})
            with pytest.raises(TypeError, match="hashable"):
                await pf.invalidate({})
            with pytest.raises(TypeError, match="hashable"):
                pf.watch({})
            s = pf.stats()
            assert s.total == 0 and s.misses == 0 and s.prefetches == 0
            assert s.deduplicated == 0 and s.hits == 0
            assert pf._debug_counts()["entries"] == 0
            assert pf._debug_counts()["tasks"] == 0


async def test_a_bad_timeout_is_rejected_when_joining_a_load_in_flight() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            pf.prefetch("k")
            await loader.started.wait()
            before = pf.stats()
            with pytest.raises(ValueError, match="timeout"):
                await pf.get("k", timeout=-1)
            assert pf.stats().joins == before.joins
            assert pf.stats().deduplicated == before.deduplicated
            loader.release()


# -- threads --------------------------------------------------------------------------


async def test_a_hit_from_another_thread_that_would_change_state_raises_wrong_thread() -> None:
    """A fresh hit from another thread is only a dict read (documented in design.md);
    anything that would change state (here: the refresh a stale hit starts) raises."""
    clock = FakeClock()
    with anyio.fail_after(5):
        async with Prefetcher(_value, refresh_after=10, clock=clock) as pf:
            await pf.get("k")
            clock.advance(11)  # a hit now starts a reload
            before = pf.stats()

            def other_thread() -> list[str]:
                out: list[str] = []
                for name, make in (
                    ("get", lambda: pf.get("k")),
                    ("serve", lambda: pf.serve("k")),
                ):
                    try:
                        asyncio.run(make())
                    except WrongThreadError:
                        out.append(name)
                return out

            assert await anyio.to_thread.run_sync(other_thread) == ["get", "serve"]
            after = pf.stats()
            assert (after.hits, after.prefetches, after.running) == (
                before.hits,
                before.prefetches,
                0,
            )


async def test_sweep_from_a_worker_thread_raises_wrong_thread_error() -> None:
    clock = FakeClock()
    with anyio.fail_after(5):
        async with Prefetcher(_value, ttl=1, clock=clock) as pf:
            await pf.get("k")
            clock.advance(5)

            def other_thread() -> str:
                try:
                    pf.sweep()
                except WrongThreadError:
                    return "raised"
                return "ran"

            assert await anyio.to_thread.run_sync(other_thread) == "raised"
            assert pf._core.counters.expirations == 0  # the thread's call changed nothing
            assert pf.stats().expirations == 1  # stats() on the loop's thread sweeps first


async def test_sweep_after_close_raises_prefetcher_closed() -> None:
    async with Prefetcher(_value) as pf:
        await pf.get("k")
    with pytest.raises(PrefetcherClosed):
        pf.sweep()


async def test_wait_status_cancel_invalidate_from_a_worker_thread_raise_wrong_thread() -> None:
    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            await pf.get("k")

            def other_thread() -> list[str]:
                out: list[str] = []
                for name, make in (
                    ("wait", lambda: pf.wait("k")),
                    ("status", lambda: pf.status("k")),
                    ("cancel", lambda: pf.cancel("k")),
                    ("invalidate", lambda: pf.invalidate("k")),
                ):
                    try:
                        asyncio.run(make())
                    except WrongThreadError:
                        out.append(name)
                try:
                    pf.watch("k")
                except WrongThreadError:
                    out.append("watch")
                return out

            got = await anyio.to_thread.run_sync(other_thread)
            assert got == ["wait", "status", "cancel", "invalidate", "watch"]
            assert (await pf.status("k")).status is Status.COMPLETED


# -- hostile loads ----------------------------------------------------------------------


async def test_a_load_that_cancels_its_own_task_fails_only_that_load(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio.current_task().cancel() exists only on asyncio")
    other = GatedLoader()

    async def self_cancel(key: str) -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)
        return "never"

    with anyio.fail_after(5):
        async with Prefetcher(other) as pf:
            pf.prefetch("other")
            await other.started.wait()
            with pytest.raises(asyncio.CancelledError):
                await pf.get("bad", self_cancel, "bad")
            await anyio.lowlevel.checkpoint()
            assert (await pf.status("bad")).status is Status.FAILED
            # the background self-cancelling load does not break watchers / body
            assert pf.prefetch("bad2", self_cancel, "bad2") is True
            snap = await pf.wait("bad2")
            assert snap.status is Status.FAILED
            assert snap.error is not None and "CancelledError" in snap.error
            other.release()
            assert await pf.get("other") == ("value", "other", 1)
            assert pf.stats().cancelled == 0


async def test_a_load_that_cancels_its_own_task_and_returns_completes(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio only")

    async def cancel_then_return(key: str) -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        return "done"

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            assert await pf.get("k", cancel_then_return, "k") == "done"
            await anyio.lowlevel.checkpoint()
            assert await pf.get("k") == "done"
            assert await pf.get("j") == ("v", "j")


async def test_a_load_that_cancels_its_own_key_gives_its_waiters_load_cancelled() -> None:
    holder: dict[str, Prefetcher[Any, Any]] = {}
    reached_after = False

    async def cancel_me(key: str) -> str:
        nonlocal reached_after
        await holder["pf"].cancel(key)
        reached_after = True
        await anyio.sleep_forever()
        return "never"

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            holder["pf"] = pf
            with pytest.raises(LoadCancelled):
                await pf.get("k", cancel_me, "k")
            assert (await pf.status("k")).status is Status.NOT_STARTED
            assert pf.stats().cancelled == 1
            assert await pf.get("k") == ("v", "k")


async def test_a_load_that_swallows_its_cancellation_neither_stores_nor_breaks_anything() -> None:
    finished = anyio.Event()
    gate = anyio.Event()
    started = anyio.Event()

    async def stubborn(key: str) -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await gate.wait()
                report_progress(1, 2, "after cancel")
        finished.set()
        return "zombie"

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            async with anyio.create_task_group() as tg:
                results: list[BaseException | Any] = []

                async def waiter() -> None:
                    try:
                        results.append(await pf.get("k", stubborn, "k"))
                    except BaseException as exc:
                        results.append(exc)

                tg.start_soon(waiter)
                await started.wait()
                await wait_all_tasks_blocked()
                assert await pf.cancel("k") is True
                await wait_all_tasks_blocked()
                assert len(results) == 1 and isinstance(results[0], LoadCancelled)
                gate.set()
                await finished.wait()
            await wait_all_tasks_blocked()
            assert (await pf.status("k")).status is Status.NOT_STARTED
            _check_stats_match(pf, await _statuses(pf, ["k"]))
            assert pf.stats().load_successes == 0
            assert await pf.get("k") == ("v", "k")


async def test_a_load_that_gets_its_own_key_fails_with_reentrant_load_error_only() -> None:
    holder: dict[str, Prefetcher[Any, Any]] = {}

    async def selfish(key: str) -> str:
        value: str = await holder["pf"].get(key)
        return value

    with anyio.fail_after(5):
        async with Prefetcher(selfish) as pf:
            holder["pf"] = pf
            with pytest.raises(ReentrantLoadError):
                await pf.get("k")
            assert (await pf.status("k")).status is Status.FAILED
            other: Any = await pf.get("j", _value, "j")
            assert other == ("v", "j")


async def test_a_load_that_demands_a_key_queued_behind_it_does_not_deadlock() -> None:
    holder: dict[str, Prefetcher[Any, Any]] = {}
    b_gate = GatedLoader(gated=False)

    async def needs_b(key: str) -> Any:
        return ("a", await holder["pf"].get("b", b_gate, "b"))

    with anyio.fail_after(5):
        async with Prefetcher(_value, max_concurrency=1) as pf:
            holder["pf"] = pf
            never = anyio.Event()

            async def blocker(key: str) -> None:
                await never.wait()

            # a holds the only slot, b queues behind it, a then demands b
            gate = anyio.Event()

            async def a_load(key: str) -> Any:
                await gate.wait()
                return await needs_b(key)

            pf.prefetch("a", a_load, "a")
            pf.prefetch("b", b_gate, "b")
            assert (await pf.status("b")).status is Status.PENDING
            gate.set()
            assert await pf.get("a") == ("a", ("value", "b", 1))
            assert b_gate.calls == {"b": 1}


async def test_a_load_that_invalidates_its_own_key_still_hands_its_result_to_its_waiters() -> None:
    holder: dict[str, Prefetcher[Any, Any]] = {}

    async def forgetful(key: str) -> str:
        await holder["pf"].invalidate(key)
        report_progress(1, 1)
        return "detached"

    with anyio.fail_after(5):
        async with Prefetcher(forgetful) as pf:
            holder["pf"] = pf
            assert await pf.get("k") == "detached"
            assert (await pf.status("k")).status is Status.NOT_STARTED
            _check_stats_match(pf, await _statuses(pf, ["k"]))
            assert pf.in_flight() == []


async def test_a_load_returning_a_non_awaitable_fails_only_that_load() -> None:
    async def real(key: str) -> str:
        return key

    def fake(key: str) -> str:  # looks like a coroutine function through __wrapped__
        return "not awaitable"

    fake.__wrapped__ = real  # type: ignore[attr-defined]

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            with pytest.raises(TypeError, match="awaitable"):
                await pf.get("k", fake, "k")  # type: ignore[arg-type]
            assert pf.prefetch("k2", fake, "k2") is True  # type: ignore[arg-type]
            snap = await pf.wait("k2")
            assert snap.status is Status.FAILED
            assert await pf.get("ok") == ("v", "ok")


async def test_a_load_raising_generator_exit_fails_only_that_load() -> None:
    async def bad(key: str) -> str:
        raise GeneratorExit("odd")

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            assert pf.prefetch("k", bad, "k") is True
            snap = await pf.wait("k")
            assert snap.status is Status.FAILED
            assert snap.error is not None and snap.error.startswith("GeneratorExit")
            assert await pf.get("ok") == ("v", "ok")


async def test_a_load_raising_a_base_exception_group_of_keyboard_interrupt_is_handled() -> None:
    async def bad(key: str) -> str:
        raise BaseExceptionGroup("g", [ValueError("x")])

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            with pytest.raises(BaseExceptionGroup):
                await pf.get("k", bad, "k")
            assert await pf.get("ok") == ("v", "ok")


async def test_keyboard_interrupt_from_a_load_cancels_everything_and_leaves_as_itself() -> None:
    hang = GatedLoader()
    outside: list[BaseException] = []

    async def interrupt(key: str) -> str:
        await anyio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    with anyio.fail_after(5):
        async with anyio.create_task_group() as outer:
            with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the block itself is under test
                async with Prefetcher(hang) as pf:

                    async def waiter() -> None:
                        try:
                            await pf.get("hang")
                        except BaseException as exc:
                            outside.append(exc)

                    outer.start_soon(waiter)
                    await hang.started.wait()
                    pf.prefetch("ki", interrupt, "ki")
                    await anyio.sleep_forever()
    assert len(outside) == 1 and isinstance(outside[0], PrefetcherClosed)


# -- cancel / invalidate / force_refresh races -------------------------------------------


async def test_cancel_with_many_waiters_wakes_each_and_restores_the_prior_value() -> None:
    clock = FakeClock()
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, clock=clock, refresh_after=10) as pf:
            loader.release()
            first = await pf.get("k")
            loader.gate = anyio.Event()
            clock.advance(11)
            outcomes: list[Any] = []
            waited: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def forced() -> None:
                    try:
                        outcomes.append(await pf.get("k", force_refresh=True))
                    except BaseException as exc:
                        outcomes.append(exc)

                async def waits() -> None:
                    waited.append(await pf.wait("k"))

                assert await pf.get("k") == first  # stale hit, starts a reload
                await wait_all_tasks_blocked()
                assert loader.calls["k"] == 2
                for _ in range(5):
                    tg.start_soon(forced)
                tg.start_soon(waits)
                await wait_all_tasks_blocked()
                assert loader.calls["k"] == 2  # force_refresh joined
                assert await pf.cancel("k") is True
            assert len(outcomes) == 5 and all(isinstance(o, LoadCancelled) for o in outcomes)
            assert len(waited) == 1 and waited[0].status is Status.COMPLETED
            assert waited[0].result == first
            assert await pf.get("k") == first
            await pf.cancel("k")  # the hit above may have started a new reload
            loader.release()


async def test_invalidate_with_many_waiters_gives_each_the_detached_result() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            got: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def g() -> None:
                    got.append(await pf.get("k"))

                for _ in range(4):
                    tg.start_soon(g)
                await loader.started.wait()
                await wait_all_tasks_blocked()
                assert await pf.invalidate("k") is True
                # a new get starts a fresh load (and its own waiters)
                tg.start_soon(g)
                await wait_all_tasks_blocked()
                assert loader.calls["k"] == 2
                loader.release()
            assert (
                sorted(got) == [("value", "k", 2)] * 5
                or (got.count(("value", "k", 2)) == 5)
                or sorted(x[2] for x in got) == [2, 2, 2, 2, 2]
            )
            assert (await pf.status("k")).status is Status.COMPLETED


async def test_invalidate_with_many_waiters_gives_the_first_waiters_the_first_run() -> None:
    calls = 0
    gate = anyio.Event()

    async def counted(key: str) -> int:
        nonlocal calls
        calls += 1
        mine = calls
        await gate.wait()
        return mine

    with anyio.fail_after(5):
        async with Prefetcher(counted) as pf:
            early: list[int] = []
            late: list[int] = []
            async with anyio.create_task_group() as tg:

                async def g(out: list[int]) -> None:
                    out.append(await pf.get("k"))

                for _ in range(3):
                    tg.start_soon(g, early)
                await wait_all_tasks_blocked()
                await pf.invalidate("k")
                tg.start_soon(g, late)
                await wait_all_tasks_blocked()
                gate.set()
            assert early == [1, 1, 1] and late == [2]
            assert await pf.get("k") == 2


async def test_cancel_of_a_detached_load_is_false_and_its_waiters_still_get_the_value() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            got: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def g() -> None:
                    got.append(await pf.get("k"))

                tg.start_soon(g)
                await loader.started.wait()
                await pf.invalidate("k")
                assert await pf.cancel("k") is False
                loader.release()
            assert got == [("value", "k", 1)]


async def test_a_timed_out_waiter_leaves_alone_and_the_load_goes_on() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            got: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def g() -> None:
                    got.append(await pf.get("k"))

                tg.start_soon(g)
                await loader.started.wait()
                with pytest.raises(TimeoutError):
                    await pf.get("k", timeout=0)
                with pytest.raises(TimeoutError):
                    await pf.wait("k", timeout=0.01)
                with pytest.raises(TimeoutError):
                    await pf.serve("k", timeout=0.01)
                assert [s.key for s in pf.in_flight()] == ["k"]
                loader.release()
            assert got == [("value", "k", 1)]
            assert pf.stats().waiters == 0
            assert loader.calls == {"k": 1}


async def test_cancelled_callers_leave_the_load_for_the_others() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            with anyio.move_on_after(0.05):
                await pf.get("k")
            assert (await pf.status("k")).status is Status.RUNNING
            served: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def s() -> None:
                    served.append(await pf.serve("k"))

                tg.start_soon(s)
                await wait_all_tasks_blocked()
                loader.release()
            assert served[0].source is Source.JOINED
            assert loader.calls == {"k": 1}


# -- max_concurrency + delay + cancel --------------------------------------------------


async def test_max_concurrency_with_delay_and_cancel_keeps_the_fifo_and_the_limit() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, max_concurrency=1) as pf:
            assert pf.prefetch("a") is True
            assert pf.prefetch("b", delay=0.01) is True
            assert pf.prefetch("c") is True
            assert pf.prefetch("d") is True
            await loader.started.wait()
            st = await _statuses(pf, ["a", "b", "c", "d"])
            assert st == {
                "a": Status.RUNNING,
                "b": Status.PENDING,
                "c": Status.PENDING,
                "d": Status.PENDING,
            }
            await anyio.sleep(0.05)  # b's delay passes: it queues behind c and d
            assert (await pf.status("b")).status is Status.PENDING
            assert await pf.cancel("c") is True
            assert await pf.cancel("a") is True
            await wait_all_tasks_blocked()
            st = await _statuses(pf, ["a", "b", "c", "d"])
            assert st["d"] is Status.RUNNING and st["b"] is Status.PENDING
            _check_stats_match(pf, st)
            loader.release()
            await pf.wait("d")
            await pf.wait("b")
            assert loader.calls == {"a": 1, "d": 1, "b": 1}


async def test_a_promoted_pending_load_does_not_take_a_background_slot() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, max_concurrency=1) as pf:
            pf.prefetch("a")
            pf.prefetch("b")
            await loader.started.wait()
            async with anyio.create_task_group() as tg:
                tg.start_soon(pf.get, "b")
                await wait_all_tasks_blocked()
                assert (await pf.status("b")).status is Status.RUNNING
                pf.prefetch("c")
                await wait_all_tasks_blocked()
                assert (await pf.status("c")).status is Status.PENDING
                assert pf._debug_counts()["bg_running"] == 1
                loader.release()
            await pf.wait("c")
            assert pf._debug_counts()["bg_running"] == 0


async def test_cancel_of_a_delayed_load_promoted_by_get_fails_its_waiter() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, max_concurrency=1) as pf:
            pf.prefetch("k", delay=100)
            out: list[BaseException] = []
            async with anyio.create_task_group() as tg:

                async def g() -> None:
                    try:
                        await pf.get("k")
                    except BaseException as exc:
                        out.append(exc)

                tg.start_soon(g)
                await loader.started.wait()
                assert await pf.cancel("k") is True
            assert len(out) == 1 and isinstance(out[0], LoadCancelled)
            assert loader.calls == {"k": 1}
            _check_stats_match(pf, await _statuses(pf, ["k"]))


async def test_a_failing_background_load_frees_its_slot_for_the_next() -> None:
    async def boom(key: str) -> str:
        await anyio.lowlevel.checkpoint()
        raise RuntimeError(key)

    with anyio.fail_after(5):
        async with Prefetcher(_value, max_concurrency=1) as pf:
            pf.prefetch("a", boom, "a")
            pf.prefetch("b")
            snap = await pf.wait("b")
            assert snap.status is Status.COMPLETED
            assert (await pf.status("a")).status is Status.FAILED


# -- eviction, ttl=0, refresh_after with failures ---------------------------------------


async def test_max_entries_evicts_failures_before_values_and_stats_follow() -> None:
    async def boom(key: str) -> str:
        raise ValueError(key)

    with anyio.fail_after(5):
        async with Prefetcher(_value, max_entries=2, failure_ttl=60) as pf:
            with pytest.raises(ValueError):
                await pf.get("x", boom, "x")
            await pf.get("a")
            await pf.get("b")
            st = await _statuses(pf, ["x", "a", "b"])
            assert st == {"x": Status.NOT_STARTED, "a": Status.COMPLETED, "b": Status.COMPLETED}
            _check_stats_match(pf, st)
            assert pf.stats().evictions == 1
            # a failed force_refresh keeps the value it would have replaced
            with pytest.raises(ValueError):
                await pf.get("a", boom, "a", force_refresh=True)
            st = await _statuses(pf, ["x", "a", "b"])
            _check_stats_match(pf, st)
            assert st["a"] is Status.COMPLETED and st["b"] is Status.COMPLETED
            assert pf.stats().total == 2


async def test_a_cold_load_that_fails_does_not_evict_a_completed_value() -> None:
    """Failures go before any completed value: a full table of values, plus one
    load that fails, still holds every value (and drops the failure)."""

    async def boom(key: str) -> str:
        await anyio.lowlevel.checkpoint()
        raise ValueError(key)

    with anyio.fail_after(5):
        async with Prefetcher(_value, max_entries=2) as pf:
            await pf.get("a")
            await pf.get("b")
            with pytest.raises(ValueError):
                await pf.get("y", boom, "y")
            st = await _statuses(pf, ["a", "b", "y"])
            assert st["a"] is Status.COMPLETED and st["b"] is Status.COMPLETED, st
            _check_stats_match(pf, st)


async def test_a_cancelled_cold_load_does_not_evict_a_completed_value() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(_value, max_entries=2) as pf:
            await pf.get("a")
            await pf.get("b")
            pf.prefetch("c", loader, "c")
            await loader.started.wait()
            await pf.cancel("c")
            st = await _statuses(pf, ["a", "b", "c"])
            assert st == {
                "a": Status.COMPLETED,
                "b": Status.COMPLETED,
                "c": Status.NOT_STARTED,
            }, st
            loader.release()


async def test_max_entries_never_evicts_in_flight_loads() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, max_entries=1) as pf:
            for k in "abc":
                pf.prefetch(k)
            await wait_all_tasks_blocked()
            assert [s.key for s in pf.in_flight()] == ["a", "b", "c"]
            _check_stats_match(pf, await _statuses(pf, list("abc")))
            loader.release()
            for k in "abc":
                await pf.wait(k)
            st = await _statuses(pf, list("abc"))
            _check_stats_match(pf, st)
            assert len(pf.in_flight()) == 0
            assert sum(1 for v in st.values() if v is Status.COMPLETED) <= 1


async def test_ttl_zero_runs_every_get_and_keeps_nothing() -> None:
    loader = GatedLoader(gated=False)
    with anyio.fail_after(5):
        async with Prefetcher(loader, ttl=0) as pf:
            assert await pf.get("k") == ("value", "k", 1)
            assert await pf.get("k") == ("value", "k", 2)
            assert (await pf.serve("k")).source is Source.RAN
            assert (await pf.status("k")).status is Status.NOT_STARTED
            _check_stats_match(pf, {"k": Status.NOT_STARTED})
            assert pf.stats().hits == 0
            assert pf.prefetch("k") is True
            snap = await pf.wait("k")
            assert snap.status is Status.NOT_STARTED
            assert pf.stats().unclaimed == 1


async def test_ttl_zero_watch_sees_the_load_complete() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, ttl=0) as pf:
            seen: list[Status] = []
            async with anyio.create_task_group() as tg:

                async def w() -> None:
                    async for snap in pf.watch("k"):
                        seen.append(snap.status)

                tg.start_soon(w)
                await wait_all_tasks_blocked()
                pf.prefetch("k")
                await wait_all_tasks_blocked()
                loader.release()
            assert seen == [Status.NOT_STARTED, Status.RUNNING, Status.COMPLETED]


async def test_a_failed_refresh_keeps_the_value_and_a_later_hit_refreshes_again() -> None:
    clock = FakeClock()
    fail = {"on": False}

    async def flaky(key: str) -> str:
        if fail["on"]:
            raise RuntimeError("refresh failed")
        return "v1"

    with anyio.fail_after(5):
        async with Prefetcher(flaky, clock=clock, refresh_after=10, ttl=100) as pf:
            assert await pf.get("k") == "v1"
            fail["on"] = True
            clock.advance(20)
            assert (await pf.serve("k")).source is Source.HIT
            snap = await pf.wait("k")
            assert snap.status is Status.COMPLETED and snap.result == "v1"
            st = {"k": Status.COMPLETED}
            _check_stats_match(pf, st)
            assert pf.stats().load_failures == 1
            assert await pf.get("k") == "v1"  # a new refresh starts
            await pf.wait("k")
            assert pf.stats().load_failures == 2
            fail["on"] = False
            assert await pf.get("k") == "v1"
            await pf.wait("k")
            clock.advance(1)
            assert (await pf.status("k")).status is Status.COMPLETED
            # after the successful refresh the value is fresh again: no reload
            before = pf.stats().load_successes
            await pf.get("k")
            await wait_all_tasks_blocked()
            assert pf.stats().load_successes == before


async def test_a_refresh_failure_past_ttl_of_the_kept_value_reports_failed() -> None:
    clock = FakeClock()
    gate = anyio.Event()
    fail = {"on": False}

    async def flaky(key: str) -> str:
        if fail["on"]:
            await gate.wait()
            raise RuntimeError("boom")
        return "v1"

    with anyio.fail_after(5):
        async with Prefetcher(flaky, clock=clock, refresh_after=10, ttl=30) as pf:
            await pf.get("k")
            fail["on"] = True
            clock.advance(20)
            await pf.get("k")  # stale hit, reload
            clock.advance(20)  # the kept value is now past its ttl
            gate.set()
            snap = await pf.wait("k")
            assert snap.status is Status.FAILED
            _check_stats_match(pf, {"k": Status.FAILED})


# -- watchers during cancel / invalidate / close ----------------------------------------


async def test_watch_sees_cancel_as_not_started_then_a_new_run_to_completion() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            seen: list[Status] = []
            async with anyio.create_task_group() as tg:

                async def w() -> None:
                    async for snap in pf.watch("k"):
                        seen.append(snap.status)

                pf.prefetch("k")
                await loader.started.wait()
                tg.start_soon(w)
                await wait_all_tasks_blocked()
                await pf.cancel("k")
                await wait_all_tasks_blocked()
                pf.prefetch("k")
                await wait_all_tasks_blocked()
                loader.release()
            assert seen == [
                Status.RUNNING,
                Status.NOT_STARTED,
                Status.RUNNING,
                Status.COMPLETED,
            ]


async def test_watchers_end_when_the_prefetcher_closes_with_loads_running() -> None:
    loader = GatedLoader()
    ended: list[list[Status]] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as outer, Prefetcher(loader) as pf:

            async def w(key: str) -> None:
                seen: list[Status] = []
                async for snap in pf.watch(key):
                    seen.append(snap.status)
                ended.append(seen)

            pf.prefetch("a")
            pf.prefetch("b", delay=100)
            outer.start_soon(w, "a")
            outer.start_soon(w, "b")
            outer.start_soon(w, "c")
            await wait_all_tasks_blocked()
    assert len(ended) == 3


async def test_watch_of_a_failing_key_ends_with_failed_for_a_hostile_exception() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    gate = anyio.Event()

    async def bad(key: str) -> str:
        await gate.wait()
        raise Unprintable()

    with anyio.fail_after(5):
        async with Prefetcher(bad) as pf:
            seen: list[Any] = []
            pf.prefetch("k")
            async with anyio.create_task_group() as tg:

                async def w() -> None:
                    async for snap in pf.watch("k"):
                        seen.append(snap)

                tg.start_soon(w)
                await wait_all_tasks_blocked()
                gate.set()
            assert [s.status for s in seen] == [Status.RUNNING, Status.FAILED]
            assert seen[-1].error.startswith("Unprintable")


# -- close -------------------------------------------------------------------------------


async def test_close_with_pending_delayed_and_running_loads_under_shutdown_grace() -> None:
    quick_gate = anyio.Event()
    hang = anyio.Event()
    ran: list[str] = []
    outcomes: dict[str, Any] = {}

    async def quick(key: str) -> str:
        ran.append(key)
        await quick_gate.wait()
        return "quick-done"

    async def hanging(key: str) -> str:
        ran.append(key)
        await hang.wait()
        return "never"

    async def queued(key: str) -> str:
        ran.append(key)
        return "queued"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as outer:  # noqa: SIM117
            async with Prefetcher(_value, max_concurrency=2, shutdown_grace=0.2) as pf:

                async def waiter(key: str) -> None:
                    try:
                        outcomes[key] = await pf.wait(key)
                    except BaseException as exc:
                        outcomes[key] = exc

                async def getter(key: str) -> None:
                    try:
                        outcomes["get-" + key] = await pf.get(key)
                    except BaseException as exc:
                        outcomes["get-" + key] = exc

                pf.prefetch("quick", quick, "quick")
                pf.prefetch("hang", hanging, "hang")
                pf.prefetch("queued", queued, "queued")
                pf.prefetch("delayed", queued, "delayed", delay=100)
                for k in ("quick", "hang", "queued", "delayed"):
                    outer.start_soon(waiter, k)
                outer.start_soon(getter, "quick")
                outer.start_soon(getter, "hang")
                await wait_all_tasks_blocked()
                quick_gate.set()  # finishes during the grace
    assert sorted(ran) == ["hang", "quick"]
    assert outcomes["get-quick"] == "quick-done"
    assert isinstance(outcomes["get-hang"], PrefetcherClosed)
    assert isinstance(outcomes["hang"], PrefetcherClosed)
    assert isinstance(outcomes["queued"], PrefetcherClosed)
    assert isinstance(outcomes["delayed"], PrefetcherClosed)
    assert pf.stats().cancelled == 3


async def test_no_load_starts_while_the_prefetcher_closes() -> None:
    clock = FakeClock()
    holder: dict[str, Prefetcher[Any, Any]] = {}
    calls: dict[str, int] = {}
    closing = anyio.Event()

    async def counting(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        return key

    async def during_close(key: str) -> str:
        await closing.wait()
        await anyio.sleep(0.01)
        with contextlib.suppress(PrefetcherClosed):
            await holder["pf"].get("stale", counting, "stale")
        await anyio.lowlevel.checkpoint()
        return "done"

    with anyio.fail_after(5):
        async with Prefetcher(counting, clock=clock, refresh_after=10, shutdown_grace=1.0) as pf:
            holder["pf"] = pf
            await pf.get("stale")
            clock.advance(20)
            pf.prefetch("closer", during_close, "closer")
            await wait_all_tasks_blocked()
            closing.set()
    assert calls == {"stale": 1}


async def test_a_load_that_swallows_close_cancellation_once_lets_close_finish() -> None:
    started = anyio.Event()

    async def stubborn(key: str) -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
            raise
        return "never"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as outer:
            got: list[BaseException] = []
            async with Prefetcher(stubborn) as pf:

                async def g() -> None:
                    try:
                        await pf.get("k")
                    except BaseException as exc:
                        got.append(exc)

                outer.start_soon(g)
                await started.wait()
    assert len(got) == 1 and isinstance(got[0], PrefetcherClosed)


async def test_a_body_exception_leaves_as_itself_with_loads_running_and_grace() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        with pytest.raises(ValueError, match="body") as info:  # noqa: PT012 - the block itself is under test
            async with Prefetcher(loader, shutdown_grace=0.05) as pf:
                pf.prefetch("a")
                pf.prefetch("b", delay=100)
                await loader.started.wait()
                raise ValueError("body")
    assert type(info.value) is ValueError


async def test_a_body_exception_group_leaves_as_itself() -> None:
    loader = GatedLoader()
    eg = ExceptionGroup("body", [ValueError("x")])
    with anyio.fail_after(5):
        with pytest.raises(ExceptionGroup) as info:  # noqa: PT012 - the block itself is under test
            async with Prefetcher(loader) as pf:
                pf.prefetch("a")
                await loader.started.wait()
                raise eg
    assert info.value is eg


async def test_calls_after_close_raise_prefetcher_closed_even_for_a_previous_hit() -> None:
    async with Prefetcher(_value) as pf:
        await pf.get("k")
        w = pf.wrap(_value)
        await w("x")
    with pytest.raises(PrefetcherClosed):
        await pf.get("k")
    with pytest.raises(PrefetcherClosed):
        await pf.serve("k")
    with pytest.raises(PrefetcherClosed):
        await w("x")
    with pytest.raises(PrefetcherClosed):
        w.prefetch("x")
    with pytest.raises(PrefetcherClosed):
        pf.watch("k")
    with pytest.raises(PrefetcherClosed):
        await pf.wait("k")


# -- unclaimed accounting ------------------------------------------------------------------


async def test_unclaimed_counts_a_background_value_replaced_by_a_reload_nobody_was_served() -> None:
    clock = FakeClock()
    with anyio.fail_after(5):
        async with Prefetcher(_value, clock=clock, refresh_after=10) as pf:
            pf.prefetch("k")
            await pf.wait("k")
            clock.advance(20)
            assert pf.prefetch("k") is True  # stale: a background reload
            await pf.wait("k")
            assert pf.stats().unclaimed == 1
            await pf.get("k")
            await pf.invalidate("k")
            assert pf.stats().unclaimed == 1


async def test_a_cancelled_background_reload_keeps_the_unclaimed_value_unclaimed() -> None:
    clock = FakeClock()
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, clock=clock, refresh_after=10) as pf:
            loader.release()
            pf.prefetch("k")
            await pf.wait("k")
            loader.gate = anyio.Event()
            clock.advance(20)
            pf.prefetch("k")
            await wait_all_tasks_blocked()
            assert await pf.cancel("k") is True
            assert (await pf.status("k")).status is Status.COMPLETED
            assert pf.stats().unclaimed == 0
            await pf.invalidate("k")
            assert pf.stats().unclaimed == 1
            loader.release()


# -- ingest adapter ------------------------------------------------------------------------


class _Pipeline:
    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.calls: list[tuple[str, str]] = []

    async def ingest_run(self, project_id: str, run_id: str) -> Any:
        self.calls.append((project_id, run_id))
        await anyio.lowlevel.checkpoint()
        r = self.results[run_id]
        if isinstance(r, BaseException):
            raise r
        return r


async def test_ingest_non_mapping_and_non_json_stats_fail_only_their_run() -> None:
    pipeline = _Pipeline(
        {
            "list": [1, 2],
            "obj": {"x": object()},
            "tuplekey": {(1, 2): 3},
            "ok": {"n": 1},
        }
    )
    with anyio.fail_after(5):
        async with IngestPrefetcher(pipeline) as ing:
            with pytest.raises(TypeError):
                await ing.ingest("p", "list")
            with pytest.raises(CodecError):
                await ing.ingest("p", "obj")
            with pytest.raises(CodecError):
                await ing.ingest("p", "tuplekey")
            assert ing.after_query("p", "obj") is True
            st = await ing.status("p", "obj")
            while st.status in (Status.PENDING, Status.RUNNING):
                await ing.prefetcher.wait(("p", "obj"))
                st = await ing.status("p", "obj")
            assert (
                st.status is Status.FAILED
                and st.error is not None
                and st.error.startswith("CodecError")
            )
            json.dumps(st.to_dict())
            assert (await ing.ingest("p", "ok")).stats == {"n": 1}


async def test_ingest_persisted_stats_that_are_not_json_fail_with_codec_error() -> None:
    pipeline = _Pipeline({"r": {"n": 1}})

    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        return {"bad": object()}

    with anyio.fail_after(5):
        async with IngestPrefetcher(pipeline, persisted_stats=persisted) as ing:
            assert ing.after_query("p", "r") is True
            await ing.prefetcher.wait(("p", "r"))
            st = await ing.status("p", "r")
            json.dumps(st.to_dict())  # must always be ready for json.dumps
            st2 = await ing.status("p", "other")
            json.dumps(st2.to_dict())


async def test_ingest_persisted_stats_not_json_on_click_is_not_served_as_is() -> None:
    pipeline = _Pipeline({"r": {"n": 1}})

    async def persisted(project_id: str, run_id: str) -> Mapping[str, Any] | None:
        return {"bad": {1, 2}}

    with anyio.fail_after(5):
        async with IngestPrefetcher(pipeline, persisted_stats=persisted) as ing:
            try:
                result = await ing.ingest("p", "r")
            except CodecError:
                return
            json.dumps(dict(result.stats))


async def test_after_query_never_raises_and_bad_ids_leave_no_trace() -> None:
    pipeline = _Pipeline({"r": {"n": 1}})
    with anyio.fail_after(5):
        async with IngestPrefetcher(pipeline) as ing:
            assert ing.after_query("", "r") is False
            assert ing.after_query(None, "r") is False  # type: ignore[arg-type]
            assert ing.after_query("p", ["r"]) is False  # type: ignore[arg-type]
            assert ing.stats().total == 0 and ing.stats().prefetches == 0
            with pytest.raises(ValueError, match="run_id"):
                await ing.ingest("p", "  ")
            with pytest.raises(ValueError, match="project_id"):
                await ing.cancel(1, "r")  # type: ignore[arg-type]
            assert ing.stats().total == 0


async def test_after_query_from_a_thread_after_close_returns_false() -> None:
    pipeline = _Pipeline({"r": {"n": 1}})
    async with IngestPrefetcher(pipeline) as ing:
        pass
    assert ing.after_query("p", "r") is False


async def test_ingest_cancel_gives_clicks_load_cancelled_and_other_runs_go_on() -> None:
    gate = anyio.Event()

    class Slow:
        async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
            if run_id == "slow":
                await gate.wait()
            return {"run": run_id}

    with anyio.fail_after(5):
        async with IngestPrefetcher(Slow()) as ing:
            assert ing.after_query("p", "slow") is True
            out: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def click() -> None:
                    try:
                        out.append(await ing.ingest("p", "slow"))
                    except BaseException as exc:
                        out.append(exc)

                tg.start_soon(click)
                await wait_all_tasks_blocked()
                assert await ing.cancel("p", "slow") is True
            assert isinstance(out[0], LoadCancelled)
            assert (await ing.status("p", "slow")).status is Status.NOT_STARTED
            r = await ing.ingest("p", "fast")
            assert r.source == "ran" and r.stats == {"run": "fast"}
            gate.set()


async def test_ingest_pipeline_raising_a_base_exception_fails_only_that_run() -> None:
    class Hostile(BaseException):
        pass

    pipeline = _Pipeline({"bad": Hostile("x"), "ok": {"n": 1}})
    with anyio.fail_after(5):
        async with IngestPrefetcher(pipeline) as ing:
            assert ing.after_query("p", "bad") is True
            await ing.prefetcher.wait(("p", "bad"))
            st = await ing.status("p", "bad")
            assert (
                st.status is Status.FAILED
                and st.error is not None
                and st.error.startswith("Hostile")
            )
            json.dumps(st.to_dict())
            assert (await ing.ingest("p", "ok")).stats == {"n": 1}


def test_ingest_prefetcher_with_a_sync_pipeline_is_a_type_error() -> None:
    class Sync:
        def ingest_run(self, project_id: str, run_id: str) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match="ingest_run"):
        IngestPrefetcher(Sync())  # type: ignore[arg-type]


async def test_wrap_with_unhashable_arguments_is_a_type_error_leaving_no_trace() -> None:
    with anyio.fail_after(5):
        async with Prefetcher() as pf:

            @pf.wrap
            async def f(x: Any) -> Any:
                return x

            with pytest.raises(TypeError, match="hashable"):
                await f([1])
            with pytest.raises(TypeError, match="hashable"):
                f.prefetch([1])
            assert await f(1) == 1
            assert pf.stats().total == 1


async def test_threads_do_not_leak_between_tests() -> None:
    assert threading.current_thread() is threading.main_thread()


async def test_a_loads_protected_cleanup_survives_cancel_on_either_backend(
    anyio_backend: str,
) -> None:
    """On trio an anyio shield protects it; on asyncio a load is a plain asyncio task
    (design.md, "Tasks"), so the cleanup is protected the asyncio way: asyncio.shield."""
    inside = anyio.Event()
    gate = anyio.Event()
    finished = anyio.Event()

    async def rollback() -> None:
        await gate.wait()
        finished.set()

    async def careful(key: str) -> str:
        if anyio_backend == "asyncio":
            await asyncio.shield(_set_then(inside, rollback()))
        else:
            with anyio.CancelScope(shield=True):
                inside.set()
                await rollback()
        await anyio.sleep_forever()
        return "never"

    with anyio.fail_after(5):
        async with Prefetcher(careful) as pf:
            pf.prefetch("k")
            await inside.wait()
            assert await pf.cancel("k") is True
            await wait_all_tasks_blocked()
            gate.set()
            await finished.wait()


async def _set_then(event: anyio.Event, then: Any) -> None:
    event.set()
    await then


async def test_a_cancelled_load_still_running_its_cleanup_holds_its_background_slot() -> None:
    cleanup_gate = anyio.Event()
    in_cleanup = anyio.Event()
    running: list[str] = []
    peak = 0

    async def load(key: str) -> str:
        nonlocal peak
        running.append(key)
        peak = max(peak, len(running))
        try:
            if key == "a":
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        in_cleanup.set()
                        await cleanup_gate.wait()
            return key
        finally:
            running.remove(key)

    with anyio.fail_after(5):
        async with Prefetcher(load, max_concurrency=1) as pf:
            pf.prefetch("a")
            pf.prefetch("b")
            await wait_all_tasks_blocked()
            await pf.cancel("a")
            await in_cleanup.wait()
            await wait_all_tasks_blocked()
            cleanup_gate.set()
            await pf.wait("b")
            assert peak == 1


class _HostileRepr:
    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HostileRepr)

    def __repr__(self) -> str:
        raise RuntimeError("repr of this key raises")


async def test_cancel_of_a_key_whose_repr_raises_gives_waiters_load_cancelled() -> None:
    loader = GatedLoader()
    key = _HostileRepr()
    with anyio.fail_after(5):
        async with Prefetcher(loader) as pf:
            out: list[BaseException] = []
            async with anyio.create_task_group() as tg:

                async def g() -> None:
                    try:
                        await pf.get(key)
                    except BaseException as exc:
                        out.append(exc)

                tg.start_soon(g)
                await loader.started.wait()
                assert await pf.cancel(key) is True
            assert len(out) == 1 and isinstance(out[0], LoadCancelled)
            assert (await pf.status(key)).status is Status.NOT_STARTED
            loader.release()


async def test_invalidate_of_a_pending_key_whose_repr_raises_drops_it() -> None:
    key = _HostileRepr()
    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            pf.prefetch(key, delay=100)
            assert await pf.invalidate(key) is True
            assert (await pf.status(key)).status is Status.NOT_STARTED
            _check_stats_match(pf, {key: Status.NOT_STARTED})


async def test_a_reentrant_get_of_a_key_whose_repr_raises_is_a_reentrant_load_error() -> None:
    holder: dict[str, Prefetcher[Any, Any]] = {}

    async def selfish(key: Any) -> Any:
        return await holder["pf"].get(key)

    key = _HostileRepr()
    with anyio.fail_after(5):
        async with Prefetcher(selfish) as pf:
            holder["pf"] = pf
            with pytest.raises(ReentrantLoadError):
                await pf.get(key)


async def test_invalidate_of_a_queued_load_drops_it_and_wakes_its_waiters() -> None:
    loader = GatedLoader()
    with anyio.fail_after(5):
        async with Prefetcher(loader, max_concurrency=1) as pf:
            pf.prefetch("a")
            pf.prefetch("b")
            waited: list[Any] = []
            async with anyio.create_task_group() as tg:

                async def w() -> None:
                    waited.append(await pf.wait("b"))

                tg.start_soon(w)
                await wait_all_tasks_blocked()
                assert await pf.invalidate("b") is True
            assert waited[0].status is Status.NOT_STARTED
            _check_stats_match(pf, await _statuses(pf, ["a", "b"]))
            loader.release()
            await pf.wait("a")
            assert loader.calls == {"a": 1}


async def test_a_failing_admission_limit_pauses_background_loads_never_demanded_ones() -> None:
    from prefetch_ingest import FixedAdmission

    class Broken(FixedAdmission):
        def limit(self) -> int | None:
            raise RuntimeError("admission broke")

    with anyio.fail_after(5):
        async with Prefetcher(_value, admission=Broken(1)) as pf:
            assert pf.prefetch("k") is True  # the call is not the admission's victim
            assert (await pf.status("k")).status is Status.PENDING  # paused, logged
            assert await pf.get("k") == await _value("k")  # a demanded load never waits
