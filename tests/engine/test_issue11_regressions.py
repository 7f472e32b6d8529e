"""Regression tests for what users hit in engine v1 (issue "Engine v2").

Each test is named after the behaviour the contract promises; each failed on
the v1 engine (commit 82dd55b) before the rewrite.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from prefetch_ingest import Prefetcher, PrefetcherClosed, Status, report_progress
from prefetch_ingest.ingest import IngestPrefetcher
from tests.helpers import FakeClock, GatedLoader

pytestmark = pytest.mark.anyio


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str() of this exception raises")


class Hostile(BaseException):
    """A BaseException subclass that is neither KeyboardInterrupt nor SystemExit."""


async def test_a_cancelled_error_the_prefetcher_did_not_cause_fails_only_that_load(
    anyio_backend: str,
) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("a foreign CancelledError exists only on asyncio")
    other = GatedLoader()
    body_went_on = False

    async def awaits_a_cancelled_future(key: str) -> str:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        fut.cancel()  # its owner cancelled it
        return await fut

    with anyio.fail_after(5):
        async with Prefetcher(other) as pf:
            assert pf.prefetch("other") is True
            await other.started.wait()
            with pytest.raises(asyncio.CancelledError):
                await pf.get("bad", awaits_a_cancelled_future, "bad")
            await anyio.lowlevel.checkpoint()  # not cancelled: the body goes on
            body_went_on = True
            other.release()
            assert await pf.get("other") == ("value", "other", 1)
            assert (await pf.status("bad")).status is Status.FAILED
            assert await pf.get("later", _value, "later") == "later"
    assert body_went_on


async def _value(key: str) -> str:
    return key


async def test_an_exception_whose_str_raises_fails_only_that_load_and_status_reports_it() -> None:
    async def bad(key: str) -> str:
        raise Unprintable()

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            with pytest.raises(Unprintable):
                await pf.get("k", bad, "k")
            snap = await pf.status("k")
            assert snap.status is Status.FAILED
            assert snap.error is not None and snap.error.startswith("Unprintable")
            assert await pf.get("j") == "j"


async def test_a_base_exception_subclass_from_a_load_fails_only_that_load() -> None:
    async def bad(key: str) -> str:
        raise Hostile()

    with anyio.fail_after(5):
        async with Prefetcher(_value) as pf:
            with pytest.raises(Hostile):
                await pf.get("k", bad, "k")
            assert await pf.get("j") == "j"


async def test_an_exception_in_the_body_of_a_prefetcher_leaves_as_itself() -> None:
    async def body() -> None:
        async with Prefetcher(_value) as pf:
            pf.prefetch("k")
            raise KeyError("mine")

    with pytest.raises(KeyError) as info:
        await body()
    assert type(info.value) is KeyError


class _Pipeline:
    async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
        return {"n": 1}


async def test_an_exception_in_the_body_of_an_ingest_prefetcher_leaves_as_itself() -> None:
    with pytest.raises(KeyError) as info:
        async with IngestPrefetcher(_Pipeline()):
            raise KeyError("mine")
    assert type(info.value) is KeyError


async def test_system_exit_from_a_load_cancels_everything_and_leaves_the_block_as_itself() -> None:
    other = GatedLoader()

    async def exits(key: str) -> str:
        raise SystemExit(3)

    async def body() -> None:
        async with Prefetcher(other) as pf:
            pf.prefetch("other")
            await other.started.wait()
            pf.prefetch("x", exits, "x")
            await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(SystemExit) as info:
        await body()
    assert type(info.value) is SystemExit and info.value.code == 3


async def test_prefetch_from_a_worker_thread_fails_and_leaves_no_trace() -> None:
    loader = GatedLoader(gated=False)
    async with Prefetcher(loader) as pf:
        errors: list[BaseException] = []

        def in_thread() -> None:
            try:
                pf.prefetch("k")
            except Exception as exc:  # the failure we expect
                errors.append(exc)

        await anyio.to_thread.run_sync(in_thread)
        assert len(errors) == 1 and "thread" in str(errors[0])
        assert (await pf.status("k")).status is Status.NOT_STARTED
        assert pf.stats().prefetches == 0 and pf.stats().total == 0
        with anyio.fail_after(5):
            assert await pf.get("k") == ("value", "k", 1)


async def test_after_query_from_a_worker_thread_returns_false_and_leaves_no_trace() -> None:
    async with IngestPrefetcher(_Pipeline()) as ingest:
        started = await anyio.to_thread.run_sync(ingest.after_query, "p", "r")
        assert started is False
        assert (await ingest.status("p", "r")).status is Status.NOT_STARTED
        with anyio.fail_after(5):
            result = await ingest.ingest("p", "r")
        assert result.source == "ran" and result.stats == {"n": 1}


async def test_watch_never_reports_a_pending_load_detached_by_invalidate() -> None:
    loader = GatedLoader()
    async with Prefetcher(loader, max_concurrency=1) as pf:
        pf.prefetch("a")  # takes the only slot
        pf.prefetch("b")  # pending behind it
        seen: list[Status] = []
        with anyio.fail_after(5):
            async with pf.watch("b") as w:
                first = await w.__anext__()
                seen.append(first.status)
                assert await pf.invalidate("b") is True
                item = await w.__anext__()
                seen.append(item.status)
                loader.release()  # "a" completes; the detached "b" must not start
                await pf.get("a")
                await wait_all_tasks_blocked()
                assert pf.prefetch("b") is True  # a new load of b
                while True:
                    item = await w.__anext__()
                    seen.append(item.status)
                    if item.status.terminal:
                        break
        assert seen[:2] == [Status.PENDING, Status.NOT_STARTED]
        assert seen[-1] is Status.COMPLETED
        assert loader.calls["b"] == 1


async def test_watch_never_reports_a_progress_reporting_load_detached_by_invalidate() -> None:
    gate = anyio.Event()
    step = anyio.Event()
    finished = anyio.Event()

    async def reporting(key: str) -> str:
        report_progress(1, 10)
        step.set()
        await gate.wait()
        report_progress(5, 10)
        finished.set()
        return "old"

    async with Prefetcher(_value) as pf:
        with anyio.fail_after(5):
            pf.prefetch("k", reporting, "k")
            await step.wait()
            async with pf.watch("k") as w:
                assert (await w.__anext__()).status is Status.RUNNING
                await pf.invalidate("k")
                assert (await w.__anext__()).status is Status.NOT_STARTED
                gate.set()  # the detached load reports progress and completes
                await finished.wait()
                await wait_all_tasks_blocked()
                received: list[Any] = []
                async with anyio.create_task_group() as tg:

                    async def next_item() -> None:
                        received.append(await w.__anext__())

                    tg.start_soon(next_item)
                    await wait_all_tasks_blocked()  # an item queued would be taken by now
                    tg.cancel_scope.cancel()
        assert received == [], f"the detached load was reported: {received}"


async def test_the_eta_mean_counts_only_successful_loads() -> None:
    clock = FakeClock()
    gate = anyio.Event()

    async def timed(key: str) -> str:
        await gate.wait()
        if key.startswith("fail"):
            raise ValueError(key)
        return key

    async with Prefetcher(_value, clock=clock) as pf:
        with anyio.fail_after(5):
            pf.prefetch("ok", timed, "ok")
            pf.prefetch("fail", timed, "fail")
            await wait_all_tasks_blocked()
            clock.advance(10)  # "ok" takes 10 s
            gate.set()
            await pf.wait("ok")
            await pf.wait("fail")
            gate2 = anyio.Event()

            async def slow_fail(key: str) -> str:
                await gate2.wait()
                raise ValueError(key)

            pf.prefetch("fail2", slow_fail, "fail2")
            await wait_all_tasks_blocked()
            clock.advance(1000)  # a failed load of 1000 s must not count
            gate2.set()
            await pf.wait("fail2")

            step = anyio.Event()
            end = anyio.Event()

            async def reporting(key: str) -> str:
                report_progress(0)
                step.set()
                await end.wait()
                return key

            pf.prefetch("now", reporting, "now")
            await step.wait()
            clock.advance(4)
            snap = await pf.status("now")
            end.set()
            await pf.wait("now")
    assert snap.progress is not None and snap.progress.eta == pytest.approx(6.0)


async def test_wait_and_watch_after_a_failed_refresh_that_kept_the_value_say_completed() -> None:
    clock = FakeClock()
    calls = 0
    gate = anyio.Event()

    async def load(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            await gate.wait()
            raise ValueError("refresh failed")
        return f"v{calls}"

    async with Prefetcher(load, refresh_after=10, clock=clock) as pf:
        with anyio.fail_after(5):
            assert await pf.get("k") == "v1"
            clock.advance(11)
            assert await pf.get("k") == "v1"  # served stale, reload started
            async with pf.watch("k") as w:
                first = await w.__anext__()
                gate.set()
                snap = await pf.wait("k")
                items = [first] + [s async for s in w]
            status = await pf.status("k")
    assert status.status is Status.COMPLETED and status.result == "v1"
    assert snap.status is Status.COMPLETED and snap.result == "v1"
    assert items[-1].status is Status.COMPLETED and items[-1].result == "v1"


async def test_a_failure_keeps_no_exception_object_alive_past_failure_ttl() -> None:
    class Big(Exception):
        pass

    refs: list[weakref.ref[BaseException]] = []

    async def bad(key: str) -> str:
        exc = Big("boom")
        refs.append(weakref.ref(exc))
        raise exc

    async with Prefetcher(_value) as pf:  # the defaults: failure_ttl=0, ttl 24 h
        with pytest.raises(Big):
            await pf.get("k", bad, "k")
        gc.collect()
        assert refs[0]() is None, "the failure record keeps the exception (and its frames) alive"
        snap = await pf.status("k")
        assert snap.status is Status.FAILED and snap.error == "Big: boom"


async def test_a_failure_within_failure_ttl_is_re_raised_as_the_same_object_then_dropped() -> None:
    clock = FakeClock()
    refs: list[weakref.ref[BaseException]] = []

    class Boom(ValueError):
        pass

    async def bad(key: str) -> str:
        exc = Boom("boom")
        refs.append(weakref.ref(exc))
        raise exc

    async with Prefetcher(_value, failure_ttl=5, clock=clock) as pf:
        with pytest.raises(Boom) as first:
            await pf.get("k", bad, "k")
        with pytest.raises(Boom) as again:
            await pf.get("k", bad, "k")
        assert again.value is first.value and len(refs) == 1
        del first, again
        clock.advance(6)
        pf.sweep()
        gc.collect()
        assert refs[0]() is None
        snap = await pf.status("k")
        assert snap.status is Status.FAILED and snap.error == "Boom: boom"


async def test_failures_are_evicted_before_completed_values() -> None:
    async def bad(key: str) -> str:
        raise ValueError(key)

    async with Prefetcher(_value, max_entries=3) as pf:
        assert await pf.get("v1") == "v1"
        assert await pf.get("v2") == "v2"
        with pytest.raises(ValueError):
            await pf.get("f1", bad, "f1")
        assert await pf.get("v3") == "v3"  # over the bound: the failure goes, not v1
        assert (await pf.status("v1")).status is Status.COMPLETED
        assert (await pf.status("f1")).status is Status.NOT_STARTED


async def test_ingest_click_served_the_kept_value_during_a_refresh_reload_is_a_hit() -> None:
    clock = FakeClock()
    gate = anyio.Event()

    class Slow:
        calls = 0

        async def ingest_run(self, project_id: str, run_id: str) -> Mapping[str, Any]:
            Slow.calls += 1
            if Slow.calls > 1:
                await gate.wait()
            return {"n": Slow.calls}

    async with IngestPrefetcher(Slow(), refresh_after=10, clock=clock) as ingest:
        with anyio.fail_after(5):
            assert (await ingest.ingest("p", "r")).source == "ran"
            clock.advance(11)
            first = await ingest.ingest("p", "r")  # starts the reload, served the old value
            second = await ingest.ingest("p", "r")  # reload still running
            gate.set()
    assert (first.source, first.stats) == ("hit", {"n": 1})
    assert (second.source, second.stats) == ("hit", {"n": 1})


async def test_calls_after_close_raise_prefetcher_closed() -> None:
    async with Prefetcher(_value) as pf:
        pass
    with pytest.raises(PrefetcherClosed):
        await pf.get("k")


def test_threads_exist() -> None:
    assert threading.current_thread() is threading.main_thread()
